"""The engine side of structured removal: which consumers a width method rewrites, in which layer, and the
layer-level passes that choose whole layers.

:class:`StructuredPlan` takes the place of :class:`~.plan.PrunePlan` in :meth:`SequentialRun.prune`: the run
is restricted to the consumers (``o_proj``, ``down_proj``: :meth:`StructuredPlan.targets`), whose input
statistics are gathered in within-layer order, so the MLP sees the attention output of the layer with its
heads already gone; the plan hands each consumer to the width method and writes the result back with the
removed columns zero. A zeroed head or channel contributes nothing, so the layers after it are calibrated on
exactly the outputs of the smaller model; :mod:`llmprune.checkpoint.surgery` then cuts the zeros out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..stats import InputStats
from ..steps.evopress import window_cuts
from ..structured.base import WidthMethod
from ..structured.columns import ColumnGroups, Moments, WidthResult
from ..structured.depth import BlockInfluence, kl_from_dense
from ..structured.experts import REAPSaliency
from ..structured.removal import LayerRemoval
from .anatomy import AttentionParts, LayerParts, expert_modules
from .capture import inference_state, module_device
from .layer import ModuleReport
from .targets import ExpertGroup, Target, _fused_layout, find_decoder_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCut:
    """What every layer loses (the same in each: a config holds one width): query heads per layer besides
    those of the removed key/value heads, key/value heads, MLP channels."""

    heads: int = 0
    kv_heads: int = 0
    channels: int = 0


class StructuredPlan:
    """Rewrites each consumer of a layer with its removed structures zero: ``plan(target, stats) -> report``.
    ``parts[p]``: the anatomy of the layer at position ``p``; ``original[p]``: its index in the model as
    loaded (before any layer was removed), under which :attr:`per_layer` records what went."""

    def __init__(self, method: WidthMethod, parts: list[LayerParts], original: list[int], cut: LayerCut,
                 layers_name: str):
        self.method = method
        self.needs = method.needs
        self.cut = cut
        self.original = original
        self.per_layer: dict[int, LayerRemoval] = {}
        self.adapters: dict = {}  # what a PrunePlan holds, empty here: the run's report reads them
        self.permutations: dict = {}
        self.nm_search: dict = {}
        self.uncompensated: dict = {}
        self._consumers: dict[str, tuple[str, int, AttentionParts | object]] = {}
        relative = set()
        for pos, p in enumerate(parts):
            for kind, part in (("heads", p.attention if cut.heads or cut.kv_heads else None),
                               ("channels", p.mlp if cut.channels else None)):
                if part is not None:
                    self._consumers[part.out] = (kind, pos, part)
                    relative.add(part.out[len(f"{layers_name}.{pos}."):])
        self._relative = sorted(relative)

    @property
    def targets(self) -> str:
        """A regex of the consumers' names relative to a layer, for :class:`SequentialRun`'s ``targets``."""
        return "^(" + "|".join(re.escape(r) for r in self._relative) + ")$"

    def __call__(self, t: Target, stats: InputStats | None) -> ModuleReport:
        kind, pos, part = self._consumers[t.name]
        if stats is None or stats.n == 0:
            raise ValueError(f"{t.name} received no calibration tokens, so nothing tells which of its structures "
                             "matter; give more calibration data (--nsamples)")
        W = t.get_weight()  # [out, in] float32
        bias = getattr(t.module, "bias", None)
        bias = bias.detach().float().clone() if isinstance(bias, torch.Tensor) else None
        done = LayerRemoval() if self.original[pos] not in self.per_layer else self.per_layer[self.original[pos]]
        if kind == "heads":
            res, done = self._heads(W, bias, stats, part, done)
            what = f"{len(done.heads)} of {part.n_heads} heads"
        else:
            res = self.method.remove(W, bias, stats, ColumnGroups.contiguous(part.n_channels, 1),
                                     self.cut.channels)
            done = LayerRemoval(done.heads, done.kv_heads, tuple(res.removed), done.experts)
            what = f"{len(done.channels)} of {part.n_channels} channels"
        self.per_layer[self.original[pos]] = done
        # both errors against the dense consumer (a two-step head removal reports its steps together)
        m = Moments.of(stats, centred=bias is not None)
        gone = torch.ones(W.shape[1], dtype=torch.bool)
        gone[(res.W != 0).any(0)] = False
        res.error_plain = m.error(W, W.masked_fill(gone, 0.0), compensated=False)
        res.error = m.error(W, res.W, compensated=res.bias is not None and not torch.equal(res.bias, bias))
        t.set_weight(res.W.masked_fill(res.W == 0, 0.0))
        if res.bias is not None:
            t.module.bias.data.copy_(res.bias.to(t.module.bias.dtype))
        return ModuleReport(name=t.name, shape=t.shape, target_sparsity=0.0, sparsity=0.0, error=res.error,
                            tokens=stats.n, pattern=f"structured: {what}",
                            reconstruct={"error_before": res.error_plain, "error_after": res.error, "iterations": 0})

    def _heads(self, W: torch.Tensor, bias, stats: InputStats, a: AttentionParts,
               done: LayerRemoval) -> tuple[WidthResult, LayerRemoval]:
        """Key/value heads first (each a group of its query heads' columns), then query heads, the same
        number from every key/value head left."""
        g = a.n_heads // a.n_kv_heads  # query heads per key/value head
        kv_gone: list[int] = []
        res = None
        if self.cut.kv_heads:
            res = self.method.remove(W, bias, stats, ColumnGroups.contiguous(a.n_kv_heads, g * a.head_dim),
                                     self.cut.kv_heads)
            kv_gone = res.removed
            W, bias = res.W, res.bias if res.bias is not None else bias
        heads_gone = [h for k in kv_gone for h in range(k * g, (k + 1) * g)]
        if self.cut.heads:
            per_kv = self.cut.heads // (a.n_kv_heads - len(kv_gone))
            alive_kv = [k for k in range(a.n_kv_heads) if k not in kv_gone]
            heads = [torch.arange(h * a.head_dim, (h + 1) * a.head_dim) for h in range(a.n_heads)]
            groups = ColumnGroups(heads, [list(range(k * g, (k + 1) * g)) for k in alive_kv],
                                  dead=torch.cat([heads[h] for h in heads_gone]) if heads_gone
                                  else torch.zeros(0, dtype=torch.long))
            res = self.method.remove(W, bias, stats, groups, per_kv)
            heads_gone = sorted(set(heads_gone) | set(res.removed))
        return res, LayerRemoval(tuple(heads_gone), tuple(kv_gone), done.channels, done.experts)


def block_influence(run, progress: bool = True) -> list[float]:
    """ShortGPT's block influence of every decoder layer of ``run``'s model, from one dense pass."""
    acc = [BlockInfluence() for _ in run.layers]
    run.observe(frozenset(), lambda i, mods: None, layer_io=lambda i, x, y: acc[i].add(x, y))
    return [a.value for a in acc]


def _skip_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """A forward hook that makes a decoder layer the identity: its output is its input hidden states."""
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x


def kl_choice(model: nn.Module, input_ids: torch.Tensor, n_remove: int, device: torch.device,
              progress: bool = True, on_step: Callable[[int, list[float]], None] | None = None) -> list[int]:
    """Layers removed one at a time: each step removes the layer whose skipping (with those chosen before)
    gives the lowest mean ``KL(p_dense ‖ p)`` over ``input_ids [n, L]``. The layers are skipped with
    forward hooks, so any architecture's own forward runs; ``on_step(step, kl_per_layer)`` sees the scores."""
    from tqdm.auto import tqdm

    _, layers = find_decoder_layers(model)
    chosen: list[int] = []
    with inference_state(model):
        home = module_device(model)
        model.to(device)
        try:
            ids = input_ids.to(device)
            dense = [torch.log_softmax(model(ids[i:i + 1]).logits.float(), dim=-1) for i in range(ids.shape[0])]
            total = sum(len(layers) - s for s in range(n_remove))
            bar = tqdm(total=total, desc="choosing layers (kl)", unit="forward", disable=not progress)
            for step in range(n_remove):
                scores = [float("inf")] * len(layers)
                for j in range(len(layers)):
                    if j in chosen:
                        continue
                    hooks = [layers[k].register_forward_hook(_skip_hook, with_kwargs=True) for k in (*chosen, j)]
                    try:
                        scores[j] = sum(kl_from_dense(dense[i], model(ids[i:i + 1]).logits)
                                        for i in range(ids.shape[0])) / ids.shape[0]
                    finally:
                        for h in hooks:
                            h.remove()
                    bar.update(1)
                best = min(range(len(layers)), key=lambda j: (scores[j], j))
                chosen.append(best)
                if on_step is not None:
                    on_step(step, scores)
                log.info("layer %d removed: KL %.4f", best, scores[best])
            bar.close()
        finally:
            model.to(home)
    return sorted(chosen)


class SkipFitness:
    """``KL(p_dense ‖ p)`` of ``model``'s final logits over windows ``ids [n, L]`` with some decoder layers
    skipped (the depth search's fitness); the dense log-probabilities are computed once. A skipped layer's
    ``forward`` is replaced, for the call, by one that hands its input hidden states back in the form the layer
    returns (a tensor, or a tuple whose other items are None), so it costs nothing and the model's own loop,
    masks and per-layer attributes stay as they are. The model must be on ``device`` while it is used
    (:func:`~.capture.whole_model_on`)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, device: torch.device):
        self.model, self.ids, self.device = model, ids, device
        _, self.layers = find_decoder_layers(model)
        self.evaluations = 0
        form: list = []  # what a layer returns: a tensor (None) or a tuple of this length
        hook = self.layers[0].register_forward_hook(
            lambda m, a, out: form.append(len(out) if isinstance(out, tuple) else None))
        try:
            with inference_state(model):
                self.dense = [torch.log_softmax(model(ids[i:i + 1].to(device)).logits[0].float(), dim=-1).cpu()
                              for i in range(ids.shape[0])]  # [L, V] each
        finally:
            hook.remove()
        self.form = form[0] if form else None

    def _skip(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return x if self.form is None else (x, *([None] * (self.form - 1)))

    def __call__(self, removed: Sequence[int], windows: Sequence[int], tokens: int) -> float:
        """Mean KL per token over ``windows`` (the last cut so that ``tokens`` tokens count), ``removed`` skipped."""
        self.evaluations += 1
        total, count = 0.0, 0
        for k in removed:
            self.layers[k].forward = self._skip  # an instance attribute: the class's forward is untouched
        try:
            with inference_state(self.model):
                for w, n in window_cuts(windows, tokens, self.ids.shape[1]):
                    logits = self.model(self.ids[w:w + 1, :n].to(self.device)).logits[0]  # [n, V]
                    total += kl_from_dense(self.dense[w][:n], logits.cpu()) * n
                    count += n
        finally:
            for k in removed:
                del self.layers[k].forward
        return total / max(count, 1)


def expert_saliency(run, parts: list[LayerParts]) -> dict[int, torch.Tensor]:
    """REAP saliency ``[n_experts]`` of every MoE layer (by position) of ``run``'s model, from one dense pass.

    A forward pre-hook on each fused experts module reads what the block hands it, ``(hidden_states [T, H],
    top_k_index [T, k], top_k_weights [T, k])``: the model's own routing, after its top-k renormalisation;
    each expert's output for its routed tokens is computed from its weights (``down(act(gate x) * up x)``)."""
    model = run.model
    acc: dict[int, REAPSaliency] = {}
    hooks = []
    for pos, p in enumerate(parts):
        if p.moe is None:
            continue
        _, experts, _ = expert_modules(model, p.moe)
        in_out, why = _fused_layout(experts)
        if in_out is None:
            raise ValueError(f"{p.moe.name}: REAP reads fused experts ({why}); this layout is not supported yet")
        group = ExpertGroup(experts, [], [], in_out=in_out)
        acc[pos] = REAPSaliency(p.moe.n_experts)

        def hook(mod, args, kwargs, group=group, sal=acc[pos]):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            x, idx, w = (*args, *(kwargs[n] for n in names[len(args):]))
            x = x.reshape(-1, x.shape[-1])
            for e, tok in group.routed(idx):
                gate = (w[tok] * (idx[tok] == e)).sum(-1)  # [t_e]  g_e(x)
                inter = group.intermediate(e, x[tok])  # [t_e, I]
                Wd = group.module.down_proj[e]  # [H, I], or [I, H] when in_out
                out = inter @ Wd if group.in_out else nn.functional.linear(inter, Wd)  # [t_e, H]
                sal.add(e, gate, out)

        hooks.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run.observe(frozenset(), lambda i, mods: None)
    finally:
        for h in hooks:
            h.remove()
    return {pos: a.saliency for pos, a in acc.items()}
