"""Capture of every decoder layer's real call, and the model-state and device helpers around it.

Every decoder layer is swapped for a catcher that records its real call (all args and kwargs:
masks, position embeddings, cache positions) and passes the hidden states on; one model
forward per calibration chunk thus records each layer's own kwargs (sliding-window and
full-attention layers get different masks) without computing any layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@contextlib.contextmanager
def inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, no cache, no grad; restores the model's previous state on exit."""
    was_training = model.training
    cfg = getattr(model, "config", None)
    had_cache = getattr(cfg, "use_cache", None)
    try:
        model.eval()
        if cfg is not None and had_cache is not None:
            cfg.use_cache = False
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if cfg is not None and had_cache is not None:
            cfg.use_cache = had_cache


def _move_except(module: nn.Module, skip: nn.Module, device: torch.device) -> None:
    """Move ``module``'s parameters and buffers to ``device``, leaving the ``skip`` subtree alone, and
    tensors on the meta device (a streamed run's tied head while only embedding rows are read)."""
    if module is skip:
        return
    for p in module.parameters(recurse=False):
        if p.device.type != "meta":
            p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        if b is not None and b.device.type != "meta":
            module._buffers[name] = b.to(device)
    for child in module.children():
        _move_except(child, skip, device)


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


# ---------------------------------------------------------------------------------------------
# Capture of every decoder layer's real call
# ---------------------------------------------------------------------------------------------
class UnsupportedModelError(ValueError):
    """The model cannot be run layer by layer by the sequential engine; the message says why."""


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states through."""

    def __init__(self, layer: nn.Module, calls: list, last: bool):
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: it must not move with the model
        self.__dict__["_calls"] = calls
        self.__dict__["_last"] = last

    def __getattr__(self, name: str) -> Any:  # attributes the model reads off its layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._calls.append((args, kwargs))
        if self._last:
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class LayerCall:
    """The arguments a decoder layer receives for one calibration chunk, hidden states aside."""

    args: tuple  # positional args after the hidden states
    kwargs: dict
    hidden_in_kwargs: bool

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_in_kwargs:
            out = layer(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, chunks: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """Run the model up to the decoder stack for each chunk: ``(hidden[chunk], calls[chunk][layer])``."""
    originals = list(layers)
    home = module_device(model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    home = home or torch.device("cpu")
    _move_except(model, layers, device)
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = []
    try:
        for ids in chunks:
            recorded: list = []
            for i, layer in enumerate(originals):
                layers[i] = _Catcher(layer, recorded, last=i == len(originals) - 1)
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            finally:
                for i, layer in enumerate(originals):
                    layers[i] = layer
            if len(recorded) != len(originals):
                raise UnsupportedModelError(
                    f"{type(model).__name__} called {len(recorded)} of its {len(originals)} decoder layers during "
                    "capture; "
                    "this architecture is not supported by the sequential engine"
                )
            first_args, first_kwargs = recorded[0]
            in_kwargs = not first_args
            h0 = first_kwargs["hidden_states"] if in_kwargs else first_args[0]
            per_layer = []
            for i, (args, kwargs) in enumerate(recorded):
                h = kwargs.get("hidden_states") if in_kwargs else args[0]
                if h is not h0 and not (h.shape == h0.shape and torch.equal(h, h0)):
                    # the catchers pass the hidden states through untouched: the model changes them
                    # between its layers, which a layer-by-layer replay cannot reproduce
                    raise UnsupportedModelError(
                        f"{type(model).__name__} changes the hidden states between decoder layers {i - 1} and {i} "
                        "(outside the layers), so pruning it layer by layer would feed each layer the wrong inputs; "
                        "this architecture is not supported by the sequential engine"
                    )
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                per_layer.append(LayerCall(tuple(args[1:]) if not in_kwargs else tuple(args), kw, in_kwargs))
            hidden.append(h0)
            calls.append(per_layer)
    finally:
        _move_except(model, layers, home)
    return hidden, calls


