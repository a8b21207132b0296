"""Calibration data: ``nsamples`` token windows of ``seqlen`` tokens, ``[nsamples, seqlen]`` int64 on CPU.

Sampling follows the reference code of SparseGPT (Frantar & Alistarh 2023,
https://arxiv.org/abs/2301.00774) and Wanda (Sun et al. 2023, https://arxiv.org/abs/2306.11695):

* **documents** (C4, records of a .jsonl/.json/.parquet file or an HF dataset): draw a random
  document, keep it if its tokenization is longer than ``seqlen``, cut a window at a random offset
  ``randint(0, len - seqlen - 1)``; repeat ``nsamples`` times.
* **streams** (WikiText-2, a .txt file): tokenize the whole text once, cut ``nsamples`` windows at
  random offsets.
* **self**: text sampled by the model itself (Williams et al. 2024, "Self-calibration for language
  model quantization and pruning", https://arxiv.org/abs/2410.17170).
* **pre-tokenized** tensors, token lists and DataLoaders are windowed as they are.

Tokenization rule (BOS): a *document* is tokenized as the reference code does, ``tokenizer(text)``
with the tokenizer's default special tokens, so with a Llama-style tokenizer a window drawn at
offset 0 starts with BOS. A *stream* (WikiText-2, .txt, the concatenation fallback) is tokenized with
``add_special_tokens=False`` and has no BOS; documents concatenated into a stream are joined by the
tokenizer's EOS token (or ``"\\n\\n"`` when it has none). Chat records are rendered with the chat
template, which writes its own special tokens, and are always tokenized with
``add_special_tokens=False``.

Deviations from the reference code, all deliberate:

* randomness comes from a local ``random.Random(seed)`` (same draws as their ``random.seed(seed)``,
  without touching global state);
* a document is used at most once and a document found too short is not tokenized again, so the
  loop ends when the documents run out: the remaining windows are then drawn from the documents
  concatenated into one stream, with a warning (the reference code loops forever);
* documents are tokenized lazily, one per draw, never the whole corpus up front;
* offline, WikiText-2 calibrates on the train split when the data dir has it, else on the valid
  split (logged); the test split is never used for calibration.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..loading.models import effective_seqlen

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationError", "describe_source", "file_sha256", "get_calibration", "portable_settings",
    "portable_source", "resolve_data_dir", "source_fingerprint",
]

DATA_DIR_ENV = "LLMPRUNE_DATA_DIR"
NAMED_SOURCES = ("c4", "wikitext2", "self")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SELF_BATCH_SIZE = 32  # sequences sampled at once (measured: 32 per batch is ~2x faster per token than 8 on CPU)

# The papers' calibration sets on the Hub.
C4_HUB = ("allenai/c4",)
C4_HUB_KWARGS = {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}
WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT2_HUB_KWARGS = {"split": "train"}

# Offline copies inside a data dir laid out like shared/data (see its README.md).
C4_LOCAL = "c4/c4_validation_2k.jsonl"
WIKITEXT2_LOCAL_TRAIN = ("wikitext2/raw/wiki.train.raw", "wikitext2/tokenized/train.txt")
WIKITEXT2_LOCAL_VALID = ("wikitext2/raw/wiki.valid.raw", "wikitext2/tokenized/valid.txt")

CHOICES_MSG = "c4, wikitext2, self, a .txt/.jsonl/.json/.parquet path, or an HF dataset 'name[:config][:split]'"
DATA_DIR_HINT = "pass --data-dir (or set LLMPRUNE_DATA_DIR) pointing at a folder laid out like shared/data"


class CalibrationError(ValueError):
    """The calibration source or its settings are unusable; the message says why and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: ``data_dir`` if given, else ``$LLMPRUNE_DATA_DIR``, else None.

    Raises CalibrationError when the chosen folder does not exist.
    """
    origin = "--data-dir"
    value: str | os.PathLike | None = data_dir
    if value is None or str(value) == "":
        value = os.environ.get(DATA_DIR_ENV) or None
        origin = f"${DATA_DIR_ENV}"
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise CalibrationError(
            f"data dir '{path}' (from {origin}) does not exist or is not a folder; "
            f"{DATA_DIR_HINT}, or leave it unset to load from the Hub"
        )
    return path


def describe_source(source: Any, data_dir: str | os.PathLike | None = None) -> str:
    """A short JSON-friendly description of a calibration source, for run metadata.

    A source is named, never located: a local file by its base name and the sha256 of its bytes
    (:func:`source_fingerprint`), so that the metadata of a checkpoint holds no path of the machine
    that pruned it. E.g. ``"c4 (local copy c4_validation_2k.jsonl, sha256 1a2b3c4d5e6f7a8b)"``,
    ``"wikitext2 (hub: Salesforce/wikitext wikitext-2-raw-v1 train)"``, ``"file calib.jsonl (sha256 ...)"``,
    ``"hf: name:config:split"``, ``"tensor[32x512]"``.
    """
    if isinstance(source, torch.Tensor):
        return "tensor[" + "x".join(str(s) for s in source.shape) + "]"
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        key = source.strip().lower()
        local = _source_file(source, data_dir)
        if key == "c4":
            return (f"c4 (local copy {local.name}, sha256 {file_sha256(local)})" if local
                    else "c4 (hub: allenai/c4 en/c4-train.00000-of-01024.json.gz)")
        if key == "wikitext2":
            return (f"wikitext2 (local copy {local.name}, sha256 {file_sha256(local)})" if local
                    else "wikitext2 (hub: Salesforce/wikitext wikitext-2-raw-v1 train)")
        if key == "self":
            return "self (sampled from the model)"
        if local is not None:
            return f"file {local.name} (sha256 {file_sha256(local)})"
        if _looks_like_path(source):
            return f"file {Path(source).name}"
        return f"hf: {source}"
    if isinstance(source, (list, tuple)):
        if source and all(_is_int(t) for t in source):
            return f"token list[{len(source)}]"
        return f"token lists[{len(source)}]"
    if isinstance(source, torch.utils.data.DataLoader):
        return f"DataLoader({type(source.dataset).__name__})"
    if _is_hf_dataset(source):
        rows = f"{len(source)} rows, " if hasattr(source, "__len__") else ""
        return f"datasets.{type(source).__name__}[{rows}columns {', '.join(source.column_names or [])}]"
    return f"iterable ({type(source).__name__})"


def source_fingerprint(source: Any, data_dir: str | os.PathLike | None = None) -> str | None:
    """The sha256 prefix of the local file a calibration source reads (the data dir's copy of ``c4`` or
    ``wikitext2``, or the file given); None for the Hub, ``self`` and pre-tokenized sources."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return None
    local = _source_file(source, data_dir)
    return file_sha256(local) if local is not None else None


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike, chars: int = 16) -> str:
    """The first ``chars`` hex digits of the sha256 of a file's bytes (cached per path, size and mtime)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key][:chars]


LOCAL_DIR_RECORDED = "(local folder, path not recorded)"


def portable_source(value: str | None) -> str | None:
    """A calibration or evaluation source as metadata records it: a name or HF id as given, a local
    file by its base name."""
    if value is None:
        return None
    if value.strip().lower() in NAMED_SOURCES:
        return value
    path = Path(value).expanduser()
    return path.name if path.exists() or _looks_like_path(value) else value


def portable_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Prune or evaluation settings as metadata records them, with no path of this machine: the data dir
    only as set or not (the sources say which local copy was read, by name and sha256), calibration and
    perplexity files and task folders by base name. Other fields are kept as they are."""
    out = dict(settings)
    if out.get("data_dir"):
        out["data_dir"] = LOCAL_DIR_RECORDED
    if isinstance(out.get("calib"), str):
        out["calib"] = portable_source(out["calib"])
    if isinstance(out.get("ppl"), list):
        out["ppl"] = [portable_source(p) if isinstance(p, str) else p for p in out["ppl"]]
    if isinstance(out.get("include_path"), list):
        out["include_path"] = [Path(p).name if isinstance(p, str) else p for p in out["include_path"]]
    if isinstance(out.get("eval"), Mapping):
        out["eval"] = portable_settings(out["eval"])
    return out


