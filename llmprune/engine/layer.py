"""One decoder layer's work: forward pre-hooks on its targets gather the input statistics that
the run declared (shared between targets fed the very same tensor: q/k/v, gate/up) and prune
each target on demand, then report what was done."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import count_nonzero
from ..stats import InputStats
from .lockstep import Lockstep
from .targets import ExpertGroup, Target

log = logging.getLogger(__name__)

ERROR_SAMPLE_ROWS = 128  # input rows kept per target to estimate its relative output error


@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float  # measured fraction of exact zeros after pruning
    error: float  # relative output error ‖ΔW X‖/‖W X‖ on sample inputs
    tokens: int  # calibration tokens seen
    pattern: str = "unstructured"  # or "N:M" (of consecutive inputs; "N:M permuted": see ``perm``)
    fallback: str | None = None  # why the module was not pruned by the run's method, if it was not
    mask_sha256: str = ""  # of the packed zero pattern of the stored weight ([out, in] row-major)
    reconstruct: dict | None = None  # reconstruction step: relative error before/after over all tokens, iterations
    compensate: dict | None = None  # low-rank compensation: rank, adapter parameters, H-weighted error before/after


@dataclass
class LayerReport:
    index: int
    seconds: float
    modules: list[ModuleReport] = field(default_factory=list)
    weights: int = 0  # every weight matrix of the layer (targets, routers, ignored and dense modules)
    zeros: int = 0  # exact zeros among them

    @property
    def error(self) -> float:
        errs = [m.error for m in self.modules if m.error == m.error]
        return sum(errs) / len(errs) if errs else float("nan")


def count_zeros(layer: nn.Module) -> tuple[int, int]:
    """``(weights, zeros)`` over every parameter of ``layer`` with two or more dimensions."""
    total = zeros = 0
    for p in layer.parameters():
        if p.dim() >= 2:
            total += p.numel()
            zeros += p.numel() - count_nonzero(p.detach())
    return total, zeros


def _out_of_order(name: str) -> RuntimeError:
    return RuntimeError(
        f"a calibration chunk reached {name} after it was pruned without that chunk's tokens: this layer runs "
        "its modules (experts) in another order than it registers them, so the chunks cannot run in lockstep; "
        "use --sequential dense-layer, or one chunk (--batch-size with every calibration window)"
    )


class StopLayer(Exception):
    """Ends a replayed chunk's layer forward at the first target that is not pruned yet."""


