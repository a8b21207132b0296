"""Pruning a checkpoint larger than memory: the decoder layers streamed from the safetensors shards.

:func:`prune_streaming` builds the model as a skeleton without weights (every parameter on the meta
device), tokenizes the calibration data and lets the tokenizer go (it is read again for the output),
and hands the engine a :class:`ShardStream` residency:

- ``bring_back(model, chunks)`` before each capture of the first layer's inputs: what lies outside the
  decoder layers (final norm, position tables) is read from the shards, the input embedding only in
  the rows of the calibration's tokens; ``set_aside`` drops them again once the capture is done.
  An untied head, which no capture reaches, stays on the meta device. The embedding and the head are
  never held whole: ``write_model`` copies what lies outside the layers to the output block by block;
- ``acquire(i, layer)`` (and ``fetch`` for an observe-only pass such as OWL's): layer ``i``'s tensors
  are read from the input shards with plain reads (a memory map would keep every page read resident),
  cast to the storage dtype as ``from_pretrained`` does;
- ``release(i, layer)``: the pruned layer is written to its own output shard at once and its
  parameters go back to the meta device and the heap is trimmed (``observed`` drops an observed
  layer's without writing).

Peak memory is about two layers (the one pruned and, while it is written, its copy in the shard
buffer), one chunk's activations and one layer's statistics, whatever the depth and the vocabulary:
when the chunks are replayed, the hidden states live in a file mapping whose pages leave the
resident set chunk by chunk (:mod:`llmprune.engine.passes`). The
output holds one shard per decoder layer and one for the rest, with a ``model.safetensors.index.json``,
and the same tensors, bit for bit, as the in-memory path writes at the same thread count
(``tests/test_stream.py``).

Checkpoints whose layout ``transformers`` converts on load (fused MoE experts stored per expert, as
Mixtral's in transformers 5) are refused: their layers cannot be read one tensor at a time as stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, PruneConfig
from .models import ModelLoadError, embedded_model_path, resolve_dtype
from .offload import _libc

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# what a Hub snapshot needs for streaming: the shards, config/index/tokenizer JSON, tokenizer models
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken"]
# Called with no arguments when a streamed run starts. The library registers none; the CLI, which owns its
# process, registers its heap setting for streaming (small allocations only on the heap: see cli._tune_heap).
STREAM_HOOKS: list = []
FIT_FRACTION = 0.7  # in-memory pruning when the weights take at most this share of the memory available
ROW_BLOCK_BYTES = 8 << 20  # ShardIndex.get_rows reads at most this much at a time


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class StreamingError(ConfigError):
    """The checkpoint or the config cannot be pruned by streaming; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The input checkpoint
# ---------------------------------------------------------------------------------------------
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

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: all say the same to the user
        raise ModelLoadError(f"could not download {model!r} from the Hub ({type(e).__name__}: {e}); check the id, "
                             "or pass a local folder") from e


