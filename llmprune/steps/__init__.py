"""Steps around any pruner (one file per method): refinement (DSnoT) and per-layer allocation (OWL)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Allocator, LayerTarget, ObservedModule, Refiner

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Allocator", "LayerTarget", "ObservedModule", "Refiner"]
