"""Keeping masks while fine-tuning: pruned weights stay exactly zero through any optimizer.

After one-shot pruning, recovery fine-tuning must not revive the pruned weights. Re-zeroing them after
each step is not enough on its own for Adam-type optimizers: a gradient at a pruned position feeds the
optimizer's moments, which keep moving the weight on later steps. :class:`SparsityKeeper` therefore

1. masks the gradients before the optimizer step (``mask_grads``), so the moments of a pruned weight
   stay zero and Adam's update there is exactly zero (decoupled weight decay scales zero to zero);
2. re-zeroes the pruned weights after the step (``apply``), which also covers optimizers that are not
   elementwise (Shampoo, SOAP, Muon's orthogonalised updates) and anything else that writes the weights.

Masks are captured from the zeros of the pruned weights (or checked against a :class:`~llmprune.PruneReport`'s
mask hashes) and stored as packed bits, one bit per weight on the weight's device: 1/32 of a float32 copy
(:mod:`.masks`).

Three ways in:

* a plain PyTorch loop::

      keeper = SparsityKeeper.from_model(model)
      loss.backward(); keeper.mask_grads(); optimizer.step(); keeper.apply(); optimizer.zero_grad()

* ``transformers.Trainer``: the keeper *is* a ``TrainerCallback`` (gradients masked in
  ``on_pre_optimizer_step``, weights re-zeroed in ``on_optimizer_step``)::

      Trainer(model=model, args=args, train_dataset=ds, callbacks=[SparsityKeeper.from_model(model)])

* PEFT / LoRA: train adapters on the sparse base (its weights are frozen, so they stay sparse), then
  :func:`merge_and_keep_sparsity` (or :meth:`SparsityKeeper.merge`) merges the adapters, re-applies the mask
  and warns with the share of the adapters' update that fell on pruned positions and was dropped
  (:mod:`.merge`).

The model may be wrapped (``DistributedDataParallel``, ``DataParallel``, accelerate's prepared model,
``torch.compile``, a PEFT model): the keeper unwraps it to find the weights, and holds the weight tensors
themselves, so wrapping or moving the model (``.to("cuda")``) after the capture is fine. FSDP, which
replaces the parameters with flat shards, is not supported.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..engine.plan import zero_pattern
from ..engine.targets import model_targets, tuner_layers, unwrap_model
from .masks import PackedMask, clean_name, pack_keep, unpack_pruned
from .merge import MergeReport, merge_adapters

log = logging.getLogger(__name__)

__all__ = ["MergeReport", "SparsityError", "SparsityKeeper", "merge_and_keep_sparsity", "pack_keep", "unpack_pruned",
           "unwrap_model"]


class SparsityError(RuntimeError):
    """Pruned weights are no longer zero, or a mask does not match the model; the message says where and why."""


def _adapter_params(model: nn.Module) -> set[int]:
    """ids of every adapter parameter (``lora_A``, ``lora_B``, ...): never masked, whatever their zeros
    (LoRA's ``B`` starts at zero)."""
    out: set[int] = set()
    for _, layer in tuner_layers(model):
        base = {id(p) for p in layer.get_base_layer().parameters()}
        out.update(id(p) for p in layer.parameters() if id(p) not in base)
    return out


class SparsityKeeper(TrainerCallback):
    """Keeps the zeros of a pruned model fixed while it trains: gradients masked before each optimizer step,
    weights re-zeroed after it. Build it with :meth:`from_model` or :meth:`from_report`.

    It is also a ``transformers.TrainerCallback``: pass it in ``Trainer(callbacks=[keeper])``. Gradient
    clipping in the Trainer runs before ``on_pre_optimizer_step``, so it measures the norm of the unmasked
    gradient; in a custom loop call :meth:`mask_grads` before clipping to clip the masked one.
    """

    def __init__(self, masks: Iterable[PackedMask]):
        self._masks: list[PackedMask] = list(masks)
        if not self._masks:
            raise ValueError("a SparsityKeeper needs at least one weight; build it with SparsityKeeper.from_model")
        self._by_param = {id(m.param): m for m in self._masks}

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, targets: str | None = None, ignore: str | None = None) -> SparsityKeeper:
        """Capture the masks from the zeros of ``model``'s prunable weights: the Linear / Conv1D weights and
        fused expert weights of the decoder layers, as :func:`llmprune.prune` selects them (``targets`` and
        ``ignore`` are the same regexes on names relative to a layer). Weights without a single zero stay
        free. ``model`` may be wrapped (DDP, accelerate, ``torch.compile``, PEFT); adapter weights are never
        masked. Raises ``ValueError`` when no target weight has a zero (the model was not pruned)."""
        inner = unwrap_model(model)
        adapters = _adapter_params(inner)
        masks: list[PackedMask] = []
        seen: set[int] = set()
        n_dense = 0
        for t in model_targets(inner, targets, ignore).values():
            p = getattr(t.module, t.param)
            if id(p) in seen or id(p) in adapters:
                continue
            seen.add(id(p))
            kept = int(torch.count_nonzero(p.detach()))
            if kept == p.numel():
                n_dense += 1
                continue
            masks.append(PackedMask(clean_name(re.sub(r"\[\d+\]$", "", t.name)), p, pack_keep(p), kept))
        if not masks:
            raise ValueError(
                f"{type(inner).__name__} has no exact zeros in its {n_dense} target weights: nothing to keep. Prune "
                "it first (llmprune.prune), or check the targets/ignore regexes"
            )
        keeper = cls(masks)
        log.info("SparsityKeeper: %d weights, mask sparsity %.4f, %d dense targets left free, masks %.1f MB",
                 len(masks), keeper.mask_sparsity, n_dense, keeper.nbytes / 2**20)
        return keeper

    @classmethod
    def from_report(cls, model: nn.Module, report: Any) -> SparsityKeeper:
        """Masks for exactly the modules a :class:`~llmprune.PruneReport` pruned, captured from the model's
        zeros and checked against the report's per-module mask hash. Raises :class:`SparsityError` when a
        module's zeros differ from what the run recorded (the model was changed or is another copy)."""
        inner = unwrap_model(model)
        cfg = getattr(report, "config", {}) or {}
        by_name = {clean_name(n): t for n, t in model_targets(inner, cfg.get("targets"), cfg.get("ignore")).items()}
        masks: dict[int, PackedMask] = {}
        bad = []
        for mod in report.modules:
            t = by_name.get(mod.name)
            if t is None:
                raise SparsityError(f"the report's module {mod.name} is not in this model; pass the model the report "
                                    "came from (or use SparsityKeeper.from_model)")
            if mod.mask_sha256 and zero_pattern(t)[1] != mod.mask_sha256:
                bad.append(mod.name)
                continue
            p = getattr(t.module, t.param)
            if id(p) not in masks:
                masks[id(p)] = PackedMask(clean_name(re.sub(r"\[\d+\]$", "", t.name)), p, pack_keep(p),
                                     int(torch.count_nonzero(p.detach())))
        if bad:
            raise SparsityError(
                f"{len(bad)} module(s) have zeros that differ from the report's masks (first: {bad[0]}): the model was "
                "changed after pruning or is not the pruned copy; capture from the zeros with SparsityKeeper.from_model"
            )
        return cls(masks.values())

    # ------------------------------------------------------------------------------------------
    # Keeping
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights (call after ``backward``, before clipping and
        ``optimizer.step()``); with gradient accumulation, once before the step is enough."""
        for m in self._masks:
            if m.param.grad is not None:
                m.zero_(m.param.grad)

    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero the pruned weights (call after each ``optimizer.step()``)."""
        for m in self._masks:
            m.zero_(m.param.data)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``mask_grads()``, ``optimizer.step()``, ``apply()`` in one call."""
        self.mask_grads()
        optimizer.step()
        self.apply()

    # ------------------------------------------------------------------------------------------
    # Checking
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def revived(self) -> dict[str, int]:
        """Per weight, the number of pruned positions that are not zero (empty when the mask holds)."""
        out = {}
        for m in self._masks:
            n = int(torch.count_nonzero(m.param[m.pruned()]))
            if n:
                out[m.name] = n
        return out

    def check(self) -> None:
        """Raise :class:`SparsityError` if any pruned weight is not exactly zero."""
        bad = self.revived()
        if bad:
            first = next(iter(bad))
            raise SparsityError(
                f"{sum(bad.values())} pruned weight(s) are non-zero in {len(bad)} tensor(s) (first: {first}, "
                f"{bad[first]}): something wrote the weights after keeper.apply(); call keeper.apply() after every "
                "optimizer step (or pass the keeper to Trainer(callbacks=[...]))"
            )

    @torch.no_grad()
    def sparsity(self) -> float:
        """Measured fraction of exact zeros over the kept weights (equals :attr:`mask_sparsity` while the
        mask holds and no kept weight happens to be zero)."""
        total = sum(m.numel for m in self._masks)
        nonzero = sum(int(torch.count_nonzero(m.param)) for m in self._masks)
        return 1.0 - nonzero / total

    @property
    def mask_sparsity(self) -> float:
        """Fraction of pruned positions in the masks."""
        total = sum(m.numel for m in self._masks)
        return 1.0 - sum(m.kept for m in self._masks) / total

    @property
    def names(self) -> list[str]:
        """Names of the kept weights in the unwrapped model: the module's name for a Linear / Conv1D weight,
        the parameter's for fused expert weights (``...mlp.experts.gate_up_proj``)."""
        return [m.name for m in self._masks]

    @property
    def nbytes(self) -> int:
        """Bytes the masks take (one bit per weight)."""
        return sum(m.bits.numel() for m in self._masks)

    def masks(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, keep-mask)`` per weight, unpacked to bool one at a time (for inspection)."""
        for m in self._masks:
            yield m.name, ~m.pruned()

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return (f"SparsityKeeper({len(self)} weights, mask sparsity {self.mask_sparsity:.4f}, "
                f"{self.nbytes / 2**20:.2f} MB of masks)")

    # ------------------------------------------------------------------------------------------
    # PEFT
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, peft_model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False,
              warn: bool = True) -> MergeReport:
        """Merge a PEFT model's adapters into its base weights, re-apply the masks and unload the adapters.

        Each adapter layer is merged by PEFT itself (LoRA, DoRA, ... and ``adapter_names``/``safe_merge``
        as in ``merge_and_unload``), one module at a time; the update ``ΔW`` it added is measured, its part
        on pruned positions dropped (:func:`~llmprune.recovery.merge.merge_adapters`). Returns a
        :class:`MergeReport` (``.model`` is the merged model) and, with ``warn``, warns with its summary
        when part of the update was dropped.
        """
        report = merge_adapters(peft_model, self._by_param, adapter_names=adapter_names, safe_merge=safe_merge)
        report.sparsity = self.sparsity()
        self.check()
        if warn and report.dropped_norm > 0:
            warnings.warn(report.summary() + ". Keep the adapter separate (unmerged) to keep its whole update",
                          UserWarning, stacklevel=2)
        log.info("%s", report.summary())
        return report

    # ------------------------------------------------------------------------------------------
    # transformers.TrainerCallback
    # ------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        """Check that the keeper belongs to the model being trained, and that its zeros hold."""
        if model is not None:
            ids = {id(p) for p in unwrap_model(model).parameters()}
            missing = [m.name for m in self._masks if id(m.param) not in ids]
            if missing:
                raise SparsityError(
                    f"{len(missing)} of the keeper's {len(self)} weights are not parameters of the model being trained "
                    f"(first: {missing[0]}): capture the keeper from the same model object you pass to the Trainer "
                    "(FSDP, which replaces parameters, is not supported)"
                )
        self.apply()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Mask the accumulated gradients just before ``optimizer.step()``."""
        self.mask_grads()
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Re-zero the pruned weights just after ``optimizer.step()``."""
        self.apply()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Log the sparsity kept through training."""
        log.info("SparsityKeeper: training ended at sparsity %.4f (mask %.4f)", self.sparsity(), self.mask_sparsity)
        return control


def merge_and_keep_sparsity(peft_model: nn.Module, keeper: SparsityKeeper | None = None,
                            adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Merge a PEFT model's adapters into a sparse base and keep its zeros: the drop-in for
    ``peft_model.merge_and_unload()``, which would make every merged weight dense.

    ``keeper`` defaults to one captured now from the base weights' zeros (adapters excluded). Warns with the
    share of the adapters' update that fell on pruned positions; :meth:`SparsityKeeper.merge` returns the
    numbers as a :class:`MergeReport`. Returns the merged model.
    """
    if keeper is None:
        keeper = SparsityKeeper.from_model(peft_model)
    return keeper.merge(peft_model, adapter_names=adapter_names, safe_merge=safe_merge).model
