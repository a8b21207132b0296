"""Capture of every decoder layer's real call, and the model-state and device helpers around it.

Every decoder layer is swapped for a catcher that records its real call (all args and kwargs:
masks, position embeddings, cache positions) and passes the hidden states on; one model
forward per calibration chunk thus records each layer's own kwargs (sliding-window and
full-attention layers get different masks) without computing any layer.

The catchers pass the hidden states on in the form the model takes a layer's output in (the
tensor, or the first element of a tuple: learned on the first chunk), and the capture checks
that each layer receives exactly what the one before returned: a model that changes the hidden
states between its layers, hands a layer another output of the one before, or runs its layers
in cycles cannot be replayed layer by layer and is refused (:class:`UnsupportedModelError`).
"""

from __future__ import annotations

import contextlib
import inspect
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


FIT_FRACTION = 0.8  # share of a GPU's free memory the whole model may take for an evaluation there


@contextlib.contextmanager
def whole_model_on(model: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """The whole model on ``device`` while inside (a GPU prune's evaluation: the engine kept the model in
    CPU memory and took one layer at a time to the GPU); yields the device the model computes on.

    On exit every module gets back its own parameters and buffers from before (the same objects, not
    copies from the device: nothing inside may change weights, and an offloaded model keeps its mapped
    pages). A model that does not fit in ``FIT_FRACTION`` of a GPU's free memory stays where it is, with a
    warning. Meta tensors stay."""
    here = module_device(model)
    if device == here or device.type == "cpu":
        yield here
        return
    # every module's own parameters and buffers; a tensor held by several modules (tied weights) moves once
    held = [(slots, name, t) for m in model.modules() for slots in (m._parameters, m._buffers)
            for name, t in slots.items() if t is not None and t.device.type != "meta"]
    unique = {id(t): t for *_, t in held}
    size = sum(t.numel() * t.element_size() for t in unique.values())
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if size > FIT_FRACTION * free:
            log.warning("the model (%.1f GB) does not fit in %d %% of %s's free memory (%.1f GB): evaluated on %s",
                        size / 1e9, int(100 * FIT_FRACTION), device, free / 1e9, here)
            yield here
            return
    moved: dict[int, torch.Tensor] = {}
    try:
        for slots, name, t in held:
            if id(t) not in moved:
                copy = t.detach().to(device)
                moved[id(t)] = nn.Parameter(copy, t.requires_grad) if isinstance(t, nn.Parameter) else copy
            slots[name] = moved[id(t)]
        yield device
    finally:
        for slots, name, t in held:  # the very objects from before: no copy back
            slots[name] = t
        moved.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


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


class _LayerOutput:
    """Stands for a decoder layer's output other than its hidden states (attention weights, a recurrent
    state) in a catcher's tuple: the model may unpack it, but a layer handed one depends on the layer
    before it in a way a replay does not reproduce."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"<output {self.index} of a decoder layer>"


# How a catcher passes the hidden states on: None, as the layer's output itself; else as the first element
# of a tuple whose other elements are stand-ins (True: a _LayerOutput) or None (False), as layers that
# return ``(hidden_states,)`` or ``(hidden_states, attn_weights)`` do.
Form = tuple[bool, ...] | None
OUTPUT_FORMS: tuple[Form, ...] = (None, (), (True,), (True, True))


def _hidden_name(layer: nn.Module) -> str:
    """The name of the layer's hidden-state parameter: its forward's first (``hidden_states``, ``x``...)."""
    try:
        params = list(inspect.signature(layer.forward).parameters.values())
    except (TypeError, ValueError):
        return "hidden_states"
    first = params[0] if params else None
    if first is None or first.kind in (first.VAR_POSITIONAL, first.VAR_KEYWORD):
        return "hidden_states"
    return first.name


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states on in ``form``
    (see :data:`OUTPUT_FORMS`)."""

    def __init__(self, layer: nn.Module, calls: list, last: bool, form: Form = None):
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: it must not move with the model
        self.__dict__["_calls"] = calls
        self.__dict__["_last"] = last
        self.__dict__["_form"] = form
        self.__dict__["_key"] = _hidden_name(layer)

    def __getattr__(self, name: str) -> Any:  # attributes the model reads off its layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._calls.append((args, kwargs))
        if self._last:
            raise _StopForward
        h = args[0] if args else kwargs[self._key]
        if self._form is None:
            return h
        return (h, *(_LayerOutput(k) if stand_in else None for k, stand_in in enumerate(self._form, 1)))


@dataclass
class LayerCall:
    """The arguments a decoder layer receives for one calibration chunk, hidden states aside."""

    args: tuple  # positional args after the hidden states
    kwargs: dict
    hidden_in_kwargs: bool
    hidden_key: str = "hidden_states"  # the keyword of the hidden states when ``hidden_in_kwargs``

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_in_kwargs:
            out = layer(*self.args, **{self.hidden_key: hidden}, **self.kwargs)
        else:
            out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _record(model: nn.Module, layers: nn.ModuleList, originals: list[nn.Module], ids: torch.Tensor,
            form: Form, recorded: list) -> None:
    """One forward with every layer swapped for a catcher; the calls of the layers it reached go to ``recorded``."""
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, recorded, last=i == len(originals) - 1, form=form)
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _hidden_of(args: tuple, kwargs: dict, key: str) -> Any:
    return args[0] if args else kwargs.get(key)


