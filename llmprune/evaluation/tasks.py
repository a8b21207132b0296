"""Task accuracy through lm-eval, in-process, on a model already in memory.

lm-eval's ``HFLM`` wraps the model object itself (no reload, no fork). Task configs come from
lm-eval's own registry (official names, data from the Hub) or, offline, from the task folders
shipped with the package under ``llmprune/evaluation/task_configs/`` (``eval/tasks/`` in a checkout
links there): they carry the official names and prompts but read the documents from the data dir
(``--data-dir`` / ``$LLMPRUNE_DATA_DIR``, laid out like ``../shared/data``).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASK_CONFIGS = Path(__file__).resolve().parent / "task_configs"  # package data: YAML configs, offline.py


class TaskError(ValueError):
    """A task is unknown or cannot run; the message names the available ones."""


def offline_tasks_dir() -> Path | None:
    """The folder of offline task configs: ``$LLMPRUNE_TASKS_DIR``, else the package's ``task_configs``
    (installed with it; ``eval/tasks`` of a checkout links there); None when neither is there."""
    env = os.environ.get("LLMPRUNE_TASKS_DIR")
    if env:
        return Path(env).expanduser()
    return TASK_CONFIGS if TASK_CONFIGS.is_dir() else None


def offline_task_names() -> list[str]:
    """Tasks with an offline config: the ``task:`` names of the YAML files under :func:`offline_tasks_dir`."""
    root = offline_tasks_dir()
    if root is None:
        return []
    names = set()
    for path in root.rglob("*.yaml"):
        m = re.search(r"^task:\s*['\"]?([\w.-]+)", path.read_text(encoding="utf-8"), re.MULTILINE)
        if m:
            names.add(m.group(1))
    return sorted(names)


@contextlib.contextmanager
def _data_dir_env(data_dir: str | Path | None) -> Iterator[None]:
    """Offline task configs read ``$LLMPRUNE_DATA_DIR``; set it for the run and restore it."""
    old = os.environ.get("LLMPRUNE_DATA_DIR")
    if data_dir is not None:
        os.environ["LLMPRUNE_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    try:
        yield
    finally:
        if data_dir is not None:
            if old is None:
                os.environ.pop("LLMPRUNE_DATA_DIR", None)
            else:
                os.environ["LLMPRUNE_DATA_DIR"] = old


def resolve_task_source(tasks: list[str], data_dir: str | Path | None, source: str = "auto") -> str:
    """``"local"`` (the offline configs of :func:`offline_tasks_dir`) or ``"hub"`` (lm-eval's official configs).

    ``auto`` takes the offline configs when a data dir is set (flag or environment) and every
    requested task has one, else lm-eval's own configs (which download their data).
    """
    if source in ("local", "hub"):
        return source
    if source != "auto":
        raise TaskError(f"task source {source!r} is not one of: auto, local, hub")
    have_dir = bool(data_dir or os.environ.get("LLMPRUNE_DATA_DIR"))
    offline = set(offline_task_names())
    return "local" if have_dir and offline and all(t in offline for t in tasks) else "hub"


def task_manager(source: str, include_path: list[str] | None = None):
    """lm-eval's TaskManager over its own tasks, plus the offline configs (``source="local"``) and ``include_path``."""
    return _task_manager(source, tuple(str(Path(p).expanduser().resolve()) for p in include_path or []))


@functools.lru_cache(maxsize=4)
def _task_manager(source: str, include_path: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    paths = list(include_path)
    if source == "local":
        root = offline_tasks_dir()
        if root is None:
            raise TaskError(
                f"offline task configs not found: {TASK_CONFIGS} is missing from this install of llmprune; "
                "reinstall it, set LLMPRUNE_TASKS_DIR to a folder of task configs (eval/tasks of a checkout), "
                "or use --task-source hub"
            )
        paths = [str(root)] + paths
    for p in paths:
        if not Path(p).is_dir():
            raise TaskError(f"include path {p!r} is not a folder; give a folder of lm-eval task YAML files")
    # Offline configs alone need none of lm-eval's ~200 task folders (indexing them takes ~15 s);
    # an include path may build on them (groups, includes), so it gets them.
    defaults = source != "local" or bool(include_path)
    return TaskManager(include_path=paths or None, include_defaults=defaults)


def check_tasks(tasks: list[str], manager) -> None:
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if not missing:
        return
    offline = offline_task_names()
    lines = []
    for t in missing:
        close = difflib.get_close_matches(t, list(known), n=3)
        lines.append(f"unknown task {t!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
    raise TaskError(
        "; ".join(lines) + f". Offline configs: {', '.join(offline) or 'none'}; every lm-eval task name works "
        "when the Hub is reachable (`lm_eval ls tasks` lists them); add your own with --include-path"
    )


def normalize_metrics(task: str, values: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"task/acc": x}``, ``{"task/acc": s}``."""
    metrics, stderr = {}, {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        suffix = "" if filt == "none" else f"@{filt}"
        if metric.endswith("_stderr"):
            stderr[f"{task}/{metric.removesuffix('_stderr')}{suffix}"] = float(value)
        else:
            metrics[f"{task}/{metric}{suffix}"] = float(value)
    return metrics, stderr


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    include_path: list[str] | None = None,
    data_dir: str | Path | None = None,
    source: str = "auto",
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, float], dict[str, dict]]:
    """Evaluate ``tasks`` with lm-eval on the in-memory ``model``: ``(metrics, stderr, protocol per task)``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    source = resolve_task_source(tasks, data_dir, source)
    manager = task_manager(source, include_path)
    check_tasks(tasks, manager)
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    protocol: dict[str, dict] = {}
    offline = set(offline_task_names()) if source == "local" else set()
    with _data_dir_env(data_dir):
        for task in tasks:  # one at a time: each task's time is part of its protocol
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
                verbosity="WARNING",
            )
            seconds = time.perf_counter() - t0
            for name, values in out["results"].items():
                m, s = normalize_metrics(name, values)
                metrics.update(m)
                stderr.update(s)
                n = out.get("n-samples", {}).get(name, {})
                cfg = out.get("configs", {}).get(name, {})
                protocol[name] = {
                    "docs": n.get("effective"),
                    "docs_total": n.get("original"),
                    "num_fewshot": out.get("n-shot", {}).get(name, num_fewshot or 0),
                    "limit": limit,
                    "version": out.get("versions", {}).get(name),
                    # a stable label (stored results carry it), not a path: the configs are package data
                    "source": "offline:eval/tasks" if name in offline else "lm-eval",
                    "output_type": cfg.get("output_type"),
                    "batch_size": str(batch_size),
                    "seconds": seconds if name == task else None,
                }
    return metrics, stderr, protocol
