"""Calibration of activation thresholds: one pass over the decoder layers, after any weight pruning.

For each decoder layer, on the calibration chunks the engine captured (:class:`SequentialRun`):

1. **Tensors.** The thresholded tensors are the inputs of the layer's targets (q/k/v share one,
   gate/up share one, o_proj and down_proj one each; a fused-experts module's input), or, for
   CATS, the output of each gated MLP's activation module. Shared inputs are recognised by
   identity (the same tensor object reaches several modules) in one probe forward of the first
   layer, and the same structure is assumed in every layer (one ModuleList of one class). WINA
   'official' then gives every reader of a shared input its own threshold (q, k, v; gate, up), as
   its official code does (:mod:`.criteria`).
2. **Allocation.** ``uniform``: every tensor gets the target sparsity. ``greedy`` (TEAL's block-wise
   greedy, ``teal/greedyopt.py``): from all sparsities 0, each step raises the sparsity of one
   tensor so that the layer's weighted sparsity ``Σ_g s_g w_g / Σ_g w_g`` grows by ``step``
   (``w_g``: the weights tensor ``g`` feeds, read from the model's shapes), choosing the tensor whose
   step gives the least layer output error ``mean_t ‖Y_t − Ŷ_t‖₂`` on the first calibration chunk;
   it stops at the target, the last step trimmed so the layer meets it exactly. Candidate
   thresholds come from the layer's input distributions with this layer dense. Deviations from the
   reference: the error is over every position (TEAL: the last quarter of each sequence), steps are
   equal in weighted sparsity (TEAL: per-projection steps scaled by hand-written weight ratios), and
   shared inputs share one sparsity.
3. **Thresholds, in call order.** Each tensor's threshold is the ``s_g`` quantile of its scores over
   every calibration token, gathered with the earlier tensors of the layer already thresholded
   (each chunk's forward stops at the tensor being calibrated), so every threshold sees the inputs
   it sees at inference; the previous layers are thresholded too. A last forward with every
   threshold of the layer gives the outputs that feed the next layer, and the sparsity each tensor
   reached on the calibration tokens.

Quantiles: scores are kept in full while a tensor has at most ``max_sample`` entries over the
calibration set, and otherwise as a uniform random sample (with replacement, seeded) of
``max_sample`` entries. By the Dvoretzky–Kiefer–Wolfowitz inequality the fraction of calibration
entries below the sample quantile is within ``ε`` of the target with probability at least
``1 − 2·exp(−2·n·ε²)``: for the default ``n = 2^24``, ``ε = 0.001`` fails with probability below
``1e-14``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.capture import inference_state, module_device
from ..engine.passes import _store_output
from ..engine.targets import _is_conv1d, find_targets
from .apply import ActivationThreshold, ThresholdSpec, _register, install
from .criteria import CRITERIA, WINA_LAYOUTS, column_norms, gated_activations, reader_weights, wina_normed
from .result import ActivationResult, measure_holdout

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "greedy")
MAX_SAMPLE = 1 << 24  # score entries kept per tensor for its quantiles
MAX_SPARSITY = 0.99  # greedy never zeroes a whole tensor


class _Stop(Exception):
    """Ends a chunk's layer forward once the tensor being calibrated was seen."""


@dataclass
class _Group:
    rel: list[str]  # member names relative to the layer
    site: str
    weights: int = 0
    norms: torch.Tensor | None = None  # WINA: ‖W_:,j‖₂ of the (stacked) members, None: scored by |x|  [in]