def _passed_outputs(args: tuple, kwargs: dict) -> dict[str, int]:
    """The arguments of a layer call that hold a stand-in for another layer's output: name -> output index."""
    found = {}
    for name, v in [*((f"positional argument {j}", a) for j, a in enumerate(args)), *kwargs.items()]:
        inner = v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else (v,)
        for x in inner:
            if isinstance(x, _LayerOutput):
                found[name] = x.index
    return found


def _check(model: nn.Module, recorded: list, n: int, keys: list[str]) -> tuple[str | None, dict[str, int]]:
    """Why the recorded calls cannot be replayed layer by layer (None if they can), and the arguments that
    hold another layer's output (see :func:`_passed_outputs`). Layer ``i`` must receive exactly the hidden
    states layer ``i - 1`` passed on (its catcher returned its own input) and none of its other outputs:
    anything else means the model changes what goes from one layer to the next outside the layers."""
    name = type(model).__name__
    if len(recorded) != n:
        return (f"{name} called {len(recorded)} of its {n} decoder layers during capture; "
                "this architecture is not supported by the sequential engine"), {}
    for i in range(1, n):
        (prev_args, prev_kwargs), (args, kwargs) = recorded[i - 1], recorded[i]
        prev, h = _hidden_of(prev_args, prev_kwargs, keys[i - 1]), _hidden_of(args, kwargs, keys[i])
        same = h is prev or (torch.is_tensor(h) and torch.is_tensor(prev) and h.shape == prev.shape
                             and torch.equal(h, prev))
        if not same:
            return (f"{name} changes the hidden states between decoder layers {i - 1} and {i} (outside the layers): "
                    f"layer {i} does not receive what layer {i - 1} returned, so pruning it layer by layer would feed "
                    "each layer the wrong inputs; this architecture is not supported by the sequential engine"), {}
        passed = _passed_outputs(args, kwargs)
        if passed:
            return (f"{name} hands decoder layer {i} another output of layer {i - 1} besides the hidden states "
                    f"({', '.join(passed)}), which a layer-by-layer replay cannot recompute; this architecture is "
                    "not supported by the sequential engine"), passed
    return None, {}


def _outputs_of_first_layer(layer: nn.Module, call: tuple, device: torch.device) -> Any:
    """The real output of ``layer`` on its recorded ``call``, or None when its weights are not here to run it
    (a streamed or offloaded layer)."""
    if any(p.device.type == "meta" for p in layer.parameters()):
        return None
    home = module_device(layer)
    layer.to(device)
    try:
        return layer(*call[0], **call[1])
    finally:
        layer.to(home)


