"""``llmprune.load``: one call for dense and compressed llmprune checkpoints (and plain ones).

A dense folder or Hub id goes through ``AutoModelForCausalLM.from_pretrained``. A compressed
folder is built empty from its config (no random initialisation) and filled tensor by tensor:
each weight is decoded, copied into its parameter and dropped, so no dense copy of the whole
model ever sits in memory beside it. The tokenizer is separate, as in transformers:
``AutoTokenizer.from_pretrained(path)`` reads the same folder.

After the model is built, every function in :data:`LOAD_HOOKS` runs with
``(model, metadata, path)``, ``metadata`` being the checkpoint's ``llmprune`` block (``{}`` when
it has none). This is the one place where what a checkpoint records beyond its weights is put
back on the model; the first hook installs activation-sparsity thresholds
(``llmprune.activation.apply_from_config``) when the metadata has an ``activation`` block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..activation.apply import apply_from_config, use_sparse_decode
from ..loading.integrity import CheckpointFileError
from ..loading.models import DTYPES, ModelLoadError, load_pretrained, load_tokenizer, resolve_dtype
from ..loading.shards import check_checkpoint
from .compressed import check_compressed, decompress, dense_config
from .format import CompressedFormatError, is_compressed, iter_decoded, layout_of, read_config

log = logging.getLogger(__name__)

LoadHook = Callable[[nn.Module, dict, Path], None]


def install_activation(model: nn.Module, metadata: dict, path: Path) -> None:
    """Install the activation-sparsity thresholds recorded under ``llmprune.activation``."""
    if not metadata.get("activation"):
        return
    apply_from_config(model)


# Run in order after the model is built and its weights are in place (before .to(device)).
# Extend with LOAD_HOOKS.append(fn); fn(model, metadata, path) may install modules on the model.
LOAD_HOOKS: list[LoadHook] = [install_activation]


class LoadError(RuntimeError):
    """The checkpoint could not be loaded; the message says why and what to do."""


def _resolve(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r} is not supported; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _load_dense(source: str, dtype, trust_remote_code: bool, allow_pickle: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except OSError as e:
        msg = str(e).splitlines()[0] if str(e) else repr(e)
        hint = " (pass allow_pickle=True to read .bin weights you trust)" if "safetensors" in msg else ""
        raise LoadError(f"could not load {source!r}: {msg}{hint}") from e


def _load_compressed(folder: Path, config: dict[str, Any], dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM, GenerationConfig
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    layout = layout_of(config)
    hf_config = dense_config(folder, config)
    stored = {e["dtype"] for e in layout["tensors"].values() if e["shape"] and len(e["shape"]) >= 2}
    if dtype == "auto":
        dtype = getattr(torch, next(iter(stored))) if len(stored) == 1 else torch.float32
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # under no_init_weights the tied weights (lm_head = embeddings) are not tied yet
    state = model.state_dict(keep_vars=True)  # name -> Parameter/buffer, tied names share one tensor
    if not set(layout["tensors"]) <= set(state):
        # The class renames or fuses checkpoint tensors on load (transformers 5 MoE experts: per-expert
        # tensors on disk, one fused tensor in memory): let transformers do that from a dense copy on disk.
        del model, state
        return _load_via_dense_copy(folder, dtype, trust_remote_code)
    filled: set[int] = set()
    unexpected = []
    with torch.no_grad():
        into = {n: t.data for n, t in state.items()}  # decoded straight into the parameters where dtypes agree
        for name, W in iter_decoded(folder, layout, into=into):
            target = state.get(name)
            if target is None:
                unexpected.append(name)
                continue
            if target.shape != W.shape:
                raise LoadError(f"{str(folder)!r}: tensor {name!r} has shape {tuple(W.shape)}, the model expects "
                                f"{tuple(target.shape)}; the checkpoint does not match its config.json")
            if W.data_ptr() != target.data_ptr():
                target.copy_(W)
            filled.add(id(target))
            del W
    missing = [n for n, t in state.items() if id(t) not in filled]  # state_dict: persistent tensors only
    if missing:
        raise LoadError(f"{str(folder)!r} lacks {len(missing)} weight(s) the model needs (e.g. {missing[0]}); "
                        "the checkpoint is incomplete or does not match its config.json")
    if unexpected:
        log.warning("%s: %d stored tensor(s) the model has no place for, ignored (e.g. %s)",
                    folder, len(unexpected), unexpected[0])
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def _load_via_dense_copy(folder: Path, dtype, trust_remote_code: bool) -> nn.Module:
    """Decode into a temporary dense folder (on disk, tensor by tensor) and load that with transformers."""
    import shutil
    import tempfile


    log.info("%s: tensor names differ from the model's (converted on load); loading through a dense copy on disk",
             folder)
    tmp = Path(tempfile.mkdtemp(prefix="llmprune-load-"))
    try:
        dense = decompress(folder, tmp / "dense")
        model = _load_dense(str(dense), dtype, trust_remote_code, allow_pickle=False)
        model.config.name_or_path = str(folder)
        return model.eval()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    hooks: bool = True,
    sparse_decode: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a causal LM from a dense or compressed llmprune checkpoint (or any transformers one).

    Args:
        path: checkpoint folder, or a Hub id (dense checkpoints only: a compressed one must be local).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``; None: as stored.
            A compressed checkpoint decodes in its stored dtype, then casts, so nothing is lost.
        device: where to put the model (``"cpu"``, ``"cuda"``); None leaves it on the CPU.
        trust_remote_code, allow_pickle: as for :func:`llmprune.prune` (custom code, .bin weights).
        hooks: run :data:`LOAD_HOOKS` (e.g. install recorded activation thresholds); False skips them.
        sparse_decode: with activation thresholds, batch-1 CPU decode reads only the weight rows of the
            inputs that survive (weights stored transposed; see :mod:`llmprune.activation.apply`).
            On the CPU it also selects eager attention unless ``attn_implementation`` says otherwise:
            one query against the cache runs faster there than through sdpa's CPU kernel
            (eval/results/activation.md).
        attn_implementation: transformers' attention implementation (``"eager"``, ``"sdpa"``, ...);
            None keeps the checkpoint's (or the default above).

    Returns the model in eval mode. The tokenizer loads separately with
    ``AutoTokenizer.from_pretrained(path)``.
    """
    folder = Path(path).expanduser()
    torch_dtype = _resolve(dtype)
    config: dict[str, Any] = {}
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise LoadError(f"folder {str(folder)!r} has no config.json; is it a Hugging Face checkpoint folder?")
    elif Path(str(path)).exists() or str(path).startswith((".", "/", "~")):
        raise LoadError(f"{str(path)!r} is not a folder; give a checkpoint folder or a Hub id")
    try:
        if folder.is_dir():  # a damaged or inconsistent folder is named before anything is read from it
            config = read_config(folder)
            if layout_of(config) is not None:
                check_compressed(folder, config, shapes=False)  # the loader compares each shape as it fills the model
            else:
                check_checkpoint(folder, trust_remote_code)
        if layout_of(config) is not None:
            model = _load_compressed(folder, config, torch_dtype, trust_remote_code)
        else:
            model = _load_dense(str(folder) if folder.is_dir() else str(path), torch_dtype,
                                trust_remote_code, allow_pickle)
    except (CompressedFormatError, CheckpointFileError) as e:
        raise LoadError(str(e)) from e
    if torch_dtype != "auto" and any(p.dtype != torch_dtype for p in model.parameters() if p.is_floating_point()):
        model.to(torch_dtype)
    if hooks:
        metadata = getattr(model.config, "llmprune", None)
        metadata = metadata if isinstance(metadata, dict) else {}
        for hook in LOAD_HOOKS:
            hook(model, metadata, folder)
    if sparse_decode:
        use_sparse_decode(model)
        if attn_implementation is None and (device is None or torch.device(device).type == "cpu"):
            attn_implementation = "eager"
            log.info("sparse_decode: eager attention (faster than sdpa for one-token CPU decode steps); "
                     "pass attn_implementation= to choose another")
    if attn_implementation is not None:
        _set_attention(model, attn_implementation)
    if device is not None:
        model.to(device)
    return model


