"""``evaluate``: perplexity and task accuracy of a model in memory, in one call."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from ..activation.apply import installed
from ..calibration import resolve_data_dir
from ..loading.models import effective_seqlen
from ..runtime.hub import offline_mode
from .config import EvalConfig
from .perplexity import PPL_DATASETS, DatasetError, c4_unavailable, dataset_perplexity
from .results import EvalResults
from .tasks import check_tasks, resolve_task_source, run_tasks, task_manager

log = logging.getLogger(__name__)


def preflight(cfg: EvalConfig) -> None:
    """Fail before any long work on a perplexity file that does not exist or an unknown task."""

    if "c4" in cfg.ppl and offline_mode():  # refused offline: fail before pruning, not after
        raise c4_unavailable(resolve_data_dir(cfg.data_dir))
    for ds in cfg.ppl:
        if ds not in PPL_DATASETS:
            path = Path(ds).expanduser()
            if path.suffix not in (".txt", ".jsonl", ".json"):
                raise DatasetError(f"unknown perplexity dataset {ds!r}; choose one of: {', '.join(PPL_DATASETS)}, "
                                   "or give a .txt/.jsonl/.json file")
            if not path.is_file():
                raise DatasetError(f"perplexity file {ds!r} does not exist")
    if cfg.tasks:
        source = resolve_task_source(cfg.tasks, cfg.data_dir, cfg.task_source)
        check_tasks(cfg.tasks, task_manager(source, cfg.include_path))


def evaluate(
    model,
    tokenizer,
    config: EvalConfig | dict[str, Any] | None = None,
    *,
    progress: bool = True,
    model_name: str | None = None,
    pruning: dict[str, Any] | None = None,
    **settings: Any,
) -> EvalResults:
    """Evaluate ``model`` (already in memory, e.g. just pruned) on perplexity datasets and lm-eval tasks.

    ``llmprune.evaluate(model, tok, ppl=["wikitext2"], tasks=["piqa"], max_windows=16)``; settings are the
    fields of :class:`~llmprune.config.EvalConfig`, given as keywords or as ``config``.
    """
    if isinstance(config, EvalConfig):
        cfg = config.model_copy(update=settings) if settings else config
        if settings:
            cfg = EvalConfig.build(cfg.model_dump())
    else:
        cfg = EvalConfig.build({**(config or {}), **settings})
    if cfg.empty:
        raise ValueError("nothing to evaluate: give ppl=[...] (wikitext2, c4, a file) and/or tasks=[...]")
    preflight(cfg)
    seqlen = effective_seqlen(model, cfg.seqlen)
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    if pruning is None:
        pruning = getattr(getattr(model, "config", None), "llmprune", None)
    results = EvalResults(model=str(name), settings={**cfg.model_dump(), "seqlen_used": seqlen},
                          pruning=pruning if isinstance(pruning, dict) else None)
    thresholds = installed(model)  # activation sparsity: measured on every perplexity text
    for ds in cfg.ppl:
        t0 = time.perf_counter()
        with thresholds.measure() if thresholds is not None else contextlib.nullcontext():
            r = dataset_perplexity(model, tokenizer, ds, seqlen=seqlen, max_windows=cfg.max_windows,
                                   batch_size=cfg.ppl_batch_size, data_dir=cfg.data_dir, progress=progress)
        key = r.dataset if ds in ("wikitext2", "c4") else Path(ds).stem
        results.metrics[f"{key}/ppl"] = r.ppl
        results.perplexity[key] = r.to_dict()
        if thresholds is not None:
            got = thresholds.sparsity()
            results.metrics[f"{key}/activation_sparsity"] = got["weighted"]
            results.perplexity[key]["activation_sparsity"] = got
        results.seconds[key] = time.perf_counter() - t0
        log.info("%s: perplexity %.4f (%d windows x %d tokens, %.1fs)", key, r.ppl, r.windows, r.seqlen, r.seconds)
    if cfg.tasks:
        metrics, stderr, protocol = run_tasks(
            model, tokenizer, cfg.tasks, num_fewshot=cfg.num_fewshot, limit=cfg.task_limit,
            batch_size=cfg.batch_size, include_path=cfg.include_path, data_dir=cfg.data_dir,
            source=cfg.task_source,
        )
        results.metrics.update(metrics)
        results.stderr.update(stderr)
        results.tasks.update(protocol)
        for task, p in protocol.items():
            if p.get("seconds") is not None:
                results.seconds[task] = p["seconds"]
    return results
