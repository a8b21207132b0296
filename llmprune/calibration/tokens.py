"""Pre-tokenized calibration: a LongTensor ``[n, L]`` or ``[L]``, token-id lists, or a DataLoader/iterable of
tensors, ``{"input_ids": ...}`` dicts (padding dropped by ``attention_mask``) or ``(input_ids, target)`` pairs,
including a ``datasets.Dataset`` with an ``input_ids`` column. The rows are windowed as they are."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .common import CHOICES_MSG, CalibrationError, is_int

log = logging.getLogger("llmprune.calibration")  # one logger for every source: users filter on it

# What the SparseGPT and Wanda papers calibrate on: 128 windows of 2048 tokens (C4).
PAPER_NSAMPLES, PAPER_SEQLEN = 128, 2048


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
        if isinstance(ids, (list, tuple)) and ids and not all(is_int(t) for t in ids):  # ragged rows
            masks = mask if mask is not None else [None] * len(ids)
            return [r for i, m in zip(ids, masks) for r in _to_rows({"input_ids": i, "attention_mask": m}, what)]
        ids = _as_ids(ids, what)
        if mask is not None:
            mask = torch.as_tensor(mask).to(torch.bool).reshape(ids.shape)
            rows = [r[m] for r, m in zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]))]
            return rows  # padding dropped
        return _to_rows(ids, what)
    if isinstance(item, (list, tuple)):
        if item and all(is_int(t) for t in item):
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


def _items(source: Any, name: str) -> Iterable[Any]:
    """The items of a pre-tokenized ``source``: itself when it is one tensor or one token list."""
    if isinstance(source, torch.Tensor) or (
        isinstance(source, (list, tuple)) and source and all(is_int(t) for t in source)
    ):
        return [source]
    if isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise CalibrationError(
            f"calibration source of type {type(source).__name__} is not understood; use one of: {CHOICES_MSG}, "
            "or pre-tokenized ids (a LongTensor, a list of token-id lists, or a DataLoader yielding input_ids)"
        )
    return source


def shape_as_given(source: Any, name: str, nsamples: int | None, seqlen: int | None,
                   context: int | None = None) -> tuple[int, int] | None:
    """``(nsamples, seqlen)`` that use a pre-tokenized ``source`` as it is given, for the settings left unset
    (None): every row once (``nsamples`` = its rows), each at the length of its shortest row (``seqlen``,
    clipped to the model's ``context``), or as many windows of an explicit ``seqlen`` as the tokens hold; an
    explicit ``nsamples`` is kept and validated by :func:`from_pretokenized` as before. None
    when ``source`` has no length (an iterator, which is never drained to find one)."""
    if not hasattr(source, "__len__"):
        return None
    rows = [r.numel() for k, item in enumerate(_items(source, name)) for r in _to_rows(item, f"item {k} of {name}")]
    rows = [n for n in rows if n > 0]
    if not rows:
        raise CalibrationError(f"pre-tokenized source {name} holds no tokens; pass token ids")
    total = sum(rows)
    if seqlen is None:
        seqlen = min(min(rows), context) if context else min(rows)
    if nsamples is None:
        nsamples = len(rows) if min(rows) >= seqlen else max(1, total // seqlen)
    return nsamples, seqlen


def warn_if_few(ids: torch.Tensor, name: str) -> None:
    """A warning when calibration used as given holds fewer tokens than the papers calibrate on."""
    nsamples, seqlen = ids.shape
    if nsamples * seqlen < PAPER_NSAMPLES * PAPER_SEQLEN:
        log.warning("calibration: %d windows x %d tokens of %s, as given (%d tokens), fewer than the %d x %d the "
                    "SparseGPT and Wanda papers calibrate on; the masks may be noisier", nsamples, seqlen, name,
                    nsamples * seqlen, PAPER_NSAMPLES, PAPER_SEQLEN)


def from_pretokenized(source: Any, name: str, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows of pre-tokenized ``source`` (described as ``name`` in errors): one per row
    at a seeded random offset when the first ``nsamples`` rows are long enough, else consecutive windows of all
    rows concatenated."""
    if isinstance(source, torch.Tensor) or (
        isinstance(source, (list, tuple)) and source and all(is_int(t) for t in source)
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
