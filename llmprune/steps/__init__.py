"""Steps around any pruner (one file per method): refinement (DSnoT), per-layer allocation (OWL),
reconstruction of the kept weights (ADMM) and low-rank compensation (EoRA)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import (Allocator, Compensator, LayerTarget, LowRank, ObservedModule, Reconstruction, Reconstructor,
                   Refiner)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Allocator", "Compensator", "LayerTarget", "LowRank", "ObservedModule", "Reconstruction", "Reconstructor",
           "Refiner"]
