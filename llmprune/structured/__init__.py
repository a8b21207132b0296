"""Structured removal: whole query heads, key/value heads, MLP channels, decoder layers and experts, so
that the saved model is a smaller dense one that every engine runs faster.

Width methods (one file each, registered by name like the pruners) see one consumer weight and its input
statistics: :mod:`.activation` (Minitron), :mod:`.flap` (FLAP), :mod:`.search` (greedy OBS). :mod:`.depth`
chooses layers, :mod:`.experts` scores experts (REAP). :mod:`.columns` holds the shared least squares and
:mod:`.removal` the record of what goes. The engine drives them (:mod:`llmprune.engine.structured`), and
:mod:`llmprune.checkpoint.surgery` cuts the model down.
"""

from . import activation, flap, search  # noqa: F401 - every built-in width method registered
from .base import ImportanceMethod, WidthMethod
from .columns import ColumnGroups, WidthResult
from .options import StructureOptions
from .removal import LayerRemoval, Removal

__all__ = ["ColumnGroups", "ImportanceMethod", "LayerRemoval", "Removal", "StructureOptions", "WidthMethod",
           "WidthResult"]