class LayerWork:
    """Hooks on one decoder layer's targets: gather the declared input statistics, prune on demand.

    ``prune(target, stats)`` prunes one target and returns its report; ``None`` observes only
    (the statistics stay in :attr:`stats`). ``reuse`` holds statistics of the dense layer from
    an observe-only pass; a target takes them instead of recomputing them while no target of
    this layer has been pruned yet (its input is then still the dense one).

    Within-layer order over chunks runs either in lockstep (:attr:`lockstep`: every chunk's
    activations stay alive at each park point) or replayed (:attr:`replay`: each chunk's forward
    stops at the first target not pruned yet, after adding its input; once every chunk stopped
    there it is pruned and the chunks run again from the layer's input). Both add the same inputs
    to the same statistics in the same order: the same masks, the replay in the memory of one chunk.
    """

    def __init__(self, targets: list[Target], groups: list[ExpertGroup], needs: frozenset[str],
                 prune: Callable[[Target, InputStats | None], ModuleReport] | None, prune_in_hook: bool,
                 reuse: dict[str, InputStats] | None = None):
        self.targets = targets
        self.groups = groups
        self.needs = needs
        self.prune_fn = prune
        self.prune_in_hook = prune_in_hook and prune is not None
        self.reuse = reuse or {}
        self.stats: dict[str, InputStats] = {}
        self.seen: dict[int, tuple[weakref.ref, InputStats]] = {}  # inputs of the current forward
        self.reports: dict[str, ModuleReport] = {}
        self.handles = []
        self.lockstep: Lockstep | None = None  # set while chunks run in lockstep
        self.expert_inputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # parked chunks' routing
        self.replay = False  # set while chunks are replayed up to the next target
        self.stop_key: Target | ExpertGroup | None = None  # where the replayed chunks of this pass stopped
        self.collective = None  # several processes (llmprune.distributed): statistics summed before pruning

    @property
    def all_targets(self) -> list[Target]:
        return self.targets + [t for g in self.groups for t in g.targets]

    def __enter__(self) -> LayerWork:
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
        if t.name in self.reports:  # already pruned (a module applied twice, or an earlier replay)
            if self._parks() and self.lockstep.arrived_late(t):
                raise _out_of_order(t.name)
            if self.replay and t.name in self.stats:  # later targets fed the same tensor share its statistics
                self.seen[id(X)] = (weakref.ref(X), self.stats[t.name])
            return
        entry = self.seen.get(id(X))
        own = self.stats.get(t.name)
        if entry is not None and entry[0]() is X and (own is None or own is entry[1]):
            self.stats[t.name] = entry[1]
        elif t.name in self.reuse and not self.reports:  # the dense statistics, already complete
            own = self.stats[t.name] = self.reuse[t.name]
            self.seen[id(X)] = (weakref.ref(X), own)
        else:
            if own is None:
                own = self.stats[t.name] = InputStats(self.needs)
            own.add(X, keep_sample=ERROR_SAMPLE_ROWS)
            self.seen[id(X)] = (weakref.ref(X), own)
        if self.replay:
            self._stop(t)
        if self.prune_in_hook:
            if self._parks():
                self.lockstep.park(t)  # returns once every chunk has added its input and t is pruned
            else:
                self.prune(t)

    def _stop(self, key: Target | ExpertGroup) -> None:
        """A replayed chunk reached ``key``, the first target it meets that is not pruned yet."""
        if self.stop_key is None:
            self.stop_key = key
        elif self.stop_key is not key:
            raise RuntimeError(
                "calibration chunks reach this layer's targets in different orders (routed experts that are "
                "separate modules), which the chunked within-layer order cannot follow; use --sequential "
                "dense-layer, or a batch that fits in memory (--batch-size)"
            )
        raise StopLayer

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
            pending = any(t.name not in self.reports for t in g.targets)
            if self.replay and pending:  # routed together with the other chunks' tokens (release)
                self.expert_inputs.setdefault(id(g), []).append((hidden, top_k_index))
                self._stop(g)
            elif self.prune_in_hook and self._parks() and not pending and self.lockstep.arrived_late(g):
                raise _out_of_order(", ".join(t.name for t in g.targets[:1]) + " ...")
            elif self.prune_in_hook and self._parks():
                # every chunk's tokens are routed together once all chunks are here (release)
                self.expert_inputs.setdefault(id(g), []).append((hidden, top_k_index))
                self.lockstep.park(g)
            else:
                self._observe_experts(g, hidden, top_k_index)

        return hook

    def _observe_experts(self, g: ExpertGroup, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        routed = dict(g.routed(top_k_index))
        for e in range(len(g.gate_up or g.down)):
            if e not in routed:
                if self.collective is not None and self.prune_in_hook:
                    # several processes: another rank's tokens may reach expert e, and every rank must enter
                    # its sums at the same step, so it is pruned here, in expert order, on every rank
                    for t in (g.gate_up[e:e + 1] if g.gate_up else []) + (g.down[e:e + 1] if g.down else []):
                        if t.name not in self.reports:
                            self.prune(t)
                continue
            X = hidden[routed[e]]  # [t_e, H]
            if g.gate_up:
                self._observe(g.gate_up[e], X)
            if g.down:  # input of the down projection, after gate_up was pruned in one-pass mode
                self._observe(g.down[e], g.intermediate(e, X))

    def release(self, key: Target | ExpertGroup) -> None:
        """Prune what the chunks parked at (called outside the chunks, once all have arrived)."""
        if isinstance(key, ExpertGroup):
            parts = self.expert_inputs.pop(id(key))
            replay, self.replay = self.replay, False  # observe and prune the experts here, not stop
            try:
                self._observe_experts(key, torch.cat([h for h, _ in parts]), torch.cat([k for _, k in parts]))
            finally:
                self.replay = replay
        else:
            self.prune(key)

    def reduce(self, t: Target) -> None:
        """Several processes: the statistics of ``t`` summed over every rank's calibration windows. Every rank
        enters the sum, also one whose tokens did not reach ``t`` (an expert); statistics no rank's tokens
        reached are dropped, as one process never makes them."""
        stats = self.stats.get(t.name)
        if stats is None:
            stats = self.stats[t.name] = InputStats(self.needs)
        self.collective.reduce_stats(t.name, stats, t.shape[1], t.stored().device)
        if stats.n == 0:
            del self.stats[t.name]

    def prune(self, t: Target) -> None:
        if self.collective is not None:  # the statistics of every rank's calibration windows
            self.reduce(t)
        self.reports[t.name] = self.prune_fn(t, self.stats.get(t.name))

    def prune_remaining(self) -> None:
        for t in self.all_targets:
            if t.name not in self.reports:
                self.prune(t)
        self.stats.clear()
        self.seen.clear()
