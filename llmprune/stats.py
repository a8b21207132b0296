"""Input statistics of a linear map ``y = W x``, accumulated over calibration tokens.

Statistics are declared by what needs them: a pruner, a refinement step or an allocator names
the ones it reads (``needs``), and the engine gathers the union once per shared input (q/k/v,
gate/up). The statistics:

- ``"sq"``: ``Σ_t x_tj²`` per input feature (Wanda's ‖X_j‖₂²);
- ``"sum"``: ``Σ_t x_tj`` per input feature (with ``"sq"``, the per-input mean and variance);
- ``"hessian"``: ``H = Σ_t x_t x_tᵀ`` (SparseGPT's layer Hessian, up to the factor 2/n, which
  damping relative to the mean diagonal makes irrelevant). ``Σ x²`` is its diagonal, so a
  Hessian makes a separate ``"sq"`` redundant and it is not accumulated twice.

All are summed in float32 whatever the activation dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

Stat = Literal["sq", "sum", "hessian"]
STATS: tuple[str, ...] = ("sq", "sum", "hessian")
# the kinds of earlier versions: one statistic per pruner
_KINDS: dict[str, frozenset[str]] = {
    "none": frozenset(), "norms": frozenset({"sq"}), "hessian": frozenset({"hessian"}),
}


def as_needs(needs: str | Iterable[str] | None) -> frozenset[str]:
    """A set of statistic names from a set, a single name or an old kind (``"norms"``, ``"none"``)."""
    if needs is None:
        return frozenset()
    if isinstance(needs, str):
        if needs in _KINDS:
            return _KINDS[needs]
        needs = (needs,)
    out = frozenset(needs)
    unknown = out - set(STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from: {', '.join(STATS)}")
    return out


def _block_bounds(d: int, width: int = 192) -> list[int]:
    """Edges of the ~``width``-column blocks in which the Hessian's upper triangle is accumulated."""
    nb = max(1, round(d / width))
    return [d * b // nb for b in range(nb + 1)]


class InputStats:
    """Statistics of the inputs of one linear map; built by :meth:`add` or given directly.

    ``needs`` names the statistics to accumulate (see the module docstring); an old kind
    (``"norms"``, ``"hessian"``, ``"none"``) is accepted too.
    """

    def __init__(
        self,
        needs: str | Iterable[str] | None = None,
        n: int = 0,
        sq: torch.Tensor | None = None,
        H: torch.Tensor | None = None,
        sample: torch.Tensor | None = None,
        sum: torch.Tensor | None = None,  # noqa: A002 - the statistic's name
    ):
        self.needs = as_needs(needs)
        self.n = n  # tokens seen
        self.sq = sq  # [in]  Σ_t x_tj²
        self.sum = sum  # [in]  Σ_t x_tj
        self._H = H  # [in, in]  Σ_t x_t x_tᵀ (only the upper block triangle while _partial)
        self._partial = False
        self.sample = sample  # [s, in] a few rows of X, for error estimates
        self.cache: dict = {}  # derived data a pruner computes once for modules sharing these inputs

    @property
    def kind(self) -> str:
        """The earlier single-kind name, for messages."""
        return "+".join(s for s in STATS if s in self.needs) or "none"

    def __repr__(self) -> str:
        return f"InputStats(needs={self.kind!r}, n={self.n})"

    def add(self, X: torch.Tensor, keep_sample: int = 0) -> None:
        """Accumulate a batch of inputs ``X`` of shape ``[..., in]``."""
        X = X.reshape(-1, X.shape[-1])  # [t, in]
        self.cache = {}
        if keep_sample and self.sample is None:
            step = max(1, X.shape[0] // keep_sample)
            self.sample = X[::step][:keep_sample].float().clone()  # [s, in]
        self.n += X.shape[0]
        d = X.shape[1]
        if "sq" in self.needs and "hessian" not in self.needs:
            if self.sq is None:
                self.sq = torch.zeros(d, dtype=torch.float32, device=X.device)
            for Xc in X.split(4096):  # bounded temporaries: X can be the whole calibration batch
                self.sq.add_(Xc.float().pow(2).sum(0))  # [in]
        if "sum" in self.needs:
            if self.sum is None:
                self.sum = torch.zeros(d, dtype=torch.float32, device=X.device)
            for Xc in X.split(4096):
                self.sum.add_(Xc.float().sum(0))  # [in]
        if "hessian" in self.needs:
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
        if self._H is not None:
            return torch.diagonal(self.H)
        raise ValueError("these statistics hold no activation norms; accumulate 'sq' or 'hessian'")

    @property
    def mean(self) -> torch.Tensor:
        """``E[x_j]`` per input feature  [in]."""
        if self.sum is None:
            raise ValueError("these statistics hold no input sums; accumulate 'sum'")
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance ``E[x_j²] − E[x_j]²`` per input feature  [in] (clamped at 0)."""
        return (self.col_sq_norms / max(self.n, 1) - self.mean.pow(2)).clamp_min_(0)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor | None) -> float:
    """‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F on sample inputs ``X [s, in]``; NaN when no sample was kept."""
    if X is None or X.numel() == 0:
        return float("nan")
    Y = X @ W.T  # [s, out]
    dY = X @ (W - W_hat).T  # [s, out]
    denom = Y.norm()
    return float(dY.norm() / denom) if denom > 0 else 0.0
