"""Passes over the decoder layers: prune, or observe only.

A :class:`SequentialRun` holds what both share (the layers, the calibration chunks, the device,
the target filters). Each pass captures every layer's real call (:mod:`.capture`), then goes
layer by layer on the compute device; a layer's outputs feed the next layer.

- :meth:`SequentialRun.prune`, per decoder layer:
  - one pass (the whole calibration batch fits): a forward pre-hook on each target gathers the
    statistics of its input and prunes it just before it is applied, so later modules of the
    layer see the outputs of already-pruned ones (true-sequential order inside the layer) and
    the layer's pruned outputs come out of the same forward. On the CPU the batch runs as small
    chunks in lockstep (:mod:`.lockstep`);
  - two passes (chunks): statistics of every target are gathered over all chunks with the
    dense layer, every target is pruned, and a second pass computes the pruned outputs.
- :meth:`SequentialRun.observe`: the dense model, one forward per chunk and layer, each layer's
  statistics handed to a reducer (an allocator such as OWL); no weight changes. The first
  layer's statistics are kept for the prune pass that follows, where they are still valid.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from ..stats import InputStats
from ..steps import ObservedModule
from .capture import capture_layer_inputs, inference_state, module_device, resolve_device
from .layer import LayerReport, LayerWork
from .lockstep import Lockstep, compute_chunk
from .plan import PrunePlan
from .residency import LayerResidency
from .targets import find_decoder_layers, find_targets

log = logging.getLogger(__name__)


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


def _store_output(hidden: list[torch.Tensor], c: int, out: torch.Tensor) -> None:
    """Chunk ``c``'s layer output becomes its next input, written over the old one when it fits."""
    h = hidden[c]
    if (out.shape == h.shape and out.dtype == h.dtype and out.device == h.device
            and out.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()):
        h.copy_(out)
    else:
        hidden[c] = out