def get_calibration(
    source: Any,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    model: torch.nn.Module | None = None,
) -> torch.LongTensor:
    """Draw ``nsamples`` calibration windows of ``seqlen`` tokens; returns ``[nsamples, seqlen]`` int64 on CPU.

    ``source`` is one of:

    * ``"c4"``: documents of the C4 calibration shard, as SparseGPT/Wanda (``allenai/c4``,
      ``en/c4-train.00000-of-01024.json.gz``); offline ``<data_dir>/c4/c4_validation_2k.jsonl``.
    * ``"wikitext2"``: the WikiText-2 train split as one stream (rows joined with ``" "`` as in the
      reference code); offline the data dir's train split, else its valid split (logged).
    * a ``.txt`` (one stream), ``.jsonl``/``.json``/``.parquet`` (records with ``text_field``, or chat
      records with ``messages`` rendered by ``tokenizer.apply_chat_template``) path.
    * an HF dataset ``"name[:config][:split]"`` (split defaults to ``train``), records as above.
    * ``"self"``: sequences sampled by ``model`` from BOS (``top_p=0.95``, ``temperature=1``).
    * pre-tokenized ids: a LongTensor ``[n, L]`` or ``[L]``, a list of token-id lists, or a
      DataLoader/iterable of tensors, ``{"input_ids": ...}`` dicts or ``(input_ids, target)`` pairs.
      If the first ``nsamples`` rows are at least ``seqlen`` long, each gives one window at a seeded
      random offset; otherwise all rows are concatenated and cut into consecutive windows.
    * a ``datasets.Dataset``: with an ``input_ids`` column, rows of pre-tokenized ids as above; otherwise
      records with ``text_field`` (or chat ``messages``), sampled as documents like C4.

    The same ``seed`` gives the same windows. See the module docstring for the sampling and BOS rules.
    """
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if not _is_int(value) or value < 1:
            raise CalibrationError(f"{name} must be an integer >= 1, got {value!r}")
    rng = random.Random(seed)

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        out = _from_string(source, tokenizer, nsamples, seqlen, rng, seed, data_dir, text_field, model)
    elif _is_text_dataset(source):
        _require_tokenizer(tokenizer, describe_source(source))
        out = _sample_documents(_dataset_docs(source, text_field, tokenizer, describe_source(source)),
                                tokenizer, nsamples, seqlen, rng)
    else:
        out = _from_pretokenized(source, nsamples, seqlen, rng)
    return out.to(device="cpu", dtype=torch.long).contiguous()  # [nsamples, seqlen]


