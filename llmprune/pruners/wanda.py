"""Wanda: Pruning by Weights and activations (Sun et al., 2023, arXiv:2306.11695).

Score ``S_ij = |W_ij| · ‖X_j‖₂`` where ``‖X_j‖₂`` is the norm of input feature ``j`` over all
calibration tokens; weights are compared within each output row (unstructured) or within each
group of M consecutive inputs (N:M), as in the reference code.
"""

from __future__ import annotations

import torch

from ..masks import select_mask
from ..stats import InputStats
from ..registry import register_pruner
from .base import Pruner, PruneResult


@register_pruner
class Wanda(Pruner):
    name = "wanda"
    needs = frozenset({"sq"})

    def prune(
        self, W: torch.Tensor, stats: InputStats, sparsity: float, nm: tuple[int, int] | None = None
    ) -> PruneResult:
        x_norm = stats.col_sq_norms.sqrt()  # [in]  ‖X_j‖₂
        S = W.abs() * x_norm.unsqueeze(0)  # [out, in]
        M = select_mask(S, sparsity, nm, scope="row")
        return PruneResult(W * M, M)
