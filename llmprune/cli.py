"""Command line: a thin layer that parses flags into a :class:`PruneConfig` and calls the API.

Flags are generated from the config's fields (``nsamples`` -> ``--nsamples``,
``trust_remote_code`` -> ``--trust-remote-code``) with the fields' own help texts, so the CLI,
the YAML recipes and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

from .config import ConfigError, EvalConfig, PruneConfig

log = logging.getLogger("llmprune")

PRUNE_EPILOG = """\
examples:
  llmprune prune --data-dir ../shared/data --nsamples 32 --seqlen 512 --output out/
      (prunes the embedded SmolLM2-135M-Instruct with SparseGPT at 50 %)
  llmprune prune HuggingFaceTB/SmolLM2-135M --method sparsegpt --sparsity 0.5 --output out/
  llmprune prune meta-llama/Llama-3.1-8B --method wanda --pattern 2:4 --device cuda --output out/
  llmprune prune --recipe recipes/sparsegpt-2of4.yaml --output out/

The result loads with AutoModelForCausalLM.from_pretrained(OUTPUT); config.json gets an
"llmprune" block and OUTPUT/llmprune_report.json holds per-module sparsity and errors.
"""


EVAL_EPILOG = """\
examples:
  llmprune eval out/ --ppl wikitext2,c4 --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa
  llmprune eval --data-dir ../shared/data --ppl wikitext2 --max-windows 16
      (the embedded SmolLM2-135M-Instruct; tasks read their documents from the data dir)
  llmprune eval --compare MODEL out-wanda/ out-sparsegpt/ --ppl wikitext2 --tasks piqa --output cmp.json

Perplexity follows the pruning papers: the WikiText-2 raw test split joined with "\\n\\n" (C4: the
first 1,100 validation documents joined with " ", 256 windows), tokenized once, non-overlapping
windows of --seqlen tokens, mean token NLL. Tasks run in-process through lm-eval; with a data dir
the offline configs of eval/tasks/ are used (official names, prompts and metrics).
"""


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """argparse ``type`` and ``choices`` for a config field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return str, None  # comma-separated
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if bool in args and literals:  # e.g. bool | Literal["auto"]: --nm-exact true|false|auto
        return str, ["true", "false", *[str(v) for lit in literals for v in typing.get_args(lit)]]
    if args:  # Optional[X] / Union
        inner = args[0]
        if typing.get_origin(inner) in (list, dict):
            return str, None  # comma-separated list, or 'RE=V;RE=V'
        if typing.get_origin(inner) is typing.Literal:
            return str, list(typing.get_args(inner))
        if isinstance(inner, type) and issubclass(inner, EvalConfig):
            return str, None  # --eval wikitext2,piqa
        return inner, None
    return annotation, None


def add_config_flags(parser: argparse.ArgumentParser, config: type = PruneConfig,
                     skip: Sequence[str] = ("model",), only: Sequence[str] | None = None) -> None:
    """One flag per config field; defaults stay unset so recipes are not overridden."""
    for name, field in config.model_fields.items():
        if name in skip or (only is not None and name not in only):
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default_factory is None else field.default_factory()
        help_ = f"{field.description} (default: {default})"
        typ, choices = _flag_type(field.annotation)
        if typ is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)
        else:
            metavar = None if choices else name.upper()
            parser.add_argument(flag, dest=name, type=typ, choices=choices, metavar=metavar,
                                default=argparse.SUPPRESS, help=help_)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmprune", description="One-shot pruning of Hugging Face causal language models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "prune",
        help="prune a model and save a checkpoint that plain transformers loads",
        description="Prune MODEL layer by layer with calibration data and save it to --output.",
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                   help="Hub id or local folder; omitted: the embedded SmolLM2-135M-Instruct.")
    p.add_argument("--recipe", metavar="FILE", help="YAML recipe; flags given on the command line override it.")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="Folder to write the pruned model to.")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it already exists.")
    p.add_argument("--resume", action="store_true",
                   help="Continue an interrupted run into the same --output from the progress it saved after each "
                        "layer (same config and model required); the result equals an uninterrupted run's.")
    add_config_flags(p)
    _add_common(p)

    e = sub.add_parser(
        "eval",
        help="perplexity and lm-eval task accuracy of one or more models",
        description="Evaluate MODEL (a Hub id or folder; omitted: the embedded default) on perplexity "
        "datasets and lm-eval tasks; with --compare, several models against the first.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("models", nargs="*", metavar="MODEL",
                   help="Hub ids or local folders; omitted: the embedded SmolLM2-135M-Instruct.")
    e.add_argument("--compare", action="store_true",
                   help="Evaluate every MODEL and tabulate each against the first, with deltas and a PNG chart.")
    e.add_argument("--output", "-o", metavar="FILE", help="Write the results as JSON to FILE.")
    e.add_argument("--chart", metavar="PNG", help="With --compare: where to draw the chart "
                   "(default: FILE.png beside --output, else llmprune-compare.png).")
    add_config_flags(e, EvalConfig)
    add_config_flags(e, PruneConfig, only=("device", "dtype", "trust_remote_code", "allow_pickle"))
    _add_common(e)
    from .checkpoint.cli import add_parsers

    add_parsers(sub, prune_parser=p)  # push, compress, decompress; prune --push-to-hub
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="No progress bars; warnings and errors only.")
    p.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    p.add_argument("--threads", metavar="N", default=None,
                   help="CPU threads: 'auto' (default: all cores, spinning when the machine is idle, sleeping "
                   "when shared; see README 'Threads and shared machines'), a positive integer, or 'torch' "
                   "(torch's own defaults). Environment: LLMPRUNE_THREADS.")