# ----------------------------------------------------------------------------------------------
# Text sources
# ----------------------------------------------------------------------------------------------


@dataclass
class _Docs:
    """A lazily read collection of documents: ``get(i)`` returns ``(text, is_chat)``."""

    name: str
    n: int
    get: Callable[[int], tuple[str, bool]]


def _from_string(
    source: str,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    rng: random.Random,
    seed: int,
    data_dir: str | os.PathLike | None,
    text_field: str,
    model: torch.nn.Module | None,
) -> torch.Tensor:
    key = source.strip().lower()
    if key == "self":
        return _self_calibration(model, tokenizer, nsamples, seqlen, seed)

    path = Path(source).expanduser()
    if key not in ("c4", "wikitext2"):
        if path.exists():
            if not path.is_file():
                raise CalibrationError(f"calibration source '{source}' is a folder; pass a file ({CHOICES_MSG})")
        elif _looks_like_path(source):
            raise CalibrationError(
                f"calibration file '{source}' does not exist; check the path, or use one of: {CHOICES_MSG}"
            )
        elif "/" not in source and ":" not in source:
            close = difflib.get_close_matches(key, NAMED_SOURCES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CalibrationError(f"unknown calibration source '{source}'; choose one of: {CHOICES_MSG}{hint}")

    _require_tokenizer(tokenizer, source)
    if key == "c4":
        return _sample_documents(_c4_docs(data_dir), tokenizer, nsamples, seqlen, rng)
    if key == "wikitext2":
        name, text = _wikitext2_text(data_dir)
        return _sample_stream(name, text, tokenizer, nsamples, seqlen, rng)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _sample_stream(f"file {path}", path.read_text(encoding="utf-8"), tokenizer, nsamples, seqlen, rng)
        if suffix in (".jsonl", ".json", ".parquet"):
            docs = _file_docs(path, text_field, tokenizer)
            return _sample_documents(docs, tokenizer, nsamples, seqlen, rng)
        raise CalibrationError(
            f"calibration file '{source}' has an unsupported suffix '{path.suffix}'; use one of: "
            + ", ".join(FILE_SUFFIXES)
        )
    return _sample_documents(_hf_docs(source, text_field, tokenizer), tokenizer, nsamples, seqlen, rng)


def _sample_documents(docs: _Docs, tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """SparseGPT/Wanda document sampling; falls back to a concatenated stream when documents run out."""
    if docs.n == 0:
        raise CalibrationError(f"calibration source {docs.name} has no documents")
    windows: list[list[int]] = []
    used: set[int] = set()
    short: set[int] = set()
    while len(windows) < nsamples and len(used) + len(short) < docs.n:
        i = rng.randint(0, docs.n - 1)
        if i in used or i in short:
            continue  # a known-short document is rejected without tokenizing it again
        text, is_chat = docs.get(i)
        ids = _encode(tokenizer, text, add_special_tokens=not is_chat)
        if len(ids) <= seqlen:
            short.add(i)
            continue
        used.add(i)
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])

    remaining = nsamples - len(windows)
    if remaining > 0:
        logger.warning(
            "calibration source %s: only %d of %d documents are longer than seqlen=%d tokens; drawing the "
            "other %d windows from the documents concatenated into one stream",
            docs.name,
            len(windows),
            docs.n,
            seqlen,
            remaining,
        )
        stream = _concatenate_docs(docs, tokenizer, need=remaining * seqlen + 1, rng=rng)
        if len(stream) < seqlen:
            raise CalibrationError(
                f"calibration source {docs.name} has only {len(stream)} tokens in all, fewer than seqlen={seqlen}; "
                "use a larger source or a smaller seqlen"
            )
        windows.extend(_stream_windows(torch.tensor(stream, dtype=torch.long), remaining, seqlen, rng).tolist())
    return torch.tensor(windows, dtype=torch.long)  # [nsamples, seqlen]


