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
  the heap is trimmed (``malloc_trim``) when the resident set has grown 5 % past what the
  first layer left (heap fragmentation). Each trim returns the freed activations only for the
  next layer to page-fault them back in; measured on a SparseGPT run of the embedded model:
  trimming after every layer, 2.9 M minor faults, 12 s of system time, peak 1.0-1.1 GB;
  never, 0.3 M faults, 4 s, but a peak of 1.29 GB; this policy, about 2 M faults, peak 0.9 GB;
- ``set_aside``: the pages of the parameters outside the decoder layers (embeddings, head)
  are handed back once the layers' inputs are captured; they are re-read when needed (save);
- ``paging_out()``: while the final save reads every mapped tensor once, a background thread
  keeps handing their clean pages back, so the save does not pull the whole model in.

Used by :func:`llmprune.prune_checkpoint`, which owns the model; the folder must outlive the
model's use. On systems without ``madvise`` only the release step applies.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ...runtime.memory import _MADV_PAGEOUT, _libc, _resident_bytes, madvise_pages

log = logging.getLogger(__name__)

TRIM_GROWTH = 1.05  # trim the heap once the resident set exceeds the first layer's by this factor


class DiskOffloader:
    """Layer residency for the engine: ``acquire(i, layer)`` before pruning, ``release(i, layer)`` after."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.bytes = 0
        self._libc = _libc()
        self._mapped: list[torch.Tensor] = []
        self._rss_first: int | None = None  # resident bytes after the first released layer
        self.trims = 0

    @staticmethod
    def _cpu_params(layer: nn.Module):
        for mname, mod in layer.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if p.device.type == "cpu" and p.numel() > 0:
                    yield f"{mname}.{pname}", p

    def _page_out(self, t: torch.Tensor) -> None:
        madvise_pages(self._libc, t, _MADV_PAGEOUT)

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

    def _trim(self) -> None:
        if self._libc is not None:
            self._libc.malloc_trim(0)
            self.trims += 1

    def set_aside(self, model: nn.Module, layers: list[nn.Module]) -> None:
        inside = {id(p) for layer in layers for p in layer.parameters()}
        for p in model.parameters():
            if id(p) not in inside and p.device.type == "cpu" and p.numel() > 0:
                self._page_out(p.data)
        self._trim()  # what loading and capturing freed

    def observed(self, index: int, layer: nn.Module) -> None:
        """After an observe-only pass read layer ``index``: hand its pages back, as ``acquire`` does,
        without copying (nothing was written); the prune pass reads them again."""
        for _, p in self._cpu_params(layer):
            self._page_out(p.data)

    def release(self, index: int, layer: nn.Module) -> None:
        for name, p in self._cpu_params(layer):
            p.data = self._map(p.data, self.folder / f"{index}.{name}.bin")
        if self._libc is not None:
            # the layer's activations were freed into the heap, where the next layer reuses them;
            # hand free pages back only when fragmentation has grown the resident set
            rss = _resident_bytes()
            if self._rss_first is None:
                self._rss_first = rss
            elif rss is not None and rss > TRIM_GROWTH * self._rss_first:
                self._trim()
        log.debug("offloaded layer %d (%.1f MB so far, %d heap trims)", index, self.bytes / 2**20, self.trims)

    @contextlib.contextmanager
    def paging_out(self, interval: float = 0.05) -> Iterator[None]:
        """Keep returning the mapped tensors' pages to the kernel while the block runs."""
        if self._libc is None or not self._mapped:
            yield
            return
        self._trim()  # the last layers' activations
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
