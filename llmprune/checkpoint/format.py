"""A compressed sparse checkpoint format: kept values plus a packed mask, in safetensors.

Layout (``LAYOUT_VERSION`` 1), per weight tensor ``W`` of the checkpoint:

- ``bitmask`` (unstructured): ``W.values`` holds the kept entries in row-major order (same dtype
  as ``W``), ``W.bitmask`` one bit per entry of ``W`` (uint8, little-endian bit order within a
  byte, row-major over the flattened tensor, padded with zero bits to a whole byte).
- ``nm`` (N:M along the last dimension, the input channels of a ``Linear``): every group of M
  consecutive entries keeps exactly N slots; ``W.values`` holds them ``[groups * N]`` and
  ``W.indices`` their positions inside the group, ``ceil(log2 M)`` bits each (2 bits for 2:4),
  packed little-endian like the bitmask. A group with fewer than N nonzeros pads with positions
  that hold zero, so the N slots are always distinct.
- ``dense``: ``W`` stored as it is (embeddings, norms, ``lm_head``, anything not sparse enough).

"Kept" means ``!= 0`` (NaN is kept). A tensor holding ``-0.0`` also stores ``W.negzero``, one bit per
entry marking them, so decompression reproduces every weight bit for bit in float32, bfloat16 and
float16; llmprune's engine writes pruned zeros as ``+0.0``, so its checkpoints need no such mask.

The weights go to ``model.compressed.safetensors`` (one file per source shard:
``model.compressed-00001-of-00002.safetensors``); ``config.json`` describes the layout under
``llmprune.compressed`` and its ``model_type`` is replaced by a sentence, so
``AutoModelForCausalLM.from_pretrained`` stops with an error that names ``llmprune.load`` and
``llmprune decompress`` instead of loading random weights. The original ``model_type`` is kept
in the layout block.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..loading.integrity import CheckpointFileError, read_header, read_json

log = logging.getLogger(__name__)

LAYOUT_KEY = "compressed"  # under config.json["llmprune"]
LAYOUT_FORMAT = "llmprune-sparse"
LAYOUT_VERSION = 1
COMPRESSED_WEIGHTS = "model.compressed.safetensors"
COMPRESSED_MODEL_TYPE = (
    "llmprune-compressed: this is a compressed sparse llmprune checkpoint; load it with "
    "llmprune.load(PATH), or write a plain transformers checkpoint with `llmprune decompress PATH OUT`"
)
DENSE_WEIGHTS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
DENSE_INDEX = "model.safetensors.index.json"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SIGN = {2: -(1 << 15), 4: -(1 << 31), 8: -(1 << 63)}  # the bit pattern of -0.0 as a signed integer


class CompressedFormatError(ValueError):
    """A folder is not in (or cannot be converted to) the compressed format; the message says why."""


# ----------------------------------------------------------------------------------------------
# bit packing
# ----------------------------------------------------------------------------------------------


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool ``[K]`` -> uint8 ``[ceil(K / 8)]``, bit ``i`` of byte ``j`` is ``bits[8 j + i]``."""
    import numpy as np

    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy(), bitorder="little"))  # [ceil(K / 8)] uint8


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 ``[ceil(count / 8)]`` -> bool ``[count]`` (inverse of :func:`pack_bits`)."""
    import numpy as np

    bits = np.unpackbits(packed.reshape(-1).numpy(), count=count, bitorder="little")  # uint8 0/1 [count]
    return torch.from_numpy(bits).view(torch.bool)


NM_CHUNK_GROUPS = 1 << 17  # groups decoded at a time (N:M): int64 indices of 2 MB per kept slot


def index_bits(M: int) -> int:
    """Bits per position inside a group of M: ``ceil(log2 M)`` (2 for M=4, 3 for M=8)."""
    return max(1, (M - 1).bit_length())


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in ``[0, 2**bits)`` ``[K]`` -> packed uint8, ``bits`` bits each, low bit first."""
    expanded = (idx.reshape(-1, 1).to(torch.int64) >> torch.arange(bits)) & 1  # [K, bits]
    return pack_bits(expanded.bool())


