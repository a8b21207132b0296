"""Cut a model down to a :class:`~llmprune.structured.removal.Removal`: a smaller standard checkpoint.

:func:`remove_layers` deletes whole decoder layers, :func:`cut_widths` slices the heads, channels and experts
out of the layers that stay, :func:`apply_removal` does both (it checks everything first, so an error leaves
the model as it was). All work in place, on the weights and on the config, so that ``save_pretrained``
writes a checkpoint that plain ``transformers`` loads with no custom code and no missing or unexpected keys.

A removed part's producers lose their output rows and its consumer its input columns:

- a query head ``h``: ``q`` rows ``h * head_dim ...`` and the same columns of ``o_proj``; a key/value head
  (a whole group) also its ``k``/``v`` rows; fused ``qkv_proj`` (Phi-3) holds ``[q | k | v]`` blocks;
- an MLP channel ``j``: row ``j`` of ``gate``/``up`` (``fc1``; rows ``j`` and ``I + j`` of a fused
  ``gate_up_proj``) and column ``j`` of ``down`` (``fc2``), biases alike;
- an expert: its slice of every fused expert parameter (or its module of a ``ModuleList``) and its router row.

A zeroed head or channel contributes nothing, so a model whose removed parts were zeroed already computes
what the cut model computes; a removed expert is one the router can no longer pick (the softmax then runs
over the kept experts' logits).

A config holds one width per dimension, so every layer must keep the same number of heads, key/value heads,
channels and experts: a removal that differs across layers is an error naming the layers and counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..engine.anatomy import (
    TOP_K_KEYS,
    LayerParts,
    attention_projections,
    expert_count_key,
    expert_modules,
    layer_parts,
    mlp_projections,
    mlp_width_key,
    out_features,
    text_config,
)
from ..engine.targets import _is_conv1d, find_decoder_layers
from .layer_removal import check_layers, remove_layers, set_config

__all__ = ["apply_removal", "cut_widths", "keep_inputs", "keep_outputs", "remove_layers"]

if TYPE_CHECKING:
    from ..structured.removal import LayerRemoval, Removal

log = logging.getLogger(__name__)

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


# ---------------------------------------------------------------- slicing one projection


def _param_like(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)


def keep_outputs(mod: nn.Module, rows: torch.Tensor) -> None:
    """Keep only output features ``rows`` of a Linear / Conv1D (and of its bias)."""
    conv = _is_conv1d(mod)
    mod.weight = _param_like(mod.weight, mod.weight.data.index_select(1 if conv else 0, rows.to(mod.weight.device)))
    if getattr(mod, "bias", None) is not None:
        mod.bias = _param_like(mod.bias, mod.bias.data.index_select(0, rows.to(mod.bias.device)))
    if conv:
        mod.nf = len(rows)
    else:
        mod.out_features = len(rows)


def keep_inputs(mod: nn.Module, cols: torch.Tensor) -> None:
    """Keep only input features ``cols`` of a Linear / Conv1D (its bias is per output: unchanged)."""
    conv = _is_conv1d(mod)
    mod.weight = _param_like(mod.weight, mod.weight.data.index_select(0 if conv else 1, cols.to(mod.weight.device)))
    if not conv:
        mod.in_features = len(cols)


def _rows(units: list[int], size: int, offset: int = 0) -> torch.Tensor:
    """Rows ``offset + u * size ... + size`` of each unit ``u``  [len(units) * size]."""
    if not units:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(offset + u * size, offset + (u + 1) * size) for u in units])


def _set_counts(mods, attrs, old: int, new: int) -> None:
    for m in mods:
        for a in attrs:
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool) and v == old:
                setattr(m, a, new)


# ---------------------------------------------------------------- what each layer loses


@dataclass
class _LayerCut:
    """One kept layer's cut, in its own indices: what stays."""

    original: int  # the layer's index in the original model
    parts: LayerParts
    heads: list[int] | None = None  # query heads kept
    groups: list[int] | None = None  # key/value heads kept
    channels: list[int] | None = None
    experts: list[int] | None = None


