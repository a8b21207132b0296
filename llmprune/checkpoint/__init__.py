"""Checkpoints after pruning: the compressed sparse format, loading, model cards and Hub pushes.

``compress``/``decompress`` convert between dense and compressed folders, ``load`` reads either,
``write_card`` writes the model card from a checkpoint's own metadata, ``push`` uploads a folder.
"""

from __future__ import annotations

from .compressed import CompressedFormatError, compress, decompress, is_compressed
from .hub import PushError, PushResult, push
from .load import LOAD_HOOKS, LoadError, load

__all__ = ["LOAD_HOOKS", "CompressedFormatError", "LoadError", "PushError", "PushResult", "compress", "decompress",
           "is_compressed", "load", "push"]
