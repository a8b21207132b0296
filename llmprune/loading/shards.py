"""A safetensors checkpoint read tensor by tensor, without loading the model: where each tensor lies
(``model.safetensors`` or an index of shards), its header, rows or blocks of rows, and the helpers that
set a read tensor into a module the way ``from_pretrained`` would. Used by streaming
(:mod:`llmprune.engine.residency.streaming`) and by the pipeline's decision to stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .integrity import (AGAIN, CheckpointFileError, check_json, check_shapes, empty_model, no_weights, read_header,
                        read_json)
from ..runtime.hub import hub_offline
from .models import ModelLoadError, embedded_model_path, hub_id_offline

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# what a Hub snapshot needs for streaming: the shards, config/index/tokenizer JSON, tokenizer models
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken"]
ROW_BLOCK_BYTES = 8 << 20  # ShardIndex.get_rows reads at most this much at a time


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class StreamingError(ConfigError):
    """The checkpoint or the config cannot be pruned by streaming; the message says why and what to do."""



def resolve_folder(model: str | None, trust_remote_code: bool = False) -> Path:
    """The local folder of ``model``: the embedded default's cached folder, a local folder, or a Hub
    snapshot of only the shards, JSON files and tokenizer files (downloaded, not loaded)."""
    if model is None:
        return embedded_model_path()
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"folder {model!r} has no config.json; is it a Hugging Face checkpoint folder?")
        return local
    if local.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {model!r} is not a folder; give a Hub id or a folder with config.json")
    from huggingface_hub import snapshot_download

    offline = hub_id_offline(model)  # no network: the cached snapshot, or an error at once
    try:
        with hub_offline(offline):
            return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as e:  # network, auth, unknown repo: all say the same to the user
        raise ModelLoadError(f"could not download {model!r} from the Hub ({type(e).__name__}: {e}); check the id, "
                             "or pass a local folder") from e


class ShardIndex:
    """Where each tensor of a safetensors checkpoint lies: ``model.safetensors`` or an index of shards. Every
    shard's header is read and checked against its file when it is built (:func:`~.integrity.read_header`),
    and the index against the shards: a damaged or incomplete checkpoint is a :class:`CheckpointFileError`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._headers: dict[str, tuple[int, dict]] = {}
        if (folder / INDEX_FILE).is_file():
            weight_map = self._index(folder / INDEX_FILE)
        elif (folder / SINGLE_FILE).is_file():
            weight_map = {k: SINGLE_FILE for k in sorted(self._header(SINGLE_FILE)[1]) if k != "__metadata__"}
        else:
            error = no_weights(folder)
            raise error if error is not None else StreamingError(
                f"{str(folder)!r} has no {SINGLE_FILE} nor {INDEX_FILE}; streaming reads safetensors checkpoints "
                "only (run without --low-memory)")
        self.weight_map: dict[str, str] = weight_map

    def _index(self, path: Path) -> dict[str, str]:
        """The index's ``weight_map``, every shard it names present and whole, holding the tensors named."""
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFileError(f"{str(path)!r} has no weight_map of tensor names to shard files: the file is "
                                      f"damaged; {AGAIN}")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in sorted(by_shard.items()):
            if not (self.folder / shard).is_file():
                raise CheckpointFileError(f"{str(path)!r} names the shard {shard}, which is not in "
                                          f"{str(self.folder)!r}: the checkpoint is incomplete; copy or download "
                                          f"{shard} into it")
            header = self._header(shard)[1]
            absent = [name for name in names if name not in header]
            if absent:
                raise CheckpointFileError(f"{str(path)!r} places tensor {absent[0]!r} in {shard}, whose header does "
                                          f"not hold it: the index and the shards do not belong together; {AGAIN}")
        return weight_map

    def _header(self, shard: str) -> tuple[int, dict]:
        """``(offset of the data, header)`` of a shard file, read and checked once."""
        if shard not in self._headers:
            self._headers[shard] = read_header(self.folder / shard)
        return self._headers[shard]

    def shapes(self) -> dict[str, tuple[list[int], str]]:
        """``name -> (shape as stored, shard file)`` of every tensor, from the headers."""
        return {name: (self._header(shard)[1][name]["shape"], shard) for name, shard in self.weight_map.items()}

    def _read(self, name: str, first: int | None = None, last: int | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[first, last)`` of tensor ``name`` (the whole tensor when not given), as stored, into
        ``out`` (a fresh tensor when None), with plain reads: a memory map would keep the pages read
        resident in this process (its peak memory would grow by a layer per layer), the page cache does
        not count."""
        import math

        shard = self.weight_map[name]
        start, header = self._header(shard)
        meta = header[name]
        shape = meta["shape"]
        if first is not None:
            shape = [last - first, *shape[1:]]
            start += first * math.prod(shape[1:]) * _DTYPES[meta["dtype"]].itemsize
        if out is None:
            out = torch.empty(shape, dtype=_DTYPES[meta["dtype"]])  # [as stored]
        with open(self.folder / shard, "rb") as f:
            f.seek(start + meta["data_offsets"][0])
            n = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        if n != out.numel() * out.element_size():
            raise StreamingError(f"{shard} ends inside tensor {name!r}: the file is truncated; download or copy it "
                                 "again")
        return out

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``: a fresh CPU tensor, as stored (see :meth:`_read`)."""
        return self._read(name)

    def dtype_of(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``, from its shard's header (nothing read)."""
        return _DTYPES[self._header(self.weight_map[name])[1][name]["dtype"]]

    def _block_rows(self, name: str) -> int:
        """How many rows of tensor ``name`` fit in ``ROW_BLOCK_BYTES`` (at least one, at most all)."""
        import math

        shape = self._header(self.weight_map[name])[1][name]["shape"]
        row_bytes = math.prod(shape[1:]) * self.dtype_of(name).itemsize
        return max(1, min(shape[0], ROW_BLOCK_BYTES // max(row_bytes, 1)))

    def row_blocks(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as stored, in consecutive blocks of rows of at most ``ROW_BLOCK_BYTES``."""
        shape = self._header(self.weight_map[name])[1][name]["shape"]
        if not shape:
            yield self.get(name)
            return
        block = self._block_rows(name)
        for r0 in range(0, shape[0], block):
            yield self._read(name, r0, min(r0 + block, shape[0]))

    def get_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct) of tensor ``name`` ``[R, ...]``, as stored, read in blocks of at
        most ``ROW_BLOCK_BYTES`` from the first row still wanted: ``[len(rows), ...]``."""
        import bisect

        shape = self._header(self.weight_map[name])[1][name]["shape"]
        block = self._block_rows(name)
        out = torch.empty((len(rows), *shape[1:]), dtype=self.dtype_of(name))  # [len(rows), ...]
        buf = torch.empty((block, *shape[1:]), dtype=out.dtype)  # [block, ...]
        k = 0
        while k < len(rows):
            first = rows[k]
            last = min(first + block, shape[0])
            j = bisect.bisect_left(rows, last, k)
            part = self._read(name, first, last, buf[: last - first])
            out[k:j] = part[torch.tensor(rows[k:j]) - first]
            k = j
        return out

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of all tensors, from the shard headers (nothing read); floating tensors counted in ``dtype``
        when given (the storage dtype they will be loaded in)."""
        import math

        total = 0
        for shard in sorted(set(self.weight_map.values())):
            for k, v in self._header(shard)[1].items():
                if k == "__metadata__":
                    continue
                stored = v["data_offsets"][1] - v["data_offsets"][0]
                floating = v["dtype"] in ("F64", "F32", "F16", "BF16")
                total += math.prod(v["shape"]) * dtype.itemsize if dtype is not None and floating else stored
        return total

    def close(self) -> None:
        self._headers.clear()


def check_checkpoint(folder: Path, trust_remote_code: bool = False) -> None:
    """A local dense checkpoint folder, whole and consistent, before anything loads it: its JSON files, every
    safetensors header against its file, the index against its shards, the stored shapes against the model
    ``config.json`` builds. A folder whose weights are not safetensors (``.bin``) is left to the loader."""
    check_json(folder)
    if not (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).is_file():
        error = no_weights(folder)
        if error is not None:
            raise error
        return
    index = ShardIndex(folder)
    check_shapes(empty_model(folder, trust_remote_code), index.shapes(), folder / "config.json")


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Point parameter or buffer ``name`` of ``root`` at ``value`` (a parameter stays a parameter)."""
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        mod._buffers[attr] = value


def _as_loaded(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor as ``from_pretrained`` loads it in ``dtype``: floating tensors cast, others as stored."""
    return value.to(dtype) if value.is_floating_point() else value


def _set_tied(root: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Point every one of ``names`` (one tensor, tied) at ``value``: one Parameter object for all of them."""
    def slot(name: str) -> tuple[dict, str]:
        mod_name, _, attr = name.rpartition(".")
        mod = root.get_submodule(mod_name) if mod_name else root
        return (mod._parameters if attr in mod._parameters else mod._buffers), attr

    _set_tensor(root, names[0], value)
    table, attr = slot(names[0])
    for name in names[1:]:
        other, other_attr = slot(name)
        other[other_attr] = table[attr]


def _persistent_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of ``module`` (what ``state_dict`` holds), by name, shared ones once."""
    seen = set()
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t
