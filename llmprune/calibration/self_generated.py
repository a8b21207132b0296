"""``calib="self"``: calibration text written by the model itself (Williams et al. 2024, "Self-calibration for
language model quantization and pruning", https://arxiv.org/abs/2410.17170)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .common import CalibrationError

# Every module of the package logs under the package's name, as the single module did: users filter on it.
logger = logging.getLogger("llmprune.calibration")

SELF_BATCH_SIZE = 32  # sequences sampled at once (measured: 32 per batch is ~2x faster per token than 8 on CPU)


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


def self_calibration(
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