def _set_attention(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise LoadError(f"attn_implementation={name!r}: this transformers version cannot switch a loaded model's "
                        "attention; upgrade transformers or leave attn_implementation unset")
    try:
        setter(name)
    except (ValueError, ImportError) as e:
        raise LoadError(f"attn_implementation={name!r} is not available for {type(model).__name__}: {e}") from e


def load_model(model: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """``(model, tokenizer, source)`` on the CPU from a Hub id, a local folder (dense or llmprune's compressed
    format) or, with ``model=None``, the embedded default SmolLM2-135M-Instruct; ``source`` is the resolved
    path or Hub id. Use :func:`load` for a pruned checkpoint with everything it records installed (activation
    thresholds, sparse decode); here only a compressed folder goes through it."""
    local = Path(model).expanduser() if model is not None else None
    if local is not None and local.is_dir() and (local / "config.json").is_file():
        if is_compressed(local):  # llmprune's compressed sparse format: transformers cannot read it
            tokenizer = load_tokenizer(local, trust_remote_code)  # a missing one stops the run before the weights
            try:
                m = load(local, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
            except LoadError as e:
                raise ModelLoadError(str(e)) from e
            return m, tokenizer, str(local)
        check_checkpoint(local, trust_remote_code)  # damaged or inconsistent files, named before anything loads
    return load_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
