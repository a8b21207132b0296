"""Atomic file writes: every file a run leaves (progress, search state, variants, cards, results) is written to
a hidden temporary name in its own folder and renamed over the target (``os.replace``, atomic on one file
system), so a killed process leaves the old file or the new one, never half of one. The temporary name
holds the process id, so ranks or runs writing the same folder do not share one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def replace_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path``. On any error the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1, sort_keys: bool = False) -> Path:
    """``data`` as JSON (one trailing newline)."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def save_tensors_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None) -> Path:
    """``tensors`` as safetensors (moved to the CPU, made contiguous)."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return replace_atomic(path, lambda tmp: save_file(data, str(tmp), metadata=dict(metadata or {"format": "pt"})))


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Any object ``torch.save`` takes (optimizer states, random generators)."""
    return replace_atomic(path, lambda tmp: torch.save(obj, tmp))


__all__ = ["replace_atomic", "save_tensors_atomic", "torch_save_atomic", "write_json_atomic", "write_text_atomic"]
