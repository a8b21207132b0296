"""Converting checkpoints between the dense and the compressed sparse format (:mod:`.format`):
``compress_in_place`` for a folder being written, ``compress`` and ``decompress`` for finished ones."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..loading.integrity import check_json, check_shapes, empty_model, read_header
from ..loading.shards import check_checkpoint
from ..steps.eora import retarget_adapter
from .card import write_card
from .folder import staged
from .format import (COMPRESSED_WEIGHTS, DENSE_INDEX, DENSE_WEIGHTS, LAYOUT_FORMAT, LAYOUT_KEY, LAYOUT_VERSION,
                     COMPRESSED_MODEL_TYPE, CompressedFormatError, encode, is_compressed, iter_decoded, layout_of,
                     parse_pattern, read_config, stored_keys)

log = logging.getLogger(__name__)


def _dense_shards(folder: Path) -> list[Path]:
    shards = sorted(p for p in folder.iterdir() if DENSE_WEIGHTS.match(p.name))
    if not shards:
        bins = [p.name for p in folder.glob("*.bin")]
        hint = (f" (it has {', '.join(bins)}; load and re-save it with save_pretrained(safe_serialization=True) "
                "first)") if bins else "; copy its weight files into it, or give the folder that holds them"
        raise CompressedFormatError(f"{str(folder)!r} has no model*.safetensors weights to compress{hint}")
    return shards


def _compressed_name(shard: Path, count: int) -> str:
    m = re.search(r"-(\d{5})-of-(\d{5})", shard.name)
    return COMPRESSED_WEIGHTS if count == 1 or not m else f"model.compressed-{m.group(1)}-of-{m.group(2)}.safetensors"


def compress_in_place(folder: str | Path, pattern: str | None = None) -> dict[str, Any]:
    """Replace the dense safetensors weights in ``folder`` by the compressed layout and rewrite
    ``config.json``; returns the layout block. Meant for a folder being written (``save_pruned``'s
    temporary folder, :func:`compress`'s); use :func:`compress` on a finished checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    config = read_config(folder)
    if layout_of(config) is not None:
        raise CompressedFormatError(f"{str(folder)!r} is already compressed")
    meta = config.get("llmprune") if isinstance(config.get("llmprune"), dict) else {}
    nm = parse_pattern(pattern if pattern is not None else meta.get("pattern"))
    shards = _dense_shards(folder)
    tensors: dict[str, dict[str, Any]] = {}
    files: list[str] = []
    dense_bytes = stored_bytes = 0
    for shard in shards:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                W = f.get_tensor(name)
                enc = encode(name, W, nm)
                out.update(enc.tensors)
                tensors[name] = {**enc.entry, "file": _compressed_name(shard, len(shards))}
                dense_bytes += W.numel() * W.element_size()
                stored_bytes += sum(t.numel() * t.element_size() for t in enc.tensors.values())
        name = _compressed_name(shard, len(shards))
        save_file({k: v.contiguous() for k, v in out.items()}, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        del out
    for shard in shards:
        shard.unlink()
    (folder / DENSE_INDEX).unlink(missing_ok=True)
    counts: dict[str, int] = {}
    for entry in tensors.values():
        counts[entry["encoding"]] = counts.get(entry["encoding"], 0) + 1
    layout = {
        "format": LAYOUT_FORMAT,
        "version": LAYOUT_VERSION,
        "model_type": config.get("model_type"),
        "files": files,
        "encodings": counts,
        "dense_bytes": dense_bytes,
        "stored_bytes": stored_bytes,
        "tensors": tensors,
        "meaning": "bitmask: NAME.values (kept entries, row-major) + NAME.bitmask (1 bit per entry, uint8, "
                   "little-endian bits); nm: every M consecutive entries of the last dimension keep N slots, "
                   "NAME.values [groups*N] + NAME.indices (ceil(log2 M) bits per slot, packed little-endian); "
                   "dense: NAME as it is. Kept = value != 0; NAME.negzero (when present, 1 bit per entry) marks the "
                   "zeros that are -0.0. Load with llmprune.load.",
    }
    config["model_type"] = COMPRESSED_MODEL_TYPE
    config["llmprune"] = {**meta, LAYOUT_KEY: layout}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("compressed %d tensors (%s): %.1f MB -> %.1f MB", len(tensors),
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), dense_bytes / 1e6, stored_bytes / 1e6)
    return layout


def dense_config(folder: Path, config: dict[str, Any]):
    """The transformers config of the dense model a compressed checkpoint holds (its ``config.json`` with the
    original ``model_type`` and without the layout block)."""
    from transformers import AutoConfig

    layout = layout_of(config)
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    cfg["llmprune"] = {k: v for k, v in config["llmprune"].items() if k != LAYOUT_KEY}  # the model is dense now
    if not cfg["llmprune"]:
        del cfg["llmprune"]
    model_type = layout.get("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise CompressedFormatError(f"{str(folder)!r}: model type {model_type!r} is unknown to this transformers "
                                    f"({e}); upgrade transformers") from e
    hf_config.name_or_path = str(folder)
    return hf_config


def check_compressed(folder: Path, config: dict[str, Any], shapes: bool = True, trust_remote_code: bool = False) -> None:
    """A compressed checkpoint folder, whole and consistent, before anything reads it: its JSON files, every
    file the layout names present with its header checked against the file and holding what the layout
    stores there, and (``shapes``) the layout's shapes against the model its ``config.json`` builds."""
    layout = layout_of(config)
    check_json(folder)
    headers: dict[str, dict] = {}
    for name, entry in layout["tensors"].items():
        file = entry["file"]
        if file not in headers:
            if not (folder / file).is_file():
                raise CompressedFormatError(f"{str(folder)!r} lacks {file}, named in its config.json; the checkpoint "
                                            "is incomplete: copy or download it again")
            headers[file] = read_header(folder / file)[1]
        absent = [k for k in stored_keys(name, entry) if k not in headers[file]]
        if absent:
            raise CompressedFormatError(f"{str(folder / file)!r} lacks {absent[0]!r}, which the layout in config.json "
                                        "places there: the weights and config.json do not belong together; copy or "
                                        "download the checkpoint again")
    if shapes:
        try:
            model = empty_model(dense_config(folder, config), trust_remote_code)
        except CompressedFormatError:  # a model type this transformers lacks: the weights can still be decoded
            return
        check_shapes(model, {n: (e["shape"], e["file"]) for n, e in layout["tensors"].items()}, folder / "config.json")


def _copy_other_files(src: Path, dst: Path, skip) -> None:
    for p in src.iterdir():
        if skip(p.name):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def _refresh_card(folder: Path) -> None:
    """Rewrite the model card of an llmprune checkpoint, so its loading instructions match the format."""
    meta = read_config(folder).get("llmprune")
    if isinstance(meta, dict) and "method" in meta:
        write_card(folder)


def _retarget_adapter(tmp: Path, dst: str | Path) -> None:
    """An EoRA adapter copied along names the new folder as its base (not the source's)."""
    retarget_adapter(tmp, str(Path(dst).expanduser().resolve()))


def compress(src: str | Path, dst: str | Path, *, pattern: str | None = None, overwrite: bool = False) -> Path:
    """Write a compressed copy of the dense checkpoint ``src`` to ``dst`` (atomically: a temporary
    sibling renamed at the end). ``pattern`` (e.g. ``"2:4"``) defaults to the one in the
    checkpoint's ``llmprune`` metadata; N:M tensors get the ``nm`` encoding, other sparse ones the
    bitmask. Everything else in the folder (tokenizer, report, card, adapters) is copied."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise CompressedFormatError(f"source {str(src)!r} is not a folder; give a checkpoint folder")
    if is_compressed(src):
        raise CompressedFormatError(f"{str(src)!r} is already compressed; nothing to do")
    _dense_shards(src)  # fail before creating anything
    check_checkpoint(src)
    out = Path(dst).expanduser()
    with staged(out, overwrite) as tmp:
        _copy_other_files(src, tmp, lambda n: n.startswith("."))
        compress_in_place(tmp, pattern)
        _refresh_card(tmp)
        _retarget_adapter(tmp, dst)
    log.info("wrote compressed checkpoint %s", out)
    return out


def decompress(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Write a dense copy of the compressed checkpoint ``src`` to ``dst``, loadable with plain
    ``AutoModelForCausalLM.from_pretrained``; weights are bit-identical to the ones compressed."""
    from safetensors.torch import save_file

    src = Path(src).expanduser()
    config = read_config(src)
    layout = layout_of(config)
    if layout is None:
        raise CompressedFormatError(f"{str(src)!r} is not compressed; it already loads with transformers")
    check_compressed(src, config)  # fail before creating anything
    out = Path(dst).expanduser()
    with staged(out, overwrite) as tmp:
        files = set(layout["files"])
        _copy_other_files(src, tmp, lambda n: n.startswith(".") or n in files or n == "config.json")
        by_file: dict[str, dict[str, torch.Tensor]] = {}
        weight_map: dict[str, str] = {}
        for name, W in iter_decoded(src, layout):
            file = layout["tensors"][name]["file"].replace("model.compressed", "model")
            by_file.setdefault(file, {})[name] = W
            weight_map[name] = file
            if len(by_file[file]) == sum(1 for e in layout["tensors"].values()
                                         if e["file"].replace("model.compressed", "model") == file):
                save_file(by_file.pop(file), str(tmp / file), metadata={"format": "pt"})
        if len(layout["files"]) > 1:
            index = {"metadata": {"total_size": layout.get("dense_bytes")}, "weight_map": weight_map}
            (tmp / DENSE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config["model_type"] = layout["model_type"]
        meta = {k: v for k, v in config["llmprune"].items() if k != LAYOUT_KEY}
        if meta:
            config["llmprune"] = meta
        else:
            del config["llmprune"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _refresh_card(tmp)
        _retarget_adapter(tmp, dst)
    log.info("wrote dense checkpoint %s", out)
    return out
