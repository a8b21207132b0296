"""Passes over the decoder layers: prune, or observe only.

A :class:`SequentialRun` holds what both share (the layers, the calibration chunks, the device,
the target filters). Each pass captures every layer's real call (:mod:`.capture`), then goes
layer by layer on the compute device; a layer's outputs feed the next layer.

- :meth:`SequentialRun.prune`, per decoder layer, in the order the config names (``sequential``):
  - ``within-layer`` (true-sequential, the default): a forward pre-hook on each target gathers the
    statistics of its input over every calibration chunk and prunes it before the chunks go on, so
    later modules of the layer see the outputs of already-pruned ones. Executed in lockstep
    (:mod:`.lockstep`: every chunk's activations alive at once) when they fit in memory, else
    replayed (each chunk's forward stops at the next target not pruned yet and starts again from
    the layer's input once it is pruned: the memory of one chunk, more compute). Both give the same
    masks: the choice of execution depends on free memory, the result does not;
  - ``dense-layer``: statistics of every target are gathered over all chunks with the dense layer,
    every target is pruned, and a second pass computes the pruned outputs.
  Chunks have a fixed size (2,048 tokens on the CPU, 32,768 on GPUs, or ``batch_size`` windows), so
  the summation order, and with it every mask, is the same on any machine. The hidden states
  between layers are spilled to a file when they would take more than a quarter of free memory,
  and always when a streamed run replays its chunks: each chunk's pages then leave the resident
  set once the chunk has gone through (the data stays in the file), so only the chunk at work is
  held.
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

from ..runtime.memory import _MADV_DONTNEED, _libc, madvise_pages
from ..runtime.precision import full_float32
from ..stats import InputStats
from ..steps import ObservedModule
from .capture import capture_layer_inputs, inference_state, module_device, resolve_device
from .layer import LayerReport, LayerWork, StopLayer, count_zeros
from .lockstep import Lockstep, call_order, compute_chunk
from .plan import PrunePlan
from .residency import LayerResidency
from .residency.distributed import Collective
from .targets import find_decoder_layers, find_targets

log = logging.getLogger(__name__)

SEQUENTIAL = ("within-layer", "dense-layer")
SPILL_FRACTION = 0.25  # hidden states larger than this share of free memory go to a file


def plan_batch_size(nsamples: int, seqlen: int, layer: nn.Module, dtype: torch.dtype,
                    device: torch.device) -> int:
    """Largest calibration chunk whose per-layer activations fit comfortably in free memory."""
    widths = [max(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, nn.Linear)]
    width = max(widths, default=4096)
    bytes_per_token = (4 * width + 8 * 1024) * max(torch.finfo(dtype).bits // 8, 4)
    budget = 0.4 * free_memory(device)
    per_sample = bytes_per_token * seqlen
    return int(max(1, min(nsamples, budget // per_sample)))


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


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
        sequential: str = "within-layer",
        execution: str = "auto",
    ):
        if sequential not in SEQUENTIAL:
            raise ValueError(f"sequential {sequential!r} is not known; choose one of: {', '.join(SEQUENTIAL)}")
        self.model = model
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.layers_name, self.layers = find_decoder_layers(model)
        self.targets, self.ignore = targets, ignore
        self.progress = progress
        self.residency = residency
        self.collective = Collective.current()  # None in one process
        if self.collective is not None:  # this rank's share of the calibration windows
            input_ids = self.collective.shard(input_ids)
        n, L = input_ids.shape
        self.sequential = sequential
        self.chunks = list(input_ids.split(compute_chunk(L, batch_size, self.device)))
        if execution not in ("auto", "lockstep", "replay"):
            raise ValueError(f"execution {execution!r} is not known; choose one of: auto, lockstep, replay")
        if sequential == "dense-layer":
            self.execution = "two passes per layer"
        elif len(self.chunks) == 1:
            self.execution = "one forward per layer"
        elif execution != "auto":
            self.execution = execution
        elif getattr(residency, "memory_first", False):  # a streamed run: one chunk's activations at a time
            self.execution = "replay"
        else:
            fits = plan_batch_size(n, L, self.layers[0], next(model.parameters()).dtype, self.device) >= n
            self.execution = "lockstep" if fits else "replay"
        self._reuse: dict[str, InputStats] = {}  # the first layer's dense statistics, from observe()
        self._spill_ptr: int | None = None  # storage of the spilled hidden-state buffer, if any
        self.skipped: dict[str, str] = {}  # module -> why it is not a target (routers, gates)
        log.info(
            "%d decoder layers at %s; calibration %d x %d in %d chunk(s): %s order, %s",
            len(self.layers), self.layers_name, n, L, len(self.chunks), sequential, self.execution,
        )
        found = [find_targets(layer, "", targets, ignore) for layer in self.layers]
        if not any(f.targets or f.groups for f in found):
            raise ValueError(
                f"no module matched targets={targets!r} ignore={ignore!r} inside the decoder layers; "
                "names are relative to a layer, e.g. 'self_attn\\.q_proj' or 'mlp\\.'"
            )

    def _capture(self) -> tuple[list[torch.Tensor], list]:
        bring_back = getattr(self.residency, "bring_back", None)
        if bring_back is not None:  # a residency that set the embeddings aside reads them again
            bring_back(self.model, self.chunks)
        hidden, calls = capture_layer_inputs(self.model, self.layers, self.chunks, self.device)
        if all(h.shape[1:] == hidden[0].shape[1:] for h in hidden):
            # one buffer for the hidden states of every chunk, which each layer's outputs overwrite
            # in place: no long-lived blocks scattered through the heap between layers
            shape = (sum(h.shape[0] for h in hidden), *hidden[0].shape[1:])
            nbytes = hidden[0].element_size() * shape[0] * hidden[0][0].numel()
            streamed = getattr(self.residency, "memory_first", False) and self.execution == "replay"
            if self.device.type == "cpu" and (streamed or nbytes > SPILL_FRACTION * free_memory(self.device)):
                buffer = self._spill(shape, hidden[0].dtype, "a streamed run holds one chunk at a time" if streamed
                                     else f"they exceed {int(100 * SPILL_FRACTION)} % of free memory")
                self._spill_ptr = buffer.untyped_storage().data_ptr()
            else:
                buffer = torch.empty(shape, dtype=hidden[0].dtype, device=hidden[0].device)
                self._spill_ptr = None
            sizes = [h.shape[0] for h in hidden]
            for c, part in enumerate(buffer.split(sizes)):  # chunk by chunk: never two copies of them all
                part.copy_(hidden[c])
                hidden[c] = part
                self._done_with(hidden, c)
        if self.residency is not None:
            self.residency.set_aside(self.model, self.layers)
        return hidden, calls

    def _spill(self, shape: tuple[int, ...], dtype: torch.dtype, why: str) -> torch.Tensor:
        """A file-backed buffer for the hidden states (deleted at once: the mapping keeps it alive)."""
        import math
        import os
        import tempfile

        fd, path = tempfile.mkstemp(prefix="llmprune-hidden-", suffix=".bin")
        os.close(fd)
        try:
            t = torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        finally:
            os.unlink(path)
        log.info("hidden states (%s, %.1f GB) spilled to a file: %s", "x".join(map(str, shape)),
                 t.numel() * t.element_size() / 1e9, why)
        return t

    def _done_with(self, hidden: list[torch.Tensor], c: int | None = None) -> None:
        """Chunk ``c`` (every chunk when None) has gone through for now: its pages leave the resident set
        when it lives in the spilled buffer, a shared file mapping, whose data stays in the file and is
        faulted back in when read. A chunk read from elsewhere (a resumed run's) stays: on private memory
        the same call would zero it."""
        if self._spill_ptr is None:
            return
        for h in hidden if c is None else [hidden[c]]:
            if h.device.type == "cpu" and h.untyped_storage().data_ptr() == self._spill_ptr:
                madvise_pages(_libc(), h, _MADV_DONTNEED, inside=True)

    def _targets(self, i: int, layer: nn.Module):
        found = find_targets(layer, f"{self.layers_name}.{i}", self.targets, self.ignore)
        self.skipped.update(found.skipped)  # routers and gates left dense by role
        return found.targets, found.groups

    def _bar(self, desc: str):
        from tqdm.auto import tqdm

        return tqdm(range(len(self.layers)), desc=desc, unit="layer", disable=not self.progress)

    # ---- observe only ----------------------------------------------------------------------
    def observe(self, needs: frozenset[str], reducer: Callable[[int, list[ObservedModule]], None],
                keep_first: frozenset[str] = frozenset(),
                layer_io: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """One dense forward per chunk and layer; ``reducer(i, modules)`` gets layer ``i``'s targets
        with their dense weights and the ``needs`` statistics of their inputs. The first layer's
        statistics are gathered with ``keep_first`` too and kept for :meth:`prune`. ``layer_io(i, x, y)``,
        if given, sees each chunk's input and output hidden states of layer ``i``."""
        with inference_state(self.model), full_float32():  # statistics without TF32
            hidden, calls = self._capture()
            for i in self._bar("observing layers"):
                layer = self.layers[i]
                fetch = getattr(self.residency, "fetch", None)
                if fetch is not None:  # a residency that holds no weights between layers reads them now
                    fetch(i, layer)
                home = module_device(layer)
                layer.to(self.device)
                tgts, groups = self._targets(i, layer)
                need = needs | keep_first if i == 0 else needs
                with LayerWork(tgts, groups, need, prune=None, prune_in_hook=False) as lw:
                    for c in range(len(self.chunks)):
                        lw.new_forward()
                        out = calls[c][i](layer, hidden[c])
                        if layer_io is not None:
                            layer_io(i, hidden[c], out)
                        _store_output(hidden, c, out)
                        self._done_with(hidden, c)
                if self.collective is not None:  # the allocator sees every rank's windows
                    lw.collective = self.collective
                    for t in lw.all_targets:
                        lw.reduce(t)
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
        with inference_state(self.model), full_float32():  # no TF32 in the pruning math
            hidden, calls = self._capture()
            bar = self._bar("pruning layers")
            order: list[str] | None = None  # module call order inside a layer (lockstep)
            start = 0
            restore = getattr(residency, "restore", None)
            if restore is not None:  # a resumed run (llmprune.resume): the layers before `start` are pruned
                start, order, reports = restore(self, plan, hidden)
            for i in bar:
                if i < start:
                    continue
                t0 = time.perf_counter()
                layer = self.layers[i]
                if residency is not None:
                    residency.acquire(i, layer)
                home = module_device(layer)  # after acquire: a streamed layer is on the meta device before
                layer.to(device)
                tgts, groups = self._targets(i, layer)
                if self.execution == "lockstep" and i == 0:
                    # the layers' call order, learned once from the dense first layer over all chunks
                    # (before any hook): routed experts may run in another order than registered
                    order = call_order(layer, [functools.partial(calls[c][i], layer, hidden[c])
                                               for c in range(len(chunks))])
                reuse = self._reuse if i == 0 else None
                within = self.sequential == "within-layer"
                with LayerWork(tgts, groups, plan.needs, plan, prune_in_hook=within, reuse=reuse) as lw:
                    lw.collective = self.collective
                    if not within:  # pass 1: statistics over every chunk with the dense layer
                        for c in range(len(chunks)):
                            lw.new_forward()
                            calls[c][i](layer, hidden[c])
                            self._done_with(hidden, c)
                        lw.new_forward()
                        lw.prune_remaining()
                    if self.execution == "lockstep":  # prune in the hooks, chunks in lockstep
                        lw.new_forward()
                        lw.lockstep = Lockstep(layer, order)
                        lw.lockstep.run(
                            [functools.partial(calls[c][i], layer, hidden[c]) for c in range(len(chunks))],
                            lw.release, functools.partial(_store_output, hidden),
                        )
                        lw.lockstep = None
                    elif self.execution == "replay":
                        self._replay(lw, layer, [functools.partial(calls[c][i], layer) for c in range(len(chunks))],
                                     hidden, self._done_with)
                    else:
                        for c in range(len(chunks)):  # (one forward: prune in the hooks) pruned outputs
                            lw.new_forward()
                            _store_output(hidden, c, calls[c][i](layer, hidden[c]))
                            self._done_with(hidden, c)
                    lw.prune_remaining()
                self._reuse = {}
                if self.collective is not None:  # every rank pruned every module alike, or stop
                    self.collective.check_masks(i, {t.name: lw.reports[t.name].mask_sha256 for t in lw.all_targets})
                weights, zeros = count_zeros(layer)  # while resident: the whole layer, not only its targets
                layer.to(home)
                if residency is not None:
                    residency.release(i, layer)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rep = LayerReport(i, time.perf_counter() - t0, [lw.reports[t.name] for t in lw.all_targets],
                                  weights, zeros)
                reports.append(rep)
                layer_done = getattr(residency, "layer_done", None)
                if layer_done is not None:  # progress saved for --resume (llmprune.resume)
                    layer_done(self, plan, i, hidden, order, reports)
                    self._done_with(hidden)  # the saving read every chunk
                bar.set_postfix(err=f"{rep.error:.3f}", sec=f"{rep.seconds:.1f}")
                log.debug("layer %d: %.1fs, mean relative error %.4f", i, rep.seconds, rep.error)
        return reports


    @staticmethod
    def _replay(lw: LayerWork, layer: nn.Module, forwards: list[Callable], hidden: list[torch.Tensor],
                done: Callable[[list[torch.Tensor], int], None] | None = None) -> None:
        """Within-layer order in the memory of one chunk: every chunk's forward runs from the layer's
        input to the first target not pruned yet (adding its input there) and stops; once all have,
        that target is pruned and the chunks start again. A chunk whose forward completes meets
        only pruned targets, so its output is final."""
        pending = list(range(len(forwards)))
        lw.replay = True
        try:
            while pending:
                lw.stop_key = None
                finished = []
                for c in pending:
                    lw.new_forward()
                    try:
                        out = forwards[c](hidden[c])
                    except StopLayer:  # stopped at the next target: the input is read again next time
                        pass
                    else:
                        _store_output(hidden, c, out)
                        finished.append(c)
                    if done is not None:
                        done(hidden, c)
                pending = [c for c in pending if c not in finished]
                if lw.stop_key is not None:
                    lw.release(lw.stop_key)
        finally:
            lw.replay, lw.stop_key = False, None


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
    sequential: str = "within-layer",
) -> list[LayerReport]:
    """Prune ``model`` in place, decoder layer by decoder layer, on calibration ``input_ids [n, L]``.

    ``sparsity_of(name)`` gives each target's sparsity (a fraction with the pattern ``nm``, or a
    :class:`~llmprune.steps.LayerTarget`); ``residency`` may bring each layer into memory before it
    is pruned and move it out after (see :mod:`llmprune.offload`).
    """
    run = SequentialRun(model, input_ids, device=device, batch_size=batch_size, targets=targets,
                        ignore=ignore, progress=progress, residency=residency, sequential=sequential)
    return run.prune(PrunePlan(pruner, sparsity_of, refiner=refiner, nm=nm))
