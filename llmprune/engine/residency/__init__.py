"""Where a decoder layer's weights live outside the moment the engine works on it."""

from __future__ import annotations

from typing import Protocol

from torch import nn


class LayerResidency(Protocol):
    """Brings each decoder layer into memory before it is pruned and moves it out after
    (see :class:`llmprune.offload.DiskOffloader`)."""

    def acquire(self, index: int, layer: nn.Module) -> None: ...

    def release(self, index: int, layer: nn.Module) -> None: ...

    def set_aside(self, model: nn.Module, layers: list[nn.Module]) -> None:
        """Called once the first layer's inputs are captured: the parameters outside ``layers``
        (embeddings, final norm, head) are not read again until every layer is pruned."""

    def fetch(self, index: int, layer: nn.Module) -> None:
        """Optional: called before an observe-only pass reads layer ``index`` (a residency that keeps
        no weights between layers, :class:`llmprune.stream.ShardStream`, reads them here)."""

    def observed(self, index: int, layer: nn.Module) -> None:
        """Called after an observe-only pass read layer ``index`` without changing it."""

    def bring_back(self, model: nn.Module, chunks: list | None = None) -> None:
        """Optional: called before a capture, with the calibration chunks it will run, to read again what
        :meth:`set_aside` took off (a residency may read only what those chunks look up)."""