def _calls_per_forward(model: nn.Module, layers: nn.ModuleList, originals: list[nn.Module], ids: torch.Tensor,
                       form: Form) -> int | None:
    """How many decoder-layer calls one forward makes up to the output head (None without one to stop at):
    more than the layers when the model runs them in cycles (HRM's L and H loops)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module) or head is model.get_input_embeddings():
        return None
    recorded: list = []

    def stop(*_: Any) -> None:
        raise _StopForward

    handle = head.register_forward_pre_hook(stop)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, recorded, last=False, form=form)
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    except Exception:  # noqa: BLE001 - the model's tail choked on stand-in outputs: the calls before count
        pass
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    return len(recorded)


def _first_capture(model: nn.Module, layers: nn.ModuleList, originals: list[nn.Module], ids: torch.Tensor,
                   keys: list[str], device: torch.device) -> tuple[list, Form]:
    """The first chunk's calls and the form in which the layers' outputs go on (:data:`OUTPUT_FORMS`).

    A decoder layer returns its hidden states as they are or inside a tuple, and the model takes them as they
    come, or its first element, or unpacks the tuple; a catcher cannot run the layer to learn which, so each
    form is tried in turn (a forward up to the last layer, no layer computed) and the first under which every
    layer receives exactly what the one before it returned is kept. The first form is the tensor itself, so
    a model that passes it on as it is captures as it always did. Where the model hands a layer another output
    of the one before (RWKV's ``state``), the first layer is run once: an output that is None there (no cache)
    is None for every layer, and is passed on as None; any other is refused. A model that calls its layers
    more than once per forward (in cycles) is refused too: one more forward, stopped at the output head,
    counts the calls."""
    n = len(originals)
    problem, error, reached = None, None, 0
    for form in OUTPUT_FORMS:
        recorded: list = []
        try:
            _record(model, layers, originals, ids, form, recorded)
        except Exception as e:  # noqa: BLE001 - the model could not take this form; the next is tried
            error = error or e
            reached = max(reached, len(recorded))
            continue
        found, passed = _check(model, recorded, n, keys)
        if found is not None and passed:
            real = _outputs_of_first_layer(originals[0], recorded[0], device)
            if isinstance(real, (tuple, list)) and all(k < len(real) and real[k] is None for k in passed.values()):
                form = tuple(k not in passed.values() for k in range(1, len(form) + 1))
                recorded = []
                _record(model, layers, originals, ids, form, recorded)
                found, passed = _check(model, recorded, n, keys)
        if found is None:
            if form is not None:
                log.debug("%s takes its decoder layers' hidden states from a tuple %s", type(model).__name__, form)
            calls = _calls_per_forward(model, layers, originals, ids, form)
            if calls is not None and calls > n:
                raise UnsupportedModelError(
                    f"{type(model).__name__} calls its {n} decoder layers {calls} times in one forward (it runs them in "
                    "cycles), so a layer's later calls get inputs a layer-by-layer replay does not compute; this "
                    "architecture is not supported by the sequential engine")
            return recorded, form
        problem = problem or found
    if problem is not None:
        raise UnsupportedModelError(problem)
    if reached == 0:  # it failed before its first layer: not about how it passes the layers' outputs on
        raise error
    raise UnsupportedModelError(
        f"{type(model).__name__} uses what its decoder layers return in a way the capture cannot stand in for "
        f"({type(error).__name__}: {error}); this architecture is not supported by the sequential engine"
    ) from error


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, chunks: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """Run the model up to the decoder stack for each chunk: ``(hidden[chunk], calls[chunk][layer])``.

    The form in which the layers' outputs go on is learned on the first chunk (:func:`_first_capture`);
    a model that changes the hidden states between its layers, or hands a layer another output of the one
    before, is refused (:class:`UnsupportedModelError`)."""
    originals = list(layers)
    keys = [_hidden_name(layer) for layer in originals]  # the hidden states' keyword, layer by layer
    home = module_device(model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    home = home or torch.device("cpu")
    _move_except(model, layers, device)
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = []
    form: Form = None
    try:
        for c, ids in enumerate(chunks):
            ids = ids.to(device)
            if c == 0:
                recorded, form = _first_capture(model, layers, originals, ids, keys, device)
            else:
                recorded = []
                _record(model, layers, originals, ids, form, recorded)
                problem, _ = _check(model, recorded, len(originals), keys)
                if problem is not None:
                    raise UnsupportedModelError(problem)
            per_layer = []
            for (args, kwargs), key in zip(recorded, keys):  # each layer's call, its hidden states aside
                in_kwargs = not args
                kw = {k: v for k, v in kwargs.items() if k != key}
                per_layer.append(LayerCall(tuple(args) if in_kwargs else tuple(args[1:]), kw, in_kwargs, key))
            hidden.append(_hidden_of(*recorded[0], keys[0]))
            calls.append(per_layer)
    finally:
        _move_except(model, layers, home)
    return hidden, calls
