"""The parts of a decoder layer that structured pruning removes: attention heads, MLP channels, experts.

:func:`layer_parts` finds, in decoder layer ``i`` of a model, the attention module with its head counts and
the projection that consumes the heads' outputs (``o_proj``), the dense MLP with its width and the projection
that consumes its channels (``down_proj``), and a routed-experts block with its router. The structured
methods read the consumers' input statistics (a head is ``head_dim`` consecutive input columns of ``out``,
a channel one input column) and :mod:`llmprune.checkpoint.surgery` cuts the producers and consumers down.

A part that exists but cannot be removed on this architecture carries ``why_not`` (e.g. GPT-2 derives the
head size from ``n_embd / n_head``, so its config cannot describe fewer heads of the same size).

The parts are recognised by the usual names (:data:`ATTENTION_SPLIT`, :data:`ATTENTION_FUSED`, :data:`MLPS`)
and the MoE blocks as :mod:`llmprune.engine.targets` recognises them (a container of experts, its parent the
block, the router a weight with one output per expert). A shared expert (Qwen2-MoE) is a dense MLP inside
the MoE block: it is not the layer's ``mlp`` part and nothing here removes it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from torch import nn

from .targets import _expert_containers, _inside, _is_conv1d, _roles, find_decoder_layers


@dataclass
class AttentionParts:
    name: str  # full name of the attention module, e.g. "model.layers.3.self_attn"
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads; query head h reads key/value head h // (n_heads // n_kv_heads)
    head_dim: int
    out: str  # full name of the output projection: input column h * head_dim + d is head h's output d
    why_not: str | None = None  # why heads cannot be removed on this architecture, if they cannot


@dataclass
class MLPParts:
    name: str  # full name of the MLP module
    n_channels: int  # intermediate width
    out: str  # full name of the down projection: input column j is channel j
    why_not: str | None = None


@dataclass
class MoEParts:
    name: str  # full name of the sparse MoE block
    n_experts: int
    top_k: int
    router: str  # full name of the router (its output rows are the experts)
    why_not: str | None = None


@dataclass
class LayerParts:
    attention: AttentionParts | None = None
    mlp: MLPParts | None = None  # a dense MLP (a shared expert is not one)
    moe: MoEParts | None = None


# Producers hold a head's (a channel's) values as output rows, the consumer as input columns.
ATTENTION_SPLIT = (("q_proj", "k_proj", "v_proj"), ("o_proj", "out_proj", "dense", "c_proj"))
ATTENTION_FUSED = {  # one fused q/k/v projection -> (its consumer, whether q, k and v are contiguous blocks)
    "qkv_proj": ("o_proj", True),  # Phi-3: rows [q heads | k heads | v heads]
    "c_attn": ("c_proj", True),  # GPT-2 (Conv1D): [q | k | v]
    "query_key_value": ("dense", False),  # GPT-NeoX, Falcon, Bloom: q, k, v interleaved per head or group
    "Wqkv": ("out_proj", False),
}
MLPS = (  # (producers, consumer); a fused gate_up holds [gate | up] rows
    (("gate_proj", "up_proj"), "down_proj"),
    (("gate_up_proj",), "down_proj"),
    (("w1", "w3"), "w2"),
    (("fc1",), "fc2"),
    (("c_fc",), "c_proj"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
)
MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "inner_hidden_size")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k", "experts_per_token")
_HEAD_DIM_FROM_CONFIG = re.compile(r"config\.head_dim|getattr\(\s*config\s*,\s*[\"']head_dim[\"']")


def text_config(model: nn.Module):
    """The config that describes the decoder stack (a multimodal model's text config)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def arch_name(model: nn.Module) -> str:
    return getattr(text_config(model), "model_type", None) or type(model).__name__


def is_projection(mod: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored ``[in, out]``)."""
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def out_features(mod: nn.Module) -> int:
    return mod.weight.shape[1] if _is_conv1d(mod) else mod.weight.shape[0]


def in_features(mod: nn.Module) -> int:
    return mod.weight.shape[0] if _is_conv1d(mod) else mod.weight.shape[1]


def _has(mod: nn.Module, names) -> bool:
    return all(isinstance(getattr(mod, n, None), nn.Module) and is_projection(getattr(mod, n)) for n in names)


def attention_projections(mod: nn.Module) -> tuple[tuple[str, ...], str, bool] | None:
    """``(producers, consumer, contiguous)`` of an attention module: ``("q_proj", "k_proj", "v_proj")`` or
    one fused projection, the output projection's name, and whether a fused q/k/v holds contiguous
    ``[q | k | v]`` blocks; None for a module that is not one."""
    if _has(mod, ATTENTION_SPLIT[0]):
        out = next((o for o in ATTENTION_SPLIT[1] if _has(mod, (o,))), None)
        return (ATTENTION_SPLIT[0], out, True) if out else None
    for fused, (out, contiguous) in ATTENTION_FUSED.items():
        if _has(mod, (fused, out)):
            return (fused,), out, contiguous
    return None


def mlp_projections(mod: nn.Module) -> tuple[tuple[str, ...], str] | None:
    """``(producers, consumer)`` of a dense MLP (``(("gate_proj", "up_proj"), "down_proj")``, ...)."""
    for producers, out in MLPS:
        if _has(mod, (*producers, out)) and (out != "c_proj" or not hasattr(mod, "c_attn")):
            return producers, out
    return None


def _int_attr(objs, names) -> int | None:
    for obj in objs:
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _head_dim_in_config(attn: nn.Module) -> bool:
    """Whether the attention module reads its head size from ``config.head_dim``, so that a config with fewer
    heads keeps it, rather than computing ``hidden_size // num_attention_heads``."""
    try:
        src = inspect.getsource(type(attn))  # the class: kernel decorators wrap __init__
    except (OSError, TypeError):
        return False
    return bool(_HEAD_DIM_FROM_CONFIG.search(src))


def mlp_width_key(cfg, width: int) -> str | None:
    """The config field that sets the MLP width ``width`` (GPT-2's ``n_inner`` may be None: 4 * n_embd)."""
    for key in MLP_WIDTH_KEYS:
        v = getattr(cfg, key, None)
        if v == width or (key == "n_inner" and v is None and hasattr(cfg, "n_embd") and 4 * cfg.n_embd == width):
            return key
    return None


def expert_count_key(cfg, n_experts: int) -> str | None:
    return next((k for k in EXPERT_COUNT_KEYS if getattr(cfg, k, None) == n_experts), None)


def _attention(layer: nn.Module, prefix: str, cfg, arch: str, outside: list[str]) -> AttentionParts | None:
    for name, mod in layer.named_modules():
        found = attention_projections(mod)
        if found is None or any(_inside(name, o) for o in outside):
            continue
        producers, out, contiguous = found
        full = f"{prefix}.{name}" if name else prefix
        cls = type(mod).__name__
        head_dim = _int_attr((mod, cfg), ("head_dim", "head_size"))
        if head_dim is None:
            head_dim = in_features(getattr(mod, out)) // _int_attr((mod, cfg), ("num_heads", "num_attention_heads"))
        n_heads = in_features(getattr(mod, out)) // head_dim
        if len(producers) == 3:
            n_kv_heads = out_features(getattr(mod, producers[1])) // head_dim
        else:
            n_kv_heads = (out_features(getattr(mod, producers[0])) // head_dim - n_heads) // 2
            contiguous = contiguous and n_kv_heads > 0 and (n_heads + 2 * n_kv_heads) * head_dim == out_features(
                getattr(mod, producers[0]))
        why = None
        if not contiguous:
            why = (f"attention heads cannot be removed on {arch}: {cls}.{producers[0]} fuses q, k and v "
                   "interleaved per head or group, a layout llmprune does not cut")
        elif not _head_dim_in_config(mod):
            why = (f"attention heads cannot be removed on {arch}: {cls} computes head_dim as hidden_size // "
                   f"num_attention_heads, so its config cannot describe fewer heads of size {head_dim}")
        elif not hasattr(cfg, "num_attention_heads"):
            why = f"attention heads cannot be removed on {arch}: its config has no num_attention_heads"
        elif n_kv_heads != n_heads and not hasattr(cfg, "num_key_value_heads"):
            why = f"attention heads cannot be removed on {arch}: its config has no num_key_value_heads"
        return AttentionParts(full, n_heads, n_kv_heads, head_dim, f"{full}.{out}", why)
    return None


def _mlp(layer: nn.Module, prefix: str, cfg, arch: str, outside: list[str]) -> MLPParts | None:
    for name, mod in layer.named_modules():
        found = mlp_projections(mod)
        if found is None or any(_inside(name, o) for o in outside):
            continue
        _, out = found
        full = f"{prefix}.{name}" if name else prefix
        width = in_features(getattr(mod, out))
        why = None
        if mlp_width_key(cfg, width) is None:
            why = (f"MLP channels cannot be removed on {arch}: no config field ({', '.join(MLP_WIDTH_KEYS)}) "
                   f"holds its width {width}")
        return MLPParts(full, width, f"{full}.{out}", why)
    return None


def _moe(layer: nn.Module, prefix: str, cfg, arch: str) -> MoEParts | None:
    containers = _expert_containers(layer)
    if not containers:
        return None
    container, E = next(iter(containers.items()))
    block_name = container.rpartition(".")[0]
    block = layer.get_submodule(block_name)
    routers = [n for n, (b, reason) in _roles(layer, containers).items() if b == block_name and reason.startswith("router")]
    router = routers[0] if routers else None
    router_mod = layer.get_submodule(router) if router else None
    top_k = _int_attr((block, router_mod or block, cfg), TOP_K_KEYS) or 1
    why = None
    if router is None:
        why = f"experts cannot be removed on {arch}: no router with one output per expert ({E}) in {block_name}"
    elif len(containers) > 1:
        why = f"experts cannot be removed on {arch}: the layer holds several expert containers ({', '.join(containers)})"
    elif expert_count_key(cfg, E) is None:
        why = (f"experts cannot be removed on {arch}: no config field ({', '.join(EXPERT_COUNT_KEYS)}) holds "
               f"the number of experts {E}")
    full = f"{prefix}.{block_name}" if block_name else prefix
    return MoEParts(full, E or 0, top_k, f"{prefix}.{router}" if router else "", why)


def expert_modules(model: nn.Module, moe: MoEParts) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(block, experts container, router)`` of an MoE part found by :func:`layer_parts`."""
    block = model.get_submodule(moe.name)
    containers = _expert_containers(block)
    if len(containers) != 1 or not moe.router:
        raise ValueError(moe.why_not or f"{moe.name}: expected one experts container and a router")
    return block, block.get_submodule(next(iter(containers))), model.get_submodule(moe.router)


def layer_parts(model: nn.Module, i: int) -> LayerParts:
    """The removable parts of decoder layer ``i`` of ``model`` (a transformers causal LM)."""
    stack_name, layers = find_decoder_layers(model)
    layer, prefix = layers[i], f"{stack_name}.{i}"
    cfg, arch = text_config(model), arch_name(model)
    moe = _moe(layer, prefix, cfg, arch)
    outside = [moe.name[len(prefix) + 1:]] if moe is not None and moe.name != prefix else []
    return LayerParts(_attention(layer, prefix, cfg, arch, outside), _mlp(layer, prefix, cfg, arch, outside), moe)
