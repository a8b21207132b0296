"""The search allocation stage (``allocation: search``, EvoPress: :mod:`llmprune.steps.evopress`).

1. fitness windows drawn from the calibration source with another seed, none equal to a calibration window;
2. OWL's outlier ratios from a dense observe pass (kept in the database folder), then the variant database
   (:mod:`llmprune.engine.variants`) opened or created for this model, calibration and method, and the levels it
   lacks built in one sequential prune pass at the uniform target;
3. the evolutionary search on the whole model, its state saved after every generation (a rerun resumes it);
4. the search's result, the uniform allocation and OWL's (projected onto the grid) scored on every fitness
   token; the best of the three is the allocation (so the search is never worse than either by its own
   measure), every target back to its dense weight, and the per-module targets handed to the prune pass.

:func:`search_depth` is the same search over which decoder layers to remove (structured ``--depth-method
search``): each layer kept or removed, a move swaps one of each, the fitness skips the removed layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..calibration import calibration_tokens
from ..engine.capture import whole_model_on
from ..engine.passes import SequentialRun
from ..engine.plan import PrunePlan, layer_index
from ..engine.structured import SkipFitness
from ..engine.targets import find_decoder_layers, model_targets
from ..engine.variants import KLFitness, VariantDatabase, build_variants, fingerprint, missing
from ..errors import ConfigError
from ..loading.models import cache_dir
from ..registry import table
from ..runtime.files import write_json_atomic
from ..steps import LayerTarget
from ..steps.evopress import SearchOptions, SearchState, evolve
from ..steps.levels import LevelSpace, depth_space, layer_space, level_space, project
from ..steps.owl import OWL

if TYPE_CHECKING:
    from ..config import PruneConfig

log = logging.getLogger(__name__)

OWL_FILE = "owl.json"


def _method_key(config: PruneConfig) -> dict:
    """What the variants depend on: the pruner, refinement and reconstruction with their options."""
    method = config.search_method or config.method
    key = {"method": method, "refine": config.refine, "reconstruct": config.reconstruct,
           "targets": config.targets, "ignore": config.ignore, "dtype": config.dtype}
    for kind, name in (("method", method), ("refine", config.refine), ("reconstruct", config.reconstruct)):
        if name:
            cls = table(kind)[name]
            key.update({k: getattr(config, k) for k in cls.options})
    return key


def _model_key(model) -> dict:
    cfg = getattr(model, "config", None)
    as_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    as_dict.pop("_name_or_path", None)
    as_dict.pop("transformers_version", None)
    params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())  # a cheap check that the weights are the same ones
    return {"name": str(getattr(cfg, "name_or_path", "") or type(model).__name__),
            "config_sha256": fingerprint(as_dict), "params": params,
            "probe": float(first.detach().float().flatten()[:4096].double().sum())}


def _options(config: PruneConfig) -> SearchOptions:
    return SearchOptions(**{k: getattr(config, k) for k in SearchOptions.model_fields})


def fitness_windows(config: PruneConfig, model, tokenizer, calibration, calib_ids: torch.Tensor,
                    n: int) -> torch.Tensor:
    """``n`` windows drawn like the calibration's with another seed, none equal to a calibration window."""
    draw = config.model_copy(update={"seed": config.seed + 7919, "nsamples": n + calib_ids.shape[0]})
    ids, _ = calibration_tokens(draw, model, tokenizer, calibration)
    seen = {bytes(row.numpy().tobytes()) for row in calib_ids}
    kept = [row for row in ids if bytes(row.numpy().tobytes()) not in seen][:n]
    if len(kept) < n:
        raise ConfigError(f"the calibration source holds too few distinct windows for {n} fitness windows apart from "
                          f"the {calib_ids.shape[0]} calibration ones; give fewer search_windows or search_tokens, or "
                          "a larger source")
    return torch.stack(kept)


