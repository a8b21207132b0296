"""Layer-wise least squares on a fixed support: the math shared by the ADMM reconstruction step
(:mod:`llmprune.steps.admm`) and ALPS (:mod:`llmprune.pruners.alps`).

For one linear map with dense weight ``W [out, in]`` and inputs ``X [tokens, in]``, the pruned
weight ``Ŵ`` with keep-mask ``M`` should minimise the output error

    ‖W Xᵀ − Ŵ Xᵀ‖²_F + λ ‖W − Ŵ‖²_F = Σ_i (w_i − ŵ_i)ᵀ (H + λI) (w_i − ŵ_i),   H = XᵀX,

row by row (``λ`` = ``damp`` × the mean diagonal of ``H``, SparseGPT's damping, which also makes
the problem well posed for inputs that never fire). With the support ``S`` of row ``i`` fixed the
optimum is closed form: ``ŵ_S = (H_SS + λI)⁻¹ ((H + λI) w)_S``, zero elsewhere.

Everything runs in the *normalised* frame of the ALPS reference code: with ``d = diag(H + λI)``,
``Hn = D^{-1/2} (H + λI) D^{-1/2}`` (unit diagonal) and ``Wn = W D^{1/2}``; the objective is the
same, masks are unchanged, and the unit diagonal makes plain conjugate gradients Jacobi-
preconditioned. ``Hn``, its eigendecomposition and the inverses ``(Hn + ρI)⁻¹`` are computed once
per input and cached on the :class:`~llmprune.stats.InputStats` the engine shares between modules
fed the same tensor (q/k/v, gate/up).

Products with ``(Hn + ρI)⁻¹`` (:meth:`NormalizedHessian.shifted_solver`) come from the eigendecomposition
up to ``EIGH_MAX_INPUTS`` inputs (2,048: every module of the embedded model, unchanged) and from a
Cholesky factor of ``Hn + ρI`` beyond. At the widths people prune the eigendecomposition is the
bottleneck: a float64 ``eigh`` grows like ``9 n³`` at LAPACK's pace (4,096 inputs: 8.6 s on this 2-core
CPU; 14,336, a Llama-3-8B ``down_proj``: many minutes) and each new ρ then costs a ``2 n³`` product to
form the inverse; a float64 Cholesky factorisation costs ``n³/3`` per ρ (2.3 s at 4,096 under load,
where forming the inverse took 8.5 s) and its two triangular solves per product cost 1.4x the product
with a formed inverse. Both give the same products up to float32 rounding (3.7e-7 relative at 4,096).
Cached inverses or factors are bounded by ``CACHE_BYTES`` per input (not by count: seven 28,672-wide
inverses, a 70B ``down_proj``'s, would hold 23 GB).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .runtime.blas import scipy_blas_single_thread
from .stats import InputStats

log = logging.getLogger(__name__)

_MAX_INVERSES = 7  # cached (Hn + ρI)⁻¹ per input: the 7 values of the ADMM step's ρ schedule ...
CACHE_BYTES = 1 << 30  # ... within 1 GiB per input (an in x in float32 matrix larger than that is never kept)
EIGH_MAX_INPUTS = 2048  # (Hn + ρI)⁻¹ from one eigendecomposition up to this many inputs, Cholesky factors beyond


def _eigh64(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric ``A [in, in]`` in float64 (as the ALPS reference), returned in
    ``A``'s dtype. On the CPU through SciPy's divide-and-conquer ``syevd`` on one OpenBLAS thread:
    measured on the embedded model's Hessians under load, 0.09 s for 576 x 576 and 0.6 s for
    1536 x 1536, where ``torch.linalg.eigh`` varied between 0.1-1.8 s and 0.9-2.8 s (float32) and
    took up to 8 s in float64."""
    if A.device.type == "cpu":
        try:
            import scipy.linalg
        except ImportError:  # pragma: no cover - scipy comes with lm-eval's dependencies
            scipy = None
        if scipy is not None:
            with scipy_blas_single_thread()():
                L, Q = scipy.linalg.eigh(A.double().numpy(), driver="evd", check_finite=False)
            return torch.from_numpy(L).to(A.dtype), torch.from_numpy(Q).to(A.dtype)
    L, Q = torch.linalg.eigh(A.double())
    return L.to(A.dtype), Q.to(A.dtype)


def _eig_inverse(eig: tuple[torch.Tensor, torch.Tensor], rho: float) -> torch.Tensor:
    """``Q diag(1 / (L + ρ)) Qᵀ [in, in]`` from ``eig = (L [in], Q [in, in])``."""
    L, Q = eig
    return (Q / (L + rho)) @ Q.T


