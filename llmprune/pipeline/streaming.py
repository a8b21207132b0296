"""The streamed variant of the pipeline: when to stream (``--low-memory``, or weights larger than the
memory available), what streaming refuses, and the run itself (:func:`prune_streaming`), which hands the
engine a :class:`~llmprune.engine.residency.streaming.ShardStream` residency. Under several processes each
rank streams every layer itself and prunes its share of the calibration windows; rank 0 writes.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint.folder import REPORT_FILE, check_output
from ..checkpoint.save import save_pruned
from ..engine.residency.distributed import world
from ..engine.residency.resume import Progress, check_partial
from ..engine.residency.streaming import ShardStream, build_skeleton
from ..engine.targets import find_decoder_layers
from ..errors import ConfigError
from ..loading.models import ModelLoadError, embedded_model_path, load_tokenizer, resolve_dtype
from ..loading.shards import INDEX_FILE, ShardIndex, StreamingError, resolve_folder
from ..runtime.memory import available_memory
from ..calibration import calibration_tokens
from .prune import needs_calibration, prune_model

if TYPE_CHECKING:
    from ..config import PruneConfig

log = logging.getLogger(__name__)

# Called with no arguments when a streamed run starts. The library registers none; the CLI, which owns its
# process, registers its heap setting for streaming (small allocations only on the heap: see cli._tune_heap).
STREAM_HOOKS: list = []
FIT_FRACTION = 0.7  # in-memory pruning when the weights take at most this share of the memory available


def should_stream(config: PruneConfig, folder: Path | None = None, copies: int = 1) -> bool:
    """``config.low_memory``, or when it is None, whether the weights (``copies`` of them: one per process on
    this machine) exceed ``FIT_FRACTION`` of the memory available (logged). A Hub id is not downloaded to
    decide: its ``model.safetensors.index.json`` total is read when it is cached, else the in-memory path is
    taken."""
    if config.low_memory is not None:
        return config.low_memory
    try:
        folder = folder or _local_folder(config.model)
        if folder is None:
            return False
        dtype = resolve_dtype(config.dtype)
        weights = copies * ShardIndex(folder).nbytes(dtype if isinstance(dtype, torch.dtype) else None)
    except (StreamingError, ModelLoadError, OSError):
        return False  # the in-memory loader gives the error with its own message
    avail = available_memory()
    if weights > FIT_FRACTION * avail:
        log.info("the weights (%.2f GB) do not fit in the memory available (%.2f GB): streaming the decoder layers "
                 "from the shards (--low-memory); --no-low-memory forces the in-memory path", weights / 1e9,
                 avail / 1e9)
        return True
    return False


def _local_folder(model: str | None) -> Path | None:
    if model is None:
        return embedded_model_path()
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, INDEX_FILE)
        return Path(cached).parent if isinstance(cached, str) else None
    except Exception:  # not a valid repo id, or no cache
        return None


def check_streamable(config: PruneConfig) -> None:
    """What streaming cannot do, refused before any work with the fix."""
    bad = []
    if config.eval_settings is not None:
        bad.append("--eval (the pruned layers are on disk, not in memory): evaluate the output afterwards with "
                   "`llmprune eval OUTPUT`")
    if config.calib == "self":
        bad.append("--calib self (sampling text needs the whole model in memory): give a dataset or file")
    if getattr(config, "activation", None) is not None:
        bad.append("activation sparsity (its pass reads every layer again): run it on the pruned output")
    if config.method == "none":
        bad.append("--method none")
    if bad:
        raise ConfigError("streaming (--low-memory) does not support " + "; ".join(bad)
                          + "; or pass --no-low-memory to prune in memory")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def prune_streaming(config: PruneConfig, output: str | Path, overwrite: bool = False, progress: bool = True,
                    resume: bool = False, folder: Path | None = None):
    """Prune ``config.model`` into ``output`` with the decoder layers streamed from its shards; the
    same checkpoint as :func:`llmprune.prune_checkpoint` in memory. The layer shards are written into
    the run's progress folder (:mod:`llmprune.resume`), from which ``resume`` continues an interrupted
    run. Returns the :class:`PruneReport`. Under several processes rank 0 writes the output and the progress."""
    rank, _ = world()
    check_streamable(config)
    check_output(output, overwrite)
    staging = check_partial(output, resume, overwrite, writer=rank == 0)
    for hook in STREAM_HOOKS:
        hook()
    t0 = time.perf_counter()
    folder = folder or resolve_folder(config.model, config.trust_remote_code)
    model, index = build_skeleton(folder, config, read_rest=False)  # the embeddings are read by the capture
    layers_name, layers = find_decoder_layers(model)
    stream = ShardStream(index, staging, layers_name, model.dtype, writer=rank == 0)
    stream.set_aside(model, layers)
    tokenizer = load_tokenizer(folder, config.trust_remote_code)
    t_load = time.perf_counter() - t0
    ids = calib = None
    if needs_calibration(config):  # the tokens first: the tokenizer is not held while the layers are pruned
        ids, calib = calibration_tokens(config, model, tokenizer)
        tokenizer = None
        gc.collect()
        if stream._libc is not None:
            stream._libc.malloc_trim(0)
    t_calib = time.perf_counter() - t0 - t_load
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tracker = None
    try:
        tracker = Progress(stream, staging, config, folder, resume)
        log.info("streaming %s: decoder layers read from %d shard(s) when reached, written to %s once pruned",
                 config.model or "the embedded model", len(set(index.weight_map.values())), staging)
        report = prune_model(model, tokenizer, config, calibration=ids, progress=progress, residency=tracker)
        if calib is not None:  # described as read from its source, not as the tokens handed over
            report.calibration = calib
            report.seconds["calibration"] += t_calib
        if config.model is None:
            report.model = f"embedded:{folder}"
        t1 = time.perf_counter()
        if rank == 0:  # one writer; the other ranks pruned the same layers and dropped them
            tokenizer = tokenizer or load_tokenizer(folder, config.trust_remote_code)
            save_pruned(model, tokenizer, output, report, overwrite=overwrite,
                        write_model=lambda tmp: stream.write_model(model, tmp))
        tracker.discard()  # the layer shards live on in the output (hard links)
    except BaseException:
        if tracker is not None:
            tracker.failed()
        raise
    finally:
        index.close()
    report.seconds = {"load": t_load, **report.seconds, "save": time.perf_counter() - t1,
                      "total": time.perf_counter() - t0}
    if rank == 0:
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
