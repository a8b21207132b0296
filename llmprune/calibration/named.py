"""The papers' calibration sets by name: ``c4`` (documents) and ``wikitext2`` (one stream), read from a data
dir laid out like shared/data when it has them, else from the Hugging Face Hub.

Offline, WikiText-2 calibrates on the train split when the data dir has it, else on the valid split (logged);
the test split is never used for calibration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from . import hf  # hf.load_hub_dataset is looked up at each call: tests patch it there, one seam for the Hub
from .common import DATA_DIR_HINT, CalibrationError, resolve_data_dir
from .files import file_docs
from .sampling import Docs

# Every module of the package logs under the package's name, as the single module did: users filter on it.
logger = logging.getLogger("llmprune.calibration")

# The papers' calibration sets on the Hub.
C4_HUB = ("allenai/c4",)
C4_HUB_KWARGS = {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}
WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT2_HUB_KWARGS = {"split": "train"}

# Offline copies inside a data dir laid out like shared/data (see its README.md).
C4_LOCAL = "c4/c4_validation_2k.jsonl"
WIKITEXT2_LOCAL_TRAIN = ("wikitext2/raw/wiki.train.raw", "wikitext2/tokenized/train.txt")
WIKITEXT2_LOCAL_VALID = ("wikitext2/raw/wiki.valid.raw", "wikitext2/tokenized/valid.txt")


def _local_file(data_dir: Path | None, candidates: Iterable[str]) -> Path | None:
    if data_dir is None:
        return None
    for rel in candidates:
        if (data_dir / rel).is_file():
            return data_dir / rel
    return None


def local_copy(key: str, data_dir: Path | None) -> Path | None:
    """The data dir's file that ``c4`` or ``wikitext2`` (``key``) reads, as the loaders below choose it."""
    return _local_file(data_dir, (C4_LOCAL,) if key == "c4" else WIKITEXT2_LOCAL_TRAIN + WIKITEXT2_LOCAL_VALID)


def _hub_error(what: str, local: str, data_dir: Path | None, exc: Exception) -> CalibrationError:
    where = f"; the data dir '{data_dir}' has no {local}" if data_dir is not None else ""
    reason = str(exc) if isinstance(exc, ConnectionError) else f"{type(exc).__name__}: {exc}"
    return CalibrationError(f"could not load {what}: the Hub could not be reached or the dataset is unavailable "
                            f"({reason}){where}; offline, {DATA_DIR_HINT} (with {local})")


def c4_docs(data_dir: str | os.PathLike | None) -> Docs:
    """The documents of the C4 calibration shard: the data dir's copy, else the Hub's."""
    d = resolve_data_dir(data_dir)
    local = _local_file(d, (C4_LOCAL,))
    if local is not None:
        logger.info("c4: using the local copy %s", local)
        return file_docs(local, "text", None, name=f"c4 (local: {local})")
    if d is not None:
        logger.warning("c4: data dir %s has no %s; loading C4 from the Hub", d, C4_LOCAL)
    try:
        ds = hf.load_hub_dataset(*C4_HUB, **C4_HUB_KWARGS)
    except Exception as exc:  # any failure of the Hub loader is reported the same way
        raise _hub_error("C4 (allenai/c4)", C4_LOCAL, d, exc) from exc
    return hf.dataset_docs(ds, "text", None, name="c4 (hub: allenai/c4)")


def wikitext2_text(data_dir: str | os.PathLike | None) -> tuple[str, str]:
    """``(name, text)`` of the WikiText-2 calibration split: the data dir's train (else valid) split, else the
    Hub's train split."""
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
        ds = hf.load_hub_dataset(*WIKITEXT2_HUB, **WIKITEXT2_HUB_KWARGS)
    except Exception as exc:
        raise _hub_error("WikiText-2 (Salesforce/wikitext)", WIKITEXT2_LOCAL_VALID[1], d, exc) from exc
    # The reference code joins the train rows with " " (the test split, for perplexity, with "\n\n").
    return "wikitext2 (hub: Salesforce/wikitext wikitext-2-raw-v1 train)", " ".join(ds["text"])
