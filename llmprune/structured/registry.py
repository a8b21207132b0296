"""The structured methods' table: width methods by name (``structure="search"``)."""

from __future__ import annotations

from ..registry import STRUCTURES, _register


def register_structure(cls):
    """Class decorator: make a :class:`~llmprune.structured.base.WidthMethod` available as ``structure=cls.name``."""
    return _register(STRUCTURES, cls)
