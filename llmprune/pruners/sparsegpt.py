"""SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot
(Frantar & Alistarh, 2023, arXiv:2301.00774).

OBS weight reconstruction with the layer Hessian ``H = Σ x xᵀ``: columns are visited left to
right; each pruned weight's error is spread over the not-yet-visited columns of its row through
the upper Cholesky factor of ``H⁻¹``. Lazy batch updates apply the accumulated error to the rest
of the matrix once per block of ``blocksize`` columns; the unstructured mask is chosen adaptively
per block from the saliency ``w² / [H⁻¹]_jj²``; N:M masks per group of M columns when the group
is reached.

Deviations from the reference code (IST-DASLab/sparsegpt):
- N:M (``nm_exact``, default on): when a group of M columns is reached, every set of M - N weights
  it could prune (per row) is scored by the exact output error the sweep will leave (from the
  group's block of the inverse-Hessian factor), and the cheapest set is pruned; the reference scores the columns one
  by one (``w² / [H⁻¹]_jj²``), ignoring that pruning one weight of the group changes the others;
- column order (``act_order``, GPTQ's act-order, default on for N:M): whole groups of columns are
  visited by decreasing Hessian diagonal, so the inputs that matter most are pruned while the
  most columns are left to absorb their error; the weight and mask are returned in the original
  order, so N:M groups stay consecutive input columns;
- an unstructured block prunes exactly ``floor(sparsity · block size)`` weights (the reference's
  ``<= threshold`` prunes one more and all ties);
- if the damped Hessian is still not positive definite, damping is raised tenfold (up to three
  times) with a warning instead of failing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Iterator

import torch

from ..masks import unstructured_mask
from ..stats import InputStats
from .base import Pruner, PruneResult

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _combinations_cpu(m: int, k: int) -> torch.Tensor:
    rows = [[c in combo for c in range(m)] for combo in itertools.combinations(range(m), k)]
    return torch.tensor(rows, dtype=torch.bool)  # [C(m, k), m]


def _combinations(m: int, k: int, device: torch.device) -> torch.Tensor:
    return _combinations_cpu(m, k).to(device)


class SparseGPT(Pruner):
    name = "sparsegpt"
    stats_kind = "hessian"

    def __init__(self, blocksize: int = 128, damp: float = 0.01, act_order: bool = False, nm_exact: bool = True):
        self.blocksize = blocksize
        self.damp = damp
        self.act_order = act_order
        self.nm_exact = nm_exact

    def inverse_hessian_factor(self, H: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Upper Cholesky factor of the damped ``H⁻¹`` and the mask of dead inputs."""
        H = H / max(n, 1)  # [in, in]
        dead = torch.diagonal(H) == 0  # inputs never active: their weights cannot matter
        H[dead, dead] = 1
        damp = self.damp * torch.mean(torch.diagonal(H))
        eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
        for attempt in range(4):
            try:
                # Upper factor U of H⁻¹ = UᵀU without forming H⁻¹: with J the reversal permutation
                # and J H J = L Lᵀ, U = J L⁻¹ J (one Cholesky and one triangular inverse).
                L = torch.linalg.cholesky((H + damp * eye).flip(0, 1))  # [in, in]
                return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1), dead
            except torch.linalg.LinAlgError:
                if attempt == 3:
                    raise
                damp = damp * 10
                log.warning("Hessian not positive definite; retrying with damping %.3g", float(damp))
        raise AssertionError("unreachable")

    def _factor(self, stats: InputStats, nm: tuple[int, int] | None):
        """``(H_inv, dead, perm)`` of ``stats``, computed once for the modules that share an input (q/k/v)."""
        key = ("sparsegpt", self.damp, self.act_order, None if nm is None else nm[1], stats.n)
        if stats.cache.get("key") == key:
            return stats.cache["value"]
        H = stats.H.float().clone()  # [in, in]
        perm = None
        if self.act_order:
            g = 1 if nm is None else nm[1]
            if H.shape[0] % g == 0:
                # visit groups of columns (whole N:M groups) by decreasing Hessian diagonal
                order = torch.argsort(torch.diagonal(H).reshape(-1, g).sum(1), descending=True)  # [in/g]
                perm = (order.unsqueeze(1) * g + torch.arange(g, device=H.device)).reshape(-1)  # [in]
                H = H[perm][:, perm]
        H_inv, dead = self.inverse_hessian_factor(H, stats.n)  # [in, in] upper
        stats.cache = {"key": key, "value": (H_inv, dead, perm)}
        return H_inv, dead, perm

    def prune(
        self, W: torch.Tensor, stats: InputStats, sparsity: float, nm: tuple[int, int] | None = None
    ) -> PruneResult:
        if stats.H is None:
            raise ValueError("SparseGPT needs the layer Hessian; accumulate statistics with kind='hessian'")
        W = W.clone().float()  # [out, in]
        cols = W.shape[1]
        H_inv, dead, perm = self._factor(stats, nm)  # [in, in] upper, [in], [in] | None
        if perm is not None:
            W = W[:, perm]
        W[:, dead] = 0
        if nm is not None:
            n_keep, m = nm
            if cols % m:
                raise ValueError(
                    f"an {n_keep}:{m} pattern needs the input dimension to be a multiple of {m}, got {cols}; "
                    "exclude this module with --ignore or use an unstructured pattern"
                )
        M_pruned = torch.zeros_like(W, dtype=torch.bool)  # [out, in] True where pruned

        # N:M groups must not straddle blocks: round the block to a multiple of M
        bs = self.blocksize if nm is None else max(nm[1], self.blocksize // nm[1] * nm[1])
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1 = W[:, i1:i2].clone()  # [out, B]
            Err1 = torch.zeros_like(W1)  # [out, B]
            H_inv1 = H_inv[i1:i2, i1:i2]  # [B, B]
            d = torch.diagonal(H_inv1)  # [B]

            if nm is None:
                S = W1.pow(2) / d.pow(2).unsqueeze(0)  # [out, B] OBS saliency
                mask1 = ~unstructured_mask(S, sparsity, "matrix")  # [out, B] True = prune
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)

            with _single_thread(W1.device):  # tiny per-column ops: thread sync would dominate
                self._sweep(W1, Err1, H_inv1, d, mask1, nm, self.nm_exact)

            W[:, i1:i2] = W1.masked_fill_(mask1, 0.0)
            M_pruned[:, i1:i2] = mask1
            W[:, i2:].sub_(Err1 @ H_inv[i1:i2, i2:])  # lazy batch update of the remaining columns

        M = ~M_pruned
        M[:, dead] = False
        W.mul_(M)
        if perm is not None:
            inv = torch.argsort(perm)
            W, M = W[:, inv], M[:, inv]
        return PruneResult(W, M)

    @staticmethod
    def _group_mask(W1: torch.Tensor, U: torch.Tensor, prune_n: int) -> torch.Tensor:
        """Which ``prune_n`` of a group's ``m`` columns to prune, per row, by the exact loss of the sweep.

        ``W1 [out, m]`` are the group's current weights and ``U [m, m]`` the group's block of the
        upper factor of ``H⁻¹``. Pruning a set S of columns left to right, with the columns already
        visited frozen, costs ``Σ_{c∈S} e_c²`` with ``e_c = w_c / U_cc`` and ``w_k -= e_c U_ck`` for
        later columns k: the output error ``ΔW H ΔWᵀ`` the sweep will leave. Every one of the
        C(m, prune_n) sets is scored and the cheapest kept; the reference scores columns one by one
        (``w² / d²``), ignoring how pruning one column of the group changes the others.
        """
        m = W1.shape[1]
        P = _combinations(m, prune_n, W1.device)  # [C, m] True = prune
        w = W1.unsqueeze(1).expand(-1, P.shape[0], -1).clone()  # [out, C, m]
        loss = torch.zeros(w.shape[:2], device=W1.device, dtype=W1.dtype)  # [out, C]
        for c in range(m):
            e = w[:, :, c] * P[:, c] / U[c, c]  # [out, C]
            loss += e * e
            if c + 1 < m:
                w[:, :, c + 1 :] -= e.unsqueeze(-1) * U[c, c + 1 :]
        return P[loss.argmin(dim=1)]  # [out, m]

    @staticmethod
    def _sweep(W1, Err1, H_inv1, d, mask1, nm, nm_exact: bool = True, sub: int = 32) -> None:
        """Column-by-column OBS inside one block; N:M masks chosen as each group is reached.

        The block is swept in sub-blocks of ``sub`` columns: each column's update reaches the rest
        of its sub-block only, and one matrix product per sub-block carries the sub-block's errors
        to the rest of the block (the same arithmetic as updating the whole block per column, with
        a quarter of the per-column work for 128-column blocks).
        """
        if nm is not None:
            n_keep, m = nm
            prune_n = m - n_keep
            sub = max(m, sub // m * m)  # N:M groups must not straddle sub-blocks
        B = W1.shape[1]
        for j1 in range(0, B, sub):
            j2 = min(j1 + sub, B)
            for i in range(j1, j2):
                w = W1[:, i]  # [out]
                if nm is not None and i % m == 0:
                    if nm_exact:
                        mask1[:, i : i + m] = SparseGPT._group_mask(W1[:, i : i + m], H_inv1[i : i + m, i : i + m],
                                                                    prune_n)
                    else:  # the reference: the group's prune_n lowest w² / d²
                        S = W1[:, i : i + m].pow(2) / d[i : i + m].pow(2).unsqueeze(0)  # [out, m]
                        idx = torch.topk(S, prune_n, dim=1, largest=False).indices  # [out, prune_n]
                        mask1.scatter_(1, i + idx, True)
                err1 = w.mul(mask1[:, i]).div_(d[i])  # [out] (w - q) / d with q = w off the mask
                W1[:, i:j2].addr_(err1, H_inv1[i, i:j2], alpha=-1)  # OBS update; leaves q in column i
                Err1[:, i] = err1
            if j2 < B:  # lazy update of the rest of the block  [out, B - j2]
                W1[:, j2:].addmm_(Err1[:, j1:j2], H_inv1[j1:j2, j2:], alpha=-1)
