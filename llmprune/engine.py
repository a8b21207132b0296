"""The sequential layer-wise engine, one for every architecture.

1. Capture: every decoder layer is swapped for a catcher that records its real call (all args
   and kwargs: masks, position embeddings, cache positions) and passes the hidden states on;
   one model forward per calibration chunk thus records each layer's own kwargs (sliding-window
   and full-attention layers get different masks) without computing any layer.
2. Per decoder layer, on the compute device:
   - one pass (the whole calibration batch fits): a forward pre-hook on each target gathers the
     statistics of its input and prunes it just before it is applied, so later modules of the
     layer see the outputs of already-pruned ones (true-sequential order inside the layer) and
     the layer's pruned outputs come out of the same forward. On the CPU the batch is run as
     small chunks in lockstep (:class:`_Lockstep`): each chunk's forward is a greenlet that
     parks at every target until all chunks have added their inputs, the target is pruned, and
     the chunks go on. The arithmetic is that of the whole batch at once; the activations of a
     chunk stay in cache (measured: 32 x 512 tokens through the embedded model's layers take
     46 s as one batch, 28 s as chunks of 4);
   - two passes (chunks): statistics of every target are gathered over all chunks with the
     dense layer, every target is pruned, and a second pass computes the pruned outputs.
   The outputs feed the next layer. Only the current layer sits on the compute device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .masks import zero_fraction
from .pruners import Pruner
from .stats import InputStats, relative_error

log = logging.getLogger(__name__)

ERROR_SAMPLE_ROWS = 128  # input rows kept per target to estimate its relative output error
CPU_CHUNK_TOKENS = 2048  # tokens per forward chunk on the CPU: a chunk's activations stay in cache


# ---------------------------------------------------------------------------------------------
# Model structure
# ---------------------------------------------------------------------------------------------
def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the ModuleList of same-class blocks holding the most parameters."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) != 1:
                continue
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None:
        raise ValueError(
            f"no stack of decoder layers found in {type(model).__name__}; llmprune expects a causal LM "
            "whose blocks sit in an nn.ModuleList (model.layers, transformer.h, ...)"
        )
    return best


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # GPT-2's transposed linear


@dataclass
class Target:
    """A weight to prune, seen as ``W [out, in]`` whatever its storage layout.

    ``index`` selects one expert of a fused 3-D expert parameter ``[experts, out, in]``.
    """

    name: str  # full name in the model, e.g. model.layers.3.mlp.experts.down_proj[5]
    module: nn.Module
    param: str = "weight"
    index: int | None = None

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

    def stored(self) -> torch.Tensor:
        p = getattr(self.module, self.param).data
        return p[self.index] if self.index is not None else p

    def get_weight(self) -> torch.Tensor:
        W = self.stored()
        return (W.T if self.transposed else W).float().clone()  # [out, in]

    def set_weight(self, W: torch.Tensor) -> None:
        p = self.stored()
        p.copy_((W.T if self.transposed else W).to(p.dtype))

    @property
    def shape(self) -> tuple[int, int]:
        W = self.stored()
        return tuple(W.T.shape if self.transposed else W.shape)


def _is_fused_experts(mod: nn.Module) -> bool:
    """Mixtral/Qwen-MoE experts of transformers 5: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``."""
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return (
        isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3
        and hasattr(mod, "act_fn")
    )


@dataclass
class ExpertGroup:
    """The experts of one fused MoE module: per expert a ``gate_up`` and a ``down`` target."""

    module: nn.Module
    gate_up: list[Target]
    down: list[Target]

    @property
    def supported(self) -> bool:
        m = self.module
        return bool(getattr(m, "is_concatenated", True) and not getattr(m, "is_transposed", False)
                    and not getattr(m, "has_bias", False) and getattr(m, "has_gate", True))

    @property
    def targets(self) -> list[Target]:
        return self.gate_up + self.down

    def routed(self, top_k_index: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(e, token_idx)`` for every expert that receives tokens; ``top_k_index [T, k]``."""
        E = self.module.gate_up_proj.shape[0]
        out = []
        for e in range(E):
            token_idx = (top_k_index == e).any(dim=-1).nonzero().squeeze(-1)  # [t_e]
            if token_idx.numel():
                out.append((e, token_idx))
        return out

    def intermediate(self, e: int, X: torch.Tensor) -> torch.Tensor:
        """Input of expert ``e``'s down projection, ``act(gate) * up``  [t_e, I]."""
        gate, up = nn.functional.linear(X, self.module.gate_up_proj[e]).chunk(2, dim=-1)
        return self.module.act_fn(gate) * up


