"""What a prune pass does to each target: its pruner, its own sparsity, an optional refinement,
reconstruction of the kept weights and low-rank compensation.

``target_of(name)`` gives each target its :class:`~llmprune.steps.LayerTarget` (a fraction, or
an N:M pattern): one value for all, a user mapping from a recipe, or an allocator's output.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from ..pruners import Magnitude, Pruner
from ..stats import InputStats, relative_error
from ..steps import Compensator, LayerTarget, LowRank, Reconstructor, Refiner
from .layer import ModuleReport
from .targets import Target

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int:
    """The decoder-layer index in a target's full name (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        raise ValueError(f"no layer index in module name {name!r}")
    return int(m.group(1))


def pattern_name(nm: tuple[int, int] | None) -> str:
    return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"


def sparsity_map(
    default: LayerTarget,
    per_layer: Sequence[LayerTarget] | None = None,
    per_module: Mapping[str, LayerTarget] | None = None,
) -> Callable[[str], LayerTarget]:
    """``name -> LayerTarget``: the first regex of ``per_module`` found in the full module name,
    else the module's layer's entry of ``per_layer``, else ``default``."""
    rules = [(re.compile(rx), t) for rx, t in (per_module or {}).items()]

    def target_of(name: str) -> LayerTarget:
        for rx, t in rules:
            if rx.search(name):
                return t
        if per_layer is not None:
            return per_layer[layer_index(name)]
        return default

    return target_of


def zero_pattern(t: Target) -> tuple[float, str]:
    """The target's measured sparsity and the sha256 of its zero pattern (``[out, in]`` row-major
    bits), from one pass over the stored weight."""
    import hashlib

    import numpy as np

    W = t.stored()
    W = W.T if t.transposed else W  # [out, in]
    kept = (W != 0).cpu().numpy().reshape(-1)  # [out·in] bool
    sparsity = 1.0 - np.count_nonzero(kept) / kept.size if kept.size else 0.0
    return sparsity, hashlib.sha256(np.packbits(kept).tobytes()).hexdigest()


class NonFiniteError(ValueError):
    """Statistics or a pruned weight hold inf or NaN; the message names the module and the fix."""


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry is finite: one sum (inf and NaN propagate through it), and the exact
    elementwise test only when the sum itself is not finite (it could overflow on huge values)."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def check_finite_stats(name: str, stats: InputStats) -> None:
    """Overflowed activations (float16 models overflow often) make Σx² or H infinite, and a pruner
    would then keep or drop whole columns silently: fail naming the module instead."""
    for what, value in (("Σx²", stats.sq), ("Σx", stats.sum), ("H = Σxxᵀ", stats._H)):
        if value is not None and not all_finite(value):
            raise NonFiniteError(
                f"the input statistics of {name} ({what}) are not finite: its activations overflowed during "
                "calibration; prune in float32 or bfloat16 (--dtype float32), or leave it dense (--ignore)"
            )