def unpack_indices(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: int64 ``[count]``."""
    return unpack_small_indices(packed, count, bits).long()


def unpack_small_indices(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices` for ``bits <= 8``: uint8 ``[count]``. Widths that divide a byte
    (1, 2, 4, 8 bits) are shifted out of each byte directly; others go through ``numpy.unpackbits``."""
    if bits > 8:
        raise CompressedFormatError(f"index width {bits} bits is over 8; the checkpoint is damaged")
    if 8 % bits == 0:  # index k sits in byte k // (8 / bits), at bit (k % (8 / bits)) * bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)  # [8 / bits]
        idx = (packed.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)  # [bytes, 8 / bits] uint8
        return idx.reshape(-1)[:count]
    import numpy as np

    b = np.unpackbits(packed.reshape(-1).numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    idx = np.zeros(count, dtype=np.uint8)  # positions inside a group
    for k in range(bits):
        idx |= b[:, k] << k
    return torch.from_numpy(idx)


# ----------------------------------------------------------------------------------------------
# one tensor
# ----------------------------------------------------------------------------------------------


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``"unstructured"``/None -> None."""
    if not pattern or pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise CompressedFormatError(f"pattern {pattern!r} is not 'unstructured' or N:M with 0 < N < M (e.g. 2:4)")
    return int(m.group(1)), int(m.group(2))


@dataclass
class Encoded:
    """One tensor in the compressed layout: the stored tensors and the layout entry for config.json."""

    tensors: dict[str, torch.Tensor]
    entry: dict[str, Any]


def encode(name: str, W: torch.Tensor, nm: tuple[int, int] | None = None) -> Encoded:
    """Encode ``W`` as ``nm`` (when ``nm`` is given and every group of the last dimension holds at
    most N kept entries), else as ``bitmask`` when that is smaller than ``W``, else ``dense``."""
    entry: dict[str, Any] = {"shape": list(W.shape), "dtype": str(W.dtype).removeprefix("torch.")}
    if not W.is_floating_point() or W.dim() < 2 or W.numel() == 0:
        return Encoded({name: W}, {**entry, "encoding": "dense"})
    W = W.contiguous()
    W_int = W.view(_INT_VIEW[W.element_size()])  # moved as integers: every bit (NaN payloads too) is kept as is
    kept = W != 0  # NaN is kept; -0.0 is a zero, its sign restored from NAME.negzero
    negzero = W_int == _SIGN[W.element_size()]  # [*W.shape] bit pattern of -0.0
    extra = {f"{name}.negzero": pack_bits(negzero)} if bool(negzero.any()) else {}
    if nm is not None and W.shape[-1] % nm[1] == 0:
        N, M = nm
        groups = kept.view(-1, M)  # [G, M]
        if int(groups.sum(1).max()) <= N:
            # kept positions first (ascending), then zero positions: the first N are the N slots
            order = torch.argsort((~groups).to(torch.int8), dim=1, stable=True)[:, :N]  # [G, N]
            values = W_int.view(-1, M).gather(1, order).reshape(-1).view(W.dtype)  # [G * N]
            bits = index_bits(M)
            return Encoded(
                {f"{name}.values": values, f"{name}.indices": pack_indices(order, bits), **extra},
                {**entry, "encoding": "nm", "n": N, "m": M, "index_bits": bits, "negzero": bool(extra)},
            )
    n_kept = int(kept.sum())
    if (W.numel() + 7) // 8 * (1 + bool(extra)) + n_kept * W.element_size() < W.numel() * W.element_size():
        return Encoded(
            {f"{name}.values": W_int.reshape(-1)[kept.reshape(-1)].view(W.dtype), f"{name}.bitmask": pack_bits(kept),
             **extra},
            {**entry, "encoding": "bitmask", "kept": n_kept, "negzero": bool(extra)},
        )
    return Encoded({name: W}, {**entry, "encoding": "dense"})


def _negzero(out: torch.Tensor, name: str, entry: dict[str, Any], get) -> torch.Tensor:
    """Put back the sign of the zeros that were ``-0.0`` (only stored when a tensor has any)."""
    if entry.get("negzero"):
        neg = unpack_bits(get(f"{name}.negzero"), out.numel())
        out.masked_fill_(neg, _SIGN[out.element_size()])
    return out


def stored_keys(name: str, entry: dict[str, Any]) -> list[str]:
    """The names under which tensor ``name`` is stored, by its layout ``entry`` (none for an unknown encoding,
    which :func:`decode` refuses)."""
    negzero = [f"{name}.negzero"] if entry.get("negzero") else []
    return {"dense": [name], "bitmask": [f"{name}.values", f"{name}.bitmask", *negzero],
            "nm": [f"{name}.values", f"{name}.indices", *negzero]}.get(entry.get("encoding"), [])


def decode(name: str, entry: dict[str, Any], get, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild tensor ``name`` from its layout ``entry``; ``get(key)`` returns a stored tensor.
    ``out`` (contiguous, the stored dtype and shape, e.g. the model's parameter) is written in
    place instead of allocating a new tensor."""
    encoding = entry.get("encoding")
    if encoding == "dense":
        return get(name) if out is None else out.copy_(get(name))
    shape = torch.Size(entry["shape"])
    values = get(f"{name}.values")
    dtype = values.dtype
    values = values.view(_INT_VIEW[values.element_size()])  # moved as integers, bit for bit
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1).view(values.dtype)  # [numel] the same memory, as integers
    flat.zero_()
    if encoding == "bitmask":
        mask = unpack_bits(get(f"{name}.bitmask"), shape.numel())
        flat.masked_scatter_(mask, values)
        _negzero(flat, name, entry, get)
        return out
    if encoding == "nm":
        N, M, bits = entry["n"], entry["m"], entry["index_bits"]
        G = shape.numel() // M
        packed = get(f"{name}.indices").reshape(-1)  # uint8, G * N indices of `bits` bits
        dst, src = flat.view(G, M), values.view(G, N)
        step = NM_CHUNK_GROUPS  # a multiple of 8: every chunk starts on a byte of `packed`
        for g0 in range(0, G, step):  # in chunks: int64 indices of a whole matrix would be 4x its bf16 size
            g1 = min(G, g0 + step)
            b0, b1 = g0 * N * bits // 8, -(-g1 * N * bits // 8)
            idx = unpack_small_indices(packed[b0:b1], (g1 - g0) * N, bits).view(g1 - g0, N)  # [g, N] uint8
            dst[g0:g1].scatter_(1, idx.long(), src[g0:g1])
        _negzero(flat, name, entry, get)
        return out
    raise CompressedFormatError(f"tensor {name!r} has unknown encoding {encoding!r}; choose one of: "
                                "dense, bitmask, nm (is this checkpoint from a newer llmprune?)")


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise CompressedFormatError(f"{str(path.parent)!r} has no config.json; give a checkpoint folder")
    try:
        return read_json(path)
    except CheckpointFileError as e:
        raise CompressedFormatError(str(e)) from None


def layout_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """The compressed layout block of a parsed config.json, or None for a dense checkpoint."""
    meta = config.get("llmprune")
    return meta.get(LAYOUT_KEY) if isinstance(meta, dict) else None


def is_compressed(folder: str | Path) -> bool:
    """Whether ``folder`` holds a compressed llmprune checkpoint."""
    try:
        return layout_of(read_config(folder)) is not None
    except CompressedFormatError:
        return False


class _Reader:
    """Reads tensors of one safetensors file with plain reads, not a memory map: the file's pages
    do not stay in the process's resident set, so loading holds the model plus one tensor's bytes."""

    _DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
               "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
               "BOOL": torch.bool}

    def __init__(self, path: Path) -> None:
        self.base, self.header = read_header(path)  # checked against the file: damage is named before any read
        self.header.pop("__metadata__", None)
        self.file = open(path, "rb")  # noqa: SIM115 (closed by close())

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.header[key]
        dtype = self._DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if out is None:
            out = torch.empty(info["shape"], dtype=dtype)
        if out.numel() == 0:
            return out
        self.file.seek(self.base + start)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        if self.file.readinto(view) != end - start:
            raise CompressedFormatError(f"{self.file.name}: tensor {key!r} is truncated; the file is incomplete")
        return out

    def close(self) -> None:
        self.file.close()