def _concatenate_docs(docs: _Docs, tokenizer: Any, need: int, rng: random.Random) -> list[int]:
    """Documents in a seeded random order, tokenized without special tokens and joined by EOS,
    until ``need`` tokens are collected or the documents run out."""
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [eos] if eos is not None else _encode(tokenizer, "\n\n", add_special_tokens=False)
    order = list(range(docs.n))
    rng.shuffle(order)
    stream: list[int] = []
    for i in order:
        text, _ = docs.get(i)
        ids = _encode(tokenizer, text, add_special_tokens=False)
        if not ids:
            continue
        if stream:
            stream.extend(sep)
        stream.extend(ids)
        if len(stream) >= need:
            break
    return stream


def _sample_stream(
    name: str, text: str, tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random
) -> torch.Tensor:
    ids = torch.tensor(_encode(tokenizer, text, add_special_tokens=False), dtype=torch.long)  # [T]
    if ids.numel() < seqlen:
        raise CalibrationError(
            f"calibration source {name} has only {ids.numel()} tokens, fewer than seqlen={seqlen}; "
            "use a larger source or a smaller seqlen"
        )
    return _stream_windows(ids, nsamples, seqlen, rng)


def _stream_windows(ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """Windows at random offsets ``randint(0, T - seqlen - 1)`` as in the reference code."""
    last = max(ids.numel() - seqlen - 1, 0)
    starts = [rng.randint(0, last) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])  # [nsamples, seqlen]


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return list(ids)


