r"""Removing groups of input columns from a consumer ``W [out, in]``: the math every width method shares.

A structure of a decoder layer is a group of input columns of the projection that consumes it: a query
head is ``head_dim`` consecutive columns of ``o_proj``, a key/value head the columns of all its query
heads, an MLP channel one column of ``down_proj``. Removing a group ``R`` sets those columns to zero, or
better, re-solves the kept columns ``K`` by least squares on the calibration inputs ``X [t, in]``:

    Ŵ_K = argmin ‖X Wᵀ − X_K Ŵ_Kᵀ‖²_F = W H_{:,K} (H_KK + λI)⁻¹,      H = Xᵀ X   [in, in]

(the normal equations of ``--reconstruct admm`` with the support a set of whole columns). Where the
consumer has a bias, the fit has an intercept: ``H`` is replaced by the centred ``Xᵀ X − n μ μᵀ`` and
the bias absorbs the mean of what went, ``b̂ = b + W μ − Ŵ μ`` (FLAP's bias compensation is the case
``Ŵ_K = W_K``). ``λ`` is ``damp`` times the mean diagonal, as in SparseGPT.

Groups sit in families (the key/value groups of query heads): each family loses the same number of
groups, so that every key/value head keeps the same number of query heads and GQA stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..stats import InputStats


@dataclass
class ColumnGroups:
    """``groups[g]``: the input columns of group ``g``; ``families[f]``: the groups of family ``f``; ``dead``:
    columns already removed (by an earlier choice on the same consumer), which stay zero."""

    groups: list[torch.Tensor]  # LongTensor [size_g] each
    families: list[list[int]]
    dead: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @classmethod
    def contiguous(cls, n_groups: int, size: int, per_family: int | None = None) -> ColumnGroups:
        """``n_groups`` groups of ``size`` consecutive columns; families of ``per_family`` consecutive
        groups (one family of all when None)."""
        groups = [torch.arange(g * size, (g + 1) * size) for g in range(n_groups)]
        per = per_family or n_groups
        return cls(groups, [list(range(f, f + per)) for f in range(0, n_groups, per)])

    def columns(self, gs: list[int] | tuple[int, ...]) -> torch.Tensor:
        """The columns of groups ``gs`` and the dead ones."""
        return torch.cat([self.dead, *(self.groups[g] for g in gs)])

    def kept(self, gs: list[int] | tuple[int, ...], width: int) -> torch.Tensor:
        """The columns left when groups ``gs`` (and the dead columns) go  [k]."""
        gone = torch.zeros(width, dtype=torch.bool)
        gone[self.columns(gs)] = True
        return (~gone).nonzero().squeeze(1)


@dataclass
class WidthResult:
    """What a width method did to one consumer: the groups removed, the new weight (exact zeros in their
    columns) and bias, and the relative output error of plain removal and of the result."""

    removed: list[int]
    W: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]
    error_plain: float  # ‖(W − W⊙keep) Xᵀ‖ / ‖W Xᵀ‖ (columns zeroed, nothing else)
    error: float  # the same for the returned W (and bias)


@dataclass
class Moments:
    """Per-token moments of a consumer's inputs: ``G = Xᵀ X / n [in, in]``, and when the consumer has a
    bias to absorb the mean, ``μ [in]`` and the covariance ``C = G − μ μᵀ``; ``fit`` is the matrix the
    least squares use (``C`` with a bias, else ``G``)."""

    G: torch.Tensor
    mu: torch.Tensor | None = None

    @classmethod
    def of(cls, stats: InputStats, centred: bool) -> Moments:
        G = stats.H.float() / max(stats.n, 1)  # [in, in]
        return cls(G, stats.mean.float() if centred else None)

    @property
    def fit(self) -> torch.Tensor:
        return self.G if self.mu is None else self.G - torch.outer(self.mu, self.mu)

    def error(self, W: torch.Tensor, W_hat: torch.Tensor, compensated: bool) -> float:
        """``‖(X Wᵀ + b) − (X Ŵᵀ + b̂)‖_F / ‖X Wᵀ‖_F`` over every calibration token: with ``b̂ = b`` (plain), or
        with the bias absorbing the mean of the change (``compensated``: the centred error)."""
        D = W - W_hat  # [out, in]
        M = self.fit if compensated else self.G
        num = float((D @ M * D).sum())
        den = float((W @ self.G * W).sum())
        return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def damped(G: torch.Tensor, damp: float) -> torch.Tensor:
    """``G + λI`` with ``λ = damp · mean(diag G)`` (1 where the diagonal is all zero)."""
    d = torch.diagonal(G)
    lam = float(damp) * float(d.mean()) if float(d.mean()) > 0 else 1.0
    return G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def least_squares(W: torch.Tensor, G: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """``Ŵ [out, in]``: zero outside the columns ``keep``, and there ``W G_{:,K} (G_KK + λI)⁻¹``."""
    GKK = damped(G[keep][:, keep].double(), damp)  # [k, k]
    rhs = (W.double() @ G[:, keep].double())  # [out, k]
    L, info = torch.linalg.cholesky_ex(GKK)
    if int(info) != 0:  # not positive definite even damped: fall back to a least-squares solve
        WK = torch.linalg.lstsq(GKK, rhs.T).solution.T
    else:
        WK = torch.cholesky_solve(rhs.T, L).T  # [out, k]
    out = torch.zeros_like(W)
    out[:, keep] = WK.to(W.dtype)
    return out


def finish(W: torch.Tensor, bias: torch.Tensor | None, groups: ColumnGroups, removed: list[int],
           W_new: torch.Tensor, m: Moments) -> WidthResult:
    """The result of removing ``removed`` with ``W_new`` proposed for the kept columns: exact zeros in the
    removed columns, the bias absorbing the mean of the change where there is one (``m.mu``), and the plain
    removal kept instead whenever the proposal does not lower the output error (a damped solve can trade a
    little of it for the damping term)."""
    cols = groups.columns(removed)
    plain = W.clone()
    plain[:, cols] = 0.0
    W_new = W_new.clone()
    W_new[:, cols] = 0.0
    compensated = bias is not None and m.mu is not None
    e_plain = m.error(W, plain, compensated=False)
    e_new = m.error(W, W_new, compensated)
    if e_new > e_plain:
        W_new, e_new, compensated = plain, e_plain, False
    b_new = None
    if bias is not None:
        b_new = bias.float() + ((W - W_new) @ m.mu if compensated else 0.0)  # [out]
    return WidthResult(sorted(removed), W_new, b_new, e_plain, e_new)


def lowest_per_family(scores: torch.Tensor, groups: ColumnGroups, per_family: int) -> list[int]:
    """The ``per_family`` groups of lowest score in every family (ties: the lower index)."""
    removed: list[int] = []
    for fam in groups.families:
        s = scores[fam]
        order = sorted(range(len(fam)), key=lambda i: (float(s[i]), fam[i]))
        removed += [fam[i] for i in order[:per_family]]
    return sorted(removed)
