"""Process memory: resident and available bytes, and the C library's page and heap calls (Linux).

Leaves for the residency strategies (offload, streaming), the engine's spilled hidden states and the
pipeline's decision to stream; nothing here imports the rest of the package.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch

_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux >= 5.4
_PAGE = 4096


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@functools.cache
def _libc():
    """The C library (malloc_trim, madvise), loaded once; None where not on Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def madvise_pages(libc, t: torch.Tensor, advice: int, inside: bool = False) -> None:
    """``madvise(advice)`` over the pages of CPU tensor ``t``: every page it touches, or with ``inside`` only
    the pages it covers whole (the neighbours of a tensor that shares its pages keep theirs). No-op
    without ``libc``."""
    if libc is None:
        return
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    start = -(-first // _PAGE) * _PAGE if inside else first // _PAGE * _PAGE
    end = last // _PAGE * _PAGE if inside else -(-last // _PAGE) * _PAGE
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)




def available_memory() -> int:
    """Bytes this process may still use: free memory, bounded by a cgroup limit and ``RLIMIT_AS``/``RLIMIT_DATA``."""
    import resource

    import psutil

    avail = psutil.virtual_memory().available
    try:  # cgroup v2
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    status = _proc_status()
    for rlim, key in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(rlim)
        if soft != resource.RLIM_INFINITY and key in status:
            avail = min(avail, soft - status[key])
    return max(avail, 0)


def _proc_status() -> dict[str, int]:
    """``/proc/self/status`` sizes in bytes (VmHWM, VmRSS, VmSize, VmData); empty where not on Linux."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out
