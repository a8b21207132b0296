"""Perplexity as the pruning papers compute it (SparseGPT, Wanda).

- ``wikitext2``: the raw test split joined with ``"\\n\\n"``, tokenized once.
- ``c4``: the first 1,100 documents of the English validation shard 0 joined with ``" "``,
  tokenized once and cut to ``256 × seqlen`` tokens, from the Hub only. Offline it is refused: the
  data dir's C4 slice is the offline calibration source of ``c4``, whose sampler may draw any of its
  documents (so a held-out part cannot be set aside without changing the calibration windows), and it
  is not validation shard 0, so a perplexity on it would score calibration text and compare with
  nothing published. A file of held-out text can be evaluated by path instead.
- a ``.txt`` file (its text) or a ``.jsonl``/``.json`` file (records' ``text`` joined with
  ``"\\n\\n"``).

The token stream is cut into non-overlapping windows of ``seqlen`` tokens (the tail shorter than
a window is dropped); perplexity is ``exp`` of the mean next-token NLL over all scored tokens
(``seqlen - 1`` per window), with the log-softmax taken in float32.

A model with activation thresholds installed is scored by one of two protocols
(``activation_protocol``), whatever positions its thresholds apply to when it generates:

- ``all`` (llmprune's): the windows above, every position of every window thresholded, every token
  scored, so every scored token saw only sparse activations, and so did its whole context;
- ``teal``: TEAL's ``utils/eval_ppl.py`` with its model's ``SparsifyFn(apply_prefill=True)``: windows
  of ``seqlen + 512`` tokens starting every 512 tokens (the tail shorter than a window dropped), the
  last 512 tokens of each scored, the last half of each window's positions thresholded (the first
  half dense, as a prompt before decode steps). The scored tokens are all thresholded; their context
  is dense for its first half. A dense model scored by ``teal`` uses the same windows (its reference).

A result names its text without local paths (``source``) and fingerprints it: ``data_sha256`` is the
sha256 prefix of the local file read (so that results can tell when a perplexity was measured on the
calibration data, see :mod:`.results`), ``fingerprint`` that of the scored token windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..activation.apply import installed
from ..calibration import file_sha256, read_records, resolve_data_dir
from ..loading.models import cache_dir
from ..runtime.files import torch_save_atomic
from ..runtime.hub import hub_unreachable, offline_mode

log = logging.getLogger(__name__)

PPL_DATASETS = ("wikitext2", "c4")
C4_LOCAL = "c4/c4_validation_2k.jsonl"  # the data dir's C4 slice: offline calibration only
C4_HUB_FILE = "en/c4-validation.00000-of-00008.json.gz"  # allenai/c4, as in the papers' code
C4_DOCS = 1100
C4_WINDOWS = 256
ACTIVATION_PROTOCOLS = ("all", "teal")
TEAL_SCORED = 512  # TEAL's utils/eval_ppl.py window_size: tokens scored per window, and the stride


class DatasetError(ValueError):
    """A perplexity dataset is unknown or cannot be read; the message says what to do."""


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    nll: float  # mean NLL per scored token
    seqlen: int
    windows: int
    tokens: int  # scored tokens
    fingerprint: str  # sha256 prefix of the evaluated token ids
    source: str  # where the text came from
    comparable: bool  # False: not comparable with published numbers (see results: overlaps_calibration)
    seconds: float
    data_sha256: str | None = None  # sha256 prefix of the local file read; None from the Hub
    protocol: str | None = None  # activation thresholds installed: 'all' or 'teal' (see the module docstring)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TextSource:
    name: str
    text: str
    source: str
    comparable: bool = True
    max_tokens_windows: int | None = None  # C4: keep the first N windows' worth of tokens
    sha256: str | None = None  # of the local file read


def wikitext2_test_text(data_dir: str | Path | None = None) -> str:
    """WikiText-2 raw test split joined with ``"\\n\\n"``: local copy first, else the Hub."""
    return load_text("wikitext2", data_dir).text


def _read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    rows = read_records(path, error=DatasetError)
    try:
        return [r[field] for r in rows]
    except (KeyError, TypeError):
        raise DatasetError(f"{path}: records have no {field!r} field; give a file whose records have 'text'") from None


def c4_unavailable(root: Path | None, hub_error: Exception | None = None) -> DatasetError:
    """Why C4 perplexity cannot run without the Hub, and what to evaluate instead."""
    local = root / C4_LOCAL if root is not None else None
    why = (f"; the data dir's {C4_LOCAL} is the offline calibration source of 'c4', never scored (nor the papers' "
           "shard)" if local is not None and local.is_file() else "")
    reason = (str(hub_error) if isinstance(hub_error, ConnectionError) else
              f"{type(hub_error).__name__}: {hub_error}" if hub_error else "offline mode is set")
    return DatasetError(f"c4 perplexity needs the Hub (allenai/c4 {C4_HUB_FILE}) and could not reach it ({reason})"
                        f"{why}; offline, evaluate wikitext2 or a .txt/.jsonl file of held-out text")


def load_text(name: str, data_dir: str | Path | None = None) -> TextSource:
    """The text of a perplexity dataset: ``wikitext2``, ``c4`` or a ``.txt``/``.jsonl``/``.json`` path."""
    root = resolve_data_dir(data_dir)  # --data-dir, else $LLMPRUNE_DATA_DIR; an error if it does not exist
    if name == "wikitext2":
        if root is not None and (root / "wikitext2" / "raw" / "wiki.test.raw").is_file():
            path = root / "wikitext2" / "raw" / "wiki.test.raw"
            # the file's lines are the rows of the HF dataset's test split
            text = "\n\n".join(path.read_text(encoding="utf-8").split("\n")[:-1])
            return TextSource(name, text, f"local copy {path.name}", sha256=file_sha256(path))
        rows = _hub_rows("wikitext", "wikitext-2-raw-v1", "test", None, root, "wikitext2/raw/wiki.test.raw")
        return TextSource(name, "\n\n".join(rows), "hub:wikitext/wikitext-2-raw-v1:test")
    if name == "c4":
        hub_error = None
        if not offline_mode():
            try:
                rows = _hub_rows("allenai/c4", None, "validation", {"validation": C4_HUB_FILE}, root, None, limit=C4_DOCS)
                return TextSource(name, " ".join(rows[:C4_DOCS]), f"hub:allenai/c4/{C4_HUB_FILE}",
                                  max_tokens_windows=C4_WINDOWS)
            except DatasetError as e:
                hub_error = e.__cause__ or e  # what the Hub answered, not the message wrapped around it
        raise c4_unavailable(root, hub_error)
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".jsonl", ".json"):
        if not path.is_file():
            raise DatasetError(f"perplexity file {name!r} does not exist")
        sha256 = file_sha256(path)
        if path.suffix == ".txt":
            return TextSource(path.name, path.read_text(encoding="utf-8"), f"file {path.name}", sha256=sha256)
        return TextSource(path.name, "\n\n".join(_read_jsonl_texts(path)), f"file {path.name}", sha256=sha256)
    raise DatasetError(
        f"unknown perplexity dataset {name!r}; choose one of: {', '.join(PPL_DATASETS)}, "
        "or give a .txt/.jsonl/.json file"
    )


def _hub_rows(path: str, name: str | None, split: str, data_files: dict | None, root: Path | None,
              local_hint: str | None, limit: int | None = None) -> list[str]:
    from datasets import load_dataset

    try:
        why = hub_unreachable()
        if why is not None:  # fail at once, not after the Hub client's retries
            raise ConnectionError(f"no connection: {why}")
        if limit is not None and data_files is not None:
            ds = load_dataset(path, name, data_files=data_files, split=split, streaming=True)
            return [r["text"] for _, r in zip(range(limit), ds)]
        return list(load_dataset(path, name, data_files=data_files, split=split)["text"])
    except Exception as e:  # noqa: BLE001 - any failure to reach or read the Hub
        hint = f"a data dir with {local_hint}" if local_hint else "the Hub"
        raise DatasetError(
            f"{path} could not be loaded from the Hub ({type(e).__name__}: {e}); data dir: "
            f"{str(root) if root else 'not set'}. Pass --data-dir (or LLMPRUNE_DATA_DIR) pointing at {hint}"
        ) from e


# ---------------------------------------------------------------------------------------------
# Tokenization, once per (tokenizer, text)
# ---------------------------------------------------------------------------------------------
_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    desc = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())[:1000])
    desc += repr(getattr(tokenizer, "add_bos_token", None)) + type(tokenizer).__name__
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def tokenize_once(tokenizer, text: str) -> torch.Tensor:
    """``tokenizer(text).input_ids [T]``, cached in memory and under ``$LLMPRUNE_CACHE/tokens``."""
    key = (_tokenizer_key(tokenizer), hashlib.sha256(text.encode()).hexdigest()[:24])
    if key in _TOKEN_CACHE:
        return _TOKEN_CACHE[key]
    path = cache_dir() / "tokens" / f"{key[0]}-{key[1]}.pt"
    ids = None
    if path.is_file():
        try:
            ids = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
            ids = None
    if ids is None:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum" is intended here
        try:
            ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)  # [T]
        finally:
            hf_logging.set_verbosity(verbosity)
        try:
            torch_save_atomic(path, ids)
        except OSError as e:
            log.debug("token cache not written (%s)", e)
    _TOKEN_CACHE[key] = ids
    return ids


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
CE_CHUNK_ELEMENTS = 1 << 22  # logits per cross-entropy call (16 MB in float32)


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, device: torch.device | None = None,
               progress: bool = False, desc: str = "perplexity", score_last: int | None = None) -> float:
    """Summed next-token NLL of ``windows [n, L]`` under ``model`` (float32 log-softmax); of the last
    ``score_last`` tokens of each window only, when given."""
    from tqdm.auto import tqdm

    device = device if device is not None else next(model.parameters()).device
    n, L = windows.shape
    total = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=n * L, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    for b in range(0, n, batch_size):
        x = windows[b : b + batch_size].to(device)  # [b, L]
        logits = model(input_ids=x, use_cache=False).logits  # [b, L, V]
        first = 0 if score_last is None else L - 1 - score_last  # the first scored prediction
        flat, target = logits[:, first:-1].flatten(0, 1), x[:, first + 1:].flatten()  # [b(L-1), V], [b(L-1)]
        # cross_entropy = fused log-softmax + gather, in float32 whatever the model's dtype, over
        # rows of ~16 MB: the log-softmax temporaries stay small (a [L, V] copy would be fresh,
        # page-faulted memory for every window)
        rows = max(16, CE_CHUNK_ELEMENTS // flat.shape[1])
        for r in range(0, flat.shape[0], rows):
            total += F.cross_entropy(flat[r : r + rows].float(), target[r : r + rows], reduction="sum").double().cpu()
        del logits, flat
        bar.update(x.numel())
    bar.close()
    return float(total)


def perplexity(
    model,
    tokenizer=None,
    text: str | None = None,
    input_ids: torch.Tensor | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = False,
    dataset: str = "text",
    source: str = "",
    comparable: bool = True,
    data_sha256: str | None = None,
    activation_protocol: str = "all",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (tokenized once) or on a token stream ``input_ids [T]``;
    ``activation_protocol`` ('all' or 'teal', see the module docstring) for a model with activation
    thresholds, and for the dense reference of 'teal'."""
    if activation_protocol not in ACTIVATION_PROTOCOLS:
        raise ValueError(f"unknown activation protocol {activation_protocol!r}; choose one of: "
                         f"{', '.join(ACTIVATION_PROTOCOLS)}")
    t0 = time.perf_counter()
    if input_ids is None:
        if text is None or tokenizer is None:
            raise ValueError("give either input_ids or both text and tokenizer")
        input_ids = tokenize_once(tokenizer, text)  # [T]
    input_ids = input_ids.reshape(-1)
    teal = activation_protocol == "teal"
    length, stride = (seqlen + TEAL_SCORED, TEAL_SCORED) if teal else (seqlen, seqlen)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if teal and isinstance(context, int) and TEAL_SCORED < context < length:
        length = context  # the scored tokens keep what context the model has
    n = (input_ids.numel() - length) // stride + 1 if input_ids.numel() >= length else 0
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DatasetError(
            f"{dataset}: the text has {input_ids.numel()} tokens, fewer than one window of {length}; "
            "lower --seqlen or give more text"
        )
    windows = input_ids.unfold(0, length, stride)[:n].contiguous()  # [n, L]
    fingerprint = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    device = torch.device(device) if device is not None else None
    was_training = model.training
    model.eval()
    thresholds = installed(model)
    try:
        with thresholds.applied(0.5 if teal else 1.0) if thresholds is not None else contextlib.nullcontext():
            total = window_nll(model, windows, batch_size, device, progress, desc=f"ppl {dataset}",
                               score_last=TEAL_SCORED if teal else None)
    finally:
        model.train(was_training)
    tokens = n * (TEAL_SCORED if teal else seqlen - 1)
    nll = total / tokens
    return PerplexityResult(dataset, math.exp(nll), nll, length, n, tokens, fingerprint, source, comparable,
                            time.perf_counter() - t0, data_sha256,
                            activation_protocol if thresholds is not None or teal else None)


def dataset_perplexity(model, tokenizer, name: str, seqlen: int = 2048, max_windows: int | None = None,
                       batch_size: int = 1, data_dir: str | Path | None = None, device=None,
                       progress: bool = False, activation_protocol: str = "all") -> PerplexityResult:
    """Perplexity on a named dataset (``wikitext2``, ``c4``) or a text/jsonl file, the papers' way."""
    src = load_text(name, data_dir)
    ids = tokenize_once(tokenizer, src.text)  # [T]
    if src.max_tokens_windows is not None:
        ids = ids[: src.max_tokens_windows * seqlen]
    return perplexity(model, input_ids=ids, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                      device=device, progress=progress, dataset=src.name, source=src.source,
                      comparable=src.comparable, data_sha256=src.sha256, activation_protocol=activation_protocol)


def split_eval_names(names: list[str]) -> dict[str, list[str]]:
    """Sort ``--eval`` names into perplexity datasets (wikitext2, c4, text files) and lm-eval tasks."""
    ppl = [n for n in names if n in PPL_DATASETS or Path(n).suffix in (".txt", ".jsonl", ".json")]
    return {"ppl": ppl, "tasks": [n for n in names if n not in ppl]}
