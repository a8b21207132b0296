"""SciPy's BLAS kept off the cores torch uses: a leaf for the math that calls LAPACK through SciPy."""

from __future__ import annotations

import contextlib
import functools


@functools.cache
def scipy_blas_single_thread() -> contextlib.AbstractContextManager:
    """A context in which SciPy's OpenBLAS runs on the calling thread only.

    Its worker threads busy-wait after each call, and on a machine whose cores torch's own
    threads already use they steal those cores: every torch op for a while after a ``trtri``
    ran several times slower (measured on the embedded model, 2 cores: the pruning work of a
    SparseGPT run took 14.5 s with SciPy's two OpenBLAS threads, 8.0 s with one)."""
    try:
        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController().select(internal_api="openblas")
    except Exception:  # pragma: no cover - threadpoolctl missing or unable to inspect the process
        return contextlib.nullcontext
    return functools.partial(ctl.limit, limits=1)