def _require_tokenizer(tokenizer: Any, source: str) -> None:
    if tokenizer is None:
        raise CalibrationError(
            f"calibration source '{source}' is text and needs a tokenizer; pass one, or pass pre-tokenized ids"
        )


# ----------------------------------------------------------------------------------------------
# Where text comes from
# ----------------------------------------------------------------------------------------------


def _load_hub_dataset(*args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset``; one seam so that tests can simulate an unreachable Hub."""
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def _local_file(data_dir: Path | None, candidates: Iterable[str]) -> Path | None:
    if data_dir is None:
        return None
    for rel in candidates:
        if (data_dir / rel).is_file():
            return data_dir / rel
    return None


def _source_file(source: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The local file a string source reads: the data dir's copy of c4/wikitext2 (as the loaders choose
    it), or the file given; None for the Hub, ``self`` and HF datasets."""
    key = source.strip().lower()
    if key in ("c4", "wikitext2"):
        try:
            d = resolve_data_dir(data_dir)
        except CalibrationError:
            return None
        return _local_file(d, (C4_LOCAL,) if key == "c4" else WIKITEXT2_LOCAL_TRAIN + WIKITEXT2_LOCAL_VALID)
    if key == "self":
        return None
    path = Path(source).expanduser()
    return path if path.is_file() else None


def _hub_error(what: str, local: str, data_dir: Path | None, exc: Exception) -> CalibrationError:
    where = f"; the data dir '{data_dir}' has no {local}" if data_dir is not None else ""
    return CalibrationError(
        f"could not load {what} from the Hugging Face Hub ({type(exc).__name__}: {exc}): the Hub could not be "
        f"reached or the dataset is unavailable{where}. To work offline, {DATA_DIR_HINT} (with {local})"
    )


def _c4_docs(data_dir: str | os.PathLike | None) -> _Docs:
    d = resolve_data_dir(data_dir)
    local = _local_file(d, (C4_LOCAL,))
    if local is not None:
        logger.info("c4: using the local copy %s", local)
        return _file_docs(local, "text", None, name=f"c4 (local: {local})")
    if d is not None:
        logger.warning("c4: data dir %s has no %s; loading C4 from the Hub", d, C4_LOCAL)
    try:
        ds = _load_hub_dataset(*C4_HUB, **C4_HUB_KWARGS)
    except Exception as exc:  # any failure of the Hub loader is reported the same way
        raise _hub_error("C4 (allenai/c4)", C4_LOCAL, d, exc) from exc
    return _dataset_docs(ds, "text", None, name="c4 (hub: allenai/c4)")


def _wikitext2_text(data_dir: str | os.PathLike | None) -> tuple[str, str]:
    d = resolve_data_dir(data_dir)
    local = _local_file(d, WIKITEXT2_LOCAL_TRAIN)
    if local is None:
        local = _local_file(d, WIKITEXT2_LOCAL_VALID)
        if local is not None:
            logger.warning(
                "wikitext2: the data dir has no train split; calibrating on the WikiText-2 valid split %s "
                "(never on the test split)",
                local,
            )
    if local is not None:
        return f"wikitext2 (local: {local})", local.read_text(encoding="utf-8")
    if d is not None:
        logger.warning("wikitext2: data dir %s has no WikiText-2 train or valid file; loading from the Hub", d)
    try:
        ds = _load_hub_dataset(*WIKITEXT2_HUB, **WIKITEXT2_HUB_KWARGS)
    except Exception as exc:
        raise _hub_error("WikiText-2 (Salesforce/wikitext)", WIKITEXT2_LOCAL_VALID[1], d, exc) from exc
    # The reference code joins the train rows with " " (the test split, for perplexity, with "\n\n").
    return "wikitext2 (hub: Salesforce/wikitext wikitext-2-raw-v1 train)", " ".join(ds["text"])


def _record_text(record: Any, text_field: str, tokenizer: Any, where: str) -> tuple[str, bool]:
    if not isinstance(record, Mapping):
        raise CalibrationError(f"{where} is a {type(record).__name__}, not a record (an object with '{text_field}')")
    if record.get(text_field) is not None:
        return str(record[text_field]), False
    if record.get("messages") is not None:
        template = getattr(tokenizer, "chat_template", None)
        if tokenizer is None or not template:
            raise CalibrationError(
                f"{where} is a chat record ('messages') but the tokenizer has no chat template; "
                f"set tokenizer.chat_template or give the records a '{text_field}' field"
            )
        return tokenizer.apply_chat_template(list(record["messages"]), tokenize=False), True
    raise CalibrationError(
        f"{where} has no '{text_field}' or 'messages' field (fields: {', '.join(map(str, record))}); "
        "choose the text field with --text-field"
    )


def _records_docs(records: list[Any], text_field: str, tokenizer: Any, name: str) -> _Docs:
    def get(i: int) -> tuple[str, bool]:
        return _record_text(records[i], text_field, tokenizer, f"record {i} of {name}")

    return _Docs(name=name, n=len(records), get=get)


def read_records(path: Path, name: str | None = None, error: type[ValueError] = CalibrationError) -> list[Any]:
    """The records of a ``.jsonl`` (one JSON object per line), ``.json`` (a list, or ``{"data": [...]}``)
    or ``.parquet`` file; malformed files raise ``error`` with the fix."""
    name = name or f"file {path}"
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, Mapping) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise error(f'{name} must hold a list of records or {{"data": [records]}}, got a {type(data).__name__}')
            return data
        if suffix == ".parquet":
            return _read_parquet(path)
    except json.JSONDecodeError as exc:
        raise error(
            f"{name} is not valid JSON ({exc}); a file with one JSON object per line must be named .jsonl"
        ) from exc
    raise error(f"{name}: records are read from .jsonl, .json or .parquet files, not {suffix or 'no suffix'}")


