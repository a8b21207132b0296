"""A pruning run as named stages, in the order the data moves:

    resolve -> choose residency -> load -> calibrate -> observe/allocate -> prune layer by layer
            -> (activation thresholds) -> evaluate -> save

:func:`prune_checkpoint` is that sequence for a checkpoint on disk; :mod:`.prune` holds the in-memory
part (calibrate .. activation), :mod:`.streaming` the variant whose layers are read from the shards,
and :mod:`.activation` the activation-sparsity stage. Where the layers live while they are pruned (in
memory with finished layers offloaded to disk, streamed from the shards, saved for ``--resume``, one rank
of several) is chosen once, in :func:`choose_residency`; the engine is handed the result.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..calibration import resolve_data_dir
from ..checkpoint.folder import REPORT_FILE, check_output
from ..checkpoint.load import load_model
from ..checkpoint.save import save_pruned
from ..engine.capture import resolve_device, whole_model_on
from ..engine.residency.distributed import Collective, local_size, setup
from ..engine.residency.offload import DiskOffloader
from ..engine.residency.resume import Progress, check_partial, source_folder
from ..errors import ConfigError
from ..evaluation.evaluate import evaluate, preflight
from ..report import PruneReport
from ..steps.eora import applied
from .prune import prune_model
from .streaming import prune_streaming, should_stream

if TYPE_CHECKING:
    from ..config import PruneConfig

log = logging.getLogger(__name__)

__all__ = ["Residency", "choose_residency", "prune_checkpoint", "prune_model"]


@dataclass(frozen=True)
class Residency:
    """Where a run's layers live: ``streamed`` from the shards, else loaded whole with finished layers
    offloaded to disk; ``resumable``: progress saved after each layer; ``rank`` of ``world_size`` processes
    (one writer, rank 0, of the output and the progress)."""

    streamed: bool
    resumable: bool
    rank: int = 0
    world_size: int = 1


def choose_residency(config: PruneConfig, resume: bool) -> Residency:
    """The one place the residency strategy is decided: streaming when asked (``low_memory``) or when the
    weights do not fit, in one process or several (under torchrun: one rank of them, each holding its own
    copy of the weights, and every rank taking the decision of any rank that must stream)."""
    rank, world_size = setup(config.device)  # under torchrun / accelerate launch: one rank of several
    if world_size > 1:
        streamed = Collective(rank, world_size).any(should_stream(config, copies=local_size()),
                                                    "choosing where the layers live")
        return Residency(streamed=streamed, resumable=True, rank=rank, world_size=world_size)
    return Residency(streamed=should_stream(config), resumable=True)


def _resolve(config: PruneConfig, output: str | Path, overwrite: bool, resume: bool) -> tuple[Residency, Path]:
    """Every check that can fail before a model loads: the output, the distributed set-up, leftover progress,
    the data dir, the evaluation asked for; then the residency. Returns it and the progress folder."""
    check_output(output, overwrite)
    if config.structured and resume:
        raise ConfigError("--resume is not supported for structured removal yet (its progress is not saved per "
                          "layer); run it again without --resume")
    where = choose_residency(config, resume)
    if config.structured and where.world_size > 1:
        raise ConfigError("structured removal runs in one process; launch it without torchrun")
    if config.structured and where.streamed:
        raise ConfigError("the model's weights do not fit in free memory, and structured removal holds the whole "
                          "model in memory (streaming it from the shards is not supported yet); free memory or "
                          "use a machine with more")
    partial = check_partial(output, resume, overwrite, writer=where.rank == 0)
    if where.world_size > 1:  # rank 0 has removed what --overwrite removes before any rank writes
        Collective(where.rank, where.world_size).barrier("checking the output")
    resolve_data_dir(config.data_dir)
    if config.eval_settings is not None:
        preflight(config.eval_settings)
    return where, partial


def prune_checkpoint(
    config: PruneConfig, output: str | Path, overwrite: bool = False, progress: bool = True, resume: bool = False
) -> PruneReport:
    """Load ``config.model`` (or the embedded default), prune it, and save it to ``output``.

    Progress is saved after every layer beside ``output`` (:mod:`llmprune.engine.residency.resume`);
    ``resume`` continues an interrupted run of the same config and model from it."""
    where, partial = _resolve(config, output, overwrite, resume)
    if where.streamed:
        return prune_streaming(config, output, overwrite=overwrite, progress=progress, resume=resume)
    t0 = time.perf_counter()
    model, tokenizer, source = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                                          allow_pickle=config.allow_pickle)
    t_load = time.perf_counter() - t0
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    offload = Path(tempfile.mkdtemp(prefix=f".{out.name}.offload-", dir=out.parent))
    tracker = None
    try:
        offloader = DiskOffloader(offload)
        tracker = (Progress(offloader, partial, config, source_folder(source), resume)
                   if where.resumable and not config.structured else offloader)
        report = prune_model(model, tokenizer, config, progress=progress, residency=tracker)
        report.model = config.model or f"embedded:{source}"
        if config.eval_settings is not None:
            _evaluate(model, tokenizer, config, report, progress)
        t1 = time.perf_counter()
        if where.rank == 0:  # one writer; the other ranks hold the same pruned model
            with offloader.paging_out():
                save_pruned(model, tokenizer, output, report, overwrite=overwrite)
        if isinstance(tracker, Progress):
            tracker.discard()
    except BaseException:
        if isinstance(tracker, Progress):
            tracker.failed()  # progress kept for --resume, an empty folder removed
        raise
    finally:
        shutil.rmtree(offload, ignore_errors=True)  # mapped pages stay valid until the model is freed
    report.seconds = {"load": t_load, **report.seconds, "save": time.perf_counter() - t1,
                      "total": time.perf_counter() - t0}
    if where.rank == 0:
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")  # with final timings
    return report


def _evaluate(model, tokenizer, config: PruneConfig, report: PruneReport, progress: bool) -> None:
    """The evaluation stage: the sparse model with its low-rank corrections (if any), recorded in ``report``;
    on the pruning device (``config.device``), where the whole model fits there, and back in place after."""
    t = time.perf_counter()
    with whole_model_on(model, resolve_device(config.device)), applied(model, report.adapters):
        report.evaluation = evaluate(model, tokenizer, config.eval_settings, progress=progress,
                                     model_name=report.model, pruning=report.metadata())
    report.seconds["eval"] = time.perf_counter() - t
