r"""What gets pruned: the stack of decoder layers, and the weights inside each layer.

A :class:`Target` is one weight seen as ``W [out, in]`` whatever its storage (``nn.Linear``,
GPT-2's transposed ``Conv1D``, one expert of a fused 3-D expert parameter); an
:class:`ExpertGroup` is a fused MoE experts module, whose inputs depend on routing.

What stays dense by role (:func:`find_targets`):

- **Routers.** In an MoE block (the parent of an experts container: a module named ``experts``,
  or one holding a 3-D parameter), a weight ``[E, H]`` whose output width equals the block's
  number of experts ``E`` is the router (Mixtral/Qwen-MoE ``gate``, DBRX ``router.layer``,
  GPT-OSS/Granite ``router``), whether an ``nn.Linear`` or a custom module with a 2-D ``weight``.
  Only the block's own children count, or the single weight inside a child (``router.layer``),
  never the experts or a shared-expert MLP.
- **Gates.** In an MoE block, a weight with one output (Qwen-MoE ``shared_expert_gate``: a
  sigmoid scale on the shared expert).

Both are left out and listed in :attr:`LayerTargets.skipped`: they are tiny, and pruning them
changes which experts every token reaches. An explicit ``targets`` regex that spells the
router's own name (a match reaching past the block's name: ``mlp\.gate``, ``gate$``,
``router``) prunes it anyway; ``mlp\.`` alone does not.

Fused experts (3-D ``gate_up_proj``/``down_proj``, the transformers 5 layout) are read in two
layouts, told apart by shape and checked against ``is_transposed``: ``[E, 2I, H]`` + ``[E, H, I]``
and transposed ``[E, H, 2I]`` + ``[E, I, H]``, with gate and up concatenated, no bias, called as
``experts(hidden_states, top_k_index, top_k_weights)``. Any other experts container (biases,
interleaved or no gate, other call signatures, DBRX's flat ``w1``/``v1``/``w2``, JetMoE's
``weight [E, out, in]``) is an error naming the module and the fix, ``--ignore`` on it: it
would otherwise stay dense unseen. Experts made of ``nn.Linear`` modules (a ModuleList) are
ordinary targets.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


def _towers(model: nn.Module) -> list[str]:
    """Names of the sub-models built from a config other than the model's own or its text config: the vision
    and audio towers of a multimodal model, whose layers a text forward never calls."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "get_text_config"):
        return []
    text = {type(cfg), type(cfg.get_text_config())}
    return [name for name, mod in model.named_modules()
            if name and hasattr(mod, "base_model_prefix") and getattr(mod, "config", None) is not None
            and type(mod.config) not in text]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the ModuleList holding the most parameters (of blocks of one
    class on a tie), outside the vision and audio towers of a multimodal model (:func:`_towers`) when there
    is one. Its blocks may be of several classes (Jamba's attention and Mamba layers, Zamba 2's hybrid
    layers): each layer is replayed with its own recorded call."""
    towers = _towers(model)
    found = []  # (size, one class, outside the towers, (name, list))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if size > 0:
                found.append((size, len({type(m) for m in mod}) == 1, not any(_inside(name, t) for t in towers),
                              (name, mod)))
    outside = [f for f in found if f[2]] or found
    if not outside:
        raise ValueError(
            f"no stack of decoder layers found in {type(model).__name__}; llmprune expects a causal LM "
            "whose blocks sit in an nn.ModuleList (model.layers, transformer.h, ...)"
        )
    return max(outside, key=lambda f: (f[0], f[1]))[3]  # the first of the largest


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # GPT-2's transposed linear


@dataclass
class Target:
    """A weight to prune, seen as ``W [out, in]`` whatever its storage layout.

    ``index`` selects one expert of a fused 3-D expert parameter ``[experts, out, in]``
    (``[experts, in, out]`` when ``in_out``).
    """

    name: str  # full name in the model, e.g. model.layers.3.mlp.experts.down_proj[5]
    module: nn.Module
    param: str = "weight"
    index: int | None = None
    in_out: bool = False  # stored as [in, out]: transposed fused experts

    @property
    def transposed(self) -> bool:
        return self.in_out or _is_conv1d(self.module)

    def stored(self) -> torch.Tensor:
        p = getattr(self.module, self.param).data
        return p[self.index] if self.index is not None else p

    def get_weight(self) -> torch.Tensor:
        W = self.stored()
        return (W.T if self.transposed else W).float().clone()  # [out, in]

    def set_weight(self, W: torch.Tensor) -> None:
        p = self.stored()
        p.copy_((W.T if self.transposed else W).to(p.dtype))

    @property
    def shape(self) -> tuple[int, int]:
        W = self.stored()
        return tuple(W.T.shape if self.transposed else W.shape)


@dataclass
class ExpertGroup:
    """The experts of one fused MoE module: per expert a ``gate_up`` and a ``down`` target."""

    module: nn.Module
    gate_up: list[Target]
    down: list[Target]
    in_out: bool = False  # transposed layout: gate_up_proj [E, H, 2I], down_proj [E, I, H]

    @property
    def targets(self) -> list[Target]:
        return self.gate_up + self.down

    def routed(self, top_k_index: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(e, token_idx)`` for every expert that receives tokens; ``top_k_index [T, k]``."""
        E = self.module.gate_up_proj.shape[0]
        out = []
        for e in range(E):
            token_idx = (top_k_index == e).any(dim=-1).nonzero().squeeze(-1)  # [t_e]
            if token_idx.numel():
                out.append((e, token_idx))
        return out

    def intermediate(self, e: int, X: torch.Tensor) -> torch.Tensor:
        """Input of expert ``e``'s down projection, ``act(gate) * up``  [t_e, I]."""
        W = self.module.gate_up_proj[e]  # [2I, H], or [H, 2I] when in_out
        gate_up = X @ W if self.in_out else nn.functional.linear(X, W)  # [t_e, 2I]
        apply_gate = getattr(self.module, "_apply_gate", None)
        if apply_gate is not None:  # transformers' gating hook: default, or clamped (Step3p7)
            return apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.module.act_fn(gate) * up


