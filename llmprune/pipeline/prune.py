"""The in-memory pruning run: methods built from the registry, calibration tokens drawn, the allocation
observed, the engine run layer by layer with the plan, activation thresholds after it."""

from __future__ import annotations

import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any

import torch

from .. import pruners, steps  # noqa: F401 - every built-in method registered
from ..calibration import calibration_tokens
from ..engine.capture import resolve_device
from ..engine.passes import SequentialRun
from ..engine.plan import PrunePlan, pattern_name, sparsity_map
from ..engine.residency import LayerResidency
from ..engine.targets import find_decoder_layers, model_targets
from ..errors import ConfigError
from ..masks import parse_pattern
from ..registry import lookup
from ..report import PruneReport
from ..steps import LayerTarget
from .activation import add_activation, prune_activations_only
from .search import per_layer_mean, search_allocation
from .structured import prune_structured

if TYPE_CHECKING:
    from ..config import PruneConfig

log = logging.getLogger(__name__)

__all__ = ["build_methods", "build_steps", "calibration_tokens", "needs_calibration", "prune_model"]


def build_methods(config: PruneConfig):
    """``(pruner, refiner, allocator)`` of a config, each built from the registry with its options."""
    pruner = lookup("method", config.method).from_config(config)
    refiner = lookup("refine", config.refine).from_config(config) if config.refine else None
    allocator = lookup("allocation", config.allocation).from_config(config) if config.allocation else None
    return pruner, refiner, allocator


def build_steps(config: PruneConfig):
    """``(reconstructor, compensator)`` of a config (each None when not asked for), built from the registry
    with their options; they run after the pruner and refinement of every target."""
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
    bad = []
    for t in model_targets(model, config.targets, config.ignore).values():
        nm = target_of(t.name).nm
        if nm is not None and t.shape[1] % nm[1]:
            bad.append(f"{t.name} (input width {t.shape[1]})")
    if bad:
        raise ConfigError(
            f"pattern {config.pattern} needs input widths that are multiples of its M, but {len(bad)} target(s) "
            f"are not: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; leave them dense with --ignore, give "
            "them their own sparsity with module_sparsity, or choose another pattern"
        )


def prune_model(
    model,
    tokenizer,
    config: PruneConfig,
    calibration: Any = None,
    progress: bool = True,
    residency: LayerResidency | None = None,
) -> PruneReport:
    """Prune ``model`` in place with a validated ``config`` and return a :class:`PruneReport`: the stages
    calibrate -> observe/allocate -> prune layer by layer (-> activation thresholds). :func:`llmprune.prune`
    is the face that builds the config; ``residency`` (e.g. a
    :class:`~llmprune.engine.residency.offload.DiskOffloader`) moves each layer in and out of memory."""
    if config.structured:  # heads, channels, layers removed: a smaller dense model
        return prune_structured(model, tokenizer, config, calibration, progress, residency)
    if config.method == "none":  # activation sparsity only (the config requires `activation` then)
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
    search = searched_layers = None
    if getattr(allocator, "whole_model", False):  # the search: variants of every target, scored on the whole model
        target_of = sparsity_map(uniform, None, per_module)
        sizes = {n: math.prod(t.shape) for n, t in model_targets(model, config.targets, config.ignore).items()}
        fixed = frozenset(n for n in sizes if target_of(n) is not uniform) if per_module else frozenset()
        variant_pruner = (lookup("method", config.search_method).from_config(config) if config.search_method
                          else pruner)  # e.g. SparseGPT's variants to choose an ALPS allocation
        base = PrunePlan(variant_pruner, target_of, refiner=refiner, nm=uniform.nm, reconstructor=reconstructor)
        found, search = search_allocation(model, tokenizer, config, calibration, ids, calib, run, base, fixed,
                                          progress)
        per_module = {**per_module, **{f"^{re.escape(n)}$": t for n, t in found.items()}}
        searched_layers = per_layer_mean({n: sparsity_map(uniform, None, per_module)(n) for n in sizes}, sizes,
                                         len(layers))
        seconds["search"] = time.perf_counter() - t1
    elif allocator is not None:
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
        layer_targets=(searched_layers if searched_layers is not None else
                       [(t.sparsity, pattern_name(t.nm)) for t in per_layer] if per_layer is not None else None),
        permutations=plan.permutations, execution=run.execution, skipped=dict(run.skipped),
        nm_search=plan.nm_search, adapters=plan.adapters, uncompensated=plan.uncompensated, search=search,
    )
    if config.activation is not None:  # thresholds calibrated on the pruned model, installed on it
        add_activation(report, run, config, tokenizer)
    return report
