"""The command line's flags: one per config field, generated from the fields (``nsamples`` ->
``--nsamples``, ``trust_remote_code`` -> ``--trust-remote-code``) with the fields' own help texts, so the
CLI, the YAML recipes and the Python API cannot drift apart; ``--help`` lists them by topic, each
method's options under the method that takes them."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Sequence
from typing import Any

from ..config import ConfigError, EvalConfig, PruneConfig, option_owners
from ..recovery.options import RecoverConfig
from . import publish

PRUNE_EPILOG = """\
examples:
  llmprune prune --data-dir ../shared/data --nsamples 32 --seqlen 512 --output out/
      (prunes the embedded SmolLM2-135M-Instruct with SparseGPT at 50 %)
  llmprune prune HuggingFaceTB/SmolLM2-135M --method sparsegpt --sparsity 0.5 --output out/
  llmprune prune meta-llama/Llama-3.1-8B --method wanda --pattern 2:4 --device cuda --output out/
  llmprune prune --recipe sparsegpt-2of4 --output out/      (a packaged recipe: `llmprune recipes` lists them)

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
the offline task configs shipped with the package are used (official names, prompts and metrics).
"""

RECOVER_EPILOG = """\
examples:
  llmprune recover out-wanda/ --calib c4 --steps 25 --batch-size 4 --seqlen 256 --output out-recovered/
      (logit distillation from the dense model out-wanda/ records; --teacher MODEL names another)
  llmprune recover out-2of4/ --teacher embedded --squarehead-weight 1 --eval-every 25 --output out-r/
  llmprune recover out-wanda/ --lora --offline-teacher teacher-cache/ --output out-r/

The masks stay exact (pruned weights zero, N:M groups whole); training windows are drawn from the
source given, held apart from the pruning's calibration windows. config.json's llmprune block gets a
"recovery" entry (steps, tokens, losses, teacher); the model card says it was distilled.
"""

# --help topics of `llmprune recover`
RECOVER_TOPICS: dict[str, tuple[str, ...]] = {
    "losses": ("kd_weight", "squarehead_weight", "lm_weight", "temperature", "top_k"),
    "teacher": ("teacher", "offline_teacher", "offline_dtype"),
    "training data": ("calib", "steps", "batch_size", "seqlen", "seed", "text_field", "data_dir"),
    "optimizer": ("lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm"),
    "LoRA": ("lora", "lora_r", "lora_alpha", "lora_targets"),
    "model and device": ("device", "dtype", "autocast", "gradient_checkpointing"),
    "evaluation and progress": ("eval_every", "eval_ppl", "eval_seqlen", "eval_windows", "save_every"),
}

# `llmprune eval`'s caps, also taken by `prune` for its --eval
EVAL_CAPS = ("max_windows", "limit")

# --help topics of the fields no method owns, in the order shown; a method's options are grouped
# under the method(s) that take them (the registry knows them). tests/test_cli_help.py checks that
# every field has a place.
TOPICS: dict[str, tuple[str, ...]] = {
    "what to prune": ("method", "sparsity", "pattern", "refine", "allocation", "reconstruct", "compensate",
                      "layer_sparsity", "module_sparsity", "targets", "ignore"),
    "calibration data": ("calib", "nsamples", "seqlen", "seed", "text_field", "data_dir"),
    "model and device": ("device", "dtype", "trust_remote_code", "allow_pickle"),
    "memory and execution": ("low_memory", "sequential", "execution", "batch_size"),
    "activation sparsity": ("activation", "activation_sparsity", "activation_allocation", "activation_greedy_step",
                            "activation_prefill", "activation_wina", "activation_holdout", "activation_holdout_windows"),
    "structured removal (a smaller dense model)": (
        "structure", "remove_heads", "remove_kv_heads", "remove_channels", "remove_layers", "remove_experts",
        "structure_budget", "depth_method", "depth_windows"),
    "after pruning": ("eval", "save_format"),
}


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


def _help(field: Any) -> str:
    """The field's description, with its default where the description does not already say it
    (a None default means 'not set', which the description explains); ``%`` escaped, as argparse
    formats help strings with ``%`` (a description's "0.5 % of" would otherwise break ``--help``)."""
    default = field.default if field.default_factory is None else field.default_factory()
    text = field.description or ""
    if not (default is None or default == [] or "default" in text.lower()):
        text = f"{text} (default: {default})"
    return text.replace("%", "%%")


def _add_flag(parser: Any, name: str, field: Any) -> None:
    flag = "--" + name.replace("_", "-")
    typ, choices = _flag_type(field.annotation)
    if typ is bool:
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=_help(field))
    else:
        parser.add_argument(flag, dest=name, type=typ, choices=choices, metavar=None if choices else name.upper(),
                            default=argparse.SUPPRESS, help=_help(field))


