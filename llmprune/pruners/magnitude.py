"""Magnitude pruning: remove the smallest ``|W_ij|``.

Unstructured masks are chosen per matrix (as the Wanda repository's magnitude baseline does);
N:M masks per group of M consecutive inputs.
"""

from __future__ import annotations

import torch

from ..masks import select_mask
from ..stats import InputStats
from ..registry import register_pruner
from .base import Pruner, PruneResult


@register_pruner
class Magnitude(Pruner):
    name = "magnitude"

    def prune(
        self, W: torch.Tensor, stats: InputStats | None, sparsity: float, nm: tuple[int, int] | None = None
    ) -> PruneResult:
        S = W.abs()  # [out, in]
        M = select_mask(S, sparsity, nm, scope="matrix")
        return PruneResult(W * M, M)
