"""Writing a pruned checkpoint that plain ``transformers`` loads.

Everything is written into a temporary sibling folder and renamed into place once complete,
so an interrupted run never leaves a half-written output behind. The files get the modes a plain
file creation gets under the process umask (``tempfile.mkdtemp`` makes its folder 0700, and
safetensors writes 0600 whatever the umask), and the metadata names data sources without local paths.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import EVAL_FILE, PERMUTATIONS_FILE, PruneReport

log = logging.getLogger(__name__)

REPORT_FILE = "llmprune_report.json"


class OutputExistsError(FileExistsError):
    pass


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``output`` exists and may not be replaced."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} is a file; give a folder path")
    parent = next((p for p in out.absolute().parents if p.exists()), None)  # the nearest existing ancestor
    if parent is not None and not parent.is_dir():
        raise OutputExistsError(f"output {str(out)!r} lies under {str(parent)!r}, which is a file; give a folder path")
    if parent is not None:  # can we write there? (a probe folder, removed at once: nothing is left)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".llmprune-probe-", dir=parent))
        except OSError as e:
            raise OutputExistsError(f"output {str(out)!r} cannot be created in {str(parent)!r} ({e.strerror}); "
                                    "choose another --output") from None
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out)!r} already exists and is not empty; pass --overwrite "
            "(overwrite=True) to replace it, or choose another --output"
        )
    return out


def _umask() -> int:
    """The process umask; read from /proc where possible, since os.umask can only read it by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_permissions(folder: Path) -> None:
    """Folders ``0o777 & ~umask`` and files ``0o666 & ~umask`` (0755 / 0644 under the usual 022), as
    ``save_pretrained`` into a fresh folder gives its files written by ``open``."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for names, mode in ((dirs, 0o777), (files, 0o666)):
            for name in names:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, mode & ~mask)
    os.chmod(folder, 0o777 & ~mask)


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
    from .training import _tuner_layers, unwrap_model

    model = unwrap_model(model)
    if _tuner_layers(model):
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
    out = check_output(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        from .checkpoint.save import finish_checkpoint

        finish_checkpoint(tmp, save_format)  # compressed format, model card
        _umask_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in report.permutations.items()}, tmp / PERMUTATIONS_FILE)
        if report.adapters:  # low-rank corrections: a PEFT LoRA adapter beside the sparse base
            from .steps.eora import save_adapter

            conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
            # the adapter's base is this sparse checkpoint (where it will be), not the dense source model:
            # transformers and AutoPeftModel load a repo's base from this field (push rewrites it to the repo id)
            save_adapter(tmp, report.adapters, base_model=str(Path(output).expanduser().resolve()),
                         fan_in_fan_out=conv1d)

    return _write(output, overwrite, fill, report.config.get("save_format", "dense"))
