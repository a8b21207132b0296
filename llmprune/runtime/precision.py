"""Full float32 precision for the pruning math, restored afterwards.

On GPUs from Ampere on, PyTorch may run float32 matmuls and convolutions in TF32 (10 mantissa bits), and
``torch.set_float32_matmul_precision('high' | 'medium')`` lets a CPU run them in bfloat16 through oneDNN.
The pruning math is float32 by design: ``XᵀX`` summed over hundreds of thousands of tokens, a Cholesky
of it and of its inverse, OBS updates, ADMM solves, SVDs. Under TF32 the Hessian loses three decimal
digits, which changes masks and can make a damped Hessian fail its Cholesky; every reference code
turns it off (SparseGPT's ``torch.backends.cuda.matmul.allow_tf32 = False`` and
``torch.backends.cudnn.allow_tf32 = False``). :func:`full_float32` does so for a block, and gives
back whatever the process had (a user's TF32 for the rest of the program is theirs).

PyTorch has two spellings of these settings: the legacy flags (``allow_tf32``,
``set_float32_matmul_precision``) and, from 2.9, ``fp32_precision`` attributes. A process that set the
new ones cannot read the legacy flags any more (reading them raises), so the block keeps to the legacy
flags where they read, and otherwise sets and restores the new attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _new_api() -> list[tuple[object, str]]:
    """The ``fp32_precision`` attributes of this PyTorch (none before 2.9): the default, then each backend's."""
    b = torch.backends
    holders = [b, getattr(b.cuda, "matmul", None), getattr(b, "cudnn", None),
               getattr(getattr(b, "cudnn", None), "conv", None), getattr(getattr(b, "cudnn", None), "rnn", None),
               getattr(b, "mkldnn", None), getattr(getattr(b, "mkldnn", None), "matmul", None),
               getattr(getattr(b, "mkldnn", None), "conv", None), getattr(getattr(b, "mkldnn", None), "rnn", None)]
    return [(h, "fp32_precision") for h in holders if h is not None and hasattr(h, "fp32_precision")]


def _legacy() -> tuple[bool, bool, str] | None:
    """``(cuBLAS TF32, cuDNN TF32, matmul precision)`` by the legacy flags; None where they cannot be read
    (the process set the new ``fp32_precision`` attributes)."""
    try:
        return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision())
    except RuntimeError:
        return None


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 matmuls and convolutions in full float32 precision inside (no TF32 on GPUs, no bfloat16
    through oneDNN on CPUs); the process's own settings come back on exit, also after an exception."""
    legacy = _legacy()
    saved = [(h, a, getattr(h, a)) for h, a in _new_api()] if legacy is None else []
    try:
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        else:
            for h, a, _ in saved:
                setattr(h, a, "ieee")
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[2])  # first: it sets the cuBLAS flag too
            torch.backends.cuda.matmul.allow_tf32 = legacy[0]
            torch.backends.cudnn.allow_tf32 = legacy[1]
        else:
            for h, a, v in saved:  # the default first, then each backend's own
                setattr(h, a, v)
