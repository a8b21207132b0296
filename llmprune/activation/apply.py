"""Installing calibrated activation thresholds on a model, and taking them off again.

A threshold is data (a number per tensor, see :mod:`.criteria`); it is applied by a small module,
:class:`ActivationThreshold`, registered as a forward pre-hook on the modules that read the
tensor (or as a forward hook on the activation module, for CATS). No ``forward`` is patched and
no parameter is renamed, so ``state_dict``, ``save_pretrained`` and every evaluation run unchanged;
:meth:`ActivationSparsity.remove` takes the hooks off and the model computes its dense outputs
again, bit for bit.

Modules fed the very same tensor that share one threshold (q/k/v and gate/up under TEAL and WINA
'stacked') share the mask: the first of them to run computes the sparse tensor and the others reuse it
(same object in, same object out), so the mask is computed once per tensor. WINA as its official code
gives each of them its own threshold, so each computes its own mask.

Where thresholds apply in a call (``activation_prefill``) and the sparse CPU decode path are described
in :mod:`.threshold`, with the modules that do it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .criteria import CRITERIA, column_norms, reader_weights
from .threshold import SITES, ActivationThreshold, CallShape, SparseDecodeLinear, ThresholdSpec

log = logging.getLogger(__name__)

def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass
class ActivationSparsity:
    """The thresholds installed on a model (what :func:`apply_activation_sparsity` returns).

    ``remove()`` takes them off (the model's dense outputs come back exactly); ``measure()`` is a
    context in which every thresholded tensor counts its zeros, read back by :meth:`sparsity`.
    """

    model: nn.Module
    criterion: str
    specs: list[ThresholdSpec]
    modules: list[ActivationThreshold] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    swapped: dict[str, SparseDecodeLinear] = field(default_factory=dict)
    prefill: float = 1.0  # fraction of a prefill's last positions thresholded (decode steps: always)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for name, wrapper in self.swapped.items():
            _set_module(self.model, name, wrapper.restore())
        self.swapped.clear()
        if getattr(self.model, "_llmprune_activation", None) is self:
            del self.model._llmprune_activation

    def __enter__(self) -> ActivationSparsity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextlib.contextmanager
    def applied(self, prefill: float) -> Iterator[None]:
        """Threshold the last ``prefill`` fraction of each multi-position call while inside (a perplexity
        protocol: 1 every position, 0.5 TEAL's evaluation); the installed setting comes back after."""
        if not 0.0 <= prefill <= 1.0:
            raise ValueError(f"prefill fraction {prefill} is out of range; give a fraction in [0, 1]")
        for m in self.modules:
            m.prefill = prefill
        try:
            yield
        finally:
            for m in self.modules:
                m.prefill = self.prefill

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Count zeros of every thresholded tensor while inside (counters reset on entry)."""
        for m in self.modules:
            m.measuring, m.zeros, m.total = True, 0, 0
        try:
            yield
        finally:
            for m in self.modules:
                m.measuring = False

    def sparsity(self) -> dict[str, Any]:
        """Measured sparsity of each thresholded tensor (by group name) and model-wide: over entries
        (``entries``) and weighted by the weights each tensor feeds (``weighted``, the share of the
        thresholded modules' weight reads skipped)."""
        per = {m.spec.name: m.zeros / m.total for m in self.modules if m.total}
        ents = sum(m.total for m in self.modules)
        w = sum(m.spec.weights for m in self.modules if m.total)
        return {
            "tensors": per,
            "entries": sum(m.zeros for m in self.modules) / ents if ents else None,
            "weighted": sum(per[m.spec.name] * m.spec.weights for m in self.modules if m.total) / w if w else None,
        }


def parse_thresholds(thresholds: Mapping[str, Any]) -> tuple[str, list[ThresholdSpec]]:
    """``(criterion, specs)`` from the ``"activation"`` metadata block of a checkpoint (or a report).

    Accepts ``{"criterion": ..., "thresholds": {module: {"threshold", "group", "site", ...}}}``; a
    module whose entry names another ``group`` shares that group's tensor. An entry's ``norms``
    (wina) says whether its score multiplies by the column norms; absent (before issue 27): it does.
    """
    if "thresholds" not in thresholds or "criterion" not in thresholds:
        raise ValueError("activation thresholds need 'criterion' and 'thresholds' (module -> entry), as written "
                         f"under config.json's llmprune.activation; got keys {sorted(thresholds)}")
    criterion = thresholds["criterion"]
    if criterion not in CRITERIA:
        raise ValueError(f"unknown activation criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    groups: dict[str, ThresholdSpec] = {}
    for module, entry in thresholds["thresholds"].items():
        if not isinstance(entry, Mapping):
            entry = {"threshold": entry}
        group = entry.get("group", module)
        site = entry.get("site", "input")
        if site not in SITES:
            raise ValueError(f"threshold of {module} has site {site!r}; choose one of: {', '.join(SITES)}")
        spec = groups.get(group)
        if spec is None:
            spec = groups[group] = ThresholdSpec(group, [], float(entry["threshold"]), site, entry.get("target"),
                                                 entry.get("calibration"), entry.get("measured"),
                                                 int(entry.get("weights", 0)), entry.get("norms"))
        spec.members.append(module)
    return criterion, list(groups.values())


def _per_feature(model: nn.Module, spec: ThresholdSpec, criterion: str) -> torch.Tensor | None:
    if criterion != "wina" or spec.norms is False:
        return None
    norms = column_norms([reader_weights(model.get_submodule(n)) for n in spec.members])  # [in]
    # a dead input column (norm 0) is never kept: its entries change nothing
    return torch.where(norms > 0, spec.threshold / norms.clamp_min(1e-30), torch.full_like(norms, float("inf")))


def install(model: nn.Module, criterion: str, specs: list[ThresholdSpec],
            sparse_decode: bool = False, prefill: float = 1.0) -> ActivationSparsity:
    """Register one :class:`ActivationThreshold` per spec on ``model`` (see :func:`apply_activation_sparsity`);
    ``prefill``: the fraction of each multi-position call's last positions thresholded (module docstring)."""
    if not 0.0 <= prefill <= 1.0:
        raise ValueError(f"activation prefill fraction {prefill} is out of range; give a fraction in [0, 1] "
                         "(0: decode steps only, 0.5: TEAL's reference, 1: every position)")
    existing = getattr(model, "_llmprune_activation", None)
    if existing is not None:
        raise RuntimeError("activation thresholds are already installed on this model; call .remove() on the "
                           "handle apply_activation_sparsity returned before installing others")
    handle = ActivationSparsity(model, criterion, specs, prefill=prefill)
    names = dict(model.named_modules())
    call = CallShape()
    try:
        handle.handles.extend(call.hooks(model))
        for spec in specs:
            missing = [n for n in spec.members if n not in names]
            if missing:
                raise ValueError(f"activation threshold for {missing[0]}: no such module in {type(model).__name__}; "
                                 "the thresholds belong to another architecture or naming")
            mod = ActivationThreshold(spec, _per_feature(model, spec, criterion), prefill, call)
            handle.modules.append(mod)
            for member in spec.members:
                target = names[member]
                if sparse_decode and spec.site == "input" and (
                        isinstance(target, nn.Linear) or type(target).__name__ == "Conv1D"):
                    wrapper = SparseDecodeLinear(target, mod)  # applies the threshold itself
                    _set_module(model, member, wrapper)
                    handle.swapped[member] = wrapper
                else:
                    handle.handles.append(_register(target, mod, spec.site))
                if sparse_decode and spec.site == "output":  # CATS: down_proj reads the zeros of act * up
                    parent = member.rpartition(".")[0]
                    down = f"{parent}.down_proj" if parent else "down_proj"
                    if isinstance(names.get(down), nn.Linear) and down not in handle.swapped:
                        handle.swapped[down] = SparseDecodeLinear(names[down])
                        _set_module(model, down, handle.swapped[down])
    except BaseException:
        handle.remove()
        raise
    model._llmprune_activation = handle
    return handle


def _register(module: nn.Module, thr: ActivationThreshold, site: str):
    if site == "output":
        return module.register_forward_hook(lambda mod, args, out: thr(out))

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            return (thr.shared(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:  # fused experts called by keyword
            return args, {**kwargs, "hidden_states": thr.shared(kwargs["hidden_states"])}
        return None

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def apply_activation_sparsity(model: nn.Module, thresholds: Mapping[str, Any],
                              sparse_decode: bool = False) -> ActivationSparsity:
    """Install calibrated activation thresholds on ``model``; returns a handle whose ``remove()`` undoes it.

    ``thresholds`` is the ``"activation"`` block of a checkpoint's ``llmprune`` metadata (or of
    :meth:`PruneReport.metadata`): the criterion and, per module, the threshold and the group of
    modules sharing its input; its ``prefill`` (absent before issue 27: 1, every position) says where
    they apply. ``sparse_decode`` (CPU) stores the thresholded weights transposed and computes batch-1
    decode steps from the surviving input rows only (see the module docstring).
    """
    criterion, specs = parse_thresholds(thresholds)
    handle = install(model, criterion, specs, sparse_decode=sparse_decode,
                     prefill=float(thresholds.get("prefill", 1.0)))
    log.info("activation sparsity (%s) installed on %d tensors%s", criterion, len(specs),
             ", sparse decode" if sparse_decode else "")
    return handle


def apply_from_config(model: nn.Module, sparse_decode: bool = False) -> ActivationSparsity | None:
    """Install the thresholds a loaded checkpoint's ``config.json`` carries (``llmprune.activation``);
    None when it has none. This is what ``llmprune.load`` calls."""
    meta = getattr(getattr(model, "config", None), "llmprune", None)
    block = meta.get("activation") if isinstance(meta, Mapping) else None
    if not block:
        return None
    return apply_activation_sparsity(model, block, sparse_decode=sparse_decode)


def installed(model: nn.Module) -> ActivationSparsity | None:
    """The thresholds installed on ``model``, if any."""
    return getattr(model, "_llmprune_activation", None)


def use_sparse_decode(model: nn.Module) -> ActivationSparsity:
    """Re-install the thresholds on ``model`` with the sparse decode path (``llmprune.load(sparse_decode=True)``)."""
    handle = installed(model)
    if handle is None:
        raise ValueError("sparse_decode needs activation thresholds, and this model has none (its config.json has "
                         "no llmprune.activation block); prune with --activation teal, or load without sparse_decode")
    if handle.swapped:
        return handle
    handle.remove()
    return install(model, handle.criterion, handle.specs, sparse_decode=True, prefill=handle.prefill)