class ShardIndex:
    """Where each tensor of a safetensors checkpoint lies: ``model.safetensors`` or an index of shards."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX_FILE).is_file():
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        elif (folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(folder / SINGLE_FILE, "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise StreamingError(f"{str(folder)!r} has no {SINGLE_FILE} nor {INDEX_FILE}; streaming reads "
                                 "safetensors checkpoints only (run without --low-memory)")
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, tuple[int, dict]] = {}

    def _header(self, shard: str) -> tuple[int, dict]:
        """``(offset of the data, header)`` of a shard file, read once."""
        if shard not in self._headers:
            with open(self.folder / shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[shard] = (8 + n, json.loads(f.read(n)))
        return self._headers[shard]

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
            with open(self.folder / shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                stored = v["data_offsets"][1] - v["data_offsets"][0]
                floating = v["dtype"] in ("F64", "F32", "F16", "BF16")
                total += math.prod(v["shape"]) * dtype.itemsize if dtype is not None and floating else stored
        return total

    def close(self) -> None:
        self._headers.clear()


# ---------------------------------------------------------------------------------------------
# Memory: does the model fit?
# ---------------------------------------------------------------------------------------------
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


def should_stream(config: PruneConfig, folder: Path | None = None) -> bool:
    """``config.low_memory``, or when it is None, whether the weights exceed ``FIT_FRACTION`` of the
    memory available (logged). A Hub id is not downloaded to decide: its ``model.safetensors.index.json``
    total is read when it is cached, else the in-memory path is taken."""
    if config.low_memory is not None:
        return config.low_memory
    try:
        folder = folder or _local_folder(config.model)
        if folder is None:
            return False
        dtype = resolve_dtype(config.dtype)
        weights = ShardIndex(folder).nbytes(dtype if isinstance(dtype, torch.dtype) else None)
    except (StreamingError, ModelLoadError, OSError):
        return False  # the in-memory loader gives the error with its own message
    avail = available_memory()
    if weights > FIT_FRACTION * avail:
        log.info("the weights (%.2f GB) do not fit in the memory available (%.2f GB): streaming the decoder layers "
                 "from the shards (--low-memory); --no-low-memory forces the in-memory path", weights / 1e9,
                 avail / 1e9)
        return True
    return False


def _local_folder(model: str | None) -> Path | None:
    if model is None:
        return embedded_model_path()
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, INDEX_FILE)
        return Path(cached).parent if isinstance(cached, str) else None
    except Exception:  # not a valid repo id, or no cache
        return None


def check_streamable(config: PruneConfig) -> None:
    """What streaming cannot do, refused before any work with the fix."""
    bad = []
    if config.eval_settings is not None:
        bad.append("--eval (the pruned layers are on disk, not in memory): evaluate the output afterwards with "
                   "`llmprune eval OUTPUT`")
    if config.calib == "self":
        bad.append("--calib self (sampling text needs the whole model in memory): give a dataset or file")
    if getattr(config, "activation", None) is not None:
        bad.append("activation sparsity (its pass reads every layer again): run it on the pruned output")
    if config.method == "none":
        bad.append("--method none")
    if bad:
        raise ConfigError("streaming (--low-memory) does not support " + "; ".join(bad)
                          + "; or pass --no-low-memory to prune in memory")


# ---------------------------------------------------------------------------------------------
# The skeleton and the residency
# ---------------------------------------------------------------------------------------------
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


def build_skeleton(folder: Path, config: PruneConfig, read_rest: bool = True):
    """``(model, index)``: ``folder``'s causal LM with every decoder layer on the meta device and
    everything else read from the shards, in the dtype ``from_pretrained`` would give (``read_rest=False``:
    left on the meta device too, for a :class:`ShardStream` to read when a capture needs it)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .engine import find_decoder_layers

    index = ShardIndex(folder)
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
    dtype = resolve_dtype(config.dtype)
    if dtype == "auto":  # as from_pretrained: the config's dtype, else the first floating tensor's
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if not isinstance(dtype, torch.dtype):
            dtype = next((t for t in map(index.dtype_of, index.weight_map) if t.is_floating_point), torch.float32)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=config.trust_remote_code)
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    layers_name, layers = find_decoder_layers(model)
    inside = {id(t) for layer in layers for t in layer.state_dict(keep_vars=True).values()}
    first = {k for k, _ in _persistent_state(layers[0])}
    stored = {k[len(f"{layers_name}.0."):] for k in index.weight_map if k.startswith(f"{layers_name}.0.")}
    if first != stored:
        raise StreamingError(
            f"{type(model).__name__}'s decoder layers are stored in another layout than the model uses (e.g. "
            f"{sorted(stored - first)[:1] or sorted(first - stored)[:1]}): transformers converts them on load, "
            "so they cannot be streamed tensor by tensor; run without --low-memory"
        )
    missing = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in inside:
            continue
        if name in index.weight_map:
            if read_rest:
                value = index.get(name)
                _set_tensor(model, name, _as_loaded(value, dtype))
        elif t.device.type == "meta":
            missing.append(name)
    model.tie_weights()
    stored_rest = {id(t) for n, t in model.state_dict(keep_vars=True).items() if n in index.weight_map}
    missing = [n for n in missing if model.get_parameter_or_buffer(n).device.type == "meta"
               and id(model.get_parameter_or_buffer(n)) not in stored_rest]  # tied to a stored tensor: not missing
    if missing:
        raise ModelLoadError(f"{str(folder)!r} lacks {len(missing)} weight(s) outside the decoder layers (e.g. "
                             f"{missing[0]}); is it a causal language model checkpoint?")
    return model, index


