"""The teacher of distillation: a model in memory beside the student, or its outputs precomputed once to disk
and streamed (offline distillation), so that a machine that holds one model can distil.

Both are called the same way, ``teacher(input_ids) -> TeacherOutput`` (:mod:`.distill`), and give the same
loss on the same batch when they keep the same ``top_k``.

The offline folder (:func:`precompute_teacher`) holds one safetensors shard per batch,
``batch-<i>.safetensors`` with ``input_ids [B, L]``, ``topk_values [B, L, k]``, ``topk_ids [B, L, k]`` and,
for SquareHead, ``hidden.<p> [B, L, H]`` (the output of teacher layer ``layers[p]``), each written to a
temporary name and renamed into place; ``manifest.json`` (written last, also atomically) records the
settings and an index from each row's token hash to its shard and row. Rows are found by their tokens, not
their position, so a ``Trainer`` that shuffles and re-batches them reads the right rows. An interrupted
precompute keeps its finished shards and goes on from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..engine.targets import find_decoder_layers, unwrap_model
from ..runtime.files import save_tensors_atomic, write_json_atomic
from .distill import LayerOutputs, TeacherOutput

log = logging.getLogger(__name__)

__all__ = ["InMemoryTeacher", "OfflineTeacher", "TeacherError", "precompute_teacher", "row_key", "teacher_layers"]

MANIFEST = "manifest.json"
FORMAT = 1
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherError(ValueError):
    """An offline teacher folder that does not hold what is asked of it; the message says what and the fix."""


def row_key(row: torch.Tensor) -> str:
    """The key of one row of token ids (its int64 bytes' sha256, 16 hex digits)."""
    return hashlib.sha256(row.to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


class InMemoryTeacher:
    """A teacher model beside the student. ``layers``: the teacher layer indices whose outputs SquareHead
    compares (:func:`~.distill.layer_map`), None for none; ``top_k``: keep only the ``k`` largest logits (as an
    offline teacher does), None for the full logits. Runs under ``torch.no_grad`` in eval mode, on the
    teacher's own device; outputs are moved to ``device`` when given."""

    def __init__(self, model: nn.Module, top_k: int | None = None, layers: Sequence[int] | None = None):
        self.model = model
        self.top_k = top_k
        self.layers = list(layers) if layers is not None else None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 device: torch.device | None = None) -> TeacherOutput:
        model = self.model
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        capture = LayerOutputs(model, self.layers) if self.layers is not None else None
        try:
            if capture is not None:
                with capture.recording() as hidden:
                    logits = model(input_ids=input_ids.to(dev), attention_mask=_to(attention_mask, dev),
                                   use_cache=False).logits  # [B, L, V]
            else:
                hidden = None
                logits = model(input_ids=input_ids.to(dev), attention_mask=_to(attention_mask, dev),
                               use_cache=False).logits  # [B, L, V]
        finally:
            if capture is not None:
                capture.remove()
            model.train(was_training)
        out = TeacherOutput(hidden=[_to(h, device) for h in hidden] if hidden is not None else None)
        if self.top_k is not None:
            values, ids = logits.float().topk(self.top_k, dim=-1)  # [B, L, k] each, sorted
            out.topk_values, out.topk_ids = _to(values, device), _to(ids, device)
        else:
            out.logits = _to(logits, device)
        return out


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return t if t is None or device is None else t.to(device)


@torch.no_grad()
def precompute_teacher(model: nn.Module, batches: Iterable[torch.Tensor], folder: str | Path, top_k: int = 64,
                       layers: Sequence[int] | None = None, dtype: str = "float32", teacher_name: str | None = None,
                       progress: bool = False) -> OfflineTeacher:
    """Run the teacher once over ``batches`` (each ``[B, L]`` token ids) and store its top-k logits and, with
    ``layers``, the outputs of those decoder layers in ``folder`` (see the module docstring); returns the
    :class:`OfflineTeacher` reading it. Values are stored in ``dtype`` (float32 keeps the loss equal to the
    in-memory teacher's; bfloat16 halves the disk). A folder that already holds a finished precompute of the
    same batches and settings is reused as it is; an interrupted one is continued from its shards."""
    from tqdm.auto import tqdm

    if dtype not in STORE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} for the offline teacher; choose one of: {', '.join(STORE_DTYPES)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    batches = [b if b.dim() == 2 else b.unsqueeze(0) for b in batches]
    folder = Path(folder).expanduser()
    settings = {"format": FORMAT, "top_k": int(top_k), "layers": list(layers) if layers is not None else None,
                "dtype": dtype, "batches": len(batches),
                "batches_sha256": hashlib.sha256(b"".join(row_key(r).encode() for b in batches for r in b)
                                                 ).hexdigest()[:16]}
    manifest = folder / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if {k: old.get(k) for k in settings} == settings:
            log.info("offline teacher %s already holds these %d batches: reused", folder, len(batches))
            return OfflineTeacher(folder)
        raise TeacherError(f"offline teacher folder {str(folder)!r} holds another precompute ({_differs(old, settings)}); "
                           "give another folder, or remove it to compute again")
    folder.mkdir(parents=True, exist_ok=True)
    store = STORE_DTYPES[dtype]
    index: dict[str, list] = {}
    inner = LayerOutputs(model, layers) if layers is not None else None
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    bar = tqdm(total=len(batches), desc="teacher", unit="batch", disable=not progress)
    try:
        for i, ids in enumerate(batches):
            name = f"batch-{i:06d}.safetensors"
            path = folder / name
            if not (path.is_file() and _shard_matches(path, ids)):  # a shard of an interrupted run is kept
                if inner is not None:
                    with inner.recording() as hidden:
                        logits = model(input_ids=ids.to(dev), use_cache=False).logits  # [B, L, V]
                else:
                    hidden, logits = [], model(input_ids=ids.to(dev), use_cache=False).logits  # [B, L, V]
                values, top = logits.float().topk(top_k, dim=-1)  # [B, L, k] each, sorted
                tensors = {"input_ids": ids.long(), "topk_values": values.to(store), "topk_ids": top.long()}
                tensors.update({f"hidden.{p}": h.to(store) for p, h in enumerate(hidden)})
                save_tensors_atomic(path, tensors)
                del logits, values, top, hidden
            for r, row in enumerate(ids):
                index.setdefault(row_key(row), [name, r])
            bar.update(1)
    finally:
        bar.close()
        if inner is not None:
            inner.remove()
        model.train(was_training)
    write_json_atomic(manifest, {**settings, "teacher": teacher_name, "index": index})
    log.info("offline teacher: %d batches written to %s", len(batches), folder)
    return OfflineTeacher(folder)


def _shard_matches(path: Path, ids: torch.Tensor) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            return torch.equal(f.get_tensor("input_ids"), ids.to("cpu", torch.long))
    except Exception:  # a damaged shard (a kill mid-write cannot leave one, a full disk could): computed again
        return False


def _differs(old: dict, new: dict) -> str:
    return "; ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in new.items() if old.get(k) != v)


class OfflineTeacher:
    """Reads a folder written by :func:`precompute_teacher`: ``teacher(input_ids)`` assembles each row's
    stored top-k logits and layer outputs, found by the row's tokens. Only the shards a batch needs are
    opened (memory-mapped by safetensors); nothing of the teacher model is in memory."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        path = self.folder / MANIFEST
        if not path.is_file():
            raise TeacherError(f"{str(self.folder)!r} holds no finished offline teacher ({MANIFEST} is missing); "
                               "compute it with precompute_teacher (llmprune recover --offline-teacher DIR does)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise TeacherError(f"offline teacher {str(self.folder)!r} has format {self.manifest.get('format')}, this "
                               f"llmprune reads {FORMAT}; compute it again")
        self.top_k: int = self.manifest["top_k"]
        self.layers: list[int] | None = self.manifest["layers"]
        self._index: dict[str, list] = self.manifest["index"]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 device: torch.device | None = None) -> TeacherOutput:
        keys = [row_key(r) for r in input_ids]
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise TeacherError(f"{len(missing)} of the batch's {len(keys)} rows are not in the offline teacher "
                               f"{str(self.folder)!r}: it was computed for other data; compute it for these windows")
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for b, k in enumerate(keys):
            shard, row = self._index[k]
            by_shard.setdefault(shard, []).append((b, row))
        names = ["topk_values", "topk_ids"] + [f"hidden.{p}" for p in range(len(self.layers or ()))]
        out: dict[str, list[torch.Tensor | None]] = {n: [None] * len(keys) for n in names}
        for shard, rows in by_shard.items():
            with safe_open(str(self.folder / shard), "pt") as f:
                for n in names:
                    t = f.get_tensor(n)  # [B, L, ...]
                    for b, r in rows:
                        out[n][b] = t[r]
        stacked = {n: _to(torch.stack(v), device) for n, v in out.items()}  # [B, L, ...]
        return TeacherOutput(topk_values=stacked["topk_values"].float(), topk_ids=stacked["topk_ids"],
                             hidden=[stacked[f"hidden.{p}"] for p in range(len(self.layers))]
                             if self.layers else None)

    def __repr__(self) -> str:
        return (f"OfflineTeacher({str(self.folder)!r}, {self.manifest['batches']} batches, top_k={self.top_k}, "
                f"layers={'none' if self.layers is None else len(self.layers)})")


def teacher_layers(teacher: nn.Module) -> int:
    """The number of decoder layers of ``teacher``."""
    return len(find_decoder_layers(unwrap_model(teacher))[1])