def _matches(name: str, targets: str | None, ignore: str | None) -> bool:
    if targets is not None and not re.search(targets, name):
        return False
    return not (ignore is not None and re.search(ignore, name))


def find_targets(
    layer: nn.Module, prefix: str, targets: str | None = None, ignore: str | None = None
) -> tuple[list[Target], list[ExpertGroup]]:
    """Every Linear / Conv1D inside a decoder layer, and fused expert weights, filtered by regexes
    on the name relative to the layer (``self_attn.q_proj``, ``mlp.experts.down_proj``)."""
    found, groups = [], []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            if _matches(name, targets, ignore):
                found.append(Target(f"{prefix}.{name}", mod))
        elif _is_fused_experts(mod):
            E = mod.gate_up_proj.shape[0]
            sel = {p: _matches(f"{name}.{p}", targets, ignore) for p in ("gate_up_proj", "down_proj")}
            if not any(sel.values()):
                continue
            group = ExpertGroup(
                mod,
                [Target(f"{prefix}.{name}.gate_up_proj[{e}]", mod, "gate_up_proj", e) for e in range(E)]
                if sel["gate_up_proj"] else [],
                [Target(f"{prefix}.{name}.down_proj[{e}]", mod, "down_proj", e) for e in range(E)]
                if sel["down_proj"] else [],
            )
            if group.supported:
                groups.append(group)
            else:
                log.warning("%s.%s: this fused-experts layout is not supported and stays dense", prefix, name)
    return found, groups


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float  # measured fraction of exact zeros after pruning
    error: float  # relative output error ‖ΔW X‖/‖W X‖ on sample inputs
    tokens: int  # calibration tokens seen


@dataclass
class LayerReport:
    index: int
    seconds: float
    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def error(self) -> float:
        errs = [m.error for m in self.modules if m.error == m.error]
        return sum(errs) / len(errs) if errs else float("nan")


# ---------------------------------------------------------------------------------------------
# State and device helpers
# ---------------------------------------------------------------------------------------------
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
    """Move ``module``'s parameters and buffers to ``device``, leaving the ``skip`` subtree alone."""
    if module is skip:
        return
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        if b is not None:
            module._buffers[name] = b.to(device)
    for child in module.children():
        _move_except(child, skip, device)