def iter_decoded(folder: str | Path, layout: dict[str, Any] | None = None,
                 into: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, dense tensor)`` one tensor at a time from a compressed folder, in file order:
    only one decoded tensor exists at a time unless the caller keeps them. A tensor named in
    ``into`` with the stored dtype and shape is decoded straight into it (and yielded)."""
    folder = Path(folder)
    layout = layout if layout is not None else layout_of(read_config(folder))
    if layout is None:
        raise CompressedFormatError(f"{str(folder)!r} is not a compressed llmprune checkpoint (config.json has no "
                                    f"llmprune.{LAYOUT_KEY} block); load it with llmprune.load or transformers")
    if layout.get("format") != LAYOUT_FORMAT or int(layout.get("version", 0)) > LAYOUT_VERSION:
        raise CompressedFormatError(
            f"{str(folder)!r} uses layout {layout.get('format')!r} version {layout.get('version')!r}; this llmprune "
            f"reads {LAYOUT_FORMAT!r} up to version {LAYOUT_VERSION}: upgrade llmprune")
    by_file: dict[str, list[str]] = {}
    for name, entry in layout["tensors"].items():
        by_file.setdefault(entry["file"], []).append(name)
    for file, names in by_file.items():
        path = folder / file
        if not path.is_file():
            raise CompressedFormatError(f"{str(folder)!r} lacks {file}, named in its config.json; the checkpoint is "
                                        "incomplete: copy or download it again")
        f = _Reader(path)
        try:
            for name in names:
                entry = layout["tensors"][name]
                target = (into or {}).get(name)
                if target is not None and not (target.is_contiguous() and list(target.shape) == entry["shape"]
                                               and str(target.dtype).removeprefix("torch.") == entry["dtype"]):
                    target = None
                if target is not None and entry["encoding"] == "dense":
                    yield name, f.get(name, out=target)  # read straight into the parameter
                else:
                    yield name, decode(name, entry, f.get, out=target)
        finally:
            f.close()