def field_groups(config: type = PruneConfig, skip: Sequence[str] = ("model",),
                 only: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{--help section title: field names}`` for ``config``'s fields, by :data:`TOPICS` and by the
    methods that own each option; fields of neither kind land in 'other settings'."""
    names = [n for n in config.model_fields if n not in skip and (only is None or n in only)]
    owners = option_owners() if config is PruneConfig else {}
    groups: dict[str, list[str]] = {}
    placed: set[str] = set()
    for title, fields in TOPICS.items() if config is PruneConfig else ():
        for n in fields:
            if n in names:
                groups.setdefault(title, []).append(n)
                placed.add(n)
    for n in names:
        if n in owners and n not in placed:
            groups.setdefault(f"options of {', '.join(sorted(owners[n]))}", []).append(n)
            placed.add(n)
    rest = [n for n in names if n not in placed]
    if rest:
        groups["other settings" if config is PruneConfig else "evaluation"] = rest
    return groups


def add_config_flags(parser: argparse.ArgumentParser, config: type = PruneConfig,
                     skip: Sequence[str] = ("model",), only: Sequence[str] | None = None) -> None:
    """One flag per config field, in titled groups; defaults stay unset so recipes are not overridden."""
    for title, names in field_groups(config, skip, only).items():
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, name, config.model_fields[name])


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and process")
    g.add_argument("--quiet", "-q", action="store_true", help="No progress bars; warnings and errors only.")
    g.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    g.add_argument("--threads", metavar="N", default=None,
                   help="CPU threads: 'auto' (default: all cores, spinning when the machine is idle, sleeping "
                   "when shared; see docs/reproducibility.md), a positive integer, or 'torch' (torch's own "
                   "defaults). Environment: LLMPRUNE_THREADS.")


def build_parser(version: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmprune", description="One-shot pruning of Hugging Face causal language models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "prune",
        help="prune a model and save a checkpoint that plain transformers loads",
        usage="llmprune prune [MODEL] --output DIR [--recipe NAME|FILE] [--method M] [--sparsity F | --pattern N:M] "
        "[options]",
        description="Prune MODEL layer by layer with calibration data and save it to --output.",
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                   help="Hub id or local folder; omitted: the embedded SmolLM2-135M-Instruct.")
    p.add_argument("--recipe", metavar="NAME|FILE", help="A packaged recipe by name (e.g. sparsegpt-50; "
                   "`llmprune recipes` lists them) or a YAML file; flags given on the command line override it.")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="Folder to write the pruned model to.")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it already exists.")
    p.add_argument("--resume", action="store_true",
                   help="Continue an interrupted run into the same --output from the progress it saved after each "
                        "layer (same config and model required); the result equals an uninterrupted run's.")
    add_config_flags(p)
    g = p.add_argument_group("evaluation after pruning (with --eval)")
    for name in EVAL_CAPS:
        _add_flag(g, name, EvalConfig.model_fields[name])
    _add_common(p)

    e = sub.add_parser(
        "eval",
        help="perplexity and lm-eval task accuracy of one or more models",
        usage="llmprune eval [MODEL ...] [--compare] [--ppl LIST] [--tasks LIST] [options]",
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

    r = sub.add_parser(
        "recover",
        help="recover a pruned model: distillation from the dense model, the masks kept",
        usage="llmprune recover PRUNED --output DIR [--teacher MODEL] [--calib SOURCE] [--steps N] [--lora] [options]",
        description="Train the pruned checkpoint PRUNED against its dense teacher (logit KD, SquareHead and/or the "
        "LM loss) with its zeros kept, and save it to --output.",
        epilog=RECOVER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("pruned", metavar="PRUNED", help="The pruned checkpoint folder (llmprune prune --output).")
    r.add_argument("--output", "-o", required=True, metavar="DIR", help="Folder to write the recovered model to.")
    r.add_argument("--overwrite", action="store_true", help="Replace --output (and a kept progress) if it exists.")
    r.add_argument("--resume", action="store_true", help="Continue an interrupted run from the progress it saved "
                   "every --save-every steps; the result equals an uninterrupted run's.")
    for title, names in RECOVER_TOPICS.items():
        group = r.add_argument_group(title)
        for name in names:
            _add_flag(group, name, RecoverConfig.model_fields[name])
    _add_common(r)

    sub.add_parser("recipes", help="list the packaged recipes (use one with prune --recipe NAME)",
                   description="List the recipes shipped with llmprune: each name and what it reproduces.")
    publish.add_parsers(sub, prune_parser=p)  # push, compress, decompress; prune --push-to-hub
    return parser


def eval_config_from_args(ns: argparse.Namespace) -> EvalConfig:
    return EvalConfig.build({k: v for k, v in vars(ns).items() if k in EvalConfig.model_fields},
                            source="command line")


def recover_config_from_args(ns: argparse.Namespace) -> RecoverConfig:
    return RecoverConfig.build({k: v for k, v in vars(ns).items() if k in RecoverConfig.model_fields},
                               source="command line")


def config_from_args(ns: argparse.Namespace) -> PruneConfig:
    fields = {k: v for k, v in vars(ns).items() if k in PruneConfig.model_fields}
    config = (PruneConfig.from_yaml(ns.recipe, **fields) if ns.recipe
              else PruneConfig.build(fields, source="command line"))
    caps = {k: getattr(ns, k) for k in EVAL_CAPS if getattr(ns, k, None) is not None}
    if caps:  # prune --eval wikitext2 --max-windows 16: the caps of `llmprune eval`, for the evaluation after pruning
        if config.eval is None or config.eval.empty:
            raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in caps)} cap the evaluation after "
                              "pruning; add --eval (e.g. --eval wikitext2), or evaluate later with llmprune eval")
        config.eval = EvalConfig.build({**config.eval.model_dump(exclude_unset=True), **caps}, source="command line")
    return config