def _check_indices(what: str, idx, n: int, layer: int) -> set[int]:
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer {layer}: {what} {bad} out of range; the layer has {n} (indices 0..{n - 1})")
    return set(idx)


def _not_removable(layer: int, why: str) -> ValueError:
    return ValueError(f"layer {layer}: {why}; remove whole layers or another dimension instead")


def _layer_cut(parts: LayerParts, r: LayerRemoval, orig: int) -> _LayerCut:
    cut = _LayerCut(orig, parts)
    att = parts.attention
    if r.heads or r.kv_heads:
        if att is None:
            raise ValueError(f"layer {orig}: heads {list(r.heads)} / key/value heads {list(r.kv_heads)} to remove, "
                             "but the layer has no attention llmprune recognises")
        if att.why_not:
            raise _not_removable(orig, att.why_not)
        g = att.n_heads // att.n_kv_heads
        gone = _check_indices("query heads", r.heads, att.n_heads, orig)
        gone_kv = _check_indices("key/value heads", r.kv_heads, att.n_kv_heads, orig)
        gone |= {h for kv in gone_kv for h in range(kv * g, (kv + 1) * g)}
        gone_kv |= {kv for kv in range(att.n_kv_heads) if all(h in gone for h in range(kv * g, (kv + 1) * g))}
        groups = [kv for kv in range(att.n_kv_heads) if kv not in gone_kv]
        if not groups:
            raise ValueError(f"layer {orig}: the removal takes every attention head; remove the layer instead")
        per_group = {kv: sum(h not in gone for h in range(kv * g, (kv + 1) * g)) for kv in groups}
        if len(set(per_group.values())) > 1:
            raise ValueError(
                f"layer {orig}: query heads kept per key/value group differ ({per_group}); grouped-query attention "
                "needs the same number in every group: remove the same number of query heads from each group")
        cut.heads = [h for h in range(att.n_heads) if h not in gone]
        cut.groups = groups
    if r.channels:
        if parts.mlp is None:
            raise ValueError(f"layer {orig}: MLP channels to remove, but the layer has no dense MLP llmprune "
                             "recognises (an MoE layer loses experts, not channels)")
        if parts.mlp.why_not:
            raise _not_removable(orig, parts.mlp.why_not)
        gone = _check_indices("MLP channels", r.channels, parts.mlp.n_channels, orig)
        if len(gone) == parts.mlp.n_channels:
            raise ValueError(f"layer {orig}: the removal takes every MLP channel; keep at least one")
        cut.channels = [j for j in range(parts.mlp.n_channels) if j not in gone]
    if r.experts:
        if parts.moe is None:
            raise ValueError(f"layer {orig}: experts to remove, but the layer has no routed experts")
        if parts.moe.why_not:
            raise _not_removable(orig, parts.moe.why_not)
        gone = _check_indices("experts", r.experts, parts.moe.n_experts, orig)
        if len(gone) == parts.moe.n_experts:
            raise ValueError(f"layer {orig}: the removal takes every expert; keep at least one")
        cut.experts = [e for e in range(parts.moe.n_experts) if e not in gone]
    return cut


def _uniform(what: str, counts: dict[int, int]) -> int | None:
    """The one count every layer keeps, or an error naming the layers that differ."""
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"layer {i}: {n}" for i, n in sorted(counts.items()))
        raise ValueError(
            f"{what} kept differ across layers ({listed}); a transformers config holds one width for every "
            f"layer: remove the same number of {what} from each layer")
    return next(iter(counts.values()), None)


