"""The Python API: prune a model in memory, or a checkpoint into a folder.

A face: it turns what the caller gives (a config, a dict, keyword overrides) into a validated
:class:`~llmprune.config.PruneConfig` and hands it to the pipeline (:mod:`llmprune.pipeline`).
"""

from __future__ import annotations

from typing import Any

from .checkpoint.load import load_model
from .config import PruneConfig
from .engine.residency import LayerResidency
from .pipeline import prune_checkpoint
from .pipeline.prune import build_methods, build_steps, calibration_tokens, needs_calibration, prune_model
from .report import PruneReport

__all__ = ["build_methods", "build_steps", "calibration_tokens", "load_model", "needs_calibration", "prune",
           "prune_checkpoint"]


def prune(
    model,
    tokenizer=None,
    config: PruneConfig | dict | None = None,
    calibration: Any = None,
    progress: bool = True,
    residency: LayerResidency | None = None,
    **overrides: Any,
) -> PruneReport:
    """Prune ``model`` in place and return a :class:`PruneReport`.

    ``calibration`` may be a named source or path (overriding ``config.calib``), a LongTensor
    ``[n, L]``, a list of token lists, any iterable of token batches or of dicts with ``input_ids``, a
    DataLoader, or a ``datasets.Dataset`` (``input_ids``, or a text column: ``text_field``); see
    :func:`llmprune.calibration.get_calibration`. Nothing global is read or changed: two calls in one
    process give what they give in two processes. ``overrides`` set config fields, e.g.
    ``prune(model, tok, method="wanda", pattern="2:4", refine="dsnot", allocation="owl")``.
    ``residency`` (e.g. a :class:`~llmprune.engine.residency.offload.DiskOffloader`) moves each layer in
    and out of memory around its pruning.
    """
    if config is None:
        config = PruneConfig.build(overrides)
    elif isinstance(config, dict):
        config = PruneConfig.build({**config, **overrides})
    elif overrides:
        config = PruneConfig.build({**config.model_dump(exclude_unset=True), **overrides})
    return prune_model(model, tokenizer, config, calibration=calibration, progress=progress, residency=residency)
