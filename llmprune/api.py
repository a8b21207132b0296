"""The Python API: prune a model in memory, or a checkpoint into a folder."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, PruneConfig, parse_pattern
from .engine import (LayerResidency, PrunePlan, SequentialRun, find_decoder_layers, pattern_name, resolve_device,
                     sparsity_map)
from .models import effective_seqlen
from .offload import DiskOffloader
from .report import PruneReport
from .steps import LayerTarget

log = logging.getLogger(__name__)


def calibration_tokens(config: PruneConfig, model, tokenizer, calibration: Any = None) -> tuple[torch.Tensor, dict]:
    """``(input_ids [nsamples, seqlen], description)`` from ``calibration`` or ``config.calib``.

    The description names the source and fingerprints what was read (``data_sha256``: the local file's
    bytes, None for the Hub and pre-tokenized sources; ``windows_sha256``: the windows drawn), never a path.
    """
    import hashlib

    from .data import describe_source, get_calibration, source_fingerprint

    source = config.calib if calibration is None else calibration
    seqlen = effective_seqlen(model, config.seqlen)
    ids = get_calibration(
        source, tokenizer, nsamples=config.nsamples, seqlen=seqlen, seed=config.seed,
        data_dir=config.data_dir, text_field=config.text_field, model=model,
    )
    desc = {"source": describe_source(source, config.data_dir),
            "data_sha256": source_fingerprint(source, config.data_dir),
            "windows_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
            "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": config.seed}
    return ids, desc


def build_methods(config: PruneConfig):
    """``(pruner, refiner, allocator)`` of a config, each built from the registry with its options."""
    from .registry import lookup

    pruner = lookup("method", config.method).from_config(config)
    refiner = lookup("refine", config.refine).from_config(config) if config.refine else None
    allocator = lookup("allocation", config.allocation).from_config(config) if config.allocation else None
    return pruner, refiner, allocator


def build_steps(config: PruneConfig):
    """``(reconstructor, compensator)`` of a config (each None when not asked for), built from the registry
    with their options; they run after the pruner and refinement of every target."""
    from .registry import lookup

    reconstructor = lookup("reconstruct", config.reconstruct).from_config(config) if config.reconstruct else None
    compensator = lookup("compensate", config.compensate).from_config(config) if config.compensate else None
    return reconstructor, compensator


def needs_calibration(config: PruneConfig, methods: tuple | None = None) -> bool:
    """Whether pruning with ``config`` reads calibration data: a method, step or allocator that declares
    statistics, or activation sparsity (magnitude alone reads none). ``methods``: those of ``config``,
    already built (:func:`build_methods` + :func:`build_steps`)."""
    methods = methods if methods is not None else (*build_methods(config), *build_steps(config))
    return bool(frozenset().union(*(m.needs for m in methods if m is not None))) or config.activation is not None


def _layer_targets(values: list, n_layers: int, what: str) -> list[LayerTarget]:
    if len(values) != n_layers:
        raise ConfigError(f"{what} gives {len(values)} values but the model has {n_layers} decoder layers; "
                          "give one per layer")
    return [v if isinstance(v, LayerTarget) else LayerTarget(float(v), None) for v in values]


def _module_target(value: float | str) -> LayerTarget:
    """A ``module_sparsity`` value: a fraction (unstructured) or an ``N:M`` pattern."""
    if isinstance(value, str):
        n, m = parse_pattern(value)
        return LayerTarget(1 - n / m, (n, m))
    return LayerTarget(float(value), None)


def _check_patterns(model, config: PruneConfig, target_of) -> None:
    """Every N:M pattern against the input width of the targets it applies to, before any work."""
    from .engine import find_targets

    layers_name, layers = find_decoder_layers(model)
    bad = []
    for i, layer in enumerate(layers):
        found = find_targets(layer, f"{layers_name}.{i}", config.targets, config.ignore)
        for t in found.targets + [t for g in found.groups for t in g.targets]:
            nm = target_of(t.name).nm
            if nm is not None and t.shape[1] % nm[1]:
                bad.append(f"{t.name} (input width {t.shape[1]})")
    if bad:
        raise ConfigError(
            f"pattern {config.pattern} needs input widths that are multiples of its M, but {len(bad)} target(s) "
            f"are not: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; leave them dense with --ignore, give "
            "them their own sparsity with module_sparsity, or choose another pattern"
        )


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
    :func:`llmprune.data.get_calibration`. Nothing global is read or changed: two calls in one process
    give what they give in two processes. ``overrides`` set config fields, e.g.
    ``prune(model, tok, method="wanda", pattern="2:4", refine="dsnot", allocation="owl")``.
    ``residency`` (e.g. a :class:`~llmprune.offload.DiskOffloader`) moves each layer in and out
    of memory around its pruning.
    """
    if config is None:
        config = PruneConfig.build(overrides)
    elif isinstance(config, dict):
        config = PruneConfig.build({**config, **overrides})
    elif overrides:
        config = PruneConfig.build({**config.model_dump(exclude_unset=True), **overrides})
    if config.method == "none":  # activation sparsity only (the config requires `activation` then)
        from .activation.passes import prune_activations_only

        return prune_activations_only(model, tokenizer, config, calibration, progress, residency)
    t0 = time.perf_counter()
    _, layers = find_decoder_layers(model)  # fail on unsupported models before calibration work
    per_layer = (_layer_targets(config.layer_sparsity, len(layers), "layer_sparsity")
                 if config.layer_sparsity is not None else None)
    device = resolve_device(config.device)
    pruner, refiner, allocator = build_methods(config)
    reconstructor, compensator = build_steps(config)
    prune_needs = frozenset().union(*(m.needs for m in (pruner, refiner, reconstructor, compensator) if m is not None))
    uniform = LayerTarget(config.target_sparsity, config.nm)
    per_module = {rx: _module_target(v) for rx, v in (config.module_sparsity or {}).items()}
    _check_patterns(model, config, sparsity_map(uniform, per_layer, per_module))
    if calibration is None and not needs_calibration(config, (pruner, refiner, allocator, reconstructor, compensator)):
        # magnitude needs no data: one short window keeps the engine path uniform and cheap
        ids = torch.zeros(1, 1, dtype=torch.long)
        calib = {"source": None, "nsamples": 0, "seqlen": 0, "seed": config.seed}
    else:
        ids, calib = calibration_tokens(config, model, tokenizer, calibration)
    t1 = time.perf_counter()
    run = SequentialRun(model, ids, device=device, batch_size=config.batch_size, targets=config.targets,
                        ignore=config.ignore, progress=progress, residency=residency,
                        sequential=config.sequential, execution=config.execution)
    seconds = {"calibration": t1 - t0}
    if allocator is not None:
        run.observe(allocator.needs, allocator.observe, keep_first=prune_needs)
        per_layer = _layer_targets(allocator.allocate(uniform.sparsity, uniform.nm), len(layers),
                                   f"allocation {config.allocation!r}")
        seconds["observe"] = time.perf_counter() - t1
    plan = PrunePlan(pruner, sparsity_map(uniform, per_layer, per_module), refiner=refiner, nm=uniform.nm,
                     reconstructor=reconstructor, compensator=compensator)
    t2 = time.perf_counter()
    layer_reports = run.prune(plan)
    seconds["prune"] = time.perf_counter() - t2
    if run.collective is not None:  # several processes: time in collectives (waiting included), bytes sent
        seconds["communication"] = run.collective.seconds
        log.info("rank %d: %.1f s and %.1f MB in collectives", run.collective.rank, run.collective.seconds,
                 run.collective.bytes / 2**20)
    cfg = config.model_dump()
    cfg["target_sparsity"] = config.target_sparsity
    name = config.model or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    report = PruneReport(
        config=cfg, model=str(name), calibration=calib, layers=layer_reports, seconds=seconds,
        layer_targets=[(t.sparsity, pattern_name(t.nm)) for t in per_layer] if per_layer is not None else None,
        permutations=plan.permutations, execution=run.execution, skipped=dict(run.skipped),
        nm_search=plan.nm_search, adapters=plan.adapters, uncompensated=plan.uncompensated,
    )
    if config.activation is not None:  # thresholds calibrated on the pruned model, installed on it
        from .activation.passes import add_activation

        add_activation(report, run, config, tokenizer)
    return report