def _check_memory(windows: int, seqlen: int, vocab: int, topk: int | None) -> None:
    import psutil

    per = vocab * 4 if topk is None else topk * 12
    need = windows * seqlen * per
    free = psutil.virtual_memory().available
    if need > 0.5 * free:
        raise ConfigError(f"the dense model's fitness log-probabilities need {need / 1e9:.1f} GB ({windows} windows x "
                          f"{seqlen} tokens x {'the vocabulary' if topk is None else f'top-{topk}'}), more than half "
                          f"of free memory ({free / 1e9:.1f} GB); give --search-topk 512, or fewer --search-tokens")


def search_allocation(model, tokenizer, config: PruneConfig, calibration, calib_ids: torch.Tensor, calib: dict,
                      run, plan: PrunePlan, fixed: frozenset[str] = frozenset(),
                      progress: bool = True) -> tuple[dict[str, LayerTarget], dict]:
    """The searched per-module targets and a summary for the report (fitness of each allocation, the
    database, the generations run, seconds per part). ``fixed``: targets whose sparsity the user gave
    (module_sparsity); they keep it, stay dense during the search, and the budget is over the others."""
    t0 = time.perf_counter()
    opts = _options(config)
    if run.collective is not None:
        raise ConfigError("allocation 'search' runs in one process (each candidate is a forward of the whole "
                          "model); launch it without torchrun")
    seqlen = calib_ids.shape[1]
    n_win = opts.search_windows or math.ceil(max(opts.search_tokens) / seqlen)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    _check_memory(n_win, seqlen, vocab, opts.search_topk)  # before any work
    all_targets = model_targets(model, config.targets, config.ignore)
    targets = {n: t for n, t in all_targets.items() if n not in fixed}
    if not targets:
        raise ConfigError("allocation 'search' has nothing to allocate: module_sparsity fixes every target; drop "
                          "--allocation search or some module_sparsity rules")
    names = list(targets)
    sizes = [math.prod(t.shape) for t in targets.values()]
    key = {"model": _model_key(model), "calibration": {k: calib.get(k) for k in
                                                      ("source", "data_sha256", "windows_sha256", "nsamples",
                                                       "seqlen", "seed")},
           "method": _method_key(config), "nm": config.nm is not None and list(config.nm)}
    folder = opts.search_dir or str(cache_dir() / "search" / fingerprint(key))
    db = VariantDatabase(folder, key)
    if opts.search_granularity == "layer":
        groups: dict[int, list[tuple[str, int]]] = {}
        for n, size in zip(names, sizes):
            groups.setdefault(layer_index(n), []).append((n, size))
        space = layer_space([(f"layer {i}", ms) for i, ms in sorted(groups.items())], config.target_sparsity,
                            opts.search_levels, opts.search_step, config.nm)
        unit_layers = sorted(groups)
    else:
        space = level_space(names, sizes, config.target_sparsity, opts.search_levels, opts.search_step, config.nm,
                            divisor=db.divisor)
        db.set_divisor(space.divisor)
        unit_layers = [layer_index(n) for n in names]
    levels = space.catalog()
    owl_path = db.folder / OWL_FILE
    owl_key = {"owl_m": config.owl_m}
    owl_saved = json.loads(owl_path.read_text()) if owl_path.exists() else None
    owl = OWL(config.owl_m, config.owl_lambda)
    if owl_saved is None or owl_saved.get("key") != owl_key:  # OWL's ratios are the dense model's
        run.observe(owl.needs, owl.observe)
        write_json_atomic(owl_path, {"key": owl_key, "ratios": owl.ratios, "sizes": owl.sizes}, sort_keys=True)
    else:
        owl.ratios = {int(k): v for k, v in owl_saved["ratios"].items()}
        owl.sizes = {int(k): v for k, v in owl_saved["sizes"].items()}
    todo = missing(db, levels)
    built = 0
    if todo:
        log.info("search database %s: building %d variants (%d modules x up to %d levels)", db.folder, todo,
                 len(names), 2 * opts.search_levels + 1)
        # its own run: no residency, so nothing of this pass is saved as --resume progress of the real one
        db_run = SequentialRun(model, calib_ids, device=run.device, batch_size=config.batch_size,
                               targets=config.targets, ignore=config.ignore, progress=progress,
                               sequential=config.sequential, execution=config.execution)
        built = build_variants(db_run, plan, db, levels, next(model.parameters()).dtype)
    t_db = time.perf_counter()

    fit_ids = fitness_windows(config, model, tokenizer, calibration, calib_ids, n_win)
    run_key = {"sparsity": config.target_sparsity, "nm": config.nm, "divisor": space.divisor,
               "options": opts.model_dump(exclude={"search_dir", "search_generations"}),  # more generations go on
               "windows_sha256": hashlib.sha256(fit_ids.numpy().tobytes()).hexdigest()[:16]}
    state_path = db.search_path(fingerprint(run_key))
    state = None
    if state_path.exists():
        saved = json.loads(state_path.read_text())
        state = SearchState.from_dict(saved["state"])
        log.info("search: resuming at generation %d of %d (%s)", state.generation, opts.search_generations,
                 state_path)

    def variants(levels_: list[int]) -> dict[str, str]:
        return {n: key for n, (key, _) in space.assign(levels_).items()}

    def save(s: SearchState) -> None:
        write_json_atomic(state_path, {"key": run_key, "state": s.to_dict()}, sort_keys=True)

    with whole_model_on(model, run.device) as on:
        # every target, the fixed ones too: dense while the search runs, and dense again after it
        fitness = KLFitness(model, fit_ids, db, all_targets, on, opts.search_topk)
        try:
            owl_levels = _owl_levels(space, owl, unit_layers, config)
            state = evolve(space, lambda c, w, t: fitness(variants(c), w, t), opts, fit_ids.shape[0], seqlen,
                           state=state, on_generation=save, progress=progress,
                           start=owl_levels if opts.search_start == "owl" else None)
            t_search = time.perf_counter()
            all_w, all_t = list(range(fit_ids.shape[0])), fit_ids.numel()
            scored = {"search": fitness(variants(state.parent), all_w, all_t),
                      "uniform": fitness(variants(space.start), all_w, all_t),
                      "owl": fitness(variants(owl_levels), all_w, all_t)}
        finally:
            fitness.restore()
    chosen_name = min(scored, key=lambda k: (scored[k], ["search", "uniform", "owl"].index(k)))
    chosen = {"search": state.parent, "uniform": space.start, "owl": owl_levels}[chosen_name]
    if chosen_name != "search":
        log.warning("search: the %s allocation scores better than the search's result on every fitness token "
                    "(KL %.4g vs %.4g); it is used. More generations or fitness tokens may help.", chosen_name,
                    scored[chosen_name], scored["search"])
    result = {n: t for n, (_, t) in space.assign(chosen).items()}
    summary = {
        "chosen": chosen_name, "fitness_kl": scored, "generations": state.generation,
        "history": state.history, "database": str(db.folder), "variants_built": built,
        "levels": {n: chosen[u] - space.start[u] for u, n in enumerate(space.names)},
        "granularity": opts.search_granularity,
        "step_weights": None if space.delta is None else float(space.delta),
        "step_sparsity": None if space.rate is None else float(space.rate),
        "fitness_windows": int(fit_ids.shape[0]), "evaluations": fitness.evaluations,
        "seconds": {"database": t_db - t0, "search": t_search - t_db, "final": time.perf_counter() - t_search},
    }
    log.info("search: %s allocation, KL %s (database %.0f s, search %.0f s)", chosen_name,
             {k: round(v, 5) for k, v in scored.items()}, t_db - t0, t_search - t_db)
    return result, summary