def _file_docs(path: Path, text_field: str, tokenizer: Any, name: str | None = None) -> _Docs:
    name = name or f"file {path}"
    return _records_docs(read_records(path, name), text_field, tokenizer, name)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise CalibrationError(f"reading {path} needs pyarrow; install it with: pip install pyarrow") from exc
    return pq.read_table(path).to_pylist()


def _hf_docs(spec: str, text_field: str, tokenizer: Any) -> _Docs:
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise CalibrationError(f"HF dataset spec '{spec}' is not understood; write it as 'name[:config][:split]'")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        ds = _load_hub_dataset(name, config, split=split)
    except Exception as exc:
        raise CalibrationError(
            f"could not load HF dataset '{spec}' (name={name!r}, config={config!r}, split={split!r}): "
            f"{type(exc).__name__}: {exc}. Check the name; if the Hub cannot be reached, save the data as a local "
            f".jsonl/.parquet file and pass its path"
        ) from exc
    columns = list(getattr(ds, "column_names", None) or [])
    if columns and text_field not in columns and "messages" not in columns:
        raise CalibrationError(
            f"HF dataset '{spec}' has no '{text_field}' or 'messages' column (columns: {', '.join(columns)}); "
            "choose the text column with --text-field"
        )
    return _dataset_docs(ds, text_field, tokenizer, name=f"hf dataset {spec}")


def _dataset_docs(ds: Any, text_field: str, tokenizer: Any, name: str) -> _Docs:
    """Records of a ``datasets.Dataset``, read one row at a time (the C4 shard has 356k documents)."""

    def get(i: int) -> tuple[str, bool]:
        return _record_text(ds[i], text_field, tokenizer, f"row {i} of {name}")

    return _Docs(name=name, n=len(ds), get=get)