def prune_checkpoint(
    config: PruneConfig, output: str | Path, overwrite: bool = False, progress: bool = True, resume: bool = False
) -> PruneReport:
    """Load ``config.model`` (or the embedded default), prune it, and save it to ``output``.

    Progress is saved after every layer beside ``output`` (:mod:`llmprune.resume`); ``resume`` continues
    an interrupted run of the same config and model from it."""
    from .data import resolve_data_dir
    from .models import load_model
    from .saving import REPORT_FILE, check_output, save_pruned

    check_output(output, overwrite)  # bad output or data dir: fail before loading the model
    from .distributed import setup
    from .resume import Progress, check_partial, source_folder

    rank, world_size = setup(config.device)  # under torchrun / accelerate launch: one rank of several
    if world_size > 1 and (resume or config.low_memory):
        raise ConfigError("--resume and --low-memory are single-process features; launch one process for them")
    partial = check_partial(output, resume, overwrite)
    resolve_data_dir(config.data_dir)
    if config.eval_settings is not None:
        from .evaluation.evaluate import preflight

        preflight(config.eval_settings)
    from .stream import prune_streaming, should_stream

    if world_size == 1 and should_stream(config):  # --low-memory, or weights larger than the memory available
        return prune_streaming(config, output, overwrite=overwrite, progress=progress, resume=resume)
    t0 = time.perf_counter()
    model, tokenizer, source = load_model(
        config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle,
    )
    t_load = time.perf_counter() - t0
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    offload = Path(tempfile.mkdtemp(prefix=f".{out.name}.offload-", dir=out.parent))
    tracker = None
    try:
        offloader = DiskOffloader(offload)
        tracker = Progress(offloader, partial, config, source_folder(source), resume) if world_size == 1 else offloader
        report = prune(model, tokenizer, config, progress=progress, residency=tracker)
        report.model = config.model or f"embedded:{source}"
        if config.eval_settings is not None:
            from .evaluation import evaluate

            t_eval = time.perf_counter()
            from .steps.eora import applied

            with applied(model, report.adapters):  # the sparse base + its low-rank corrections, if any
                report.evaluation = evaluate(model, tokenizer, config.eval_settings, progress=progress,
                                             model_name=report.model,
                                             pruning=report.metadata())
            report.seconds["eval"] = time.perf_counter() - t_eval
        t1 = time.perf_counter()
        if rank == 0:  # one writer; the other ranks hold the same pruned model
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
    if rank == 0:
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")  # with final timings
    return report
