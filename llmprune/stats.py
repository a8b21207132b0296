"""Input statistics of a linear map ``y = W x``, accumulated over calibration tokens.

One place computes them for every pruner: ``"norms"`` keeps ``Σ x_j²`` per input feature
(Wanda's ‖X_j‖₂²), ``"hessian"`` keeps ``H = Σ x xᵀ`` (SparseGPT's layer Hessian, up to the
factor 2/n, which damping relative to the mean diagonal makes irrelevant). Both are summed in
float32 whatever the activation dtype.
"""

from __future__ import annotations

from typing import Literal

import torch

StatsKind = Literal["none", "norms", "hessian"]


def _block_bounds(d: int, width: int = 192) -> list[int]:
    """Edges of the ~``width``-column blocks in which the Hessian's upper triangle is accumulated."""
    nb = max(1, round(d / width))
    return [d * b // nb for b in range(nb + 1)]


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
        self._H = H  # [in, in]  Σ_t x_t x_tᵀ (only the upper block triangle while _partial)
        self._partial = False
        self.sample = sample  # [s, in] a few rows of X, for error estimates
        self.cache: dict = {}  # derived data a pruner computes once for modules sharing these inputs

    def __repr__(self) -> str:
        return f"InputStats(kind={self.kind!r}, n={self.n})"

    def add(self, X: torch.Tensor, keep_sample: int = 0) -> None:
        """Accumulate a batch of inputs ``X`` of shape ``[..., in]``."""
        X = X.reshape(-1, X.shape[-1])  # [t, in]
        self.cache = {}
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
            d = X.shape[1]
            if self._H is None:
                self._H = torch.zeros(d, d, dtype=torch.float32, device=X.device)
            # H is symmetric: accumulate only its upper block triangle (blocks of ~192 columns:
            # 36/64 of the flops for 8 blocks; narrower blocks lose GEMM efficiency), and mirror it
            # once when H is read
            bounds = _block_bounds(d)
            for Xc in X.split(8192):  # float32 copies of bf16/fp16 inputs stay bounded
                Xc = Xc.float()  # [t_c, in]
                for i0, i1 in zip(bounds[:-1], bounds[1:]):
                    self._H[i0:i1, i0:].addmm_(Xc[:, i0:i1].T, Xc[:, i0:])  # H[b, b:] += X_bᵀ X_b:
            self._partial = len(bounds) > 2

    @property
    def H(self) -> torch.Tensor | None:
        """``Σ_t x_t x_tᵀ [in, in]``, symmetric."""
        if self._partial:
            bounds = _block_bounds(self._H.shape[0])
            for i0, i1 in zip(bounds[:-1], bounds[1:]):  # copy the upper blocks' transposes below
                self._H[i1:, i0:i1] = self._H[i0:i1, i1:].T
            self._partial = False
        return self._H

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._H, self._partial = value, False

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