SUPPORTED_EXPERTS = (
    "gate_up_proj [E, 2I, H] + down_proj [E, H, I], or transposed [E, H, 2I] + [E, I, H]; gate and up "
    "concatenated, no bias, called as experts(hidden_states, top_k_index, top_k_weights)"
)
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _fused_layout(mod: nn.Module) -> tuple[bool | None, str]:
    """``(in_out, "")`` for a fused-experts module llmprune reads, ``(None, why not)`` otherwise."""
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if gu is None and (hasattr(mod, "up_proj") or not getattr(mod, "has_gate", True)):
        return None, "no gate: up_proj only"
    if not all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in (gu, down)):
        return None, "no 3-D gate_up_proj and down_proj"
    extra = [n for n, p in mod.named_parameters() if p.dim() >= 2 and n not in ("gate_up_proj", "down_proj")]
    if extra or getattr(mod, "has_bias", False):
        return None, f"also holds {', '.join(extra) or 'biases'}"
    if not getattr(mod, "is_concatenated", True):
        return None, "gate and up interleaved"
    if not (hasattr(mod, "act_fn") or hasattr(mod, "_apply_gate")):
        return None, "no act_fn"
    params = list(inspect.signature(mod.forward).parameters)
    if params[:2] != ["hidden_states", "top_k_index"]:
        return None, f"called as forward({', '.join(params)})"
    (E, A, B), (E_down, C, D) = gu.shape, down.shape
    standard = A == 2 * D and B == C  # [E, 2I, H], [E, H, I]
    in_out = B == 2 * C and A == D  # [E, H, 2I], [E, I, H]
    if E != E_down or not (standard or in_out):
        return None, "shapes match neither layout"
    flag = getattr(mod, "is_transposed", None)
    if flag is not None and bool(flag) != in_out:
        return None, f"is_transposed={flag} disagrees with the shapes"
    return in_out, ""


