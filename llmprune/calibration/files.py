"""Calibration files: a ``.txt`` file is one stream; a ``.jsonl``, ``.json`` or ``.parquet`` file holds records
(``text_field``, or chat ``messages``) sampled as documents. :func:`read_records` is also used by evaluation."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .common import FILE_SUFFIXES, CalibrationError
from .sampling import Docs, record_text, sample_documents, sample_stream


def from_file(
    path: Path, source: str, tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random, text_field: str
) -> torch.Tensor:
    """Windows of the file at ``path`` (given as ``source``), by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return sample_stream(f"file {path}", path.read_text(encoding="utf-8"), tokenizer, nsamples, seqlen, rng)
    if suffix in (".jsonl", ".json", ".parquet"):
        docs = file_docs(path, text_field, tokenizer)
        return sample_documents(docs, tokenizer, nsamples, seqlen, rng)
    raise CalibrationError(
        f"calibration file '{source}' has an unsupported suffix '{path.suffix}'; use one of: "
        + ", ".join(FILE_SUFFIXES)
    )


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


def file_docs(path: Path, text_field: str, tokenizer: Any, name: str | None = None) -> Docs:
    """The records of a file as documents."""
    name = name or f"file {path}"
    return _records_docs(read_records(path, name), text_field, tokenizer, name)


def _records_docs(records: list[Any], text_field: str, tokenizer: Any, name: str) -> Docs:
    def get(i: int) -> tuple[str, bool]:
        return record_text(records[i], text_field, tokenizer, f"record {i} of {name}")

    return Docs(name=name, n=len(records), get=get)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise CalibrationError(f"reading {path} needs pyarrow; install it with: pip install pyarrow") from exc
    return pq.read_table(path).to_pylist()
