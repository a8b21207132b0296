"""ADMM reconstruction of the kept weights with the mask fixed: Boža, "Fast and Optimal Weight Update
for Pruned Large Language Models" (2024, arXiv:2401.02938; reference code
https://github.com/fmfi-compbio/admm-pruning), finished by conjugate gradients on the support as in
ALPS (Meng et al. 2024, arXiv:2406.07831).

After any pruner (and any refinement) the mask ``M`` is fixed and only the kept weights change:
per output row, ``min_ŵ (w − ŵ)ᵀ (H + λI) (w − ŵ)`` with ``ŵ = 0`` off ``M`` (the layer-wise
least squares, whose optimum on the support is ``ŵ_S = (H_SS + λI)⁻¹ ((H + λI) w)_S``; see
:mod:`llmprune.reconstruction`). SparseGPT's OBS sweep only approximates it (each column's error is
spread over the columns to its right only), Wanda and magnitude do not update at all.

Damping: ``λ = admm_damp × mean diag(H)``, the reconstruction's own setting (the pruner's ``--damp``
no longer reaches it), 0.01 by default where Boža's reference uses 0.1. The damping term
``λ‖w − ŵ‖²`` pulls the kept weights towards their dense values, a ridge that trades calibration
error for held-out error. Measured (eval/results/protocols.md): on 12 modules of the embedded model
with 2:4 masks, 0.1 lowers the error on held-out tokens by 1.1 % after SparseGPT (0.2217 → 0.2192)
and 1.4 % after Wanda (0.2257 → 0.2225), but over the whole model, on the benchmark protocol,
SparseGPT 2:4 + admm (seed 0) scored 68.43 WikiText-2 perplexity at 0.1 against 65.81 at 0.01, a gap
beyond that pattern's ±1.5 of rounding noise: 0.01 stays the default.

ADMM (scaled form) splits ``ŵ`` into an unconstrained copy ``V`` and the masked ``Z``, in the
normalised frame (``Hn`` unit diagonal, ``Wn = W · s``):

    V_{k+1} = (Wn Hn + ρ_k (Z_k − U_k)) (Hn + ρ_k I)⁻¹      [out, in]
    Z_{k+1} = M ⊙ (V_{k+1} + U_k)                           [out, in]
    U_{k+1} = U_k + V_{k+1} − Z_{k+1}                        [out, in]

with ``Z_0`` the pruner's result and ``U_0 = 0``. ``(Hn + ρI)⁻¹`` comes from one eigendecomposition
of ``Hn`` per input (shared by q/k/v and gate/up), so the penalty can grow along the iterations
without a new factorisation: ``ρ_k = admm_rho · 1.3^⌊min(k, 18)/3⌋`` (the fastest rate of ALPS's
schedule, every third iteration, over Boža's ~20 iterations: a growing ρ drives ``V`` onto the support;
held fixed after, so that longer runs converge to the optimum, which an ever-growing ρ would freeze
short of). The ADMM phase stops after
``admm_iters`` iterations or once the primal residual ``‖V − Z‖_F / ‖Z‖_F`` is below ``admm_tol``.
Then conjugate gradients on the support (:func:`~llmprune.reconstruction.pcg_on_support`) take
``Z`` to the optimum: at most ``admm_pcg_iters`` iterations, stopping when an iteration lowers the
layer error by less than ``admm_tol`` of itself.

Guarantees: the mask is the pruner's, bit for bit (exact ``+0.0`` off it, so N:M groups stay
N:M); each output row keeps the solve's weights only if they lower its output error ``‖(w − ŵ) Xᵀ‖``
(the solve minimises the damped error, which can trade a little output error for the damping term
on rows fed by few tokens), else the pruner's weights: the layer error never increases. The report gets each module's relative output error
``‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F`` before and after, computed from ``H`` over every calibration token.

Deviations from the reference code: the reference (a) also selects the mask (gradual pruning inside
the iterations) — here the mask is the pruner's, which is what makes this a step after *any* pruner;
(b) uses a fixed penalty and a fixed number of iterations; here ρ grows geometrically and a
conjugate-gradient back-solve (ALPS) finishes the solve, with stopping rules on the relative error;
(c) solves in the original frame; here in the normalised one (the same optimum); (d) damps after
normalising ``XᵀX`` to a unit diagonal, ``+ 0.1 · mean diag`` there, i.e. ``λ_j = 0.1 · H_jj`` per input
(relative); here ``λ = 0.1 · mean diag(H)`` for every input (uniform), the form SparseGPT's and ALPS's
damping take; and 0.01 by default (above). The two forms were compared on held-out tokens with an ad-hoc script (12 modules of
layers 5/15/25, dense inputs, C4 calibration, WikiText-2 valid as held-out, 2:4 masks): relative output
error 0.2192 (uniform 0.1) against 0.2197 (relative 0.1) after SparseGPT, 0.2225 against 0.2231 after
Wanda, and 0.2217 / 0.2257 at uniform 0.01: the value matters, the form does not.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from pydantic import Field

from ..masks import apply_mask_
from ..pruners.base import PruneResult
from ..reconstruction import normalized_hessian, pcg_on_support, reference_error
from ..registry import register_reconstructor
from ..settings import Settings
from ..stats import InputStats
from .base import Reconstruction, Reconstructor

log = logging.getLogger(__name__)

RHO_GROWTH = 1.3  # ρ ← 1.3 ρ ...
RHO_EVERY = 3  # ... every third ADMM iteration
RHO_UNTIL = 18  # ... up to this iteration (ρ grows 1.3^6 ≈ 4.8x), fixed after it
ADMM_DAMP = 0.01  # λ / mean diag(H); Boža's 0.1 measured worse (eval/results/protocols.md)


class ADMMOptions(Settings):
    """ADMM reconstruction's options, fields of :class:`llmprune.PruneConfig`."""

    admm_damp: float = Field(
        ADMM_DAMP, ge=0, lt=1, description="ADMM reconstruction: damping λ of the least squares on the mask, as a "
        "fraction of the mean Hessian diagonal, the reconstruction's own (SparseGPT's --damp is the pruner's). "
        "Boža's 0.1 measured worse than 0.01: SparseGPT 2:4 + admm 68.43 against 65.81 (eval/results/protocols.md).",
    )
    admm_iters: int = Field(
        0, ge=0, description="ADMM reconstruction: at most this many ADMM iterations (Boža 2024, ρ growing 1.3x "
        "every 3) before the conjugate gradients; 0: conjugate gradients only, which reach the same layer error "
        "several times faster (eval/results/reconstruct.md).",
    )
    admm_rho: float = Field(
        1.0, gt=0, description="ADMM reconstruction: initial penalty ρ on the normalised Hessian (unit diagonal).",
    )
    admm_pcg_iters: int = Field(
        30, ge=0, description="ADMM reconstruction: at most this many conjugate-gradient iterations on the support.",
    )
    admm_tol: float = Field(
        1e-3, ge=0, description="ADMM reconstruction: stop when an iteration lowers the layer's reconstruction error "
        "by less than this fraction of it (ADMM: when ‖V − Z‖/‖Z‖ is below it).",
    )


