"""Steps around any pruner: a refinement of a pruned mask (DSnoT), a per-layer allocation of
the sparsity (OWL). Like pruners they see bare tensors and declare what they read."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from ..pruners.base import Method, PruneResult
from ..stats import InputStats


class Refiner(Method):
    """Changes a pruner's result for one weight, keeping its sparsity (and its N:M pattern)."""

    @abstractmethod
    def refine(self, W: torch.Tensor, result: PruneResult, stats: InputStats, sparsity: float,
               nm: tuple[int, int] | None = None) -> PruneResult:
        """``W [out, in]``: the dense float32 weight before pruning; ``result``: the pruner's output.
        Returns a result with the same number of kept weights in every row (and every N:M group)."""

    def applies(self, name: str) -> bool:
        """Whether the target ``name`` (its full name in the model) is refined; all by default."""
        return True


@dataclass(frozen=True)
class LayerTarget:
    """The sparsity one decoder layer is pruned to: a fraction, or an N:M pattern."""

    sparsity: float
    nm: tuple[int, int] | None = None


@dataclass
class ObservedModule:
    """One target of a decoder layer in the observe-only pass: its dense weight and input statistics."""

    name: str  # full name in the model
    W: torch.Tensor  # [out, in] float32 dense weight
    stats: InputStats


class Allocator(Method):
    """Chooses each decoder layer's sparsity from an observe-only pass over the dense model."""

    @abstractmethod
    def observe(self, layer: int, modules: list[ObservedModule]) -> None:
        """Called once per decoder layer, in order, with the layer's targets (dense weights)."""

    @abstractmethod
    def allocate(self, sparsity: float, nm: tuple[int, int] | None = None) -> list[LayerTarget]:
        """One target per observed layer, in order. The mean over all pruned weights (weighted by
        size) equals ``sparsity`` (or ``1 - N/M``)."""


@dataclass
class Reconstruction:
    """What a reconstruction step did to one module: its relative output error before and after
    (``‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F`` over every calibration token) and the iterations it ran."""

    error_before: float
    error_after: float
    iterations: int = 0


class Reconstructor(Method):
    """Updates the kept weights of a pruned module with its mask fixed (after any pruner and refinement)."""

    @abstractmethod
    def reconstruct(self, W: torch.Tensor, result: PruneResult, stats: InputStats,
                    nm: tuple[int, int] | None = None) -> tuple[PruneResult, Reconstruction]:
        """``W [out, in]``: the dense float32 weight; ``result``: the pruned one. Returns a result with
        the very same mask (exact zeros off it) and what was done."""


@dataclass
class LowRank:
    """A low-rank correction ``ΔW ≈ B A`` of one module (a LoRA pair): ``A [r, in]``, ``B [out, r]``."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    error_before: float  # ‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F without the correction
    error_after: float  # ... with Ŵ + B A

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def params(self) -> int:
        return self.A.numel() + self.B.numel()


class Compensator(Method):
    """Adds a low-rank correction beside a pruned module, kept apart from the sparse weight (an adapter)."""

    @abstractmethod
    def compensate(self, W: torch.Tensor, W_hat: torch.Tensor, stats: InputStats) -> LowRank | None:
        """``W [out, in]`` dense, ``W_hat [out, in]`` pruned (both float32): the correction, or None."""
