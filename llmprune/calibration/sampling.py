"""Window sampling shared by the text sources, and the tokenization rule (see the package docstring).

* **documents** (SparseGPT/Wanda): :func:`sample_documents` draws a random document, keeps it if its
  tokenization is longer than ``seqlen`` and cuts a window at ``randint(0, len - seqlen - 1)``; when the
  documents run out, the remaining windows come from the documents concatenated into one stream.
* **streams**: :func:`sample_stream` tokenizes the whole text once and cuts windows at random offsets.

A source hands documents over as :class:`Docs`, read lazily one at a time.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .common import CalibrationError

# Every module of the package logs under the package's name, as the single module did: users filter on it.
logger = logging.getLogger("llmprune.calibration")


@dataclass
class Docs:
    """A lazily read collection of documents: ``get(i)`` returns ``(text, is_chat)``."""

    name: str
    n: int
    get: Callable[[int], tuple[str, bool]]


def sample_documents(docs: Docs, tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
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


def _concatenate_docs(docs: Docs, tokenizer: Any, need: int, rng: random.Random) -> list[int]:
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


def sample_stream(
    name: str, text: str, tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random
) -> torch.Tensor:
    """``nsamples`` windows of one text tokenized without special tokens (no BOS)."""
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


def require_tokenizer(tokenizer: Any, source: str) -> None:
    """Text sources need a tokenizer; say so, and how to do without one."""
    if tokenizer is None:
        raise CalibrationError(
            f"calibration source '{source}' is text and needs a tokenizer; pass one, or pass pre-tokenized ids"
        )


def record_text(record: Any, text_field: str, tokenizer: Any, where: str) -> tuple[str, bool]:
    """``(text, is_chat)`` of one record: its ``text_field``, else its chat ``messages`` rendered with the
    tokenizer's chat template."""
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