class SequentialRun:
    """Calibration ``input_ids [n, L]`` run through ``model``'s decoder layers, one at a time."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        targets: str | None = None,
        ignore: str | None = None,
        progress: bool = True,
        residency: LayerResidency | None = None,
    ):
        self.model = model
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.layers_name, self.layers = find_decoder_layers(model)
        self.targets, self.ignore = targets, ignore
        self.progress = progress
        self.residency = residency
        n, L = input_ids.shape
        if batch_size is None:
            batch_size = plan_batch_size(n, L, self.layers[0], next(model.parameters()).dtype, self.device)
        self.batch_size = min(batch_size, n)
        self.one_pass = self.batch_size >= n
        self.chunks = list(input_ids.split(compute_chunk(L, self.batch_size, self.device)))
        self._reuse: dict[str, InputStats] = {}  # the first layer's dense statistics, from observe()
        log.info(
            "%d decoder layers at %s; calibration %d x %d in %d chunk(s): %s",
            len(self.layers), self.layers_name, n, L, len(self.chunks),
            "one pass per layer (true-sequential)" if self.one_pass else "two passes per layer",
        )
        if not any(any(find_targets(layer, "", targets, ignore)) for layer in self.layers):
            raise ValueError(
                f"no module matched targets={targets!r} ignore={ignore!r} inside the decoder layers; "
                "names are relative to a layer, e.g. 'self_attn\\.q_proj' or 'mlp\\.'"
            )

    def _capture(self) -> tuple[list[torch.Tensor], list]:
        hidden, calls = capture_layer_inputs(self.model, self.layers, self.chunks, self.device)
        if all(h.shape[1:] == hidden[0].shape[1:] for h in hidden):
            # one buffer for the hidden states of every chunk, which each layer's outputs overwrite
            # in place: no long-lived blocks scattered through the heap between layers
            hidden = list(torch.cat(hidden).split([h.shape[0] for h in hidden]))
        if self.residency is not None:
            self.residency.set_aside(self.model, self.layers)
        return hidden, calls

    def _targets(self, i: int, layer: nn.Module):
        return find_targets(layer, f"{self.layers_name}.{i}", self.targets, self.ignore)

    def _bar(self, desc: str):
        from tqdm.auto import tqdm

        return tqdm(range(len(self.layers)), desc=desc, unit="layer", disable=not self.progress)

    # ---- observe only ----------------------------------------------------------------------
    def observe(self, needs: frozenset[str], reducer: Callable[[int, list[ObservedModule]], None],
                keep_first: frozenset[str] = frozenset()) -> None:
        """One dense forward per chunk and layer; ``reducer(i, modules)`` gets layer ``i``'s targets
        with their dense weights and the ``needs`` statistics of their inputs. The first layer's
        statistics are gathered with ``keep_first`` too and kept for :meth:`prune`."""
        with inference_state(self.model):
            hidden, calls = self._capture()
            for i in self._bar("observing layers"):
                layer = self.layers[i]
                home = module_device(layer)
                layer.to(self.device)
                tgts, groups = self._targets(i, layer)
                need = needs | keep_first if i == 0 else needs
                with LayerWork(tgts, groups, need, prune=None, prune_in_hook=False) as lw:
                    for c in range(len(self.chunks)):
                        lw.new_forward()
                        _store_output(hidden, c, calls[c][i](layer, hidden[c]))
                mods = [ObservedModule(t.name, t.get_weight(), lw.stats[t.name])
                        for t in lw.all_targets if t.name in lw.stats]
                reducer(i, mods)
                if i == 0 and keep_first:
                    self._reuse = dict(lw.stats)
                layer.to(home)
                observed = getattr(self.residency, "observed", None)
                if observed is not None:
                    observed(i, layer)

    # ---- prune -----------------------------------------------------------------------------
    def prune(self, plan: PrunePlan) -> list[LayerReport]:
        """Prune the model in place, layer by layer; one report per layer."""
        reports: list[LayerReport] = []
        chunks, device, residency = self.chunks, self.device, self.residency
        with inference_state(self.model):
            hidden, calls = self._capture()
            bar = self._bar("pruning layers")
            for i in bar:
                t0 = time.perf_counter()
                layer = self.layers[i]
                home = module_device(layer)
                if residency is not None:
                    residency.acquire(i, layer)
                layer.to(device)
                tgts, groups = self._targets(i, layer)
                reuse = self._reuse if i == 0 else None
                with LayerWork(tgts, groups, plan.needs, plan, prune_in_hook=self.one_pass, reuse=reuse) as lw:
                    if not self.one_pass:  # pass 1: statistics over every chunk with the dense layer
                        for c in range(len(chunks)):
                            lw.new_forward()
                            calls[c][i](layer, hidden[c])
                        lw.new_forward()
                        lw.prune_remaining()
                    if self.one_pass and len(chunks) > 1:  # prune in the hooks, chunks in lockstep
                        lw.new_forward()
                        lw.lockstep = Lockstep(layer)
                        lw.lockstep.run(
                            [functools.partial(calls[c][i], layer, hidden[c]) for c in range(len(chunks))],
                            lw.release, functools.partial(_store_output, hidden),
                        )
                        lw.lockstep = None
                    else:
                        for c in range(len(chunks)):  # (one pass: prune in the hooks) pruned outputs
                            lw.new_forward()
                            _store_output(hidden, c, calls[c][i](layer, hidden[c]))
                    lw.prune_remaining()
                self._reuse = {}
                layer.to(home)
                if residency is not None:
                    residency.release(i, layer)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rep = LayerReport(i, time.perf_counter() - t0, [lw.reports[t.name] for t in lw.all_targets])
                reports.append(rep)
                bar.set_postfix(err=f"{rep.error:.3f}", sec=f"{rep.seconds:.1f}")
                log.debug("layer %d: %.1fs, mean relative error %.4f", i, rep.seconds, rep.error)
        return reports


def run_sequential(
    model: nn.Module,
    input_ids: torch.Tensor,
    pruner,
    sparsity_of: Callable[[str], float],
    nm: tuple[int, int] | None = None,
    targets: str | None = None,
    ignore: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    progress: bool = True,
    residency: LayerResidency | None = None,
    refiner=None,
) -> list[LayerReport]:
    """Prune ``model`` in place, decoder layer by decoder layer, on calibration ``input_ids [n, L]``.

    ``sparsity_of(name)`` gives each target's sparsity (a fraction with the pattern ``nm``, or a
    :class:`~llmprune.steps.LayerTarget`); ``residency`` may bring each layer into memory before it
    is pruned and move it out after (see :mod:`llmprune.offload`).
    """
    run = SequentialRun(model, input_ids, device=device, batch_size=batch_size, targets=targets,
                        ignore=ignore, progress=progress, residency=residency)
    return run.prune(PrunePlan(pruner, sparsity_of, refiner=refiner, nm=nm))
