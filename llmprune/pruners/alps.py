"""ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language Models
(Meng, Behdin, Wang, Mazumder, NeurIPS 2024, arXiv:2406.07831; reference code
https://github.com/mazumder-lab/ALPS, ``ALPS_admm`` and ``cg_batch``).

Mask and weights together: ``min_{Ŵ} Σ_i (w_i − ŵ_i)ᵀ (H + λI) (w_i − ŵ_i)`` subject to a sparsity
constraint (``k`` kept weights in the matrix, or N of every M consecutive inputs), solved by ADMM
over a copy ``D`` that carries the constraint, in the normalised frame of
:mod:`llmprune.reconstruction` (``Hn`` unit diagonal, ``Wn = W · s``):

    B_{t+1} = (Wn Hn − V_t + ρ_t D_t) (Hn + ρ_t I)⁻¹         [out, in]  (one eigendecomposition of Hn)
    D_{t+1} = P_k(B_{t+1} + V_t / ρ_t)                       [out, in]  (keep the k largest |·|, or N of M)
    V_{t+1} = V_t + ρ_t (B_{t+1} − D_{t+1})                  [out, in]

with ``D_0`` the magnitude projection of ``Wn`` and ``V_0 = 0``. The penalty follows the paper's
schedule: every 3 iterations, with ``s_t`` the number of weights whose membership of the support
changed since the last check, ``ρ ← 1.3ρ`` if ``s_t > 0.1k``, ``1.2ρ`` if ``s_t > 0.005k``,
``1.1ρ`` if any changed (``ρ/5`` and a restart while ρ has never been raised: it started too large),
and stop once no weight changes (or, at a check after the 30th iteration index, i.e. from iteration 33
on, fewer than ``0.0003k``: the reference's ``i_admm >= switch_iter`` on its 0-based ``i_admm``); ρ ≤ 10⁶.
(Until 2026-12-07 that stop came one check early, at iteration 30; it only differs where a module's
support still changes at iteration 30, by fewer than 0.0003k weights. On the benchmark protocol, ALPS
2:4: 64.00 before and 64.25 after, within 2:4's ±1.5 of rounding noise; the mean layer error 0.3 % lower;
eval/results/protocols.md.)
``(Hn + ρI)⁻¹ = Q diag(1/(L + ρ)) Qᵀ`` comes from one eigendecomposition of ``Hn``, computed once
per input and shared by the modules fed the same tensor (q/k/v, gate/up); beyond 2,048 inputs from a
Cholesky factor of ``Hn + ρI`` per ρ instead (no eigendecomposition, which dominates at 8B widths; see
:mod:`llmprune.reconstruction`). The support of the last
``B`` is then fixed and conjugate gradients on it (the reference's ``cg_batch``; here
:func:`~llmprune.reconstruction.pcg_on_support`) solve the least squares for the kept weights.

Memory per module: ``Hn``, ``Q`` and one inverse (``in × in``), ``Wn Hn``, ``B``, ``D``, ``V`` and a
temporary (``out × in``), float32.

Deviations from the reference code:
- the eigendecomposition (float64, as the reference's) is computed once per input and shared by
  the modules fed the same tensor, instead of once per module; the iterations run in float32;
- the back-solve stops when an iteration lowers the layer error by less than ``1e-4`` of itself
  (the reference: residual norm below ``1e-4`` of the right-hand side's, per column), at most
  ``alps_pcg_iters`` (10, the reference's) iterations;
- the unstructured constraint is ``floor(sparsity · out · in)`` pruned weights over the matrix
  (the reference rounds the kept count), ties broken exactly.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from ..masks import apply_mask_, invert, lowest_mask, nm_mask
from ..reconstruction import normalized_hessian, pcg_on_support, reference_error, relative_layer_error
from ..registry import register_pruner
from ..settings import Settings
from ..stats import InputStats
from .base import Pruner, PruneResult
from .sparsegpt import SparseGPTOptions

log = logging.getLogger(__name__)

UPDATE_EVERY = 3  # iterations between support checks and ρ updates (the reference's update_iter)
SWITCH_ITER = 30  # from the first check after iteration index 30 (iteration 33) a nearly fixed support
#                   (< 0.0003 k changes) ends the ADMM, as the reference's `i_admm >= switch_iter`
RHO_MAX = 1e6
PCG_TOL = 1e-4


class ALPSOptions(Settings):
    """ALPS's options, fields of :class:`llmprune.PruneConfig` (``damp`` is SparseGPT's)."""

    damp: float = SparseGPTOptions.model_fields["damp"]
    alps_rho: float = Field(
        0.1, gt=0, description="ALPS: initial ADMM penalty ρ on the normalised Hessian (unit diagonal); the paper's "
        "schedule raises it by 1.3/1.2/1.1 every 3 iterations while the support still changes.",
    )
    alps_iters: int = Field(
        300, ge=0, description="ALPS: at most this many ADMM iterations (the reference's max_iter); they stop earlier "
        "once the support no longer changes.",
    )
    alps_pcg_iters: int = Field(
        10, ge=0, description="ALPS: at most this many conjugate-gradient iterations on the final support (the "
        "reference's 10).",
    )


@register_pruner
class ALPS(Pruner):
    name = "alps"
    needs = frozenset({"hessian"})
    options = tuple(ALPSOptions.model_fields)

    def __init__(self, damp: float = 0.01, alps_rho: float = 0.1, alps_iters: int = 300, alps_pcg_iters: int = 10):
        for name, v in (("alps_iters", alps_iters), ("alps_pcg_iters", alps_pcg_iters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (an iteration cap), got {v!r}")
        if not alps_rho > 0:
            raise ValueError(f"alps_rho must be > 0 (the initial ADMM penalty; the paper's 0.1), got {alps_rho!r}")
        if not 0 <= damp < 1:
            raise ValueError(f"damp must be in [0, 1) (a fraction of the mean Hessian diagonal), got {damp!r}")
        self.damp = float(damp)
        self.rho0 = float(alps_rho)
        self.iters = alps_iters
        self.pcg_iters = alps_pcg_iters
        self.last: dict = {}  # what the last prune did (iterations, final ρ, errors), for logs and tests

    @staticmethod
    def _project(B: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
        """Keep-mask ``[out, in]`` of the constraint set: the largest ``|B|`` of the matrix, or N of every M."""
        if nm is not None:
            return nm_mask(B.abs(), *nm)
        return invert(lowest_mask(B.abs(), int(B.numel() * sparsity), "matrix"))

    def prune(self, W: torch.Tensor, stats: InputStats, sparsity: float,
              nm: tuple[int, int] | None = None) -> PruneResult:
        if stats.H is None:
            raise ValueError("ALPS needs the layer Hessian; accumulate statistics with needs={'hessian'}")
        out, cols = W.shape
        if nm is not None and cols % nm[1]:
            raise ValueError(f"an {nm[0]}:{nm[1]} pattern needs the input dimension to be a multiple of {nm[1]}, "
                             f"got {cols}; exclude this module with --ignore or use an unstructured pattern")
        nh = normalized_hessian(stats, self.damp)
        Wn = W.float() * nh.s  # [out, in]
        C = Wn @ nh.Hn  # [out, in]  Wn Hn (the reference's YtX)
        M0 = self._project(Wn, sparsity, nm)  # [out, in] magnitude start
        k = max(int(M0.sum()), 1)  # kept weights
        D0 = Wn * M0  # [out, in]
        B, D, V = Wn.clone(), D0.clone(), torch.zeros_like(Wn)  # [out, in] each
        M_prev = M0
        rho, raised, t = self.rho0, False, 0
        solve = nh.shifted_solver(rho, cache=False) if self.iters else None  # R ↦ R (Hn + ρI)⁻¹
        for t in range(self.iters):
            B = solve(torch.addcmul(C - V, D, torch.tensor(rho)))  # [out, in]
            M = self._project(B + V / rho, sparsity, nm)  # [out, in]
            D = (V / rho).add_(B).mul_(M)  # [out, in]
            V.add_(B - D, alpha=rho)
            if (t + 1) % UPDATE_EVERY:
                continue
            change = int((M != M_prev).sum())  # weights that entered or left the support since the last check
            M_prev = M
            if change > 0.1 * k:
                rho, raised = rho * 1.3, True
            elif change > 0.005 * k:
                rho, raised = rho * 1.2, True
            elif change > 0:
                if raised:
                    rho *= 1.1
                else:  # the support settled before ρ ever rose: ρ started too large, start again lower
                    rho /= 5
                    B, D, V = Wn.clone(), D0.clone(), torch.zeros_like(Wn)
            elif raised:
                break
            else:
                rho /= 5
            rho = min(rho, RHO_MAX)
            solve = nh.shifted_solver(rho, cache=False)
            if t >= SWITCH_ITER and change < 0.0003 * k:  # the reference's i_admm >= switch_iter
                break
        M = self._project(B, sparsity, nm)  # [out, in] the support of the last B
        X = B * M  # [out, in]
        ref = reference_error(nh, Wn)
        before = relative_layer_error(nh, Wn, X, ref)
        X, _, trace = pcg_on_support(nh, Wn, M, X, self.pcg_iters, PCG_TOL, ref)
        W_hat = apply_mask_((X / nh.s).contiguous(), M)  # [out, in] exact +0.0 off the mask
        self.last = {"iterations": t + 1 if self.iters else 0, "rho": rho, "error_admm": before,
                     "pcg_iterations": trace.iterations}
        log.debug("ALPS: %d ADMM iterations (final rho %.3g), relative error after ADMM %.4f, %d PCG iterations",
                  self.last["iterations"], rho, before, trace.iterations)
        return PruneResult(W_hat, M)
