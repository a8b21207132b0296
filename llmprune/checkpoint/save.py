"""Writing a pruned checkpoint that plain ``transformers`` loads: weights with exact zeros, ``config.json``
with the ``llmprune`` block, the tokenizer, the report, the evaluation, RIA's permutations, EoRA's adapter
and the model card, written into a staging folder (:mod:`.folder`) and renamed into place. The metadata
names data sources without local paths.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..engine.targets import tuner_layers, unwrap_model
from ..report import EVAL_FILE, PERMUTATIONS_FILE, PruneReport
from ..steps.eora import save_adapter
from .card import write_card
from .compressed import compress_in_place
from .folder import REPORT_FILE, staged

log = logging.getLogger(__name__)

__all__ = ["REPORT_FILE", "finish_checkpoint", "save", "save_pruned"]


def save(model, tokenizer: Any, output: str | Path, report: PruneReport | None = None, *,
         save_format: str | None = None, overwrite: bool = False) -> Path:
    """Save a pruned model in memory as an llmprune checkpoint folder (what ``llmprune prune`` writes):
    safetensors weights with exact zeros, ``config.json`` with the ``llmprune`` block, the tokenizer,
    ``llmprune_report.json`` and a model card, written to a temporary sibling folder and renamed into
    place, so a failure leaves nothing half-written.

    Args:
        model: the pruned model; training wrappers (DDP, accelerate, ``torch.compile``) are looked through.
            A PEFT model must be merged first (:func:`llmprune.merge_and_keep_sparsity`), or its adapters
            saved with PEFT's own ``save_pretrained``.
        tokenizer: saved beside the weights; None saves none.
        output: the folder to write.
        report: the :class:`PruneReport` of :func:`llmprune.prune`. None: the metadata the model already
            carries (a model read with :func:`llmprune.load` from an llmprune checkpoint).
        save_format: ``"dense"`` (plain transformers loads it) or ``"compressed"`` (the sparse format, read
            by :func:`llmprune.load`); None: the report's (dense by default).
        overwrite: replace a non-empty ``output``.

    Returns the folder written.
    """
    model = unwrap_model(model)
    if tuner_layers(model):
        raise ValueError("the model still has PEFT adapter layers: merge them first with "
                         "llmprune.merge_and_keep_sparsity(peft_model) (the zeros kept), or save the adapters "
                         "with peft_model.save_pretrained(folder)")
    if save_format is not None and save_format not in ("dense", "compressed"):
        raise ValueError(f"save_format {save_format!r} is unknown; choose one of: dense, compressed")
    if report is not None:
        if not isinstance(report, PruneReport):
            raise TypeError(f"report must be the PruneReport returned by llmprune.prune, not {type(report).__name__}")
        if save_format is not None:
            report = dataclasses.replace(report, config={**report.config, "save_format": save_format})
        return save_pruned(model, tokenizer, output, report, overwrite=overwrite)
    meta = getattr(getattr(model, "config", None), "llmprune", None)
    if not isinstance(meta, dict) or "method" not in meta:
        raise ValueError("the model carries no llmprune metadata: pass report=<the PruneReport of llmprune.prune>, "
                         "or save an unpruned model with model.save_pretrained(folder)")
    return _write(output, overwrite, lambda tmp: _write_loaded(model, tokenizer, tmp),
                  save_format or "dense")  # the model in memory is dense; compressed only when asked


def _write_loaded(model, tokenizer, tmp: Path) -> None:
    model.save_pretrained(tmp, safe_serialization=True)  # config.json keeps the model's llmprune block
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _write(output: str | Path, overwrite: bool, fill: Callable[[Path], None], save_format: str) -> Path:
    """Run ``fill(tmp)`` on a temporary sibling folder of ``output``, finish it (format, model card) and
    rename it into place; on any failure remove it and leave ``output`` as it was."""
    out = Path(output).expanduser()
    with staged(out, overwrite) as tmp:
        fill(tmp)
        finish_checkpoint(tmp, save_format)  # compressed format, model card
    log.info("saved pruned model to %s", out)
    return out


def save_pruned(model, tokenizer, output: str | Path, report: PruneReport, overwrite: bool = False,
                write_model: Callable[[Path], None] | None = None) -> Path:
    """Save weights (safetensors, exact zeros), config with an ``llmprune`` block, tokenizer,
    generation config, ``llmprune_report.json`` and (if evaluated) ``llmprune_eval.json`` into ``output``.

    ``write_model(folder)`` replaces ``model.save_pretrained(folder)`` (weights, config.json, generation
    config): streamed runs (:mod:`llmprune.stream`) move the shards they already wrote."""
    def fill(tmp: Path) -> None:
        if write_model is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            write_model(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["llmprune"] = report.metadata()
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if report.evaluation is not None:
            report.evaluation.save(tmp / EVAL_FILE)
        if report.permutations:
            save_file({k: v.contiguous() for k, v in report.permutations.items()}, tmp / PERMUTATIONS_FILE)
        if report.adapters:  # low-rank corrections: a PEFT LoRA adapter beside the sparse base
            conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
            # the adapter's base is this sparse checkpoint (where it will be), not the dense source model:
            # transformers and AutoPeftModel load a repo's base from this field (push rewrites it to the repo id)
            save_adapter(tmp, report.adapters, base_model=str(Path(output).expanduser().resolve()),
                         fan_in_fan_out=conv1d)

    return _write(output, overwrite, fill, report.config.get("save_format", "dense"))


def finish_checkpoint(folder: str | Path, save_format: str = "dense") -> None:
    """Convert ``folder`` (still the temporary folder being written) to ``save_format`` and write
    its model card; the card is made last, from what the folder then holds."""
    if save_format == "compressed":
        compress_in_place(folder)
    elif save_format != "dense":
        raise ValueError(f"save_format {save_format!r} is unknown; choose one of: dense, compressed")
    write_card(folder)
