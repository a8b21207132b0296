"""SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot
(Frantar & Alistarh, 2023, arXiv:2301.00774).

OBS weight reconstruction with the layer Hessian ``H = Σ x xᵀ``: columns are visited left to
right; each pruned weight's error is spread over the not-yet-visited columns of its row through
the upper Cholesky factor of ``H⁻¹``. Lazy batch updates apply the accumulated error to the rest
of the matrix once per block of ``blocksize`` columns; the unstructured mask is chosen adaptively
per block from the saliency ``w² / [H⁻¹]_jj²``; N:M masks per group of M columns when the group
is reached.

Deviations from the reference code (IST-DASLab/sparsegpt):
- an unstructured block prunes exactly ``floor(sparsity · block size)`` weights (the reference's
  ``<= threshold`` prunes one more and all ties);
- if the damped Hessian is still not positive definite, damping is raised tenfold (up to three
  times) with a warning instead of failing.
"""

from __future__ import annotations

import contextlib
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


class SparseGPT(Pruner):
    name = "sparsegpt"
    stats_kind = "hessian"

    def __init__(self, blocksize: int = 128, damp: float = 0.01):
        self.blocksize = blocksize
        self.damp = damp

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

    def prune(
        self, W: torch.Tensor, stats: InputStats, sparsity: float, nm: tuple[int, int] | None = None
    ) -> PruneResult:
        if stats.H is None:
            raise ValueError("SparseGPT needs the layer Hessian; accumulate statistics with kind='hessian'")
        W = W.clone().float()  # [out, in]
        cols = W.shape[1]
        H_inv, dead = self.inverse_hessian_factor(stats.H.float().clone(), stats.n)  # [in, in] upper
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
                self._sweep(W1, Err1, H_inv1, d, mask1, nm)

            W[:, i1:i2] = W1.masked_fill_(mask1, 0.0)
            M_pruned[:, i1:i2] = mask1
            W[:, i2:].sub_(Err1 @ H_inv[i1:i2, i2:])  # lazy batch update of the remaining columns

        M = ~M_pruned
        M[:, dead] = False
        W.mul_(M)
        return PruneResult(W, M)

    @staticmethod
    def _sweep(W1, Err1, H_inv1, d, mask1, nm) -> None:
        """Column-by-column OBS inside one block; N:M masks chosen as each group is reached."""
        if nm is not None:
            n_keep, m = nm
            prune_n = m - n_keep
        for i in range(W1.shape[1]):
            w = W1[:, i]  # [out]
            if nm is not None and i % m == 0:
                S = W1[:, i : i + m].pow(2) / d[i : i + m].pow(2).unsqueeze(0)  # [out, m]
                idx = torch.topk(S, prune_n, dim=1, largest=False).indices  # [out, prune_n]
                mask1.scatter_(1, i + idx, True)
            err1 = w.mul(mask1[:, i]).div_(d[i])  # [out] (w - q) / d with q = w off the mask
            W1[:, i:].addr_(err1, H_inv1[i, i:], alpha=-1)  # OBS update; leaves q in column i
            Err1[:, i] = err1
