"""The open registry of methods: pruners, refinement steps and allocators, by name.

A method is one file under ``llmprune/pruners/`` or ``llmprune/steps/`` whose class carries one
of the decorators below; the packages import every file they hold, so nothing else needs editing.
Outside the package, ``register_pruner(MyPruner)`` makes ``method="mine"`` available too.

This module is the table alone and imports nothing of the package: the built-in methods fill it
when ``llmprune.pruners`` and ``llmprune.steps`` are imported, which the config (and so every face
of the package) does before it looks a name up.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")

PRUNERS: dict[str, type] = {}
REFINERS: dict[str, type] = {}
ALLOCATORS: dict[str, type] = {}
RECONSTRUCTORS: dict[str, type] = {}
COMPENSATORS: dict[str, type] = {}
STRUCTURES: dict[str, type] = {}  # structured width methods (llmprune.structured)
_TABLES = {"method": PRUNERS, "refine": REFINERS, "allocation": ALLOCATORS, "reconstruct": RECONSTRUCTORS,
           "compensate": COMPENSATORS, "structure": STRUCTURES}


def _register(table: dict[str, type], cls: T) -> T:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls!r} needs a class attribute 'name' to be registered")
    if name in table and table[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({table[name].__qualname__})")
    table[name] = cls
    return cls


def register_pruner(cls: T) -> T:
    """Class decorator: make a :class:`~llmprune.pruners.Pruner` available as ``method=cls.name``."""
    return _register(PRUNERS, cls)


def register_refiner(cls: T) -> T:
    """Class decorator: make a :class:`~llmprune.steps.Refiner` available as ``refine=cls.name``."""
    return _register(REFINERS, cls)


def register_allocator(cls: T) -> T:
    """Class decorator: make an :class:`~llmprune.steps.Allocator` available as ``allocation=cls.name``."""
    return _register(ALLOCATORS, cls)


def register_reconstructor(cls: T) -> T:
    """Class decorator: make a :class:`~llmprune.steps.Reconstructor` available as ``reconstruct=cls.name``."""
    return _register(RECONSTRUCTORS, cls)


def register_compensator(cls: T) -> T:
    """Class decorator: make a :class:`~llmprune.steps.Compensator` available as ``compensate=cls.name``."""
    return _register(COMPENSATORS, cls)


def table(kind: str) -> dict[str, type]:
    """The registered classes of one kind: ``"method"``, ``"refine"``, ``"allocation"``, ``"reconstruct"``
    or ``"compensate"``."""
    return _TABLES[kind]


def lookup(kind: str, name: str) -> Any:
    """The class registered as ``name``; an error listing the choices otherwise."""
    t = table(kind)
    if name not in t:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(t))}")
    return t[name]


def option_owners() -> dict[str, set[str]]:
    """Config field -> names of the registered methods that take it as an option."""
    owners: dict[str, set[str]] = {}
    for table in _TABLES.values():
        for name, cls in table.items():
            for opt in getattr(cls, "options", ()):
                owners.setdefault(opt, set()).add(name)
    return owners
