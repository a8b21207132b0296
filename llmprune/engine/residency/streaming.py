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

Under several processes (:mod:`.distributed`) every rank streams each layer from the shards and prunes
it; only rank 0 (``writer``) writes the layer shards and the output, the others drop each layer once pruned.

Checkpoints whose layout ``transformers`` converts on load (fused MoE experts stored per expert, as
Mixtral's in transformers 5) are refused: their layers cannot be read one tensor at a time as stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...loading.integrity import check_json, check_shapes
from ...loading.models import ModelLoadError, resolve_dtype
from ...loading.shards import (_DTYPES, INDEX_FILE, ShardIndex, StreamingError, _as_loaded, _persistent_state, _set_tensor,
                               _set_tied)
from ...runtime.files import save_tensors_atomic
from ...runtime.memory import _libc
from ..targets import find_decoder_layers

if TYPE_CHECKING:
    from ...config import PruneConfig

log = logging.getLogger(__name__)


def build_skeleton(folder: Path, config: PruneConfig, read_rest: bool = True):
    """``(model, index)``: ``folder``'s causal LM with every decoder layer on the meta device and
    everything else read from the shards, in the dtype ``from_pretrained`` would give (``read_rest=False``:
    left on the meta device too, for a :class:`ShardStream` to read when a capture needs it)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    check_json(folder)
    index = ShardIndex(folder)  # every header checked against its file, the index against the shards
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
    check_shapes(model, index.shapes(), folder / "config.json")
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
    reaches a layer, written to a shard of ``folder`` once it is pruned, then back to the meta device. Not a
    ``writer`` (a rank other than 0 of several processes): the pruned layer is dropped without writing."""

    def __init__(self, index: ShardIndex, folder: str | Path, prefix: str, dtype: torch.dtype, writer: bool = True):
        self.index = index
        self.writer = writer
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
        if not self.writer:  # rank 0 writes the same pruned layer
            self.observed(index, layer)
            if self._libc is not None:
                self._libc.malloc_trim(0)
            return
        state = {f"{self.prefix}.{index}.{k}": v.detach().contiguous() for k, v in layer.state_dict().items()}
        shard = f"layer-{index:06d}.safetensors"
        save_tensors_atomic(self.folder / shard, state)  # a killed run leaves no partial shard
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
