"""Pruners by name. Adding a method is one file here plus one entry in :data:`PRUNERS`."""

from __future__ import annotations

from .base import Pruner, PruneResult
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

PRUNERS: dict[str, type[Pruner]] = {cls.name: cls for cls in (Magnitude, Wanda, SparseGPT)}


def get_pruner(name: str, **options) -> Pruner:
    """Instantiate a pruner by name; ``options`` are passed to the ones that take them."""
    if name not in PRUNERS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(PRUNERS)}")
    cls = PRUNERS[name]
    if cls is SparseGPT:
        return cls(**options)
    return cls()


__all__ = ["PRUNERS", "Magnitude", "PruneResult", "Pruner", "SparseGPT", "Wanda", "get_pruner"]
