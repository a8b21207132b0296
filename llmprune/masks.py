"""Mask selection, shared by every pruner.

A mask ``M`` has the weight's shape ``[out, in]`` and is True where a weight is *kept*
(the ``M ⊙ W`` of the SparseGPT paper). Scores ``S`` rank weights: low scores are pruned.
"""

from __future__ import annotations

from typing import Literal

import torch

Scope = Literal["row", "matrix"]


def nm_mask(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    out, cols = S.shape
    if cols % m:
        raise ValueError(
            f"an {n}:{m} pattern needs the input dimension to be a multiple of {m}, got {cols}; "
            "exclude this module with --ignore or use an unstructured pattern"
        )
    G = S.reshape(out, cols // m, m)  # [out, groups, m]
    keep = torch.topk(G, n, dim=-1).indices  # [out, groups, n]
    M = torch.zeros_like(G, dtype=torch.bool).scatter_(-1, keep, True)
    return M.reshape(out, cols)


def kth_smallest(S: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) along ``dim``, keeping the dimension. On the CPU numpy's
    introselect (``np.partition``), about 8x faster than ``torch.kthvalue`` there."""
    if S.device.type == "cpu" and S.dtype in (torch.float32, torch.float64) and not S.requires_grad:
        import numpy as np

        part = np.partition(S.numpy(), k - 1, axis=dim)
        return torch.from_numpy(np.take(part, [k - 1], axis=dim))
    return torch.kthvalue(S, k, dim=dim, keepdim=True).values


def unstructured_mask(S: torch.Tensor, sparsity: float, scope: Scope) -> torch.Tensor:
    """Prune the ``floor(sparsity * size)`` lowest scores, per output row or per matrix."""
    if scope == "row":
        k = int(S.shape[1] * sparsity)  # pruned per row
        if k == 0:
            return torch.ones_like(S, dtype=torch.bool)
        M = S > kth_smallest(S, k, dim=1)  # [out, in]; each row prunes >= k
        if int((~M).sum()) != k * S.shape[0]:  # ties at some row's threshold: exact top-k
            M = torch.ones_like(S, dtype=torch.bool)
            M.scatter_(1, torch.topk(S, k, dim=1, largest=False).indices, False)
        return M
    k = int(S.numel() * sparsity)
    if k == 0:
        return torch.ones_like(S, dtype=torch.bool)
    flat = S.flatten()  # [numel]
    thresh = kth_smallest(flat, k, dim=0)  # linear time, unlike a sort or top-k
    M = flat > thresh
    if int((~M).sum()) != k:  # ties at the threshold: fall back to an exact top-k
        M = torch.ones_like(flat, dtype=torch.bool)
        M[torch.topk(flat, k, largest=False).indices] = False
    return M.reshape(S.shape)


def select_mask(
    S: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: Scope = "row"
) -> torch.Tensor:
    """Keep-mask from scores: N:M when ``nm`` is given, else unstructured at ``sparsity``."""
    if nm is not None:
        return nm_mask(S, *nm)
    return unstructured_mask(S, sparsity, scope)