def _shifted_cholesky(Hn: torch.Tensor, rho: float) -> torch.Tensor:
    """Lower Cholesky factor ``[in, in]`` of ``Hn + ρI``, factorised in float64, returned in ``Hn``'s dtype."""
    A = Hn.double()  # [in, in]
    A.diagonal().add_(rho)
    return torch.linalg.cholesky(A, out=A).to(Hn.dtype)  # in place: one float64 copy at a time


@dataclass
class NormalizedHessian:
    """``Hn [in, in]`` (unit diagonal) and the scale ``s = sqrt(diag(H/n + λI)) [in]``: ``Wn = W · s``."""

    Hn: torch.Tensor  # [in, in]
    s: torch.Tensor  # [in]
    lam_n: torch.Tensor  # [in] λ / d_j: the damping's share of each normalised diagonal entry
    eig: tuple[torch.Tensor, torch.Tensor] | None = None  # (L [in], Q [in, in]) of Hn, on demand
    inverses: dict | None = None  # (kind, ρ) -> (Hn + ρI)⁻¹ or its Cholesky factor [in, in], bounded

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L [in], Q [in, in])`` with ``Hn = Q diag(L) Qᵀ``, computed once."""
        if self.eig is None:
            L, Q = _eigh64(self.Hn)  # [in], [in, in]
            self.eig = (L.clamp_min(0), Q)
        return self.eig

    def inverse(self, rho: float, cache: bool = True) -> torch.Tensor:
        """``(Hn + ρI)⁻¹ [in, in]`` from the one eigendecomposition: ``Q diag(1 / (L + ρ)) Qᵀ``; kept for
        the next module on the same input when ``cache`` (a fixed ρ schedule: ADMM), not otherwise (ALPS's
        adaptive ρ rarely repeats)."""
        return self._cached(("inverse", rho), cache, lambda: _eig_inverse(self.eigh(), rho))

    def shifted_solver(self, rho: float, cache: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """``R ↦ R (Hn + ρI)⁻¹`` for ``R [out, in]``: a product with :meth:`inverse` up to
        :data:`EIGH_MAX_INPUTS` inputs, else two triangular solves with the Cholesky factor of ``Hn + ρI``
        (factorised in float64, solved in float32; see the module's docstring for the costs)."""
        if self.Hn.shape[0] <= EIGH_MAX_INPUTS:
            inv = self.inverse(rho, cache)  # [in, in]
            return lambda R: R @ inv
        L = self._cached(("cholesky", rho), cache, lambda: _shifted_cholesky(self.Hn, rho))  # [in, in] lower
        return lambda R: torch.cholesky_solve(R.T, L).T  # [out, in]  ((Hn + ρI)⁻¹ Rᵀ)ᵀ

    def _cached(self, key: tuple, cache: bool, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, kept per ``key`` when ``cache``: at most :data:`_MAX_INVERSES` matrices within
        :data:`CACHE_BYTES` (the oldest dropped first; one larger than the bound is never kept)."""
        if self.inverses is None:
            self.inverses = {}
        hit = self.inverses.get(key)
        if hit is not None:
            return hit
        made = make()
        size = made.numel() * made.element_size()
        if not cache or size > CACHE_BYTES:
            return made
        while self.inverses and (len(self.inverses) >= _MAX_INVERSES or
                                 size + sum(t.numel() * t.element_size() for t in self.inverses.values()) > CACHE_BYTES):
            self.inverses.pop(next(iter(self.inverses)))
        self.inverses[key] = made
        return made

    def error(self, Wn: torch.Tensor, Xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, e)``: ``E = (Xn − Wn) Hn  [out, in]`` and ``e [out]`` the damped error of each row,
        ``(x − w)ᵀ Hn (x − w)``."""
        D = Xn - Wn  # [out, in]
        E = D @ self.Hn  # [out, in]
        return E, (D * E).sum(1)

    def undamped(self, Wn: torch.Tensor, Xn: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The error without the damping term, from the damped one: ``e − Σ_j λ/d_j (x − w)_j²``  [out]."""
        return (e - ((Xn - Wn).pow(2) * self.lam_n).sum(1)).clamp_min(0)


def normalized_hessian(stats: InputStats, damp: float) -> NormalizedHessian:
    """The normalised damped Hessian of ``stats`` (cached on it for the modules sharing the input)."""
    key = ("lsq", float(damp), stats.n)
    hit = stats.cache.get(key)
    if hit is not None:
        return hit
    if stats.H is None:
        raise ValueError("least-squares reconstruction needs the layer Hessian; accumulate statistics with "
                         "needs={'hessian'}")
    H = stats.H.float() / max(stats.n, 1)  # [in, in] per-token Hessian
    diag = torch.diagonal(H).clone()  # [in]
    dead = diag == 0  # inputs never active: their kept weights keep the dense value
    lam = float(damp) * float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    d = diag + lam  # [in]
    d[dead] = 1.0 + lam if lam > 0 else 1.0
    s = d.sqrt()  # [in]
    Hn = H / s.unsqueeze(1) / s.unsqueeze(0)  # [in, in]
    Hn.diagonal().copy_(torch.ones_like(d))  # exactly 1: (H_jj + λ) / d_j, and the dead inputs
    lam_n = torch.full_like(d, lam) / d  # [in]
    lam_n[dead] = 1.0  # a dead input's whole diagonal is "damping": no effect on the outputs
    out = NormalizedHessian(Hn, s, lam_n)
    stats.cache[key] = out
    return out


@dataclass
class SolveTrace:
    """What a solve on the support did: iterations and the relative errors along the way."""

    iterations: int = 0
    errors: list[float] | None = None  # relative damped error after each iteration


def pcg_on_support(nh: NormalizedHessian, Wn: torch.Tensor, M: torch.Tensor, X0: torch.Tensor,
                   iters: int, tol: float, ref: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, SolveTrace]:
    """Conjugate gradients on the support, every row at once (ALPS's back-solve: PCG with the Jacobi
    preconditioner, which the normalisation makes the identity).

    Minimises ``Σ_i (x_i − w_i)ᵀ Hn (x_i − w_i)`` over ``x`` with ``x = 0`` off ``M [out, in]``,
    starting from ``X0`` (zero off ``M``). Per row, the residual is the negative gradient on the
    support, ``r = M ⊙ ((w − x) Hn)``; each iteration costs one product ``P Hn`` of the search
    directions. The objective of a row falls by exactly ``α rᵀr`` per iteration, so the errors are
    tracked for free: the solve stops after ``iters`` iterations or once an iteration lowers the
    total error by less than ``tol`` times the error itself. Returns ``(X [out, in], e [out], trace)``
    with ``e`` each row's damped error ``(x − w)ᵀ Hn (x − w)``; ``ref`` (``‖W‖²`` in the same norm) scales
    the relative errors of the trace.
    """
    Mf = M.to(Wn.dtype)  # [out, in]
    X = X0.clone()  # [out, in]
    E, e = nh.error(Wn, X)  # [out, in], [out]
    R = E.neg_().mul_(Mf)  # [out, in] residual on the support
    scale = 1.0 / ref if ref else 1.0
    rz = R.pow(2).sum(1)  # [out]
    P = R.clone()  # [out, in]
    trace = SolveTrace(0, [float(e.sum()) * scale])
    tiny = torch.finfo(rz.dtype).tiny
    for k in range(iters):
        AP = P @ nh.Hn  # [out, in]
        pap = (P * AP).sum(1)  # [out]
        alpha = torch.where(pap > 0, rz / pap.clamp_min(tiny), torch.zeros_like(rz))  # [out]
        X.addcmul_(alpha.unsqueeze(1), P)
        R.addcmul_(alpha.unsqueeze(1), AP.mul_(Mf), value=-1)
        drop = alpha * rz  # [out] each row's exact decrease in this iteration
        e = (e - drop).clamp_min_(0)
        total = float(e.sum())
        rz_new = R.pow(2).sum(1)  # [out]
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))  # [out]
        P.mul_(beta.unsqueeze(1)).add_(R)
        rz = rz_new
        trace.iterations = k + 1
        trace.errors.append(total * scale)
        if float(drop.sum()) <= tol * total or total == 0:
            break
    return X.mul_(Mf), e, trace


def reference_error(nh: NormalizedHessian, Wn: torch.Tensor) -> float:
    """``‖W Xᵀ‖²_F / n`` (undamped), the denominator of :func:`relative_layer_error`."""
    zero = torch.zeros_like(Wn)
    _, e = nh.error(zero, Wn)
    return float(nh.undamped(zero, Wn, e).sum())


def relative_layer_error(nh: NormalizedHessian, Wn: torch.Tensor, Xn: torch.Tensor, ref: float | None = None) -> float:
    """``‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F`` from the Hessian (every calibration token, no damping)."""
    _, e = nh.error(Wn, Xn)
    num = float(nh.undamped(Wn, Xn, e).sum())
    den = reference_error(nh, Wn) if ref is None else ref
    return (num / den) ** 0.5 if den > 0 else 0.0