def _is_hf_dataset(source: Any) -> bool:
    """A ``datasets.Dataset`` or ``IterableDataset`` (checked without importing ``datasets``)."""
    return type(source).__module__.startswith("datasets.") and hasattr(source, "column_names")


def _is_text_dataset(source: Any) -> bool:
    """A map-style ``datasets.Dataset`` of text records (no ``input_ids`` column): sampled as documents.
    One with ``input_ids`` (or a streaming one) is read as pre-tokenized rows."""
    columns = getattr(source, "column_names", None) or []
    return (_is_hf_dataset(source) and hasattr(source, "__getitem__") and hasattr(source, "__len__")
            and "input_ids" not in columns)


def _looks_like_path(source: str) -> bool:
    return source.lower().endswith(FILE_SUFFIXES) or source.startswith(("./", "../", "/", "~", ".\\", "..\\"))


# ----------------------------------------------------------------------------------------------
# Self-calibration
# ----------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _special_id(name: str, tokenizer: Any, model: torch.nn.Module) -> int | None:
    for owner in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _self_calibration(
    model: torch.nn.Module | None, tokenizer: Any, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Williams et al. 2024: sequences sampled by the model from BOS, nucleus sampling (top_p 0.95, T = 1).

    Each row is BOS followed by ``seqlen - 1`` sampled tokens (``min_new_tokens`` keeps EOS from ending
    it early). Global RNG state is restored afterwards.
    """
    if model is None:
        raise CalibrationError("calibration source 'self' samples text from the model; pass model=...")
    bos = _special_id("bos_token_id", tokenizer, model)
    eos = _special_id("eos_token_id", tokenizer, model)
    start = bos if bos is not None else eos
    if start is None:
        raise CalibrationError(
            "calibration source 'self' starts each sequence from BOS (or EOS), but neither the tokenizer nor "
            "the model config has one; pass a tokenizer with a bos_token"
        )
    pad = _special_id("pad_token_id", tokenizer, model)
    pad = pad if pad is not None else (eos if eos is not None else start)
    device = next(model.parameters()).device
    fork_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )

    rows: list[torch.Tensor] = []
    with torch.no_grad(), torch.random.fork_rng(devices=fork_devices), _eval_mode(model):
        torch.manual_seed(seed)
        for b0 in range(0, nsamples, SELF_BATCH_SIZE):
            b = min(SELF_BATCH_SIZE, nsamples - b0)
            input_ids = torch.full((b, 1), start, dtype=torch.long, device=device)  # [b, 1]
            if seqlen > 1:
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    top_p=0.95,
                    top_k=0,
                    temperature=1.0,
                    max_new_tokens=seqlen - 1,
                    min_new_tokens=seqlen - 1,
                    pad_token_id=pad,
                )  # [b, <= seqlen]
            else:
                out = input_ids
            out = out[:, :seqlen].to("cpu", torch.long)
            if out.shape[1] < seqlen:
                logger.warning("self-calibration: generation stopped at %d of %d tokens; padding", out.shape[1], seqlen)
                out = torch.cat([out, out.new_full((b, seqlen - out.shape[1]), pad)], dim=1)
            rows.append(out)
    return torch.cat(rows)  # [nsamples, seqlen]


# ----------------------------------------------------------------------------------------------
# Pre-tokenized sources
# ----------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_ids(value: Any, what: str) -> torch.Tensor:
    ids = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    return ids.to(torch.long)


def _to_rows(item: Any, what: str) -> list[torch.Tensor]:
    """One item of a pre-tokenized source as 1-D rows of token ids."""
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise CalibrationError(
                f"{what} is a dict without 'input_ids' (keys: {', '.join(map(str, item))}); records of text are "
                "read from a datasets.Dataset (text column: text_field) or a .jsonl file, or tokenize them first"
            )
        ids, mask = item["input_ids"], item.get("attention_mask")
        if isinstance(ids, (list, tuple)) and ids and not all(_is_int(t) for t in ids):  # ragged rows
            masks = mask if mask is not None else [None] * len(ids)
            return [r for i, m in zip(ids, masks) for r in _to_rows({"input_ids": i, "attention_mask": m}, what)]
        ids = _as_ids(ids, what)
        if mask is not None:
            mask = torch.as_tensor(mask).to(torch.bool).reshape(ids.shape)
            rows = [r[m] for r, m in zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]))]
            return rows  # padding dropped
        return _to_rows(ids, what)
    if isinstance(item, (list, tuple)):
        if item and all(_is_int(t) for t in item):
            return [torch.tensor(item, dtype=torch.long)]
        if not item:
            return []
        return _to_rows(item[0], what)  # an (input_ids, target) pair as in the reference trainloaders
    if isinstance(item, torch.Tensor) or hasattr(item, "__array__"):
        ids = _as_ids(item, what)
        if ids.dim() == 1:
            return [ids]
        if ids.dim() == 2:
            return list(ids)
        raise CalibrationError(f"{what} must be 1-D [L] or 2-D [n, L] token ids, got shape {list(ids.shape)}")
    raise CalibrationError(
        f"{what} is a {type(item).__name__}; pre-tokenized sources yield tensors, token-id lists, "
        "or dicts with 'input_ids'"
    )


def _from_pretokenized(source: Any, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    name = describe_source(source)
    if isinstance(source, torch.Tensor) or (
        isinstance(source, (list, tuple)) and source and all(_is_int(t) for t in source)
    ):
        items: Iterable[Any] = [source]
    elif isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise CalibrationError(
            f"calibration source of type {type(source).__name__} is not understood; use one of: {CHOICES_MSG}, "
            "or pre-tokenized ids (a LongTensor, a list of token-id lists, or a DataLoader yielding input_ids)"
        )
    else:
        items = source

    rows: list[torch.Tensor] = []
    total = 0
    for k, item in enumerate(items):
        for row in _to_rows(item, f"item {k} of {name}"):
            rows.append(row.reshape(-1))
            total += row.numel()
        if len(rows) >= nsamples and total >= nsamples * seqlen:
            break  # enough: an endless iterable is not drained

    if len(rows) >= nsamples and all(r.numel() >= seqlen for r in rows[:nsamples]):
        starts = [rng.randint(0, r.numel() - seqlen) for r in rows[:nsamples]]
        return torch.stack([r[s : s + seqlen] for r, s in zip(rows, starts)])  # [nsamples, seqlen]
    if total < nsamples * seqlen:
        raise CalibrationError(
            f"pre-tokenized source {name} has {total} tokens in {len(rows)} rows, fewer than "
            f"nsamples*seqlen = {nsamples}*{seqlen} = {nsamples * seqlen}; pass more data or lower nsamples/seqlen"
        )
    flat = torch.cat(rows)  # [total]
    return flat[: nsamples * seqlen].reshape(nsamples, seqlen)


def calibration_tokens(config, model, tokenizer, calibration: Any = None) -> tuple[torch.Tensor, dict]:
    """``(input_ids [nsamples, seqlen], description)`` from ``calibration`` or ``config.calib``.

    The description names the source and fingerprints what was read (``data_sha256``: the local file's
    bytes, None for the Hub and pre-tokenized sources; ``windows_sha256``: the windows drawn), never a path.
    """
    source = config.calib if calibration is None else calibration
    seqlen = effective_seqlen(model, config.seqlen)
    ids = get_calibration(
        source, tokenizer, nsamples=config.nsamples, seqlen=seqlen, seed=config.seed,
        data_dir=config.data_dir, text_field=config.text_field, model=model,
    )
    desc = {"source": describe_source(source, config.data_dir),
            "data_sha256": source_fingerprint(source, config.data_dir),
            "windows_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
            "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": config.seed}
    return ids, desc
