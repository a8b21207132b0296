"""What each subcommand does with its parsed flags: a call of the Python API and a printout."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from ..activation.apply import apply_from_config, installed
from ..api import prune_checkpoint
from ..checkpoint import compress, decompress, push
from ..checkpoint.card import base_model_of, recorded_model
from ..checkpoint.folder import OutputExistsError
from ..checkpoint.format import read_config
from ..checkpoint.hub import PushError
from ..checkpoint.load import LoadError, load_model
from ..config import PruneConfig, recipe_summaries
from ..engine.capture import resolve_device
from ..engine.residency.distributed import DistributedError
from ..engine.residency.resume import describe_partial
from ..errors import ConfigError
from ..evaluation import compare_chart, compare_table, evaluate, save_all
from ..evaluation.evaluate import preflight
from ..loading.models import EMBEDDED, ModelLoadError
from ..pipeline import streaming
from ..recovery.progress import describe_progress
from ..recovery.recover import recover_checkpoint
from .parser import config_from_args, eval_config_from_args, recover_config_from_args

# Errors of bad input, answered with one line and exit 2: every ValueError (ConfigError, CalibrationError,
# DatasetError, TaskError, ...) and the loaders' and writers' own.
USER_ERRORS = (ValueError, OutputExistsError, ModelLoadError, LoadError, PushError)
# Faults of the run's environment, answered with one line and exit 1: a process of a torchrun group died.
RUN_ERRORS = (DistributedError,)


def cmd_prune(ns: argparse.Namespace, heap_for_streaming) -> int:
    config = config_from_args(ns)
    if heap_for_streaming not in streaming.STREAM_HOOKS:
        streaming.STREAM_HOOKS.append(heap_for_streaming)
    report = prune_checkpoint(config, ns.output, overwrite=ns.overwrite, progress=not ns.quiet, resume=ns.resume)
    print(report.summary())
    if report.evaluation is not None:
        print()
        print(report.evaluation.markdown())
    print(f"\nsaved to {ns.output}")
    if getattr(ns, "push_to_hub", None):  # prune --push-to-hub: push the folder just written
        r = push(ns.output, ns.push_to_hub, private=ns.private)
        print(f"pushed {len(r.files)} files to {r.repo_id}: {r.commit_url}")
    return 0


def interrupted(ns: argparse.Namespace) -> str:
    """What an interrupted command left: for ``prune``, the progress kept for ``--resume`` (where, how large,
    how to continue or remove it); the scratch folders are gone by then."""
    kept = describe_partial(ns.output) if ns.command == "prune" else None
    if ns.command == "recover":
        kept = describe_progress(ns.output)
    return kept or "nothing was written"


def cmd_eval(ns: argparse.Namespace) -> int:
    cfg = eval_config_from_args(ns)
    if cfg.empty:
        raise ConfigError("nothing to evaluate; give --ppl (e.g. wikitext2) and/or --tasks (e.g. piqa)")
    models = [None if m == EMBEDDED else m for m in ns.models] or [None]
    if len(models) > 1 and not ns.compare:
        raise ConfigError(f"{len(models)} models given; pass --compare to evaluate several models against the first")
    if ns.compare and len(models) == 1:
        models = [dense_model_of(models[0]), models[0]]
    load = PruneConfig.build({k: getattr(ns, k) for k in ("device", "dtype", "trust_remote_code", "allow_pickle")
                              if hasattr(ns, k)}, source="command line")
    preflight(cfg)  # unknown task or dataset: fail before loading anything
    device = resolve_device(load.device)
    results = []
    for name in models:
        model, tokenizer, source = load_model(name, dtype=load.dtype, trust_remote_code=load.trust_remote_code,
                                              allow_pickle=load.allow_pickle)
        if installed(model) is None:  # activation thresholds the checkpoint records, as llmprune.load installs them
            apply_from_config(model)
        model.to(device)
        label = name or f"{EMBEDDED}:{source}"
        r = evaluate(model, tokenizer, cfg, progress=not ns.quiet, model_name=label)
        results.append(r)
        print(f"\n## {label}\n")
        print(r.markdown())
        del model, tokenizer
        gc.collect()
    if ns.compare:
        print("\n## comparison\n")
        print(compare_table(results))
        chart = Path(ns.chart) if ns.chart else (
            Path(ns.output).with_suffix(".png") if ns.output else Path("llmprune-compare.png"))
        compare_chart(results, chart)
        print(f"\nchart: {chart}")
        if ns.output:
            save_all(results, ns.output)
    elif ns.output:
        results[0].save(ns.output)
    if ns.output:
        print(f"results: {ns.output}")
    return 0


def dense_model_of(pruned: str | None) -> str | None:
    """The model a pruned checkpoint was pruned from, as its report records it (None: the embedded default),
    for ``eval --compare PRUNED``; an error that asks for it when it is not recorded or not loadable."""
    folder = Path(pruned).expanduser() if pruned is not None else None
    recorded = None
    if folder is not None and folder.is_dir():
        recorded = recorded_model(folder, (read_config(folder).get("llmprune") or {}) if (folder / "config.json")
                                  .is_file() else {})
    if recorded is not None and recorded.startswith(f"{EMBEDDED}:"):
        return None
    if recorded is not None and (base_model_of(recorded) or Path(recorded).expanduser().is_dir()):
        return recorded
    raise ConfigError(f"--compare evaluates every MODEL against the first, and {pruned or EMBEDDED!r} records no "
                      f"dense model to compare with; name it first, e.g. `llmprune eval --compare DENSE "
                      f"{pruned or ''}` ({EMBEDDED!r} names the embedded SmolLM2-135M-Instruct)")


def cmd_recover(ns: argparse.Namespace) -> int:
    """``llmprune recover``: the teacher is --teacher, else the dense model the checkpoint records."""
    config = recover_config_from_args(ns)
    teacher = config.teacher
    if teacher is None and config.needs_teacher:
        try:
            teacher = dense_model_of(ns.pruned)
        except ConfigError:
            raise ConfigError(f"{ns.pruned!r} records no dense model to distil from; name the teacher with "
                              f"--teacher MODEL ({EMBEDDED!r} names the embedded SmolLM2-135M-Instruct)") from None
    elif teacher == EMBEDDED:
        teacher = None
    r = recover_checkpoint(ns.pruned, ns.output, config, teacher=teacher, overwrite=ns.overwrite, resume=ns.resume,
                           progress=not ns.quiet)
    first, last = r.history[0]["loss"], r.history[-1]["loss"]
    print(f"recovered {r.steps} steps ({r.tokens:,} tokens, {r.seconds:.1f} s): loss {first:.4f} -> {last:.4f}")
    if r.sparsity.get("after") is not None:
        print(f"sparsity of the pruned weights: {r.sparsity['before']:.4f} -> {r.sparsity['after']:.4f} "
              f"({r.sparsity['revived']} pruned weights non-zero)")
    for e in r.evals:
        print(f"  step {e['step']}: {config.eval_ppl} perplexity {e['ppl']:.3f}")
    print(f"\nsaved to {ns.output}")
    return 0


def cmd_recipes(ns: argparse.Namespace) -> int:
    rows = recipe_summaries()
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        print(f"{name:<{width}}  {summary}")
    print("\nuse one with: llmprune prune --recipe NAME --output DIR (flags given beside it override it)")
    return 0


def cmd_publish(ns: argparse.Namespace) -> int:
    """``push``, ``compress``, ``decompress``."""
    if ns.command == "push":
        r = push(ns.folder, ns.repo_id, private=ns.private, revision=ns.revision, commit_message=ns.message,
                 create_pr=ns.create_pr, license=ns.license)
        print(f"pushed {len(r.files)} files to {r.repo_id}: {r.pr_url or r.commit_url}")
    elif ns.command == "compress":
        out = compress(ns.src, ns.dst, pattern=ns.pattern, overwrite=ns.overwrite)
        print(f"compressed checkpoint written to {out}")
    else:
        out = decompress(ns.src, ns.dst, overwrite=ns.overwrite)
        print(f"dense checkpoint written to {out}")
    return 0


COMMANDS = {"eval": cmd_eval, "recover": cmd_recover, "recipes": cmd_recipes, "push": cmd_publish, "compress": cmd_publish,
            "decompress": cmd_publish}
