"""Perplexity as the pruning papers compute it (SparseGPT, Wanda).

WikiText-2: the raw test split joined with ``"\\n\\n"``, tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped); the
perplexity is ``exp`` of the mean next-token NLL over all scored tokens, with the log-softmax
taken in float32.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per scored token
    seqlen: int
    windows: int
    tokens: int  # scored tokens
    fingerprint: str  # sha256 prefix of the evaluated text
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def wikitext2_test_text(data_dir: str | Path | None = None) -> str:
    """WikiText-2 raw test split joined with ``"\\n\\n"``: local copy first, else the Hub."""
    data_dir = data_dir or os.environ.get("LLMPRUNE_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / "wikitext2" / "raw" / "wiki.test.raw"
        if path.is_file():
            # the file's lines are the rows of the HF dataset's test split
            return "\n\n".join(path.read_text(encoding="utf-8").split("\n")[:-1])
    from datasets import load_dataset

    try:
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as e:
        raise FileNotFoundError(
            f"WikiText-2 is not under data dir {data_dir!r} and the Hub could not be reached ({e}); "
            "pass --data-dir pointing at a folder with wikitext2/raw/wiki.test.raw"
        ) from e
    return "\n\n".join(rows)


@torch.no_grad()
def perplexity(
    model,
    tokenizer=None,
    text: str | None = None,
    input_ids: torch.Tensor | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (tokenized once) or on a token stream ``input_ids [T]``."""
    t0 = time.perf_counter()
    if input_ids is None:
        if text is None or tokenizer is None:
            raise ValueError("give either input_ids or both text and tokenizer")
        input_ids = tokenizer(text, return_tensors="pt").input_ids[0]  # [T]
        fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    else:
        input_ids = input_ids.reshape(-1)
        fingerprint = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:16]
    n = input_ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {input_ids.numel()} tokens, fewer than one window of {seqlen}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = input_ids[: n * seqlen].reshape(n, seqlen)  # [n, L]
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for b in range(0, n, batch_size):
            x = windows[b : b + batch_size].to(device)  # [b, L]
            logits = model(input_ids=x, use_cache=False).logits  # [b, L, V]
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [b, L-1, V]
            total += -logp.gather(-1, x[:, 1:].unsqueeze(-1)).sum().item()
            del logits, logp
    finally:
        model.train(was_training)
    tokens = n * (seqlen - 1)
    nll = total / tokens
    return PerplexityResult(math.exp(nll), nll, seqlen, n, tokens, fingerprint, time.perf_counter() - t0)
