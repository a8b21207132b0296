"""What every calibration source shares: the error type, the names of the sources, the offline data dir,
file fingerprints, and settings as run metadata records them (never a path of this machine)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "LLMPRUNE_DATA_DIR"
NAMED_SOURCES = ("c4", "wikitext2", "self")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

CHOICES_MSG = "c4, wikitext2, self, a .txt/.jsonl/.json/.parquet path, or an HF dataset 'name[:config][:split]'"
DATA_DIR_HINT = "pass --data-dir (or set LLMPRUNE_DATA_DIR) pointing at a folder laid out like shared/data"


class CalibrationError(ValueError):
    """The calibration source or its settings are unusable; the message says why and how to fix it."""


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
    return path.name if path.exists() or looks_like_path(value) else value


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


def looks_like_path(source: str) -> bool:
    """A string source meant as a file: a known suffix, or a relative/absolute/home path prefix."""
    return source.lower().endswith(FILE_SUFFIXES) or source.startswith(("./", "../", "/", "~", ".\\", "..\\"))


def is_int(value: Any) -> bool:
    """An ``int`` and not a ``bool`` (a token id, ``nsamples``, ``seqlen``)."""
    return isinstance(value, int) and not isinstance(value, bool)
