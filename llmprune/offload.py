"""Keep only the decoder layer being pruned resident in RAM.

``transformers`` maps safetensors checkpoints into memory and makes the parameters views of
that mapping, so a page becomes resident when first read and a private copy when written.
Pruning reads and rewrites every layer, so a run's resident memory would grow to the whole
model. :class:`DiskOffloader` bounds it, around each layer:

- ``acquire``: the layer's CPU tensors are copied into fresh memory, and the pages they were
  read from are handed back to the kernel (``madvise(MADV_PAGEOUT)``; advisory, so data is
  never lost: a page read again is re-read from the file);
- ``release``: the pruned tensors are written to files in ``folder`` and the parameters
  re-pointed at shared memory maps of them, which stay off the resident set until read;
- ``paging_out()``: while the final save reads every mapped tensor once, a background thread
  keeps handing their clean pages back, so the save does not pull the whole model in.

Used by :func:`llmprune.prune_checkpoint`, which owns the model; the folder must outlive the
model's use. On systems without ``madvise`` only the release step applies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_MADV_PAGEOUT = 21  # Linux >= 5.4
_PAGE = 4096


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


class DiskOffloader:
    """Layer residency for the engine: ``acquire(i, layer)`` before pruning, ``release(i, layer)`` after."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.bytes = 0
        self._libc = _libc()
        self._mapped: list[torch.Tensor] = []

    @staticmethod
    def _cpu_params(layer: nn.Module):
        for mname, mod in layer.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if p.device.type == "cpu" and p.numel() > 0:
                    yield f"{mname}.{pname}", p

    def _page_out(self, t: torch.Tensor) -> None:
        if self._libc is None:
            return
        start = t.data_ptr() // _PAGE * _PAGE
        end = -(-(t.data_ptr() + t.numel() * t.element_size()) // _PAGE) * _PAGE
        self._libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)

    def acquire(self, index: int, layer: nn.Module) -> None:
        for _, p in self._cpu_params(layer):
            old = p.data
            p.data = old.clone()
            self._page_out(old)

    def _map(self, t: torch.Tensor, path: Path) -> torch.Tensor:
        t = t.detach().contiguous()
        t.view(-1).view(torch.uint8).numpy().tofile(path)
        self.bytes += t.numel() * t.element_size()
        # one mapping per tensor: tensors sharing storage would look tied to save_pretrained
        mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        self._mapped.append(mapped)
        return mapped

    def release(self, index: int, layer: nn.Module) -> None:
        for name, p in self._cpu_params(layer):
            p.data = self._map(p.data, self.folder / f"{index}.{name}.bin")
        if self._libc is not None:
            # the layer's activations were freed into the heap: hand its free pages back
            self._libc.malloc_trim(0)
        log.debug("offloaded layer %d (%.1f MB so far)", index, self.bytes / 2**20)

    @contextlib.contextmanager
    def paging_out(self, interval: float = 0.05) -> Iterator[None]:
        """Keep returning the mapped tensors' pages to the kernel while the block runs."""
        if self._libc is None or not self._mapped:
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                for t in self._mapped:
                    self._page_out(t)

        thread = threading.Thread(target=loop, name="llmprune-pageout", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