def _plan(model: nn.Module, removal: Removal, originals: list[int], stays: set[int] | None = None) -> list[_LayerCut]:
    """The cut of every layer of the model as it is now; ``originals[j]`` is layer ``j``'s original index, and
    the widths must agree across the layers in ``stays`` (all of them by default)."""
    known = set(originals)
    stray = sorted(i for i, r in removal.per_layer.items() if r and i not in known)
    if stray:
        raise ValueError(f"removal.per_layer names layers {stray}, which are not in the model (original indices "
                         f"of its layers: {originals}); per_layer holds only layers that stay")
    cuts = []
    for j, orig in enumerate(originals):
        r = removal.per_layer.get(orig)
        parts = layer_parts(model, j)
        cuts.append(_layer_cut(parts, r, orig) if r else _LayerCut(orig, parts))
    for what, part, kept, full in (
        ("query heads", "attention", "heads", lambda p: p.attention.n_heads),
        ("key/value heads", "attention", "groups", lambda p: p.attention.n_kv_heads),
        ("MLP channels", "mlp", "channels", lambda p: p.mlp.n_channels),
        ("experts", "moe", "experts", lambda p: p.moe.n_experts),
    ):
        with_part = [c for c in cuts if getattr(c.parts, part) is not None
                     and (stays is None or c.original in stays)]
        if any(getattr(c, kept) is not None for c in with_part):
            _uniform(what, {c.original: len(getattr(c, kept)) if getattr(c, kept) is not None else full(c.parts)
                            for c in with_part})
    return cuts


# ---------------------------------------------------------------- cutting


def _cut_attention(model: nn.Module, cut: _LayerCut) -> None:
    att = cut.parts.attention
    mod = model.get_submodule(att.name)
    producers, out, _ = attention_projections(mod)
    hd, n_q, n_kv = att.head_dim, att.n_heads, att.n_kv_heads
    q_rows, kv_rows = _rows(cut.heads, hd), _rows(cut.groups, hd)
    if len(producers) == 3:
        q, k, v = (getattr(mod, p) for p in producers)
        keep_outputs(q, q_rows)
        keep_outputs(k, kv_rows)
        keep_outputs(v, kv_rows)
    else:  # [q | k | v] blocks
        keep_outputs(getattr(mod, producers[0]), torch.cat([q_rows, n_q * hd + kv_rows, (n_q + n_kv) * hd + kv_rows]))
    keep_inputs(getattr(mod, out), q_rows)
    new_q, new_kv = len(cut.heads), len(cut.groups)
    _set_counts([mod], HEAD_COUNT_ATTRS, n_q, new_q)
    _set_counts([mod], KV_HEAD_COUNT_ATTRS, n_kv, new_kv)
    if isinstance(getattr(mod, "num_key_value_groups", None), int):
        mod.num_key_value_groups = new_q // new_kv


def _cut_mlp(model: nn.Module, cut: _LayerCut) -> None:
    mlp = cut.parts.mlp
    mod = model.get_submodule(mlp.name)
    producers, out = mlp_projections(mod)
    keep = torch.tensor(cut.channels, dtype=torch.long)
    for p in producers:
        proj = getattr(mod, p)
        fused = out_features(proj) == 2 * mlp.n_channels  # [gate | up] rows
        keep_outputs(proj, torch.cat([keep, mlp.n_channels + keep]) if fused else keep)
    keep_inputs(getattr(mod, out), keep)
    _set_counts([mod], ("intermediate_size",), mlp.n_channels, len(cut.channels))


def _keep_leading(mod: nn.Module, E: int, keep: torch.Tensor) -> None:
    """Slice dimension 0 of every parameter and buffer of ``mod`` (and below) that has one entry per expert."""
    for sub in mod.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == E:
                setattr(sub, name, _param_like(p, p.data.index_select(0, keep.to(p.device))))
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1 and b.shape[0] == E:
                sub._buffers[name] = b.index_select(0, keep.to(b.device))
        if isinstance(sub, nn.Linear) and sub.weight.shape[0] != sub.out_features:
            sub.out_features = sub.weight.shape[0]


