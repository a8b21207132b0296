"""The PEFT merge that keeps sparsity: adapters merged into a sparse base, the mask re-applied, and a
:class:`MergeReport` of the adapters' update that fell on pruned positions and was dropped.

:meth:`~llmprune.recovery.keeper.SparsityKeeper.merge` and
:func:`~llmprune.recovery.keeper.merge_and_keep_sparsity` are the ways in; :func:`merge_adapters` is the
merge itself, on the keeper's masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.targets import tuner_layers
from .masks import PackedMask, clean_name


@dataclass
class MergeReport:
    """What :meth:`~llmprune.recovery.keeper.SparsityKeeper.merge` did to the adapters' update ``ΔW`` (all
    adapters merged together).

    ``dropped_fraction`` is ``‖ΔW ⊙ (1 − M)‖² / ‖ΔW‖²`` over every merged sparse module: the share of the
    update's squared Frobenius norm that fell on pruned positions and was removed to keep the mask.
    """

    model: nn.Module  # the merged model, adapters unloaded
    modules: dict[str, float] = field(default_factory=dict)  # merged sparse module -> its dropped fraction
    dense_modules: list[str] = field(default_factory=list)  # merged modules the keeper does not hold (kept dense)
    update_norm: float = 0.0  # ‖ΔW‖ over the sparse modules
    dropped_norm: float = 0.0  # ‖ΔW ⊙ (1 − M)‖ over the sparse modules
    sparsity: float = 0.0  # of the kept weights after the merge (equal to the keeper's mask sparsity)

    @property
    def dropped_fraction(self) -> float:
        return (self.dropped_norm / self.update_norm) ** 2 if self.update_norm > 0 else 0.0

    def summary(self) -> str:
        """One line for logs and warnings."""
        if not self.modules:
            return "no adapter was merged into a sparse module"
        worst = max(self.modules, key=self.modules.get)
        return (f"merged adapters into {len(self.modules)} sparse module(s) and re-applied the mask (sparsity "
                f"{self.sparsity:.4f}): the adapters' update had {self.dropped_fraction:.1%} of its squared norm "
                f"({self.dropped_norm / self.update_norm:.1%} of its norm) on pruned positions, which was dropped; "
                f"worst module {worst} ({self.modules[worst]:.1%} of its squared norm)" if self.update_norm > 0 else
                f"merged adapters into {len(self.modules)} sparse module(s); their update was zero")


@torch.no_grad()
def merge_adapters(peft_model: nn.Module, masks: Mapping[int, PackedMask], adapter_names: list[str] | None = None,
                   safe_merge: bool = False) -> MergeReport:
    """Merge a PEFT model's adapters into its base weights one module at a time (by PEFT itself), drop the
    update's part on the pruned positions of the weights in ``masks`` (``id(weight)`` -> its mask) and unload
    the adapters. The report's ``sparsity`` is left to the caller (:meth:`~.keeper.SparsityKeeper.merge`)."""
    layers = tuner_layers(peft_model)
    if not layers:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT adapter layers to merge; pass the PeftModel "
                         "returned by peft.get_peft_model or PeftModel.from_pretrained")
    report = MergeReport(model=peft_model)
    update2 = dropped2 = 0.0
    for name, layer in layers:
        base = layer.get_base_layer()
        W = getattr(base, "weight", None)
        entry = masks.get(id(W)) if W is not None else None
        if entry is None:
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            report.dense_modules.append(clean_name(name))
            continue
        before = W.detach().clone()
        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        W = base.weight  # safe_merge replaces .data; the parameter is the same
        delta = W.detach().float() - before.float()  # ΔW in the stored layout
        del before
        pruned = entry.pruned()
        u2 = float(delta.pow(2).sum())
        d2 = float(delta[pruned].pow(2).sum())
        entry.zero_(W.data)
        update2 += u2
        dropped2 += d2
        report.modules[entry.name] = d2 / u2 if u2 > 0 else 0.0
    report.model = peft_model.unload()  # the adapters are merged already: only replace the layers
    report.update_norm, report.dropped_norm = math.sqrt(update2), math.sqrt(dropped2)
    return report
