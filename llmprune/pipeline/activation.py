"""The activation-sparsity step of a pruning run: calibrate thresholds on the model as weight pruning
left it (or on the dense model, for an activations-only run), install them, measure held-out sparsity.

Called by :func:`~llmprune.pipeline.prune.prune_model` after the prune pass; when ``activation`` is unset nothing here runs
and a pruning run is unchanged, bit for bit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..activation.apply import install
from ..activation.calibrate import ActivationCalibration, ActivationResult, measure_holdout
from ..calibration import calibration_tokens
from ..engine.capture import resolve_device
from ..engine.passes import SequentialRun
from ..engine.targets import find_decoder_layers
from ..evaluation.perplexity import load_text, tokenize_once
from ..report import PruneReport

log = logging.getLogger(__name__)


def holdout_windows(config, tokenizer, seqlen: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The first ``activation_holdout_windows`` windows of ``seqlen`` tokens of the held-out text
    (``activation_holdout``: WikiText-2's test split by default, never the calibration text)."""
    if not config.activation_holdout or tokenizer is None:
        if config.activation_holdout:
            log.info("no tokenizer: held-out activation sparsity not measured")
        return None
    src = load_text(config.activation_holdout, config.data_dir)
    ids = tokenize_once(tokenizer, src.text)  # [T]
    n = min(config.activation_holdout_windows, ids.numel() // seqlen)
    if n < 1:
        raise ValueError(f"held-out text {config.activation_holdout!r} has {ids.numel()} tokens, fewer than one "
                         f"window of {seqlen}; give a longer --activation-holdout or --activation-holdout none")
    return ids[: n * seqlen].view(n, seqlen), {"source": src.name, "data_sha256": src.sha256,
                                              "windows": n, "seqlen": seqlen}


def activation_pass(run, config, tokenizer=None) -> tuple[ActivationResult, Any]:
    """Calibrate thresholds over ``run`` (a :class:`~llmprune.engine.SequentialRun` on the calibration
    tokens), install them on the model and measure them on held-out text: ``(result, handle)``."""
    cal = ActivationCalibration(config.activation, config.activation_target, config.activation_allocation,
                                step=config.activation_greedy_step, seed=config.seed, wina=config.activation_wina,
                                prefill=config.activation_prefill)
    result = cal.run(run)
    handle = install(run.model, result.criterion, result.specs, prefill=result.prefill)
    seqlen = int(run.chunks[0].shape[1])
    held = holdout_windows(config, tokenizer, seqlen) if seqlen > 1 else None
    if held is not None:
        t0 = time.perf_counter()
        result.holdout = measure_holdout(run, handle, held[0], held[1])
        log.info("activation sparsity on held-out %s: %.4f weighted by weights fed (%.1fs)",
                 held[1]["source"], result.holdout["weighted"] or 0.0, time.perf_counter() - t0)
    return result, handle


def add_activation(report, run, config, tokenizer=None) -> None:
    """Run :func:`activation_pass` after a prune pass and record it in ``report`` (``report.activation``)."""
    t0 = time.perf_counter()
    result, handle = activation_pass(run, config, tokenizer)
    report.activation = result
    report.activation_handle = handle
    report.seconds["activation"] = time.perf_counter() - t0


def prune_activations_only(model, tokenizer, config, calibration: Any = None, progress: bool = True,
                           residency=None):
    """``llmprune.prune`` with ``method='none'``: no weight changes, activation thresholds only."""
    t0 = time.perf_counter()
    find_decoder_layers(model)  # fail on unsupported models before calibration work
    ids, calib = calibration_tokens(config, model, tokenizer, calibration)
    t1 = time.perf_counter()
    run = SequentialRun(model, ids, device=resolve_device(config.device), batch_size=config.batch_size,
                        targets=config.targets, ignore=config.ignore, progress=progress, residency=residency,
                        sequential=config.sequential)
    cfg = config.model_dump()
    cfg["target_sparsity"] = 0.0
    name = config.model or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    report = PruneReport(config=cfg, model=str(name), calibration=calib, seconds={"calibration": t1 - t0},
                         execution=run.execution)
    add_activation(report, run, config, tokenizer)
    return report
