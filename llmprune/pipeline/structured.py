"""The structured-removal stage: whole layers first (chosen on the dense model), then heads and channels
layer by layer through the engine, then the cut that leaves a smaller dense model in memory.

    calibrate -> choose layers (block influence, or KL one at a time) -> remove them
              -> heads / KV heads / channels, layer by layer (width method) -> cut the zeros out

What went is recorded in the report (:attr:`PruneReport.structure`: indices per layer in the original
numbering, parameters before and after, each consumer's output error before and after its re-solve),
from where it reaches ``config.json`` and the model card.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from torch import nn

from .. import structured  # noqa: F401 - every built-in width method registered
from ..calibration import calibration_tokens
from ..checkpoint.surgery import cut_widths, remove_layers
from ..engine.anatomy import LayerParts, layer_parts, out_features
from ..engine.capture import resolve_device
from ..engine.layer import count_zeros
from ..engine.passes import SequentialRun
from ..engine.residency import LayerResidency
from ..engine.structured import LayerCut, StructuredPlan, block_influence, expert_saliency, kl_choice
from ..engine.targets import find_decoder_layers
from ..errors import ConfigError
from ..registry import lookup
from ..report import PruneReport
from ..structured.depth import lowest
from ..structured.options import count
from ..structured.removal import LayerRemoval, Removal
from .search import search_depth

if TYPE_CHECKING:
    from ..config import PruneConfig

log = logging.getLogger(__name__)

__all__ = ["decoder_params", "plan_cut", "prune_structured"]

DEFAULT_WIDTH_METHOD = "search"
CHANNEL_MULTIPLE = 8  # a budget's channel count keeps the intermediate width a multiple of this


def decoder_params(model: nn.Module) -> int:
    """Parameters inside the decoder layers."""
    _, layers = find_decoder_layers(model)
    return sum(p.numel() for p in layers.parameters())


def _uniform(parts: list[LayerParts], kind: str) -> Any:
    """The part ``kind`` of every layer that has one, checked to have the same size everywhere."""
    found = [getattr(p, kind) for p in parts if getattr(p, kind) is not None]
    if not found:
        return None
    sizes = {(a.n_heads, a.n_kv_heads, a.head_dim) if kind == "attention" else a.n_channels for a in found}
    if len(sizes) > 1:
        raise ConfigError(f"the decoder layers have {kind} parts of different sizes ({sorted(sizes)}); structured "
                          f"removal of {kind} needs one size in every layer")
    return found[0]


def _refuse(part: Any, kind: str, setting: str, model: nn.Module) -> None:
    arch = type(model).__name__
    if part is None:
        raise ConfigError(f"--{setting.replace('_', '-')}: {arch} has no {kind} the structured engine can find in "
                          "its decoder layers; remove the setting")
    if part.why_not:
        raise ConfigError(f"--{setting.replace('_', '-')}: {part.why_not}")


def plan_cut(config: PruneConfig, model: nn.Module, parts: list[LayerParts], decoder_before: int | None = None
             ) -> LayerCut:
    """Counts per layer from the settings (fractions or counts), checked against the architecture, with a
    parameter budget's remainder taken from MLP channels. ``decoder_before``: the decoder's parameters before
    any layer or expert was removed (the budget's base; what is gone already counts towards it)."""
    attn, mlp = _uniform(parts, "attention"), _uniform(parts, "mlp")
    kv = heads = channels = 0
    if config.remove_kv_heads:
        _refuse(attn, "key/value heads", "remove_kv_heads", model)
        kv = count(config.remove_kv_heads, attn.n_kv_heads, "remove_kv_heads")
    if config.remove_heads:
        _refuse(attn, "attention heads", "remove_heads", model)
        left_kv = attn.n_kv_heads - kv
        g = attn.n_heads // attn.n_kv_heads
        if config.remove_heads < 1:  # a fraction of every key/value head's query heads, rounded
            heads = left_kv * count(config.remove_heads, g, "remove_heads")
        else:
            heads = count(config.remove_heads, left_kv * g, "remove_heads")
        if heads % left_kv:
            per = attn.n_heads // attn.n_kv_heads
            raise ConfigError(
                f"--remove-heads {config.remove_heads} removes {heads} query heads, which the {left_kv} key/value "
                f"heads cannot share equally (each has {per} query heads); give a multiple of {left_kv}, e.g. "
                f"{max(left_kv, left_kv * round(heads / left_kv))}, or a fraction of it")
        if heads // left_kv >= attn.n_heads // attn.n_kv_heads:
            raise ConfigError(f"--remove-heads {config.remove_heads} leaves a key/value head without query heads; "
                              "remove whole key/value heads with --remove-kv-heads instead")
    if config.remove_channels:
        _refuse(mlp, "MLP channels", "remove_channels", model)
        channels = count(config.remove_channels, mlp.n_channels, "remove_channels")
    if config.structure_budget is not None:
        channels = _budget_channels(config, model, parts, attn, mlp, heads, kv, channels, decoder_before)
    return LayerCut(heads=heads, kv_heads=kv, channels=channels)


def _width(model: nn.Module, name: str) -> int:
    return out_features(model.get_submodule(name))


def _budget_channels(config, model, parts, attn, mlp, heads, kv, channels, decoder_before) -> int:
    """MLP channels per layer so that the removed parameters reach ``structure_budget`` of the decoder's."""
    now = decoder_params(model)
    total = decoder_before or now
    goal = config.structure_budget * total
    n_attn = sum(p.attention is not None for p in parts)
    n_mlp = sum(p.mlp is not None for p in parts)
    removed = float(total - now)  # layers and experts removed already
    if attn is not None and (heads or kv):
        hidden = _width(model, attn.out)
        per_head = 2 * attn.head_dim * hidden  # q rows + o columns
        g = attn.n_heads // attn.n_kv_heads
        removed += n_attn * (heads * per_head + kv * (g * per_head + 2 * attn.head_dim * hidden))
    if channels:
        removed += n_mlp * channels * _per_channel(model, mlp)
    if removed >= goal:
        raise ConfigError(f"structure_budget {config.structure_budget} is already exceeded by the remove_* settings "
                          f"given ({removed / total:.3f} of the decoder's parameters); lower them or raise the budget")
    _refuse(mlp, "MLP channels", "structure_budget", model)
    extra = math.ceil((goal - removed) / (n_mlp * _per_channel(model, mlp)))
    kept = mlp.n_channels - channels - extra
    kept -= kept % CHANNEL_MULTIPLE if kept > CHANNEL_MULTIPLE else 0
    if kept <= 0:
        raise ConfigError(f"structure_budget {config.structure_budget} would remove every MLP channel; lower it or "
                          "remove layers or heads too")
    return mlp.n_channels - kept


def _per_channel(model: nn.Module, mlp) -> float:
    return sum(p.numel() for p in model.get_submodule(mlp.name).parameters()) / mlp.n_channels


def _choose_experts(model: nn.Module, ids, config: PruneConfig, parts: list[LayerParts], kept: list[int],
                    device, progress: bool) -> dict[int, tuple[int, ...]]:
    """The experts of lowest REAP saliency in every MoE layer, the same number from each (original indices
    of the layers -> experts)."""
    moe = [p.moe for p in parts if p.moe is not None]
    _refuse(moe[0] if moe else None, "routed experts", "remove_experts", model)
    sizes = {(m.n_experts, m.top_k) for m in moe}
    if len(sizes) > 1:
        raise ConfigError(f"the MoE layers have different expert counts or top-k ({sorted(sizes)}); removing "
                          "experts needs one count in every layer")
    n_experts, top_k = sizes.pop()
    n = count(config.remove_experts, n_experts, "remove_experts")
    if n_experts - n < top_k:
        raise ConfigError(f"--remove-experts {config.remove_experts} leaves {n_experts - n} experts, fewer than the "
                          f"{top_k} every token is routed to; remove at most {n_experts - top_k}")
    run = SequentialRun(model, ids, device=device, batch_size=config.batch_size, progress=progress)
    saliency = expert_saliency(run, parts)
    chosen = {kept[pos]: tuple(lowest(s.tolist(), n)) for pos, s in saliency.items()}
    log.info("experts removed per MoE layer: %d of %d (REAP)", n, n_experts)
    return chosen


def prune_structured(model: nn.Module, tokenizer, config: PruneConfig, calibration: Any = None,
                     progress: bool = True, residency: LayerResidency | None = None) -> PruneReport:
    """Remove structures from ``model`` in place (it is smaller afterwards) and report what went."""
    t0 = time.perf_counter()
    layers_name, layers = find_decoder_layers(model)
    n_layers = len(layers)
    device = resolve_device(config.device)
    params_before, decoder_before = sum(p.numel() for p in model.parameters()), decoder_params(model)
    ids, calib = calibration_tokens(config, model, tokenizer, calibration)
    seconds: dict[str, float] = {"calibration": time.perf_counter() - t0}
    removal = Removal()
    depth: dict[str, Any] = {}
    n_drop = count(config.remove_layers, n_layers, "remove_layers") if config.remove_layers else 0
    if n_drop:
        t1 = time.perf_counter()
        if config.depth_method in ("block-influence", "search"):  # the search starts from block influence's choice
            run = SequentialRun(model, ids, device=device, batch_size=config.batch_size, progress=progress)
            scores = block_influence(run, progress)
            chosen = lowest(scores, n_drop)
            depth = {"method": config.depth_method, "scores": [round(s, 6) for s in scores]}
            if config.depth_method == "search":
                chosen, depth["search"] = search_depth(model, config, ids, calib, chosen, device, progress)
        else:
            steps: list[list[float]] = []
            chosen = kl_choice(model, ids[:config.depth_windows], n_drop, device, progress,
                               on_step=lambda s, kl: steps.append([round(x, 6) for x in kl]))
            depth = {"method": "kl", "windows": min(config.depth_windows, len(ids)), "steps": steps}
        remove_layers(model, chosen)
        removal.layers = tuple(chosen)
        seconds["depth"] = time.perf_counter() - t1
        log.info("removed decoder layers %s (%s)", list(chosen), config.depth_method)
    layer_reports = []
    execution = None
    kept = removal.kept_layers(n_layers)
    parts = [layer_parts(model, p) for p in range(len(kept))]
    experts: dict[int, tuple[int, ...]] = {}
    if config.remove_experts:
        t1 = time.perf_counter()
        experts = _choose_experts(model, ids, config, parts, kept, device, progress)
        cut_widths(model, Removal(layers=removal.layers,
                                  per_layer={i: LayerRemoval(experts=e) for i, e in experts.items()}))
        parts = [layer_parts(model, p) for p in range(len(kept))]
        seconds["experts"] = time.perf_counter() - t1
    cut = plan_cut(config, model, parts, decoder_before)
    if cut.heads or cut.kv_heads or cut.channels:
        t2 = time.perf_counter()
        method = lookup("structure", config.structure or DEFAULT_WIDTH_METHOD).from_config(config)
        plan = StructuredPlan(method, parts, kept, cut, layers_name)
        run = SequentialRun(model, ids, device=device, batch_size=config.batch_size, targets=plan.targets,
                            progress=progress, residency=residency, sequential="within-layer",
                            execution=config.execution)
        layer_reports = run.prune(plan)
        execution = run.execution
        cut_widths(model, Removal(layers=removal.layers, per_layer=dict(plan.per_layer)))
        removal.per_layer = dict(plan.per_layer)
        seconds["prune"] = time.perf_counter() - t2
    for i, e in experts.items():  # the record: experts beside the heads and channels of the same layer
        r = removal.per_layer.get(i, LayerRemoval())
        removal.per_layer[i] = LayerRemoval(r.heads, r.kv_heads, r.channels, e)
    _, layers = find_decoder_layers(model)
    for rep in layer_reports:  # the layers as they are now: cut, dense
        rep.weights, rep.zeros = count_zeros(layers[rep.index])
    decoder_after = decoder_params(model)
    structure = {
        "removal": removal.to_dict(),
        "width_method": (config.structure or DEFAULT_WIDTH_METHOD) if layer_reports else None,
        "per_layer": {"heads": cut.heads, "kv_heads": cut.kv_heads, "channels": cut.channels,
                      "experts": len(next(iter(experts.values()), ()))},
        "depth": depth or None,
        "params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "decoder_params": {"before": decoder_before, "after": decoder_after,
                           "fraction_removed": round(1 - decoder_after / decoder_before, 6)},
    }
    cfg = config.model_dump()
    cfg["target_sparsity"] = config.target_sparsity
    name = config.model or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    return PruneReport(config=cfg, model=str(name), calibration=calib, layers=layer_reports, seconds=seconds,
                       execution=execution, structure=structure)
