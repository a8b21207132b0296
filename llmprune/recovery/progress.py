"""Progress of a recovery run, for ``--resume``.

Every ``save_every`` steps the trainable weights, the optimizer's state and the RNG state are saved to a
progress folder (``.<output>.recover`` beside the output for :func:`~.recover.recover_checkpoint`),
``progress.json`` last, by atomic renames; a resumed run restores them and goes on from that step, and ends
with the same weights as an uninterrupted run (same data, same steps). A run resumes only progress of the
same settings (but those in :data:`~.options.NOT_HASHED`), data and model (:func:`run_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..engine.targets import unwrap_model
from ..errors import ConfigError
from ..runtime.files import torch_save_atomic, write_text_atomic
from .options import NOT_HASHED, RecoverConfig

__all__ = ["PROGRESS_FILE", "describe_progress", "load_progress", "progress_folder", "run_fingerprint",
           "save_progress"]

PROGRESS_FILE = "progress.json"
STATE_FILE = "state.pt"
FORMAT = 1


def progress_folder(output: str | Path) -> Path:
    """The hidden sibling of ``output`` where :func:`~.recover.recover_checkpoint` keeps its progress."""
    out = Path(output).expanduser()
    return out.with_name(f".{out.name}.recover")


def describe_progress(output: str | Path) -> str | None:
    """One line on the progress an interrupted ``recover`` kept, or None."""
    folder = progress_folder(output)
    try:
        step = json.loads((folder / PROGRESS_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None
    return (f"the progress of {step} step(s) is kept in {str(folder)!r}: run the same command with --resume to "
            "continue, or with --overwrite to start again (which removes it)")


def run_fingerprint(config: RecoverConfig, windows: torch.Tensor, model: nn.Module) -> str:
    cfg = {k: v for k, v in config.model_dump().items() if k not in NOT_HASHED}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(windows.numpy().tobytes())
    inner = unwrap_model(model)
    h.update(type(inner).__name__.encode())
    for name, p in inner.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    return h.hexdigest()[:16]


def save_progress(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str,
                   history: list, evals: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"params": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch_save_atomic(folder / STATE_FILE, state)
    write_text_atomic(folder / PROGRESS_FILE, json.dumps({"format": FORMAT, "step": step, "fingerprint": fingerprint,
                                                          "history": history, "evals": evals}) + "\n")  # the commit point


def load_progress(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                   fingerprint: str) -> tuple[int, list, list] | None:
    path = folder / PROGRESS_FILE
    if not path.is_file():
        return None
    progress = json.loads(path.read_text())
    if progress.get("format") != FORMAT or progress.get("fingerprint") != fingerprint:
        raise ConfigError(f"the progress in {str(folder)!r} belongs to another run (other settings, data or model); "
                          "run with the same settings, or with --overwrite to start again")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["params"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(progress["step"]), progress["history"], progress["evals"]