class ShardStream:
    """Layer residency that keeps no layer's weights between layers: read from ``index`` when the engine
    reaches a layer, written to a shard of ``folder`` once it is pruned, then back to the meta device."""

    def __init__(self, index: ShardIndex, folder: str | Path, prefix: str, dtype: torch.dtype):
        self.index = index
        self.folder = Path(folder)  # created with the first layer written
        self.prefix = prefix  # "model.layers"
        self.dtype = dtype
        self._libc = _libc()
        self.shards: dict[str, list[str]] = {}  # shard file -> tensor names, in writing order
        self.bytes = 0
        self.aside: list[tuple[list[str], str, torch.dtype]] = []  # (names of one tensor, its shard name, dtype)
        self._compact = None  # the input embedding's rows read for a capture (bring_back), until set_aside
        self._compact_calls = 0  # lookups through those rows during the capture

    memory_first = True  # execution "auto" replays chunks instead of holding all of them (SequentialRun)

    def acquire(self, index: int, layer: nn.Module) -> None:
        for name, _ in list(_persistent_state(layer)):
            value = self.index.get(f"{self.prefix}.{index}.{name}")
            _set_tensor(layer, name, _as_loaded(value, self.dtype))

    fetch = acquire  # an observe-only pass reads the layer the same way

    def set_aside(self, model: nn.Module, layers: list[nn.Module]) -> None:
        """The tensors outside the layers (embeddings, final norm, head: 113 MB of the embedded model,
        2 GB of a Llama-3-8B) go back to the meta device, or stay there when the skeleton was built
        without them; :meth:`bring_back` reads them from the shards for a capture or the writing.
        Tensors not stored in the shards (computed buffers) stay."""
        if self._compact is not None:  # the capture's embedding rows: dropped, the tie restored
            group, emb, padding_idx, handle, shape = self._compact
            handle.remove()
            emb.padding_idx = padding_idx
            _set_tied(model, group, torch.empty(shape, dtype=emb.weight.dtype, device="meta"))
            self._compact = None
            if not self._compact_calls:  # the rows would have been looked up by their vocabulary ids
                raise StreamingError(f"{type(model).__name__} looks up its input embedding without calling it, "
                                     "which streaming cannot follow; run without --low-memory")
        inside = {id(t) for layer in layers for t in layer.state_dict(keep_vars=True).values()}
        aside = {stored for _, stored, _ in self.aside}
        names: dict[int, list[str]] = {}  # tied parameters: one tensor, several names
        tensors: dict[int, torch.Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) not in inside:
                names.setdefault(id(t), []).append(name)
                tensors[id(t)] = t
        for key, group in names.items():
            stored = next((n for n in group if n in self.index.weight_map), None)
            if stored is None or stored in aside:
                continue
            t = tensors[key]
            meta = t.device.type == "meta"  # as build_skeleton(read_rest=False) left it: cast as on loading
            self.aside.append((group, stored, self.dtype if meta and t.is_floating_point() else t.dtype))
            if not meta:
                _set_tied(model, group, torch.empty_like(t, device="meta"))
        del tensors
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def bring_back(self, model: nn.Module, chunks: list[torch.Tensor] | None = None) -> None:
        """The tensors :meth:`set_aside` took off, read again (the same values: cast as on loading).

        Given the calibration ``chunks`` (a capture, which stops at the last decoder layer), the head
        stays on the meta device and the input embedding is read in the rows of the tokens they hold
        only, its lookups mapped onto them by a forward pre-hook until :meth:`set_aside`: the capture's
        hidden states are the same, bit for bit (a lookup copies rows), in at most ``nsamples x seqlen``
        rows instead of the vocabulary (the embedded model: 49,152)."""
        inputs = model.get_input_embeddings() if chunks is not None else None
        head = model.get_output_embeddings() if chunks is not None else None
        # max_norm renormalises the rows it looks up in place: such an embedding is read whole
        emb = inputs if isinstance(inputs, nn.Embedding) and inputs.max_norm is None else None
        head_tensors = {id(t) for t in head.state_dict(keep_vars=True).values()} if head is not None else set()
        head_tensors -= {id(t) for t in inputs.state_dict(keep_vars=True).values()} if inputs is not None else set()
        kept = []
        for entry in self.aside:
            group, stored, dtype = entry
            if head_tensors and all(id(model.get_parameter_or_buffer(n)) in head_tensors for n in group):
                kept.append(entry)  # an untied head: no capture reaches it
                continue
            if emb is not None and any(model.get_parameter_or_buffer(n) is emb.weight for n in group):
                ids = torch.cat([c.reshape(-1) for c in chunks]).unique()  # sorted [u]
                if ids.numel() and 0 <= int(ids[0]) and int(ids[-1]) < emb.num_embeddings:
                    self._embed_rows(model, emb, group, stored, dtype, ids)
                    kept.append(entry)
                    continue
            value = self.index.get(stored)
            _set_tied(model, group, _as_loaded(value, dtype))
        self.aside = kept

    def _embed_rows(self, model: nn.Module, emb: nn.Embedding, group: list[str], stored: str, dtype: torch.dtype,
                    ids: torch.Tensor) -> None:
        """Input embedding ``emb`` holding only rows ``ids [u]`` (sorted), token ``ids[k]`` looked up at row k."""
        rows = self.index.get_rows(stored, ids.tolist())  # [u, H] as stored
        shape = tuple(emb.weight.shape)
        name = next(n for n in group if model.get_parameter_or_buffer(n) is emb.weight)
        _set_tensor(model, name, _as_loaded(rows, dtype))  # the tied head stays meta
        position = torch.full((emb.num_embeddings,), -1, dtype=torch.long)  # [vocab] -> row of ``rows``
        position[ids] = torch.arange(ids.numel())

        def lookup(module: nn.Module, args: tuple, kwargs: dict):
            self._compact_calls += 1
            if args:
                return (position.to(args[0].device)[args[0]], *args[1:]), kwargs
            return args, {**kwargs, "input": position.to(kwargs["input"].device)[kwargs["input"]]}

        padding_idx, emb.padding_idx = emb.padding_idx, None  # an index into the whole vocabulary; no gradients here
        self._compact_calls = 0
        self._compact = (group, emb, padding_idx, emb.register_forward_pre_hook(lookup, with_kwargs=True), shape)

    def _drop(self, layer: nn.Module) -> None:
        for name, t in list(_persistent_state(layer)):
            _set_tensor(layer, name, torch.empty_like(t, device="meta"))

    def observed(self, index: int, layer: nn.Module) -> None:
        self._drop(layer)

    def release(self, index: int, layer: nn.Module) -> None:
        from safetensors.torch import save_file

        state = {f"{self.prefix}.{index}.{k}": v.detach().contiguous() for k, v in layer.state_dict().items()}
        shard = f"layer-{index:06d}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(state, self.folder / f"{shard}.tmp", metadata={"format": "pt"})
        os.replace(self.folder / f"{shard}.tmp", self.folder / shard)  # a killed run leaves no partial shard
        self.shards[shard] = list(state)
        self.bytes += sum(v.numel() * v.element_size() for v in state.values())
        del state
        self._drop(layer)
        if self._libc is not None:  # the freed layer's heap pages back to the system: a flat peak over depth
            self._libc.malloc_trim(0)
        log.debug("layer %d written to %s (%.1f MB so far)", index, shard, self.bytes / 2**20)

    def write_model(self, model: nn.Module, folder: Path) -> None:
        """Into ``folder``: the layer shards moved in, the rest written as one more shard, the index,
        ``config.json`` and the generation config, as ``save_pretrained`` writes them. The tensors set
        aside are copied from the input shards block by block (cast as on loading), never held whole."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        from .engine import find_decoder_layers

        if self._compact is not None:
            raise RuntimeError("write_model during a capture")
        _, layers = find_decoder_layers(model)
        inside = {id(t) for layer in layers for t in layer.state_dict(keep_vars=True).values()}
        rest = {k: t.detach() for k, t in model.state_dict(keep_vars=True).items() if id(t) not in inside}
        for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
            rest.pop(key, None)
        rest = remove_tied_weights_from_state_dict(rest, model)  # meta tensors: told apart by their parameter
        source = {n: (stored, dtype) for group, stored, dtype in self.aside for n in group}
        files = [("rest", list(rest))] + list(self.shards.items())
        n = len(files)
        weight_map, total = {}, self.bytes
        for k, (src, names) in enumerate(files, 1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            if src == "rest":
                total += self._write_rest(folder / name, rest, source)
            else:  # linked, not moved: the progress folder stays whole until the output is complete
                try:
                    os.link(self.folder / src, folder / name)
                except OSError:  # another filesystem, or no hard links
                    shutil.copyfile(self.folder / src, folder / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_parameters": model.num_parameters(), "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)

    def _write_rest(self, path: Path, tensors: dict[str, torch.Tensor],
                    source: dict[str, tuple[str, torch.dtype]]) -> int:
        """A safetensors file of ``tensors``; those on the meta device are read from the input shard named
        by ``source`` (``name -> (stored name, dtype)``) in blocks of rows. Returns the bytes of data."""
        codes = {v: k for k, v in _DTYPES.items()}
        plan, offset = [], 0
        for name in sorted(tensors):
            t = tensors[name]
            if t.device.type == "meta":
                stored, dtype = source[name]
                as_stored = self.index.dtype_of(stored)
                dtype = dtype if as_stored.is_floating_point else as_stored  # as _as_loaded will give it
            else:
                stored, dtype = None, t.dtype
            nbytes = t.numel() * dtype.itemsize
            plan.append((name, t, stored, dtype, offset, offset + nbytes))
            offset += nbytes
        header = {"__metadata__": {"format": "pt"}}
        header.update({name: {"dtype": codes[dtype], "shape": list(t.shape), "data_offsets": [b, e]}
                       for name, t, _, dtype, b, e in plan})
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(path, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for name, t, stored, dtype, b, e in plan:
                parts = self.index.row_blocks(stored) if stored is not None else [t]
                for part in parts:
                    part = _as_loaded(part, dtype)
                    f.write(memoryview(part.contiguous().reshape(-1).view(torch.uint8).numpy()))
                if f.tell() != len(head) + 8 + e:
                    raise StreamingError(f"{name}: {f.tell() - len(head) - 8 - b} bytes written, {e - b} expected")
        return offset


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def prune_streaming(config: PruneConfig, output: str | Path, overwrite: bool = False, progress: bool = True,
                    resume: bool = False, folder: Path | None = None):
    """Prune ``config.model`` into ``output`` with the decoder layers streamed from its shards; the
    same checkpoint as :func:`llmprune.prune_checkpoint` in memory. The layer shards are written into
    the run's progress folder (:mod:`llmprune.resume`), from which ``resume`` continues an interrupted
    run. Returns the :class:`PruneReport`."""
    import time

    from transformers import AutoTokenizer

    import gc

    from .api import calibration_tokens, needs_calibration, prune
    from .engine import find_decoder_layers
    from .resume import Progress, check_partial
    from .saving import REPORT_FILE, check_output, save_pruned

    check_streamable(config)
    check_output(output, overwrite)
    staging = check_partial(output, resume, overwrite)
    for hook in STREAM_HOOKS:
        hook()
    t0 = time.perf_counter()
    folder = folder or resolve_folder(config.model, config.trust_remote_code)
    model, index = build_skeleton(folder, config, read_rest=False)  # the embeddings are read by the capture
    layers_name, layers = find_decoder_layers(model)
    stream = ShardStream(index, staging, layers_name, model.dtype)
    stream.set_aside(model, layers)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
    t_load = time.perf_counter() - t0
    ids = calib = None
    if needs_calibration(config):  # the tokens first: the tokenizer is not held while the layers are pruned
        ids, calib = calibration_tokens(config, model, tokenizer)
        tokenizer = None
        gc.collect()
        if stream._libc is not None:
            stream._libc.malloc_trim(0)
    t_calib = time.perf_counter() - t0 - t_load
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tracker = None
    try:
        tracker = Progress(stream, staging, config, folder, resume)
        log.info("streaming %s: decoder layers read from %d shard(s) when reached, written to %s once pruned",
                 config.model or "the embedded model", len(set(index.weight_map.values())), staging)
        report = prune(model, tokenizer, config, calibration=ids, progress=progress, residency=tracker)
        if calib is not None:  # described as read from its source, not as the tokens handed over
            report.calibration = calib
            report.seconds["calibration"] += t_calib
        if config.model is None:
            report.model = f"embedded:{folder}"
        t1 = time.perf_counter()
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
        save_pruned(model, tokenizer, output, report, overwrite=overwrite,
                    write_model=lambda tmp: stream.write_model(model, tmp))
        tracker.discard()  # the layer shards live on in the output (hard links)
    except BaseException:
        if tracker is not None:
            tracker.failed()
        raise
    finally:
        index.close()
    report.seconds = {"load": t_load, **report.seconds, "save": time.perf_counter() - t1,
                      "total": time.perf_counter() - t0}
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