def _expert_count(mod: nn.Module) -> int | None:
    for src in (mod, getattr(mod, "config", None)):
        for attr in _EXPERT_COUNTS:
            v = getattr(src, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    if isinstance(mod, nn.ModuleList):
        return len(mod)
    deep = [p for p in mod.parameters(recurse=False) if p.dim() >= 3 and _matrix(p)]
    return deep[0].shape[0] if deep else None


def _inside(name: str, container: str) -> bool:
    return name == container or name.startswith(f"{container}.")


def _expert_containers(layer: nn.Module) -> dict[str, int | None]:
    """Name → number of experts, for each module of ``layer`` that holds experts: one with a 3-D
    parameter (convolutions aside), or one named ``experts`` without such a module inside (a
    ModuleList, DBRX's flat weights). JetMoE's ``experts`` attention holds two 3-D modules and a
    router: it is an MoE block, not a container."""
    deep: dict[str, int | None] = {}
    named: dict[str, int | None] = {}
    for name, mod in layer.named_modules():
        if not name or any(_inside(name, c) for c in deep):
            continue
        if not isinstance(mod, nn.modules.conv._ConvNd) and any(p.dim() >= 3 and _matrix(p)
                                                                 for p in mod.parameters(recurse=False)):
            deep[name] = _expert_count(mod)
        elif name.rsplit(".", 1)[-1] == "experts" and not any(_inside(name, c) for c in named):
            named[name] = _expert_count(mod)
    named = {n: E for n, E in named.items() if not any(_inside(d, n) for d in deep)}
    return deep | named


def _matrix(p: torch.Tensor) -> bool:
    """A weight with at least two dimensions of more than one entry; ``[1, 1, H]`` mixing coefficients
    (RWKV's ``time_mix_*``) and ``[1, 1, h, 1]`` decays (Kimi's ``A_log``) are vectors, never targets."""
    return sum(d > 1 for d in p.shape) >= 2


def _weight_2d(mod: nn.Module) -> bool:
    W = getattr(mod, "weight", None)
    return isinstance(W, nn.Parameter) and W.dim() == 2


def _roles(layer: nn.Module, containers: dict[str, int | None]) -> dict[str, tuple[str, str]]:
    """Name → ``(MoE block, reason)`` for the routers and gates of the layer (see the module docstring)."""
    mods = dict(layer.named_modules())
    roles: dict[str, tuple[str, str]] = {}
    for container, E in containers.items():
        block = container.rpartition(".")[0]
        for child_name, child in mods[block].named_children():
            child_full = f"{block}.{child_name}" if block else child_name
            if any(_inside(child_full, c) for c in containers):
                continue
            weighted = [(n, m) for n, m in child.named_modules() if _weight_2d(m)]
            if len(weighted) != 1:  # a router is one weight, or a wrapper of one (DBRX router.layer)
                continue
            n, m = weighted[0]
            name = f"{child_full}.{n}" if n else child_full
            out = m.nf if _is_conv1d(m) else m.weight.shape[0]
            hint = f"name it in targets to prune it, e.g. '{re.escape(name)}$'"
            if out == E:
                roles[name] = (block, f"router: {out} outputs, one per expert of {container}; {hint}")
            elif out == 1:
                roles[name] = (block, f"gate: one output scaling a branch of {block or 'the layer'}; {hint}")
    return roles


def _spells(targets: str, name: str, block: str) -> bool:
    """Whether the ``targets`` regex names the module itself: a match reaching past its block's name."""
    start = len(block) + 1 if block else 0
    return any(m.end() > max(start, m.start()) for m in re.finditer(targets, name))


def _loose_params(mod: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Weights (≥ 2-D) of ``mod`` not held by a Linear / Conv1D, which llmprune could see as targets."""
    out = []
    for sub_name, sub in mod.named_modules():
        if isinstance(sub, nn.Linear) or _is_conv1d(sub):
            continue
        for n, p in sub.named_parameters(recurse=False):
            if p.dim() >= 2 and _matrix(p):
                out.append((f"{sub_name}.{n}" if sub_name else n, p))
    return out


def _expert_group(name: str, mod: nn.Module, full: str, targets: str | None,
                  ignore: str | None) -> ExpertGroup | None:
    loose = _loose_params(mod)
    sel = {n for n, _ in loose if _matches(f"{name}.{n}", targets, ignore)}
    if not sel:  # experts made of Linear modules (found one by one), or not selected
        return None
    in_out, why = _fused_layout(mod)
    if in_out is None:
        shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in loose)
        raise ValueError(
            f"{full} ({type(mod).__name__}: {shapes}) holds experts in a layout llmprune does not read "
            f"({why}); it reads {SUPPORTED_EXPERTS}. Leave them dense with ignore='{re.escape(name)}' "
            f"(--ignore '{re.escape(name)}')"
        )
    E = mod.gate_up_proj.shape[0]
    return ExpertGroup(
        mod,
        [Target(f"{full}.gate_up_proj[{e}]", mod, "gate_up_proj", e, in_out) for e in range(E)]
        if "gate_up_proj" in sel else [],
        [Target(f"{full}.down_proj[{e}]", mod, "down_proj", e, in_out) for e in range(E)]
        if "down_proj" in sel else [],
        in_out,
    )


def _matches(name: str, targets: str | None, ignore: str | None) -> bool:
    if targets is not None and not re.search(targets, name):
        return False
    return not (ignore is not None and re.search(ignore, name))


@dataclass
class LayerTargets:
    """What :func:`find_targets` found in one decoder layer."""

    targets: list[Target]
    groups: list[ExpertGroup]
    skipped: list[tuple[str, str]]  # (name, reason): routers and gates left dense by role


def find_targets(
    layer: nn.Module, prefix: str, targets: str | None = None, ignore: str | None = None
) -> LayerTargets:
    """Every Linear / Conv1D inside a decoder layer, and fused expert weights, filtered by regexes
    on the name relative to the layer (``self_attn.q_proj``, ``mlp.experts.down_proj``); routers
    and gates are skipped unless ``targets`` names them (see the module docstring). Raises
    ``ValueError`` for selected experts in a layout it does not read."""
    containers = _expert_containers(layer)
    roles = _roles(layer, containers)
    found = LayerTargets([], [], [])
    for name, mod in layer.named_modules():
        full = f"{prefix}.{name}"
        if name in roles:
            block, reason = roles[name]
            if not _matches(name, None, ignore):
                continue
            if targets is not None and _spells(targets, name, block):
                found.targets.append(Target(full, mod))
            elif targets is None or re.search(targets, name):
                found.skipped.append((full, reason))
                log.debug("%s stays dense: %s", full, reason)
        elif isinstance(mod, nn.Linear) or _is_conv1d(mod):
            if _matches(name, targets, ignore):
                found.targets.append(Target(full, mod))
        elif name in containers:
            group = _expert_group(name, mod, full, targets, ignore)
            if group is not None:
                found.groups.append(group)
    return found


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside the wrappers used for training: ``DistributedDataParallel``/``DataParallel`` (and
    accelerate's and DeepSpeed's engines, which hold it as ``.module``), ``torch.compile``'s ``_orig_mod``
    and PEFT's ``PeftModel`` (its base model, with the adapter layers still injected)."""
    seen = 0
    while seen < 16:  # wrappers nest a few levels at most; the bound stops a self-referencing wrapper
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine") and hasattr(model, "module")
        ):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and type(model).__name__.startswith("Peft"):
            model = model.get_base_model()
        else:
            return model
    return model


def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """PEFT adapter layers (LoRA and the other tuners) inside ``model``; empty without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def model_targets(model: nn.Module, targets: str | None, ignore: str | None) -> dict[str, Target]:
    """Every target of the model by full name, in layer order."""
    layers_name, layers = find_decoder_layers(model)
    out: dict[str, Target] = {}
    for i, layer in enumerate(layers):
        found = find_targets(layer, f"{layers_name}.{i}", targets, ignore)
        for t in found.targets + [t for g in found.groups for t in g.targets]:
            out[t.name] = t
    return out
