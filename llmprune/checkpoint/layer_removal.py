"""Remove whole decoder layers from a model in place: the layer list, the config's layer count and
per-layer lists, and the ``layer_idx`` of what stays. Part of the structured surgery
(:mod:`.surgery`, whose :func:`~.surgery.apply_removal` calls it before cutting widths)."""

from __future__ import annotations

import logging

from torch import nn

from ..engine.anatomy import arch_name, layer_parts, text_config
from ..engine.targets import find_decoder_layers

log = logging.getLogger(__name__)

# Config lists that hold layer indices (renumbered); other lists of one entry per layer are sliced.
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
# Config counts of leading layers of a kind (Qwen2 sliding-window layers, DeepSeek dense layers).
LEADING_LAYER_COUNTS = ("max_window_layers", "first_k_dense_replace")


def config_objects(model: nn.Module) -> list:
    """The text config and every other config object of its class held by the model's modules."""
    cfg = text_config(model)
    found = {id(cfg): cfg}
    for m in model.modules():
        c = getattr(m, "config", None)
        if type(c) is type(cfg):
            found.setdefault(id(c), c)
    return list(found.values())


def set_config(model: nn.Module, key: str, value) -> None:
    for cfg in config_objects(model):
        setattr(cfg, key, value)


def check_layers(model: nn.Module, layers) -> list[int]:
    _, stack = find_decoder_layers(model)
    n = len(stack)
    gone = sorted(set(int(i) for i in layers))
    bad = [i for i in gone if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
    if len(gone) == n:
        raise ValueError(f"the removal takes all {n} decoder layers; keep at least one")
    cfg = text_config(model)
    if gone and getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"layers cannot be removed on {arch_name(model)} with scale_attn_by_inverse_layer_idx=True: "
                         "each layer's attention scale depends on its index, which removal changes")
    return gone


def remove_layers(model: nn.Module, layers) -> None:
    """Delete decoder ``layers`` (indices in the model as it is) in place: the ModuleList, the config's
    ``num_hidden_layers`` and its per-layer lists (``layer_types``, ``mlp_only_layers``, ...), and the
    ``layer_idx`` of what stays (attention modules index the KV cache with it)."""
    gone = check_layers(model, layers)
    if not gone:
        return
    _, stack = find_decoder_layers(model)
    n = len(stack)
    kept = [i for i in range(n) if i not in set(gone)]
    for i in reversed(gone):
        del stack[i]
    for new, layer in enumerate(stack):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    for cfg in config_objects(model):
        _shrink_config(cfg, n, kept)
    cfg = text_config(model)
    if hasattr(cfg, "mlp_only_layers") and hasattr(cfg, "decoder_sparse_step"):
        # Qwen-MoE: sparse where (i + 1) % step == 0 and i not in mlp_only_layers; say it with step 1
        dense = [j for j in range(len(stack)) if layer_parts(model, j).moe is None]
        set_config(model, "decoder_sparse_step", 1)
        set_config(model, "mlp_only_layers", dense)


def _shrink_config(cfg, n: int, kept: list[int]) -> None:
    new_index = {orig: new for new, orig in enumerate(kept)}
    cfg.num_hidden_layers = len(kept)
    for key, value in list(vars(cfg).items()):
        if not isinstance(value, (list, tuple)):
            continue
        if key in LAYER_INDEX_LISTS:
            new = [new_index[i] for i in value if i in new_index]
        elif "layer" in key and len(value) == n:
            new = [value[i] for i in kept]
        else:
            continue
        try:
            setattr(cfg, key, type(value)(new))
        except AttributeError:  # a read-only property, derived from fields already updated
            log.debug("config %s is read-only; left to derive itself", key)
    for key in LEADING_LAYER_COUNTS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            setattr(cfg, key, sum(i < v for i in kept))
