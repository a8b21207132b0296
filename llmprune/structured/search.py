r"""Search for the structures whose removal changes the layer's output least: greedy OBS removal of whole
groups of input columns (ZipLM: Kurtić et al., NeurIPS 2023; the structured OBS of OSSCAR, Meng et al.,
ICML 2024, and of Kuznedelev et al.'s oBERT), beyond ranking by importance.

With ``Ĥ = G + λI`` the damped per-token second moment of the consumer's inputs and ``Ĥ⁻¹`` its inverse,
removing group ``g`` (columns ``Q``) from the current ``W`` and re-solving every other column optimally
raises the output error ``‖X Wᵀ − X Ŵᵀ‖²/n`` by

    ε_g = tr( W_{:,Q} [Ĥ⁻¹]_{QQ}⁻¹ W_{:,Q}ᵀ )                                   (OBS, one group)

and the optimal update of the rest and of the inverse restricted to the remaining columns are

    W    ← W − W_{:,Q} [Ĥ⁻¹]_{QQ}⁻¹ [Ĥ⁻¹]_{Q,:}                                     [out, in]
    Ĥ⁻¹  ← Ĥ⁻¹ − [Ĥ⁻¹]_{:,Q} [Ĥ⁻¹]_{QQ}⁻¹ [Ĥ⁻¹]_{Q,:}                              [in, in]

The search removes, one group at a time, the group of lowest ``ε_g`` among the families that still have
to lose one (so every key/value head keeps the same number of query heads), and updates. After the last
step ``W`` is the damped least-squares solution on the kept columns (the sequential OBS updates are
exact), so the consumer is re-solved as a by-product. Cost per removed group: ``O(out·in + in²)``;
in float64 on the CPU for the accuracy of hundreds of rank-``|Q|`` downdates.
"""

from __future__ import annotations

import torch

from .base import WidthMethod
from .columns import Moments, damped, finish
from .registry import register_structure


@register_structure
class GreedySearch(WidthMethod):
    name = "search"
    options = ("damp", "search_batch")

    def __init__(self, damp: float = 0.01, search_batch: int = 16):
        self.damp = float(damp)
        self.batch = int(search_batch)

    def remove(self, W, bias, stats, groups, per_family):
        m = Moments.of(stats, centred=bias is not None)
        dtype = torch.float64 if W.device.type == "cpu" else torch.float32
        Hinv = torch.linalg.inv(damped(m.fit.to(dtype), self.damp))  # [in, in]
        Wc = W.to(dtype).clone()  # [out, in]
        if groups.dead.numel():  # columns an earlier choice removed: taken out first, without a score
            Wc, Hinv = self._downdate(Wc, Hinv, groups.dead)
        family = {g: f for f, fam in enumerate(groups.families) for g in fam}
        left = [per_family] * len(groups.families)  # groups each family still has to lose
        alive = sorted(family)
        removed: list[int] = []
        if all(len(groups.groups[g]) == 1 for g in alive):
            removed = self._columns(Wc, Hinv, groups, family, left)
        while any(left):
            cands = [g for g in alive if left[family[g]] > 0 and g not in removed]
            eps = torch.stack([self._eps(Wc, Hinv, groups.groups[g]) for g in cands])
            g = cands[int(torch.argmin(eps))]  # ties: the lower index
            Wc, Hinv = self._downdate(Wc, Hinv, groups.groups[g])
            left[family[g]] -= 1
            removed.append(g)
        return finish(W, bias, groups, removed, Wc.to(W.dtype), m)

    def _columns(self, Wc: torch.Tensor, Hinv: torch.Tensor, groups, family: dict[int, int],
                 left: list[int]) -> list[int]:
        """Groups of one column each (MLP channels): ``ε_j = ‖W_{:,j}‖² / [Ĥ⁻¹]_jj`` for every column at once;
        each step removes the ``search_batch`` lowest (one at a time when 1) with one block downdate."""
        order = sorted(family)
        col = torch.tensor([int(groups.groups[g][0]) for g in order])  # group -> its column
        fam = torch.tensor([family[g] for g in order])
        need = torch.tensor(left)
        open_ = torch.ones(len(col), dtype=torch.bool)
        removed: list[int] = []
        while bool((need > 0).any()):
            eps = Wc[:, col].pow(2).sum(0) / torch.diagonal(Hinv)[col]  # [n_groups]
            eps[~open_ | (need[fam] == 0)] = float("inf")
            take: list[int] = []
            for g in torch.argsort(eps, stable=True).tolist():  # ties: the lower index
                if len(take) == self.batch or not bool(need.gt(0).any()) or eps[g] == float("inf"):
                    break
                if need[fam[g]] > 0:
                    take.append(g)
                    need[fam[g]] -= 1
            Wc, Hinv = self._downdate(Wc, Hinv, col[take])
            open_[take] = False
            removed += [order[g] for g in take]
        for f, n in enumerate(need.tolist()):
            left[f] = n
        return removed

    @staticmethod
    def _downdate(Wc: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``Q`` removed: the other columns re-solved and ``Ĥ⁻¹`` restricted to what is left."""
        B_inv = torch.linalg.inv(Hinv[Q][:, Q])  # [q, q]  [Ĥ⁻¹]_{QQ}⁻¹
        Wc -= (Wc[:, Q] @ B_inv) @ Hinv[Q, :]
        Hinv -= Hinv[:, Q] @ B_inv @ Hinv[Q, :]
        Wc[:, Q] = 0.0
        Hinv[Q, :] = 0.0
        Hinv[:, Q] = 0.0
        return Wc, Hinv

    @staticmethod
    def _eps(Wc: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        WQ = Wc[:, Q]  # [out, q]
        return (WQ @ torch.linalg.inv(Hinv[Q][:, Q]) * WQ).sum()  # tr(W_Q B⁻¹ W_Qᵀ)
