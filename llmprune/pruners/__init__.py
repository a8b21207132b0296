"""Pruners by name. Adding a method is one file here whose class is decorated with
:func:`~llmprune.registry.register_pruner`; this package imports every file it holds."""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import PRUNERS, lookup
from .base import Method, Pruner, PruneResult

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

from .magnitude import Magnitude  # noqa: E402
from .sparsegpt import SparseGPT  # noqa: E402
from .wanda import Wanda  # noqa: E402


def get_pruner(name: str, **options) -> Pruner:
    """Instantiate a pruner by name with keyword ``options`` (its ``__init__`` keywords)."""
    cls = lookup("method", name)
    unknown = set(options) - set(cls.options)
    if unknown:
        raise ValueError(f"method {name!r} takes no option {', '.join(sorted(unknown))}; "
                         f"its options are: {', '.join(cls.options) or 'none'}")
    return cls(**options)


__all__ = ["PRUNERS", "Magnitude", "Method", "PruneResult", "Pruner", "SparseGPT", "Wanda", "get_pruner"]