def _module_device(module: nn.Module) -> torch.device:
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
    home = _module_device(model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
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
                raise RuntimeError(
                    f"the model called {len(recorded)} of its {len(originals)} decoder layers during capture; "
                    "this architecture is not supported by the sequential engine"
                )
            first_args, first_kwargs = recorded[0]
            in_kwargs = not first_args
            h0 = first_kwargs["hidden_states"] if in_kwargs else first_args[0]
            per_layer = []
            for args, kwargs in recorded:
                h = kwargs.get("hidden_states") if in_kwargs else args[0]
                if h is not h0:
                    # The model transforms hidden states between layers: replaying layer i's own
                    # captured inputs would be wrong, so fall back to layer 0's call for all.
                    log.warning("hidden states change between decoder layers; replaying layer 0's arguments")
                    per_layer = [per_layer[0]] * len(originals)
                    break
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                per_layer.append(LayerCall(tuple(args[1:]) if not in_kwargs else tuple(args), kw, in_kwargs))
            hidden.append(h0)
            calls.append(per_layer)
    finally:
        _move_except(model, layers, home)
    return hidden, calls


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
class _LayerPruning:
    """Hooks on one decoder layer's targets: gather input statistics, prune on demand."""

    def __init__(self, targets: list[Target], groups: list[ExpertGroup], pruner: Pruner,
                 sparsity_of: Callable[[str], float], nm: tuple[int, int] | None, prune_in_hook: bool):
        self.targets = targets
        self.groups = groups
        self.pruner = pruner
        self.sparsity_of = sparsity_of
        self.nm = nm
        self.prune_in_hook = prune_in_hook
        self.stats: dict[str, InputStats] = {}
        self.seen: dict[int, tuple[weakref.ref, InputStats]] = {}  # inputs of the current forward
        self.reports: dict[str, ModuleReport] = {}
        self.handles = []
        self.lockstep: _Lockstep | None = None  # set while chunks run in lockstep
        self.expert_inputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # parked chunks' routing

    @property
    def all_targets(self) -> list[Target]:
        return self.targets + [t for g in self.groups for t in g.targets]

    def __enter__(self) -> _LayerPruning:
        for t in self.targets:
            self.handles.append(t.module.register_forward_pre_hook(self._hook(t)))
        for g in self.groups:
            self.handles.append(g.module.register_forward_pre_hook(self._experts_hook(g), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def new_forward(self) -> None:
        self.seen.clear()

    def _observe(self, t: Target, X: torch.Tensor) -> None:
        """Add input ``X`` of target ``t`` to its statistics, sharing them with earlier targets
        that received the very same tensor in this forward (q/k/v, gate/up)."""
        if t.name in self.reports:  # already pruned (a module applied twice)
            return
        entry = self.seen.get(id(X))
        own = self.stats.get(t.name)
        if entry is not None and entry[0]() is X and (own is None or own is entry[1]):
            self.stats[t.name] = entry[1]
        else:
            if own is None:
                own = self.stats[t.name] = InputStats(self.pruner.stats_kind)
            own.add(X, keep_sample=ERROR_SAMPLE_ROWS)
            self.seen[id(X)] = (weakref.ref(X), own)
        if self.prune_in_hook:
            if self._parks():
                self.lockstep.park(t)  # returns once every chunk has added its input and t is pruned
            else:
                self.prune(t)

    def _parks(self) -> bool:
        """Whether the current forward is a lockstep chunk, which parks instead of pruning."""
        return self.lockstep is not None and self.lockstep.in_chunk()

    def _hook(self, t: Target) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._observe(t, args[0])

        return hook

    def _experts_hook(self, g: ExpertGroup) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            hidden, top_k_index = bound["hidden_states"], bound["top_k_index"]  # [T, H], [T, k]
            if self.prune_in_hook and self._parks():
                # every chunk's tokens are routed together once all chunks are here (release)
                self.expert_inputs.setdefault(id(g), []).append((hidden, top_k_index))
                self.lockstep.park(g)
            else:
                self._observe_experts(g, hidden, top_k_index)

        return hook

    def _observe_experts(self, g: ExpertGroup, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        for e, token_idx in g.routed(top_k_index):
            X = hidden[token_idx]  # [t_e, H]
            if g.gate_up:
                self._observe(g.gate_up[e], X)
            if g.down:  # input of the down projection, after gate_up was pruned in one-pass mode
                self._observe(g.down[e], g.intermediate(e, X))

    def release(self, key: Target | ExpertGroup) -> None:
        """Prune what the chunks parked at (called outside the chunks, once all have arrived)."""
        if isinstance(key, ExpertGroup):
            parts = self.expert_inputs.pop(id(key))
            self._observe_experts(key, torch.cat([h for h, _ in parts]), torch.cat([k for _, k in parts]))
        else:
            self.prune(key)

    def prune(self, t: Target) -> None:
        stats = self.stats.get(t.name)
        if stats is None or stats.n == 0:
            if self.pruner.stats_kind != "none":
                log.info("%s received no calibration input; pruning it by magnitude", t.name)
            from .pruners import Magnitude

            pruner, stats = Magnitude(), InputStats("none")
        else:
            pruner = self.pruner
        W = t.get_weight()  # [out, in] float32
        target = self.sparsity_of(t.name)
        res = pruner.prune(W, stats, target, self.nm)
        t.set_weight(res.W)
        self.reports[t.name] = ModuleReport(
            name=t.name,
            shape=t.shape,
            target_sparsity=target,
            sparsity=zero_fraction(t.stored()),
            error=relative_error(W, res.W, stats.sample),
            tokens=stats.n,
        )

    def prune_remaining(self) -> None:
        for t in self.all_targets:
            if t.name not in self.reports:
                self.prune(t)
        self.stats.clear()
        self.seen.clear()


class _Lockstep:
    """One layer forward per calibration chunk, each a greenlet, run in lockstep on one thread.

    A chunk's forward parks at each target's pre-hook (after adding its input to the target's
    statistics) and at each fused-experts module. When every live chunk is parked, the earliest
    park point in the layer's module order is released (its target pruned, or its experts
    routed and pruned on all chunks' tokens) and the chunks waiting there resume. Chunks skip
    targets they do not call (routed experts), which the module order accounts for.
    """

    def __init__(self, layer: nn.Module):
        self.rank = {id(m): i for i, m in enumerate(layer.modules())}  # module order in the layer
        self.parked: dict[Any, Target | ExpertGroup] = {}
        self.chunks: set = set()
        self.main = None

    def in_chunk(self) -> bool:
        from greenlet import getcurrent

        return getcurrent() in self.chunks

    def park(self, key: Target | ExpertGroup) -> None:
        from greenlet import getcurrent

        self.parked[getcurrent()] = key
        self.main.switch()

    def run(self, forwards: list[Callable[[], torch.Tensor]], release: Callable[[Target | ExpertGroup], None],
            done: Callable[[int, torch.Tensor], None]) -> None:
        """Run every chunk's forward; ``done(c, output)`` as each finishes."""
        from greenlet import getcurrent, greenlet

        self.main = getcurrent()

        def body(c: int) -> Callable[[], None]:
            def run() -> None:
                done(c, forwards[c]())
            return run

        lets = [greenlet(body(c)) for c in range(len(forwards))]
        self.chunks = set(lets)
        try:
            for g in lets:
                g.switch()  # to its first park point, or to the end of its forward
            while self.parked:
                key = min(self.parked.values(), key=lambda k: self.rank.get(id(k.module), -1))
                waiting = [g for g, k in self.parked.items() if k is key]
                release(key)
                for g in waiting:
                    del self.parked[g]
                    g.switch()
        finally:
            self.chunks, self.parked, self.main = set(), {}, None


def compute_chunk(seqlen: int, batch_size: int, device: torch.device) -> int:
    """Samples per layer forward: small chunks on the CPU (cache), the memory-planned batch on GPUs."""
    if device.type != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_CHUNK_TOKENS // max(seqlen, 1)))


def _store_output(hidden: list[torch.Tensor], c: int, out: torch.Tensor) -> None:
    """Chunk ``c``'s layer output becomes its next input, written over the old one when it fits."""
    h = hidden[c]
    if (out.shape == h.shape and out.dtype == h.dtype and out.device == h.device
            and out.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()):
        h.copy_(out)
    else:
        hidden[c] = out


class LayerResidency(Protocol):
    """Where a decoder layer's weights live outside the moment it is pruned."""

    def acquire(self, index: int, layer: nn.Module) -> None: ...

    def release(self, index: int, layer: nn.Module) -> None: ...

    def set_aside(self, model: nn.Module, layers: list[nn.Module]) -> None:
        """Called once the first layer's inputs are captured: the parameters outside ``layers``
        (embeddings, final norm, head) are not read again until every layer is pruned."""


def plan_batch_size(nsamples: int, seqlen: int, layer: nn.Module, dtype: torch.dtype,
                    device: torch.device) -> int:
    """Largest calibration chunk whose per-layer activations fit comfortably in free memory."""
    widths = [max(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, nn.Linear)]
    width = max(widths, default=4096)
    bytes_per_token = (4 * width + 8 * 1024) * max(torch.finfo(dtype).bits // 8, 4)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    budget = 0.4 * free
    per_sample = bytes_per_token * seqlen
    return int(max(1, min(nsamples, budget // per_sample)))


def run_sequential(
    model: nn.Module,
    input_ids: torch.Tensor,
    pruner: Pruner,
    sparsity_of: Callable[[str], float],
    nm: tuple[int, int] | None = None,
    targets: str | None = None,
    ignore: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    progress: bool = True,
    residency: LayerResidency | None = None,
) -> list[LayerReport]:
    """Prune ``model`` in place, decoder layer by decoder layer, on calibration ``input_ids [n, L]``.

    ``sparsity_of(name)`` gives each target's sparsity (one value, or per-layer allocations such as
    OWL's); ``residency`` may bring each layer into memory before it is pruned and move it out after
    (see :mod:`llmprune.offload`).
    """
    from tqdm.auto import tqdm

    device = resolve_device(device) if isinstance(device, str) else device
    layers_name, layers = find_decoder_layers(model)
    n, L = input_ids.shape
    if batch_size is None:
        batch_size = plan_batch_size(n, L, layers[0], next(model.parameters()).dtype, device)
    batch_size = min(batch_size, n)
    one_pass = batch_size >= n
    chunks = list(input_ids.split(compute_chunk(L, batch_size, device)))
    log.info(
        "%d decoder layers at %s; calibration %d x %d in %d chunk(s): %s",
        len(layers), layers_name, n, L, len(chunks),
        "one pass per layer (true-sequential)" if one_pass else "two passes per layer",
    )

    if not any(any(find_targets(layer, "", targets, ignore)) for layer in layers):
        raise ValueError(
            f"no module matched targets={targets!r} ignore={ignore!r} inside the decoder layers; "
            "names are relative to a layer, e.g. 'self_attn\\.q_proj' or 'mlp\\.'"
        )
    reports: list[LayerReport] = []
    with inference_state(model):
        hidden, calls = capture_layer_inputs(model, layers, chunks, device)
        if all(h.shape[1:] == hidden[0].shape[1:] for h in hidden):
            # one buffer for the hidden states of every chunk, which each layer's outputs overwrite
            # in place: no long-lived blocks scattered through the heap between layers
            hidden = list(torch.cat(hidden).split([h.shape[0] for h in hidden]))
        if residency is not None:
            residency.set_aside(model, layers)
        bar = tqdm(range(len(layers)), desc="pruning layers", unit="layer", disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            layer = layers[i]
            home = _module_device(layer)
            if residency is not None:
                residency.acquire(i, layer)
            layer.to(device)
            tgts, groups = find_targets(layer, f"{layers_name}.{i}", targets, ignore)
            with _LayerPruning(tgts, groups, pruner, sparsity_of, nm, prune_in_hook=one_pass) as lp:
                if not one_pass:  # pass 1: statistics over every chunk with the dense layer
                    for c in range(len(chunks)):
                        lp.new_forward()
                        calls[c][i](layer, hidden[c])
                    lp.new_forward()
                    lp.prune_remaining()
                if one_pass and len(chunks) > 1:  # prune in the hooks, chunks in lockstep
                    lp.new_forward()
                    lp.lockstep = _Lockstep(layer)
                    lp.lockstep.run(
                        [functools.partial(calls[c][i], layer, hidden[c]) for c in range(len(chunks))], lp.release,
                        functools.partial(_store_output, hidden),
                    )
                    lp.lockstep = None
                else:
                    for c in range(len(chunks)):  # (one pass: prune in the hooks) pruned outputs
                        lp.new_forward()
                        _store_output(hidden, c, calls[c][i](layer, hidden[c]))
                lp.prune_remaining()
            layer.to(home)
            if residency is not None:
                residency.release(i, layer)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rep = LayerReport(i, time.perf_counter() - t0, [lp.reports[t.name] for t in lp.all_targets])
            reports.append(rep)
            bar.set_postfix(err=f"{rep.error:.3f}", sec=f"{rep.seconds:.1f}")
            log.debug("layer %d: %.1fs, mean relative error %.4f", i, rep.seconds, rep.error)
    return reports
