"""Keep finished decoder layers on disk, memory-mapped, instead of in RAM.

After a layer is pruned its tensors are written to files and the parameters are re-pointed at
shared memory maps of those files. The pages are not resident until something reads them (the
final save), so the resident memory of a run stays at about one layer plus activations instead
of growing to the whole model. Used by :func:`llmprune.prune_checkpoint`, which owns the model;
the folder must outlive the model's use and is removed by the caller.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class DiskOffloader:
    """Callable ``(index, layer)``: moves a CPU layer's parameters and buffers into ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.bytes = 0

    def _map(self, t: torch.Tensor, path: Path) -> torch.Tensor:
        t = t.detach().contiguous()
        t.view(-1).view(torch.uint8).numpy().tofile(path)
        self.bytes += t.numel() * t.element_size()
        # one mapping per tensor: tensors that shared storage would look tied to save_pretrained
        return torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)

    def __call__(self, index: int, layer: nn.Module) -> None:
        seen: dict[int, torch.Tensor] = {}
        for mname, mod in layer.named_modules():
            for pname, p in list(mod.named_parameters(recurse=False)):
                if p.device.type != "cpu" or p.numel() == 0:
                    continue
                key = id(p.data.untyped_storage()), p.data.storage_offset(), tuple(p.shape)
                if key not in seen:
                    seen[key] = self._map(p.data, self.folder / f"{index}.{mname}.{pname}.bin")
                p.data = seen[key]
        log.debug("offloaded layer %d (%.1f MB so far)", index, self.bytes / 2**20)