def _cut_experts(model: nn.Module, cut: _LayerCut) -> None:
    moe = cut.parts.moe
    block, experts, router = expert_modules(model, moe)
    E, new_E = moe.n_experts, len(cut.experts)
    keep = torch.tensor(cut.experts, dtype=torch.long)
    if isinstance(experts, nn.ModuleList):
        kept = [experts[e] for e in cut.experts]
        for e in range(E - 1, -1, -1):
            del experts[e]
        experts.extend(kept)
    else:
        _keep_leading(experts, E, keep)
    _keep_leading(router, E, keep)
    mods = list(block.modules())
    _set_counts(mods, EXPERT_COUNT_ATTRS, E, new_E)
    for m in mods:
        for a in ("top_k", *TOP_K_KEYS):
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > new_E:
                setattr(m, a, new_E)


def _cut(model: nn.Module, cuts: list[_LayerCut]) -> None:
    cfg = text_config(model)
    with torch.no_grad():
        for cut in cuts:
            if cut.heads is not None:
                _cut_attention(model, cut)
            if cut.channels is not None:
                _cut_mlp(model, cut)
            if cut.experts is not None:
                _cut_experts(model, cut)
    head_cut = next((c for c in cuts if c.heads is not None), None)
    if head_cut is not None:
        att = head_cut.parts.attention
        set_config(model, "head_dim", att.head_dim)  # explicit: fewer heads of the same size
        set_config(model, "num_attention_heads", len(head_cut.heads))
        if hasattr(cfg, "num_key_value_heads"):
            set_config(model, "num_key_value_heads", len(head_cut.groups))
    mlp_cut = next((c for c in cuts if c.channels is not None), None)
    if mlp_cut is not None:
        set_config(model, mlp_width_key(cfg, mlp_cut.parts.mlp.n_channels), len(mlp_cut.channels))
    moe_cut = next((c for c in cuts if c.experts is not None), None)
    if moe_cut is not None:
        E, new_E = moe_cut.parts.moe.n_experts, len(moe_cut.experts)
        set_config(model, expert_count_key(cfg, E), new_E)
        for key in TOP_K_KEYS:
            v = getattr(cfg, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > new_E:
                set_config(model, key, new_E)
        _set_counts([model], EXPERT_COUNT_ATTRS, E, new_E)  # Mixtral's causal LM keeps them for its aux loss
        for a in TOP_K_KEYS:
            v = getattr(model, a, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > new_E:
                setattr(model, a, new_E)


def cut_widths(model: nn.Module, removal: Removal) -> None:
    """Slice the heads, key/value heads, MLP channels and experts of ``removal.per_layer`` out of the model, in
    place, and shrink its config to match. ``removal.per_layer`` is keyed by original layer indices: the
    layers in ``removal.layers`` must be gone already (:func:`remove_layers`, as :func:`apply_removal` does);
    to cut widths alone, pass a removal without ``layers``."""
    _, layers = find_decoder_layers(model)
    originals = removal.kept_layers(len(layers) + len(set(removal.layers)))
    _cut(model, _plan(model, removal, originals))


def apply_removal(model: nn.Module, removal: Removal) -> None:
    """:func:`remove_layers` then :func:`cut_widths`, in place. Everything is checked first: an error (a
    dimension that cannot be removed on the architecture, widths that differ across layers, an index out of
    range) leaves the model untouched."""
    _, stack = find_decoder_layers(model)
    n = len(stack)
    check_layers(model, removal.layers)
    trial = replace(removal, layers=())
    stray = sorted(i for i, r in removal.per_layer.items() if r and i in set(removal.layers))
    if stray:
        raise ValueError(f"removal.per_layer names layers {stray}, which removal.layers removes")
    _plan(model, trial, list(range(n)), stays=set(removal.kept_layers(n)))
    remove_layers(model, removal.layers)
    cut_widths(model, removal)
