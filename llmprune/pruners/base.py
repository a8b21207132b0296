"""The pruner interface: one weight and its input statistics in, pruned weight and mask out.

Pruners see bare tensors only (no modules, devices, hooks or data), so each is tested on
small matrices. ``W`` is always ``[out, in]`` float32; the engine converts storage layouts
(GPT-2's ``Conv1D``, fused experts) and dtypes around the call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..stats import InputStats, StatsKind


@dataclass
class PruneResult:
    W: torch.Tensor  # [out, in] pruned weight, exact zeros where M is False (may be a strided view)
    M: torch.Tensor  # [out, in] bool, True where the weight is kept (may be a strided view)


class Pruner(ABC):
    """Base class: subclasses set ``name`` and ``stats_kind`` and implement :meth:`prune`."""

    name: ClassVar[str]
    stats_kind: ClassVar[StatsKind]

    @abstractmethod
    def prune(
        self, W: torch.Tensor, stats: InputStats, sparsity: float, nm: tuple[int, int] | None = None
    ) -> PruneResult:
        """Prune ``W [out, in]`` to ``sparsity`` (or keep ``n`` of every ``m`` inputs when ``nm``)."""
