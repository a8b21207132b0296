"""Whether a checkpoint folder's files are whole and agree with each other, checked before anything reads
them: every safetensors header against its file (truncated, a corrupt header, tensors whose bytes do not
fit their shapes), the JSON files transformers reads, and the stored shapes against the model its
``config.json`` builds. Each failure is a :class:`CheckpointFileError` naming the file and the fix, so
every path (prune in memory or streamed, resume, eval, compress, decompress, push) refuses a damaged
checkpoint in one line before it writes anything. Only headers and sizes are read: a weight's values are
not checked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .models import ModelLoadError

AGAIN = "copy or download the checkpoint again"
MAX_HEADER = 100 << 20  # safetensors refuses a larger header
# bits per element of each safetensors dtype (one this table lacks is not size-checked)
_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
         "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
         "F6_E2M3": 6, "F6_E3M2": 6}
# the JSON files transformers reads from a checkpoint folder
JSON_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "chat_template.json")
# where weights other than safetensors lie (left to the loader: --allow-pickle)
OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth")


class CheckpointFileError(ModelLoadError):
    """A file of a checkpoint folder is damaged, missing or disagrees with the others; the message names the
    file and the fix."""


def read_header(path: Path) -> tuple[int, dict]:
    """``(offset of the data, header)`` of the safetensors file ``path``, checked as safetensors checks it:
    the header is JSON, the tensors tile the data without gaps or overlaps, each spans the bytes its dtype
    and shape need, and the file ends where the last one does."""
    if not path.is_file():
        raise CheckpointFileError(f"{str(path)!r} is missing; copy or download it into {str(path.parent)!r}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > MAX_HEADER or 8 + n > size:
            raise CheckpointFileError(f"{str(path)!r} is truncated or damaged: its header should take {n:,} bytes "
                                      f"and the file has {size:,} in all; {AGAIN}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:  # not JSON, or not UTF-8
        raise CheckpointFileError(f"{str(path)!r} has a corrupt header (not JSON: {e}); {AGAIN}") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{str(path)!r} has a corrupt header (a JSON {type(header).__name__}, not an "
                                  f"object); {AGAIN}")
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(begin, int) and isinstance(end, int)
                  and all(isinstance(d, int) and d >= 0 for d in shape))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointFileError(f"{str(path)!r}: the header entry of tensor {name!r} is malformed: the file is "
                                      f"damaged; {AGAIN}")
        entries.append((begin, end, name, dtype, shape))
    at = 0
    for begin, end, name, dtype, shape in sorted(entries):
        if begin != at or end < begin:
            raise CheckpointFileError(f"{str(path)!r}: tensor {name!r} lies at bytes [{begin:,}, {end:,}) of the "
                                      f"data where byte {at:,} was next: the file is damaged; {AGAIN}")
        bits = _BITS.get(dtype)
        if bits is not None and math.prod(shape) * bits != (end - begin) * 8:
            raise CheckpointFileError(f"{str(path)!r}: tensor {name!r} is {dtype} {shape} "
                                      f"({math.prod(shape) * bits // 8:,} bytes) but its header entry spans "
                                      f"{end - begin:,} bytes: the file is damaged; {AGAIN}")
        at = end
    if at != size - 8 - n:
        what = "is truncated" if at > size - 8 - n else "has bytes after its last tensor"
        raise CheckpointFileError(f"{str(path)!r} {what}: its header places {at:,} bytes of tensors, the file holds "
                                  f"{size - 8 - n:,}; {AGAIN}")
    return 8 + n, header


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; one that does not parse (or is not an object) is named with the fix."""
    try:
        value = json.loads(path.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
        raise CheckpointFileError(f"{str(path)!r} is not valid JSON ({e}): the file is damaged; {AGAIN}") from None
    if not isinstance(value, dict):
        raise CheckpointFileError(f"{str(path)!r} holds a JSON {type(value).__name__}, not an object: the file is "
                                  f"damaged; {AGAIN}")
    return value


def check_json(folder: Path) -> None:
    """Every JSON file transformers reads from ``folder`` (:data:`JSON_FILES`, those present) parses."""
    for name in JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name)


def no_weights(folder: Path) -> CheckpointFileError | None:
    """The error for a checkpoint folder with neither safetensors nor other weights; None when it has some."""
    if any(folder.glob("*.safetensors")) or any(p for pattern in OTHER_WEIGHTS for p in folder.glob(pattern)):
        return None
    return CheckpointFileError(f"{str(folder)!r} has a config.json but no weights (model.safetensors, or shards "
                               "with model.safetensors.index.json): copy the weight files into it, or give the folder "
                               "that holds them")


def empty_model(config, trust_remote_code: bool = False) -> nn.Module | None:
    """The causal LM ``config`` (a folder or a transformers config) describes, its parameters on the meta
    device (nothing allocated, the RNG untouched); None when transformers cannot build it, which its loader
    then explains."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if isinstance(config, Path):
            config = AutoConfig.from_pretrained(config, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None):  # packed weights: stored shapes differ by design
            return None
        with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a check that cannot be made must not stop a load that works; the loader
        return None    # explains any real failure (unknown type, custom code, missing package)


def check_shapes(model: nn.Module | None, stored: dict[str, tuple[list[int], str]], config_path: Path) -> None:
    """The tensors stored (``name -> (shape, file)``) hold as many values as the parameters of the same
    names in ``model`` (built from ``config_path``). Compared by element count, not shape: transformers
    transposes some stored tensors on load (e.g. qwen3_vl_moe experts); a tensor under another name is
    converted on load and not compared."""
    if model is None:
        return
    bad = [(name, list(t.shape), *stored[name]) for name, t in model.state_dict(keep_vars=True).items()
           if name in stored and t.numel() != math.prod(stored[name][0])]
    if bad:
        name, expected, shape, file = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointFileError(f"{str(config_path)!r} does not match the weights: tensor {name!r} is {shape} in "
                                  f"{file}, the config makes it {expected}{more}; restore the config.json saved with "
                                  "these weights, or give the weights it was written for")