def search_depth(model, config: PruneConfig, ids: torch.Tensor, calib: dict, start: list[int], device: torch.device,
                 progress: bool = True) -> tuple[list[int], dict]:
    """EvoPress depth pruning: which ``len(start)`` decoder layers to remove, searched from ``start`` (block
    influence's choice) by swapping a removed layer for a kept one, scored by the KL of the final logits from
    the dense model's on calibration windows (the paper scores on calibration data). The state is saved after
    every generation (a rerun resumes). Returns the removed layers (the search's, or ``start`` where it scores
    lower on every fitness token) and a summary for the report."""
    t0 = time.perf_counter()
    opts = _options(config)
    seqlen = ids.shape[1]
    n_win = min(ids.shape[0], opts.search_windows or math.ceil(max(opts.search_tokens) / seqlen))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    _check_memory(n_win, seqlen, vocab, None)
    fit_ids = ids[:n_win]
    n_layers = len(find_decoder_layers(model)[1])
    space = depth_space(n_layers, start)
    key = {"model": _model_key(model), "calibration": {k: calib.get(k) for k in
                                                      ("source", "data_sha256", "windows_sha256", "seqlen", "seed")},
           "depth": {"start": sorted(start), "windows": n_win},
           "options": opts.model_dump(exclude={"search_dir", "search_generations"})}
    folder = Path(opts.search_dir).expanduser() if opts.search_dir else cache_dir() / "search"
    state_path = folder / "depth" / f"{fingerprint(key)}.json"
    state = SearchState.from_dict(json.loads(state_path.read_text())["state"]) if state_path.exists() else None

    def removed(levels: list[int]) -> list[int]:
        return [i for i, j in enumerate(levels) if j]

    with whole_model_on(model, device) as on:
        fitness = SkipFitness(model, fit_ids, on)
        state = evolve(space, lambda c, w, t: fitness(removed(c), w, t), opts, n_win, seqlen, state=state,
                       on_generation=lambda s: write_json_atomic(state_path, {"key": key, "state": s.to_dict()},
                                                                 sort_keys=True),
                       progress=progress)
        all_w, all_t = list(range(n_win)), fit_ids.numel()
        scored = {"search": fitness(removed(state.parent), all_w, all_t), "block-influence": fitness(start, all_w, all_t)}
    chosen_name = "search" if scored["search"] <= scored["block-influence"] else "block-influence"
    chosen = removed(state.parent) if chosen_name == "search" else sorted(start)
    log.info("depth search: layers %s (%s), KL %s", chosen, chosen_name, {k: round(v, 5) for k, v in scored.items()})
    return chosen, {"chosen": chosen_name, "start": sorted(start), "fitness_kl": scored,
                    "generations": state.generation, "history": state.history, "fitness_windows": n_win,
                    "evaluations": fitness.evaluations, "seconds": time.perf_counter() - t0}


def _owl_levels(space: LevelSpace, owl: OWL, unit_layers: list[int], config: PruneConfig) -> list[int]:
    """OWL's per-layer allocation on the grid: each unit its layer's sparsity, projected with the budget."""
    per_layer = owl.allocate(config.target_sparsity, config.nm)
    return project(space, [per_layer[i].sparsity for i in unit_layers])


def per_layer_mean(targets: dict[str, LayerTarget], sizes: dict[str, int], n_layers: int) -> list[tuple[float, str]]:
    """Each decoder layer's size-weighted mean target sparsity (for the report's per-layer list)."""
    acc = [[0.0, 0] for _ in range(n_layers)]
    pats: list[set] = [set() for _ in range(n_layers)]
    for name, t in targets.items():
        i = layer_index(name)
        acc[i][0] += t.sparsity * sizes[name]
        acc[i][1] += sizes[name]
        pats[i].add("unstructured" if t.nm is None else f"{t.nm[0]}:{t.nm[1]}")
    return [(a / n if n else 0.0, "+".join(sorted(p)) or "unstructured") for (a, n), p in zip(acc, pats)]


__all__ = ["per_layer_mean", "search_allocation", "search_depth"]
