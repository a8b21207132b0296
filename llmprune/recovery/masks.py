"""Packed-bit masks: one bit per weight, on the weight's device (1/32 of a float32 copy).

A :class:`PackedMask` holds one kept weight and its keep-mask as packed bits (:func:`pack_keep`), unpacks
the pruned positions on demand (:func:`unpack_pruned`) and writes exact zeros there. The bits are in
``numpy.packbits``' order, so a keeper's bytes hash like the engine's ``mask_sha256``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Bit weights of one packed byte, most significant first (numpy.packbits' order, so that a keeper's
# bytes hash like the engine's mask_sha256).
_BITS = (128, 64, 32, 16, 8, 4, 2, 1)


def clean_name(name: str) -> str:
    """A module name as in the unwrapped, adapter-free model (PEFT inserts ``.base_layer``)."""
    return name.replace(".base_layer", "")


def pack_keep(W: torch.Tensor) -> torch.Tensor:
    """The keep-mask ``W != 0`` of a weight as packed bits: uint8 ``[ceil(numel / 8)]`` on ``W``'s device,
    in row-major order of the stored tensor, most significant bit first (as ``numpy.packbits``)."""
    keep = (W.detach() != 0).reshape(-1)  # [numel] bool
    if keep.device.type == "cpu":
        return torch.from_numpy(np.packbits(keep.numpy()))  # numpy's packing: ~10x torch's on the CPU
    pad = (-keep.numel()) % 8
    if pad:
        keep = torch.cat([keep, keep.new_zeros(pad)])
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=keep.device)  # [8]
    return (keep.view(-1, 8).to(torch.uint8) * bits).sum(dim=1, dtype=torch.uint8)  # [ceil(numel / 8)]


def unpack_pruned(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The pruned positions (True where the weight must be zero) of a mask packed by :func:`pack_keep`."""
    numel = math.prod(shape)
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)  # [8]
    pruned = torch.bitwise_and(packed.unsqueeze(1), bits).eq(0)  # [ceil(numel / 8), 8]
    return pruned.view(-1)[:numel].view(shape)


_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer views of float weights


@dataclass
class PackedMask:
    """One kept weight: the tensor itself and its keep-mask as packed bits."""

    name: str
    param: torch.Tensor
    bits: torch.Tensor  # uint8 [ceil(numel / 8)], on the weight's device once used
    kept: int  # weights kept (ones in the mask)

    @property
    def numel(self) -> int:
        return self.param.numel()

    def _bits_on(self, device: torch.device) -> torch.Tensor:
        if self.bits.device != device:  # the model moved after the capture: the mask follows, once
            self.bits = self.bits.to(device)
        return self.bits

    def pruned(self) -> torch.Tensor:
        """Bool ``[*shape]`` on the weight's device, True at pruned positions (unpacked on demand)."""
        return unpack_pruned(self._bits_on(self.param.device), self.param.shape)

    def zero_(self, t: torch.Tensor) -> None:
        """Write exact zeros into ``t`` (the weight or its gradient) at the pruned positions.

        On the CPU through numpy on the tensor's bits seen as integers: ``np.unpackbits`` and an integer
        multiply by the keep-mask are ~10x faster there than torch's bool kernels (17 ms against 1.6 ms
        for a 1536x576 weight on the 2-core machine), and the integer view gives +0.0 even over NaN or inf.
        """
        view = _INT_VIEWS.get(t.element_size())
        if t.device.type == "cpu" and t.is_contiguous() and view is not None and not t.is_complex():
            keep = np.unpackbits(self._bits_on(t.device).numpy(), count=t.numel()).view(np.bool_)  # [numel]
            a = t.detach().view(view).numpy().reshape(-1)  # [numel], the tensor's own memory
            np.multiply(a, keep, out=a)
        else:
            t.masked_fill_(unpack_pruned(self._bits_on(t.device), t.shape), 0)