@register_reconstructor
class ADMM(Reconstructor):
    name = "admm"
    needs = frozenset({"hessian"})
    options = tuple(ADMMOptions.model_fields)

    def __init__(self, admm_damp: float = ADMM_DAMP, admm_iters: int = 0, admm_rho: float = 1.0,
                 admm_pcg_iters: int = 30, admm_tol: float = 1e-3):
        for name, v in (("admm_iters", admm_iters), ("admm_pcg_iters", admm_pcg_iters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (an iteration cap), got {v!r}")
        if admm_iters == 0 and admm_pcg_iters == 0:
            raise ValueError("admm_iters and admm_pcg_iters are both 0: nothing would be solved; give one of them "
                             "a positive cap, or drop --reconstruct")
        if not admm_rho > 0:
            raise ValueError(f"admm_rho must be > 0 (the initial ADMM penalty, relative to the unit diagonal of the "
                             f"normalised Hessian), got {admm_rho!r}")
        if not admm_tol >= 0:
            raise ValueError(f"admm_tol must be >= 0 (a relative error change), got {admm_tol!r}")
        if not 0 <= admm_damp < 1:
            raise ValueError(f"admm_damp must be in [0, 1) (a fraction of the mean Hessian diagonal; Boža's 0.1), "
                             f"got {admm_damp!r}")
        self.damp = float(admm_damp)
        self.iters = admm_iters
        self.rho = float(admm_rho)
        self.pcg_iters = admm_pcg_iters
        self.tol = float(admm_tol)

    def reconstruct(self, W: torch.Tensor, result: PruneResult, stats: InputStats,
                    nm: tuple[int, int] | None = None) -> tuple[PruneResult, Reconstruction]:
        nh = normalized_hessian(stats, self.damp)
        M = result.M  # [out, in] bool, fixed
        Mf = M.to(torch.float32)  # [out, in]
        Wn = W.float() * nh.s  # [out, in] dense, normalised
        Z0 = result.W.float() * nh.s  # [out, in] the pruner's result, normalised
        ref = reference_error(nh, Wn)
        _, e0 = nh.error(Wn, Z0)  # [out] damped error of each row  (one product; PCG starts from it again)
        Z, k = Z0, 0
        if self.iters:
            C = Wn @ nh.Hn  # [out, in]  Wn Hn
            U = torch.zeros_like(Z0)  # [out, in] scaled dual
            Z = Z0.clone()
            for k in range(self.iters):
                rho = self.rho * RHO_GROWTH ** (min(k, RHO_UNTIL) // RHO_EVERY)
                V = nh.shifted_solver(rho)(torch.addcmul(C, Z - U, torch.tensor(rho)))  # [out, in]
                Z = (V + U).mul_(Mf)  # [out, in]
                U.add_(V).sub_(Z)
                primal = float((V - Z).norm() / Z.norm().clamp_min(1e-30))
                if primal < self.tol:
                    break
            k += 1
        e1, trace = e0, None
        if self.pcg_iters:
            Z, e1, trace = pcg_on_support(nh, Wn, M, Z, self.pcg_iters, self.tol, ref)
        elif self.iters:
            _, e1 = nh.error(Wn, Z)  # [out]
        u0, u1 = nh.undamped(Wn, Z0, e0), nh.undamped(Wn, Z, e1)  # [out] output errors without the damping
        # rows whose output error the solve did not lower stay as the pruner left them: the damped optimum
        # can trade output error for the damping term (rows fed by few tokens), and float noise on rows
        # already optimal
        keep = u1 < u0
        Z = torch.where(keep.unsqueeze(1), Z, Z0)
        u1 = torch.where(keep, u1, u0)
        W_hat = apply_mask_((Z / nh.s).contiguous(), M.contiguous())  # [out, in] exact +0.0 off the mask
        before = (float(u0.sum()) / ref) ** 0.5 if ref > 0 else 0.0
        after = (float(u1.sum()) / ref) ** 0.5 if ref > 0 else 0.0
        iters = k + (trace.iterations if trace is not None else 0)
        log.debug("ADMM: relative error %.4f -> %.4f in %d iterations", before, after, iters)
        return dataclasses.replace(result, W=W_hat), Reconstruction(before, after, iters)
