"""What gets pruned: the stack of decoder layers, and the weights inside each layer.

A :class:`Target` is one weight seen as ``W [out, in]`` whatever its storage (``nn.Linear``,
GPT-2's transposed ``Conv1D``, one expert of a fused 3-D expert parameter); an
:class:`ExpertGroup` is a fused MoE experts module, whose inputs depend on routing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the ModuleList of same-class blocks holding the most parameters."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) != 1:
                continue
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None:
        raise ValueError(
            f"no stack of decoder layers found in {type(model).__name__}; llmprune expects a causal LM "
            "whose blocks sit in an nn.ModuleList (model.layers, transformer.h, ...)"
        )
    return best


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # GPT-2's transposed linear


@dataclass
class Target:
    """A weight to prune, seen as ``W [out, in]`` whatever its storage layout.

    ``index`` selects one expert of a fused 3-D expert parameter ``[experts, out, in]``.
    """

    name: str  # full name in the model, e.g. model.layers.3.mlp.experts.down_proj[5]
    module: nn.Module
    param: str = "weight"
    index: int | None = None

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

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


def _is_fused_experts(mod: nn.Module) -> bool:
    """Mixtral/Qwen-MoE experts of transformers 5: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``."""
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return (
        isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3
        and hasattr(mod, "act_fn")
    )


@dataclass
class ExpertGroup:
    """The experts of one fused MoE module: per expert a ``gate_up`` and a ``down`` target."""

    module: nn.Module
    gate_up: list[Target]
    down: list[Target]

    @property
    def supported(self) -> bool:
        m = self.module
        return bool(getattr(m, "is_concatenated", True) and not getattr(m, "is_transposed", False)
                    and not getattr(m, "has_bias", False) and getattr(m, "has_gate", True))

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
        gate, up = nn.functional.linear(X, self.module.gate_up_proj[e]).chunk(2, dim=-1)
        return self.module.act_fn(gate) * up


def _matches(name: str, targets: str | None, ignore: str | None) -> bool:
    if targets is not None and not re.search(targets, name):
        return False
    return not (ignore is not None and re.search(ignore, name))


def find_targets(
    layer: nn.Module, prefix: str, targets: str | None = None, ignore: str | None = None
) -> tuple[list[Target], list[ExpertGroup]]:
    """Every Linear / Conv1D inside a decoder layer, and fused expert weights, filtered by regexes
    on the name relative to the layer (``self_attn.q_proj``, ``mlp.experts.down_proj``)."""
    found, groups = [], []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            if _matches(name, targets, ignore):
                found.append(Target(f"{prefix}.{name}", mod))
        elif _is_fused_experts(mod):
            E = mod.gate_up_proj.shape[0]
            sel = {p: _matches(f"{name}.{p}", targets, ignore) for p in ("gate_up_proj", "down_proj")}
            if not any(sel.values()):
                continue
            group = ExpertGroup(
                mod,
                [Target(f"{prefix}.{name}.gate_up_proj[{e}]", mod, "gate_up_proj", e) for e in range(E)]
                if sel["gate_up_proj"] else [],
                [Target(f"{prefix}.{name}.down_proj[{e}]", mod, "down_proj", e) for e in range(E)]
                if sel["down_proj"] else [],
            )
            if group.supported:
                groups.append(group)
            else:
                log.warning("%s.%s: this fused-experts layout is not supported and stays dense", prefix, name)
    return found, groups


