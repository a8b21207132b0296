"""The pruner interface: one weight and its input statistics in, pruned weight and mask out.

Pruners see bare tensors only (no modules, devices, hooks or data), so each is tested on
small matrices. ``W`` is always ``[out, in]`` float32; the engine converts storage layouts
(GPT-2's ``Conv1D``, fused experts) and dtypes around the call.

A pruner declares the input statistics it reads (``needs``, see :mod:`llmprune.stats`) and the
config fields it takes (``options``: each a keyword of its ``__init__`` and a field of a small
settings model declared beside the method, e.g. ``SparseGPTOptions``, which
:class:`llmprune.PruneConfig` inherits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..stats import InputStats


@dataclass
class PruneResult:
    W: torch.Tensor  # [out, in] pruned weight, exact zeros where M is False (may be a strided view)
    M: torch.Tensor  # [out, in] bool, True where the weight is kept (may be a strided view)


class Method(ABC):
    """What every registered method (pruner or step around one) declares."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()  # input statistics read (see llmprune.stats)
    options: ClassVar[tuple[str, ...]] = ()  # config fields passed to __init__ as keywords

    @classmethod
    def from_config(cls, config: Any) -> Method:
        """An instance with its options read from ``config`` (a :class:`~llmprune.PruneConfig`)."""
        return cls(**{k: getattr(config, k) for k in cls.options})

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Refuse a config this method cannot run, before any model loads (a ``ValueError`` that names the
        fix); called for every method a :class:`~llmprune.PruneConfig` selects. Nothing by default."""
        return None


class Pruner(Method):
    """Base class: subclasses set ``name`` and ``needs`` and implement :meth:`prune`."""

    @property
    def stats_kind(self) -> str:  # earlier single-kind name
        return InputStats(self.needs).kind

    @abstractmethod
    def prune(
        self, W: torch.Tensor, stats: InputStats, sparsity: float, nm: tuple[int, int] | None = None
    ) -> PruneResult:
        """Prune ``W [out, in]`` to ``sparsity`` (or keep ``n`` of every ``m`` inputs when ``nm``)."""