class ActivationCalibration:
    """Chooses per-tensor thresholds layer by layer on a :class:`~llmprune.engine.SequentialRun`."""

    def __init__(self, criterion: str, sparsity: float, allocation: str = "uniform", step: float = 0.025,
                 max_sample: int = MAX_SAMPLE, seed: int = 0, wina: str = "official", prefill: float = 0.0):
        if criterion not in CRITERIA:
            raise ValueError(f"unknown activation criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown activation allocation {allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"activation sparsity {sparsity} is out of range; give a fraction in [0, 1), e.g. 0.5")
        if wina not in WINA_LAYOUTS:
            raise ValueError(f"unknown WINA layout {wina!r}; choose one of: {', '.join(WINA_LAYOUTS)}")
        if not 0.0 <= prefill <= 1.0:
            raise ValueError(f"activation prefill fraction {prefill} is out of range; give a fraction in [0, 1] "
                             "(0: decode steps only, 0.5: TEAL's reference, 1: every position)")
        self.criterion, self.sparsity, self.allocation = criterion, sparsity, allocation
        self.wina, self.prefill = wina, prefill  # prefill: where the thresholds apply later, recorded in the result
        self.step, self.max_sample, self.seed = step, max_sample, seed

    # ---- the tensors of a layer ------------------------------------------------------------
    def _members(self, layer: nn.Module, prefix: str, targets: str | None, ignore: str | None) -> dict[str, str]:
        """Relative name → site of every module whose input (or output, CATS) may be thresholded."""
        if self.criterion == "cats":
            gated, plain = gated_activations(layer, prefix)
            if not gated:
                raise ValueError(
                    f"activation criterion 'cats' thresholds the activation of gated MLPs (act(gate(x)) * up(x)), "
                    f"but {prefix} has none ({', '.join(plain) or 'no activation module'}: not gated); use "
                    "--activation teal or wina for this architecture"
                )
            return {n[len(prefix) + 1:]: "output" for n in gated}
        found = find_targets(layer, prefix, targets, ignore)
        out = {t.name[len(prefix) + 1:]: "input" for t in found.targets}
        for g in found.groups:
            if g.gate_up:  # fused experts: their common input (the down projections' inputs stay dense)
                name = g.gate_up[0].name.rsplit(".gate_up_proj", 1)[0]
                out[name[len(prefix) + 1:]] = "input"
        return out

    def _probe(self, layer: nn.Module, prefix: str, forward, targets: str | None,
               ignore: str | None) -> list[_Group]:
        """The layer's thresholded tensors in call order, members grouped by the tensor they read."""
        members = self._members(layer, prefix, targets, ignore)
        seen: list[tuple[Any, str]] = []  # (tensor, rel name) in call order
        handles = []
        for rel, site in members.items():
            mod = layer.get_submodule(rel)
            if site == "output":
                handles.append(mod.register_forward_hook(
                    lambda m, a, out, rel=rel: seen.append((out, rel))))
            else:
                def pre(m, args, kwargs, rel=rel):
                    x = args[0] if args else kwargs.get("hidden_states")
                    seen.append((x, rel))
                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            forward()
        finally:
            for h in handles:
                h.remove()
        groups: list[_Group] = []
        by_tensor: dict[int, _Group] = {}
        for x, rel in seen:
            if any(rel in g.rel for g in groups):
                continue  # a module called twice (experts' act_fn once per expert): one tensor kind
            g = by_tensor.get(id(x)) if members[rel] == "input" else None
            if g is None:
                g = by_tensor[id(x)] = _Group([], members[rel])
                groups.append(g)
            g.rel.append(rel)
        return groups

    def _weights(self, layer: nn.Module, g: _Group) -> int:
        """Weights the tensor feeds: its readers' weights; for CATS, ``up`` and ``down`` of its MLP."""
        if g.site == "output":
            mlp = layer.get_submodule(g.rel[0].rpartition(".")[0]) if "." in g.rel[0] else layer
            total = 0
            for name in ("up_proj", "w3", "down_proj", "w2"):
                sub = getattr(mlp, name, None)
                if isinstance(sub, (nn.Module, torch.Tensor)):
                    total += (sub.weight if isinstance(sub, nn.Module) else sub).numel()
            gu = getattr(mlp, "gate_up_proj", None)
            if gu is not None:
                total += (gu.weight if isinstance(gu, nn.Module) else gu).numel() // 2
            return total
        total = 0
        for rel in g.rel:
            mod = layer.get_submodule(rel)
            if isinstance(mod, nn.Linear) or _is_conv1d(mod):
                total += mod.weight.numel()
            else:  # fused experts: every expert's gate_up (each token reads top-k of them)
                total += mod.gate_up_proj.numel()
        return total

    def _norms(self, layer: nn.Module, g: _Group) -> torch.Tensor | None:
        if self.criterion != "wina":
            return None
        mods = [layer.get_submodule(rel) for rel in g.rel]
        if self.wina == "official" and not (g.site == "input" and wina_normed(g.rel[0], mods[0])):
            return None  # official WINA: |x| alone on q, v, o, up, down
        return column_norms([reader_weights(m) for m in mods])  # [in]

    # ---- scores and quantiles ----------------------------------------------------------------
    def _scores(self, g: _Group, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The scores of ``x [..., in]`` flattened, or only those at flat indices ``idx [m]`` (a sample: no
        float32 copy of the whole chunk, which at 70B widths is gigabytes per tensor; the same values)."""
        if idx is None:
            S = x.detach().abs().float()  # [..., in]
            if g.norms is not None:
                S = S * g.norms.to(S.device)
            return S.reshape(-1)
        idx = idx.to(x.device)
        S = x.detach().reshape(-1)[idx].abs().float()  # [m]
        if g.norms is not None:
            S = S * g.norms.to(S.device)[idx % x.shape[-1]]
        return S

    @staticmethod
    def _quantile(v: torch.Tensor, s: float) -> float:
        """Threshold zeroing a fraction ``s`` of the entries of sorted ``v``: ``v[⌈s·n⌉]`` (0 for s = 0)."""
        if s <= 0:
            return 0.0
        k = min(v.numel() - 1, math.ceil(s * v.numel()))
        return float(v[k])

    # ---- the pass ----------------------------------------------------------------------------
    def run(self, run) -> ActivationResult:
        """Calibrate every layer of ``run`` (a :class:`~llmprune.engine.SequentialRun`) and return the
        thresholds; the model is left without hooks (install them with :func:`.apply.install`)."""
        t0 = time.perf_counter()
        result = ActivationResult(self.criterion, self.allocation, self.sparsity,
                                  step=self.step if self.allocation == "greedy" else None,
                                  wina=self.wina if self.criterion == "wina" else None, prefill=self.prefill)
        gen = torch.Generator().manual_seed(self.seed)
        structure: list[list[str]] | None = None
        with inference_state(run.model):
            hidden, calls = run._capture()
            n_tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
            for i in run._bar("activation thresholds"):
                layer = run.layers[i]
                prefix = f"{run.layers_name}.{i}"
                home = module_device(layer)
                layer.to(run.device)

                def forward(c: int, layer=layer, i=i) -> torch.Tensor:
                    return calls[c][i](layer, hidden[c])

                if structure is None:
                    groups = self._probe(layer, prefix, lambda: forward(0), run.targets, run.ignore)
                    structure = [g.rel for g in groups]
                    sites = [g.site for g in groups]
                    if self.criterion == "wina" and self.wina == "official":  # a threshold per reader
                        sites = [site for rel, site in zip(structure, sites) for _ in rel]
                        structure = [[r] for rel in structure for r in rel]
                    log.info("activation tensors per layer: %s", "; ".join("/".join(r) for r in structure))
                groups = [_Group(list(rel), site) for rel, site in zip(structure, sites)]
                for g in groups:
                    g.weights = self._weights(layer, g)
                    g.norms = self._norms(layer, g)
                targets = self._allocate(layer, groups, forward, len(hidden), n_tokens, gen)
                layer_specs = self._calibrate_layer(layer, prefix, groups, targets, forward, len(hidden),
                                                    n_tokens, gen, hidden, _store_output)
                result.specs.extend(layer_specs)
                layer.to(home)
                observed = getattr(run.residency, "observed", None)
                if observed is not None:
                    observed(i, layer)
        result.seconds = time.perf_counter() - t0
        return result

    def _gather(self, layer: nn.Module, groups: list[_Group], forward, n_chunks: int, n_tokens: int,
                gen: torch.Generator, stop_at: int | None, installed: list[ThresholdSpec]) -> dict[int, torch.Tensor]:
        """Sorted scores of ``groups`` (all, or only ``stop_at``, where each chunk's forward stops) over every
        chunk, with the ``installed`` thresholds of this layer applied."""
        wanted = range(len(groups)) if stop_at is None else [stop_at]
        parts: dict[int, list[torch.Tensor]] = {k: [] for k in wanted}
        handles, _ = self._install_layer(layer, installed, groups)
        seen: set[int] = set()

        def take(k: int, x: torch.Tensor) -> None:
            if k in seen:  # a shared tensor is scored once per forward (first member); experts: every call
                if groups[k].site == "input":
                    return
            seen.add(k)
            expected = n_tokens * x.shape[-1]
            if expected > self.max_sample:  # a uniform sample of this chunk's share, drawn before any copy
                m = max(1, round(x.numel() * self.max_sample / expected))
                S = self._scores(groups[k], x, torch.randint(x.numel(), (m,), generator=gen))  # [m]
            else:
                S = self._scores(groups[k], x)  # [entries]
            parts[k].append(S)
            if stop_at is not None and groups[k].site == "input":
                raise _Stop

        for k in wanted:
            g = groups[k]
            mod = layer.get_submodule(g.rel[0])
            if g.site == "output":
                def post(m, a, out, k=k):
                    take(k, out)
                    return None
                handles.append(mod.register_forward_hook(post))
            else:
                def pre(m, args, kwargs, k=k):
                    take(k, args[0] if args else kwargs["hidden_states"])
                # after the installed threshold hooks: they ran first and already thresholded the earlier tensors
                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            for c in range(n_chunks):
                seen.clear()
                try:
                    forward(c)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return {k: torch.sort(torch.cat(v))[0] if v else torch.zeros(1) for k, v in parts.items()}

    def _install_layer(self, layer: nn.Module, specs: list[ThresholdSpec],
                       groups: list[_Group]) -> tuple[list, list[ActivationThreshold]]:
        """Hooks applying ``specs`` (names relative to ``layer``) on the layer: ``(handles, modules)``, one
        counting module per spec (for the calibration sparsity)."""
        handles, modules = [], []
        by_rel = {tuple(g.rel): g for g in groups}
        for spec in specs:
            g = by_rel[tuple(spec.members)]
            per_feature = None
            if g.norms is not None:
                per_feature = torch.where(g.norms > 0, spec.threshold / g.norms.clamp_min(1e-30),
                                          torch.full_like(g.norms, float("inf")))
            mod = ActivationThreshold(spec, per_feature)
            mod.measuring = True
            modules.append(mod)
            for rel in spec.members:
                handles.append(_register(layer.get_submodule(rel), mod, spec.site))
        return handles, modules

    def _allocate(self, layer: nn.Module, groups: list[_Group], forward, n_chunks: int, n_tokens: int,
                  gen: torch.Generator) -> list[float]:
        """Each tensor's sparsity: the target (uniform), or TEAL's greedy choice for this layer."""
        if self.allocation == "uniform" or self.sparsity == 0 or len(groups) == 1:
            return [self.sparsity] * len(groups)
        sorted_scores = self._gather(layer, groups, forward, n_chunks, n_tokens, gen, None, [])
        w = torch.tensor([float(g.weights) for g in groups])  # [G]
        W = float(w.sum())
        Y0 = forward(0)  # the dense layer's output on the first chunk  [b, L, H]

        def error(s: list[float]) -> float:
            specs = [ThresholdSpec("", g.rel, self._quantile(sorted_scores[k], s[k]), g.site)
                     for k, g in enumerate(groups) if s[k] > 0]
            handles, _ = self._install_layer(layer, specs, groups)
            try:
                Y = forward(0)
            finally:
                for h in handles:
                    h.remove()
            return float((Y.float() - Y0.float()).norm(dim=-1).mean())

        s = [0.0] * len(groups)
        while sum(si * wi for si, wi in zip(s, w.tolist())) / W < self.sparsity - 1e-9:
            best, best_err = None, math.inf
            for k in range(len(groups)):
                if s[k] >= MAX_SPARSITY:
                    continue
                cand = list(s)
                cand[k] = min(MAX_SPARSITY, s[k] + self.step * W / float(w[k]))
                e = error(cand)
                if e < best_err:
                    best, best_err = cand, e
            if best is None:
                break
            k_changed = next(k for k in range(len(groups)) if best[k] != s[k])
            s = best
            over = sum(si * wi for si, wi in zip(s, w.tolist())) / W - self.sparsity
            if over > 0:  # trim the last step so the layer meets the target exactly
                s[k_changed] = max(0.0, s[k_changed] - over * W / float(w[k_changed]))
        log.debug("greedy sparsities: %s", ", ".join(f"{'/'.join(g.rel)} {x:.3f}" for g, x in zip(groups, s)))
        return s

    def _calibrate_layer(self, layer: nn.Module, prefix: str, groups: list[_Group], targets: list[float],
                         forward, n_chunks: int, n_tokens: int, gen: torch.Generator, hidden: list[torch.Tensor],
                         store) -> list[ThresholdSpec]:
        """Thresholds of the layer's tensors in call order, then the thresholded outputs (see module docstring)."""
        local: list[ThresholdSpec] = []
        for k, g in enumerate(groups):
            if targets[k] <= 0:
                t = 0.0
            else:
                v = self._gather(layer, groups, forward, n_chunks, n_tokens, gen, k, local)[k]
                t = self._quantile(v, targets[k])
            local.append(ThresholdSpec("", g.rel, t, g.site, targets[k], weights=g.weights,
                                       norms=(g.norms is not None) if self.criterion == "wina" else None))
        handles, modules = self._install_layer(layer, local, groups)
        try:
            for c in range(n_chunks):
                store(hidden, c, forward(c))
        finally:
            for h in handles:
                h.remove()
        out = []
        for spec, g, mod in zip(local, groups, modules):
            members = [f"{prefix}.{r}" for r in g.rel]
            out.append(ThresholdSpec(members[0], members, spec.threshold, g.site, spec.target,
                                     mod.zeros / mod.total if mod.total else None, weights=g.weights,
                                     norms=spec.norms))
        return out


__all__ = ["ALLOCATIONS", "ActivationCalibration", "ActivationResult", "install", "measure_holdout"]
