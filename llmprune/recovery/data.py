"""The training windows of a recovery run, held apart from the pruning's calibration.

The windows come from the same sources as pruning's calibration (:func:`~llmprune.calibration.get_calibration`:
``c4``, ``wikitext2``, files, HF datasets), drawn with seed ``seed + 1`` (pruning draws with its ``seed``, 0 by
default). Different seeds do not make the windows disjoint on their own (a stream's random offsets overlap, a
document may be drawn twice), so when the pruned model's metadata records a calibration from the same source,
its windows are drawn again from that record (source, ``nsamples``, ``seqlen``, ``seed``, checked against its
``windows_sha256``) and every training window that shares a run of :data:`HOLDOUT_NGRAM` consecutive tokens
with one of them is dropped (more windows are drawn in its place). What was done is recorded
(``data.held_apart``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..calibration import describe_source, get_calibration
from ..errors import ConfigError
from .options import RecoverConfig

__all__ = ["HOLDOUT_NGRAM", "training_windows"]

HOLDOUT_NGRAM = 32  # a training window sharing this many consecutive tokens with a calibration window is dropped


def _ngrams(windows: torch.Tensor, n: int) -> set[bytes]:
    """Every run of ``n`` consecutive tokens of ``windows [m, L]``, as bytes."""
    out: set[bytes] = set()
    width = 8 * n
    for w in windows.to(torch.int64):
        b = w.contiguous().numpy().tobytes()
        out.update(b[i : i + width] for i in range(0, len(b) - width + 8, 8))
    return out


def _touches(window: torch.Tensor, grams: set[bytes], n: int) -> bool:
    b = window.to(torch.int64).contiguous().numpy().tobytes()
    width = 8 * n
    return any(b[i : i + width] in grams for i in range(0, len(b) - width + 8, 8))


def training_windows(config: RecoverConfig, tokenizer: Any, calibration: dict | None = None,
                     calib_source: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(windows [steps * batch_size, seqlen], description)``: the training data, held apart from the pruning's
    calibration windows (module docstring). ``calibration``: the pruned model's ``llmprune.calibration`` record;
    ``calib_source``: the source it names as pruning's config recorded it (``llmprune.config.calib``)."""
    n = config.steps * config.batch_size
    seed = config.seed + 1
    name = describe_source(config.calib, config.data_dir)
    desc: dict[str, Any] = {"source": name, "seed": seed, "windows": n, "seqlen": config.seqlen}
    avoid: set[bytes] | None = None
    if calibration and calibration.get("source") == name and calib_source is not None:
        try:
            calib = get_calibration(config.calib, tokenizer, nsamples=int(calibration["nsamples"]),
                                    seqlen=int(calibration["seqlen"]), seed=int(calibration["seed"]),
                                    data_dir=config.data_dir, text_field=config.text_field)
        except (ValueError, KeyError, TypeError) as e:
            calib = None
            desc["held_apart"] = f"by seed only: the calibration windows could not be drawn again ({e})"
        if calib is not None:
            sha = hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16]
            if calibration.get("windows_sha256") not in (None, sha):
                desc["held_apart"] = ("by seed only: the calibration windows drawn again differ from the recorded "
                                      "ones (another tokenizer or data copy)")
            else:
                avoid = _ngrams(calib, min(HOLDOUT_NGRAM, config.seqlen))
    elif calibration:
        desc["held_apart"] = f"by source: pruning calibrated on {calibration.get('source')}"
    else:
        desc["held_apart"] = "by seed only: the model records no calibration"
    if avoid is None:
        ids = get_calibration(config.calib, tokenizer, nsamples=n, seqlen=config.seqlen, seed=seed,
                              data_dir=config.data_dir, text_field=config.text_field)
        return ids, desc
    k = min(HOLDOUT_NGRAM, config.seqlen)
    draw = n + max(8, n // 4)
    for _ in range(4):  # draw more when too many windows touch the calibration
        ids = get_calibration(config.calib, tokenizer, nsamples=draw, seqlen=config.seqlen, seed=seed,
                              data_dir=config.data_dir, text_field=config.text_field)
        keep = [w for w in ids if not _touches(w, avoid, k)]
        if len(keep) >= n:
            desc["held_apart"] = (f"{draw - len(keep)} of {draw} windows drawn shared {k} consecutive tokens with "
                                  f"the pruning's {calibration['nsamples']} calibration windows and were dropped")
            return torch.stack(keep[:n]), desc
        draw *= 2
    raise ConfigError(f"only {len(keep)} of {draw // 2} windows of {name} do not overlap the pruning's calibration "
                      f"windows, fewer than the {n} needed (steps x batch_size); use a larger source, another source "
                      "or fewer steps")