def _version() -> str:
    from . import __version__

    return __version__


def eval_config_from_args(ns: argparse.Namespace) -> EvalConfig:
    return EvalConfig.build({k: v for k, v in vars(ns).items() if k in EvalConfig.model_fields},
                            source="command line")


def config_from_args(ns: argparse.Namespace) -> PruneConfig:
    fields = {k: v for k, v in vars(ns).items() if k in PruneConfig.model_fields}
    if ns.recipe:
        return PruneConfig.from_yaml(ns.recipe, **fields)
    return PruneConfig.build(fields, source="command line")


def _cmd_prune(ns: argparse.Namespace) -> int:
    from .api import prune_checkpoint

    config = config_from_args(ns)
    from .stream import STREAM_HOOKS

    if _heap_for_streaming not in STREAM_HOOKS:
        STREAM_HOOKS.append(_heap_for_streaming)
    report = prune_checkpoint(config, ns.output, overwrite=ns.overwrite, progress=not ns.quiet, resume=ns.resume)
    print(report.summary())
    if report.evaluation is not None:
        print()
        print(report.evaluation.markdown())
    print(f"\nsaved to {ns.output}")
    from .checkpoint.cli import push_after_prune

    push_after_prune(ns)
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    import gc
    from pathlib import Path

    from .engine import resolve_device
    from .evaluation import compare_chart, compare_table, evaluate, save_all
    from .evaluation.evaluate import preflight
    from .models import load_model

    cfg = eval_config_from_args(ns)
    if cfg.empty:
        raise ConfigError("nothing to evaluate; give --ppl (e.g. wikitext2) and/or --tasks (e.g. piqa)")
    models = ns.models or [None]
    if len(models) > 1 and not ns.compare:
        raise ConfigError(f"{len(models)} models given; pass --compare to evaluate several models against the first")
    load = PruneConfig.build({k: getattr(ns, k) for k in ("device", "dtype", "trust_remote_code", "allow_pickle")
                              if hasattr(ns, k)}, source="command line")
    preflight(cfg)  # unknown task or dataset: fail before loading anything
    device = resolve_device(load.device)
    results = []
    for name in models:
        model, tokenizer, source = load_model(name, dtype=load.dtype, trust_remote_code=load.trust_remote_code,
                                              allow_pickle=load.allow_pickle)
        from .activation import apply_from_config, installed

        if installed(model) is None:  # activation thresholds the checkpoint records, as llmprune.load installs them
            apply_from_config(model)
        model.to(device)
        label = name or f"embedded:{source}"
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


def _tune_heap() -> None:
    """Keep freed activations in glibc's heap for reuse instead of returning them at once.

    glibc's adaptive mmap threshold starts at 128 kB: until it has adapted, every activation of
    a few MB is a fresh mapping, page-faulted on first touch and unmapped when freed (measured:
    a SparseGPT run on the embedded model took 92 s with a 1 MB threshold, 78 s with 32 MB).
    Fixing it also fixes the trim threshold at 128 kB, so freeing a block at the top of the
    heap would shrink the heap for the next allocation to fault back in; that threshold is
    raised too. The disk offloader trims the heap when fragmentation has grown it
    (``malloc_trim``). glibc also gives each thread that allocates an arena of its own, each
    reserving 64 MiB of address space: harmless for resident memory, but an address-space cap
    (``ulimit -v``, ``prlimit --as``) counts them, so the arenas are capped at 2 unless
    ``MALLOC_ARENA_MAX`` is set. The CLI owns its process, so it may set these; the library never does.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # the user's own glibc tuning wins
                libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD = 32 MiB
            if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
                libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD = 1 GiB
            if "MALLOC_ARENA_MAX" not in os.environ:  # each thread's arena reserves 64 MiB of address space
                libc.mallopt(-8, 2)  # M_ARENA_MAX = 2: the main heap and one more (an `ulimit -v` cap counts them)
        except (OSError, AttributeError):
            pass


def _heap_for_streaming() -> None:
    """A streamed run (``--low-memory``, or chosen because the model does not fit) wants its address space
    flat, not the last few percent of speed: tensors of 1 MiB and more are mapped and unmapped on their own,
    so freed layers leave no holes in the heap (measured, 200-layer Llama, 3.3 GB of weights: the heap's
    address space grew to 4.2 GB at a resident 0.6 GB with the 32 MiB threshold, and stayed at 1.2 GB with
    1 MiB; an ``ulimit -v`` cap counts address space)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD = 128 MiB
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    _tune_heap()
    parser = build_parser()
    ns = parser.parse_args(argv)
    level = logging.DEBUG if ns.verbose else logging.WARNING if ns.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if ns.command in ("prune", "eval"):  # before torch loads: the OpenMP wait policy is read at import
        from .threads import ThreadSettingError, apply_thread_policy, start_rebalancing

        try:
            apply_thread_policy(ns.threads)
        except ThreadSettingError as e:
            print(f"llmprune: error: {e}", file=sys.stderr)
            return 2
        start_rebalancing()  # follow other runs that start or end while this one goes on
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if ns.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from .data import CalibrationError
    from .models import ModelLoadError
    from .saving import OutputExistsError

    from .evaluation import DatasetError, TaskError
    from .checkpoint import LoadError, PushError
    from .checkpoint.cli import COMMANDS, run
    from .threads import sync_torch

    sync_torch()  # torch is loaded now: make its thread count match the policy's

    try:
        if ns.command in COMMANDS:
            return run(ns)
        return _cmd_prune(ns) if ns.command == "prune" else _cmd_eval(ns)
    except (ConfigError, CalibrationError, ModelLoadError, OutputExistsError, DatasetError, TaskError,
            LoadError, PushError) as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
