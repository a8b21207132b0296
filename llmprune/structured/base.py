"""The width-method interface: one consumer's weight and its input statistics in, the groups of input
columns removed and the consumer re-solved out. Like the pruners, width methods see bare tensors only."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from ..pruners.base import Method
from ..stats import InputStats
from .columns import ColumnGroups, Moments, WidthResult, finish, least_squares, lowest_per_family


class WidthMethod(Method):
    """Chooses which structures (groups of a consumer's input columns) go, ``per_family`` from every family,
    and returns the consumer without them (:class:`~.columns.WidthResult`)."""

    needs: ClassVar[frozenset[str]] = frozenset({"hessian", "sum"})

    @abstractmethod
    def remove(self, W: torch.Tensor, bias: torch.Tensor | None, stats: InputStats, groups: ColumnGroups,
               per_family: int) -> WidthResult:
        """``W [out, in]`` float32, ``bias [out]`` or None."""


class ImportanceMethod(WidthMethod):
    """Ranks the groups by a score and removes the lowest of every family; the kept columns are then
    re-solved by least squares (``structure_reconstruct``, on by default) or left as they were. A bias, where
    the consumer has one, absorbs the mean of what went in both cases."""

    options = ("damp", "structure_reconstruct")

    def __init__(self, damp: float = 0.01, structure_reconstruct: bool = True):
        self.damp = float(damp)
        self.reconstruct = bool(structure_reconstruct)

    @abstractmethod
    def scores(self, W: torch.Tensor, stats: InputStats, groups: ColumnGroups) -> torch.Tensor:
        """``[n_groups]``: the importance of every group (low goes first)."""

    def remove(self, W, bias, stats, groups, per_family):
        m = Moments.of(stats, centred=bias is not None)
        removed = lowest_per_family(self.scores(W, stats, groups), groups, per_family)
        if self.reconstruct and removed:
            W_new = least_squares(W, m.fit, groups.kept(removed, W.shape[1]), self.damp)
        else:
            W_new = W
        return finish(W, bias, groups, removed, W_new, m)


def group_sums(per_column: torch.Tensor, groups: ColumnGroups) -> torch.Tensor:
    """``[n_groups]``: a per-column quantity summed over each group's columns."""
    return torch.stack([per_column[g].sum() for g in groups.groups])
