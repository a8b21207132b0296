"""Input statistics of a linear map ``y = W x``, accumulated over calibration tokens.

One place computes them for every pruner: ``"norms"`` keeps ``Σ x_j²`` per input feature
(Wanda's ‖X_j‖₂²), ``"hessian"`` keeps ``H = Σ x xᵀ`` (SparseGPT's layer Hessian, up to the
factor 2/n, which damping relative to the mean diagonal makes irrelevant). Both are summed in
float32 whatever the activation dtype.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

StatsKind = Literal["none", "norms", "hessian"]


try:  # symmetric rank-k update: half the work of X.T @ X on the CPU
    from scipy.linalg.blas import ssyrk as _ssyrk
except ImportError:  # pragma: no cover - scipy is optional
    _ssyrk = None


def _syrk_ok(X: torch.Tensor) -> bool:
    return _ssyrk is not None and X.device.type == "cpu" and X.dtype == torch.float32 and X.is_contiguous()


class InputStats:
    """Statistics of the inputs of one linear map; built by :meth:`add` or given directly."""

    def __init__(
        self,
        kind: StatsKind,
        n: int = 0,
        sq: torch.Tensor | None = None,
        H: torch.Tensor | None = None,
        sample: torch.Tensor | None = None,
    ):
        self.kind = kind
        self.n = n  # tokens seen
        self.sq = sq  # [in]  Σ_t x_tj²
        self._H = H  # [in, in]  Σ_t x_t x_tᵀ (only its lower triangle while _H_lower)
        self._H_lower = False
        self.sample = sample  # [s, in] a few rows of X, for error estimates

    def __repr__(self) -> str:
        return f"InputStats(kind={self.kind!r}, n={self.n})"

    @property
    def H(self) -> torch.Tensor | None:
        """The full symmetric ``Σ x xᵀ`` (completed from its lower triangle on first access)."""
        if self._H is not None and self._H_lower:
            self._H.add_(torch.tril(self._H, diagonal=-1).T)
            self._H_lower = False
        return self._H

    def add(self, X: torch.Tensor, keep_sample: int = 0) -> None:
        """Accumulate a batch of inputs ``X`` of shape ``[..., in]``."""
        X = X.reshape(-1, X.shape[-1])  # [t, in]
        if keep_sample and self.sample is None:
            step = max(1, X.shape[0] // keep_sample)
            self.sample = X[::step][:keep_sample].float().clone()  # [s, in]
        self.n += X.shape[0]
        if self.kind == "none":
            return
        if self.kind == "norms":
            if self.sq is None:
                self.sq = torch.zeros(X.shape[1], dtype=torch.float32, device=X.device)
            for Xc in X.split(4096):  # bounded temporaries: X can be the whole calibration batch
                self.sq.add_(Xc.float().pow(2).sum(0))  # [in]
        else:
            if self._H is None:
                self._H = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
                self._H_lower = True  # zeros: a valid lower triangle
            for Xc in X.split(8192):  # float32 copies of bf16/fp16 inputs stay bounded
                Xc = Xc.float().contiguous()  # [t_c, in]
                if _syrk_ok(Xc):
                    if not self._H_lower:  # completed earlier: continue on its lower triangle
                        self._H, self._H_lower = self._H.tril(), True
                    # Fortran views: Xc.T is [in, t] column-major and H.T shares H's memory; syrk
                    # fills the Fortran upper triangle of H.T, i.e. the lower triangle of H.
                    Hf = self._H.numpy().T
                    res = _ssyrk(1.0, Xc.numpy().T, beta=1.0, c=Hf, trans=0, lower=0, overwrite_c=1)
                    if res is not Hf and not np.shares_memory(res, Hf):  # scipy chose to copy
                        Hf[...] = res
                else:
                    self.H.addmm_(Xc.T, Xc)  # H += Xᵀ X  [in, in] (completed first if needed)

    @property
    def col_sq_norms(self) -> torch.Tensor:
        """``Σ_t x_tj²`` per input feature ``j``, from whichever statistic was kept."""
        if self.sq is not None:
            return self.sq
        if self.H is not None:
            return torch.diagonal(self.H)
        raise ValueError("these statistics hold no activation norms; accumulate with kind='norms' or 'hessian'")


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor | None) -> float:
    """‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F on sample inputs ``X [s, in]``; NaN when no sample was kept."""
    if X is None or X.numel() == 0:
        return float("nan")
    Y = X @ W.T  # [s, out]
    dY = X @ (W - W_hat).T  # [s, out]
    denom = Y.norm()
    return float(dY.norm() / denom) if denom > 0 else 0.0