class PrunePlan:
    """Prunes one target at a time: ``plan(target, stats) -> ModuleReport``."""

    def __init__(self, pruner: Pruner, target_of: Callable[[str], LayerTarget | float],
                 refiner: Refiner | None = None, nm: tuple[int, int] | None = None,
                 reconstructor: Reconstructor | None = None, compensator: Compensator | None = None):
        self.pruner = pruner
        self._target_of = target_of
        self.refiner = refiner
        self.reconstructor = reconstructor  # after the pruner and the refinement: new kept weights, same mask
        self.compensator = compensator  # last: a low-rank correction kept beside the sparse weight
        self.adapters: dict[str, LowRank] = {}  # module -> its correction (compensator)
        self.uncompensated: dict[str, str] = {}  # pruned modules the compensator could not adapt, and why
        self.nm = nm  # the pattern of targets whose ``target_of`` gives a bare fraction
        # input-channel permutations of N:M results chosen in a permuted order (RIA):
        # W[:, perm] has the N:M pattern in consecutive groups, W itself in general not
        self.permutations: dict[str, torch.Tensor] = {}
        self.nm_search: dict[str, str] = {}  # N:M pattern -> how the pruner chose each group (exact, greedy, ...)

    @property
    def needs(self) -> frozenset[str]:
        """The statistics every target's input must provide."""
        return frozenset().union(*(m.needs for m in (self.pruner, self.refiner, self.reconstructor, self.compensator)
                                   if m is not None))

    def target_of(self, name: str) -> LayerTarget:
        t = self._target_of(name)
        return t if isinstance(t, LayerTarget) else LayerTarget(float(t), self.nm)

    def pruned(self, name: str, W: torch.Tensor, stats: InputStats | None, spec: LayerTarget):
        """``W [out, in]`` (dense float32) pruned to ``spec`` by the pruner, the refinement and the
        reconstruction: ``(result, reconstruction or None, pruner used, fallback or None)``. Nothing is
        written to the model (:meth:`__call__` does; the search's variant database stores it)."""
        pruner, refiner, fallback, reconstructor = self.pruner, self.refiner, None, self.reconstructor
        if (stats is None or stats.n == 0) and self.needs:
            # e.g. an expert no calibration token was routed to
            fallback = "magnitude: no calibration tokens reached it"
            log.warning("%s received no calibration tokens; pruning it by magnitude instead of %s",
                        name, pruner.name)
        if stats is None or stats.n == 0:
            pruner, refiner, stats, reconstructor = Magnitude(), None, InputStats(), None
        else:
            check_finite_stats(name, stats)
        choice = getattr(pruner, "nm_choice", None)
        if spec.nm is not None and choice is not None:
            self.nm_search[pattern_name(spec.nm)] = choice(spec.nm)
        res = pruner.prune(W, stats, spec.sparsity, spec.nm)
        if refiner is not None and spec.sparsity > 0 and refiner.applies(name):
            res = refiner.refine(W, res, stats, spec.sparsity, spec.nm)
        rec = None
        if reconstructor is not None and spec.sparsity > 0:
            res, rec = reconstructor.reconstruct(W, res, stats, spec.nm)
        if not all_finite(res.W):
            raise NonFiniteError(
                f"{name}: {pruner.name} produced non-finite weights (the weight or its statistics hold inf/NaN); "
                "check the model's weights, or prune in float32 (--dtype float32)"
            )
        return res, rec, pruner, fallback

    def __call__(self, t: Target, stats: InputStats | None) -> ModuleReport:
        spec = self.target_of(t.name)
        W = t.get_weight()  # [out, in] float32
        res, rec, pruner, fallback = self.pruned(t.name, W, stats, spec)
        if pruner is not self.pruner:
            stats = InputStats()
        compensator = self.compensator if pruner is self.pruner else None
        t.set_weight(res.W.masked_fill(res.W == 0, 0.0))  # W * M leaves -0.0: pruned zeros are stored as +0.0
        pattern = pattern_name(spec.nm)
        perm = getattr(res, "perm", None)
        if spec.nm is not None and perm is not None:
            pattern += " permuted"
            self.permutations[t.name] = perm.to("cpu", torch.int32)  # [in]
        sparsity, mask_sha256 = zero_pattern(t)
        comp = None
        if compensator is not None and spec.sparsity > 0:
            if t.index is None and t.param == "weight":
                lr = compensator.compensate(W, res.W, stats)
                if lr is not None:
                    self.adapters[t.name] = lr
                    comp = {"rank": lr.rank, "params": lr.params, "error_before": lr.error_before,
                            "error_after": lr.error_after}
            else:  # one expert of a fused 3-D parameter: no module for a LoRA pair to attach to
                self.uncompensated[t.name] = "an expert of a fused expert parameter (no Linear module for LoRA)"
        return ModuleReport(
            name=t.name,
            shape=t.shape,
            target_sparsity=spec.sparsity,
            sparsity=sparsity,
            error=relative_error(W, res.W, stats.sample),
            tokens=stats.n,
            pattern=pattern,
            fallback=fallback,
            mask_sha256=mask_sha256,
            reconstruct=None if rec is None else {"error_before": rec.error_before, "error_after": rec.error_after,
                                                  "iterations": rec.iterations},
            compensate=comp,
        )
