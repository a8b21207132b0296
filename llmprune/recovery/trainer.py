"""``transformers.Trainer`` with a teacher: :class:`DistillationTrainer` replaces the Trainer's loss by
:class:`~.distill.DistillLoss` (logit KD, SquareHead, LM loss), and works with
:class:`~.keeper.SparsityKeeper` as a callback like any Trainer::

    trainer = DistillationTrainer(model=student, teacher=dense, distill=DistillLoss(kd_weight=1.0),
                                  args=args, train_dataset=ds, callbacks=[SparsityKeeper.from_model(student)])
    trainer.train()

The teacher is a model (run in eval mode under ``no_grad`` beside the student, moved to the student's
device) or an :class:`~.teacher.OfflineTeacher`, whose rows are found by their tokens, so the Trainer's
shuffling and batching read the right ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..engine.targets import find_decoder_layers, unwrap_model
from .distill import DistillLoss, LayerOutputs, layer_map, removed_layers
from .teacher import InMemoryTeacher, OfflineTeacher, teacher_layers

__all__ = ["DistillationTrainer"]


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is ``distill`` (a :class:`DistillLoss`, default: KD at T=1) against
    ``teacher``. The batches need ``input_ids``; ``attention_mask`` masks padded positions out of every term,
    ``labels`` (if given, -100 ignored) feed the LM term. ``last_losses`` holds the terms of the last step."""

    def __init__(self, *args: Any, teacher: nn.Module | InMemoryTeacher | OfflineTeacher | None = None,
                 distill: DistillLoss | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.distill = distill if distill is not None else DistillLoss()
        if self.distill.needs_teacher and teacher is None:
            raise ValueError("the distillation loss needs a teacher; pass teacher=<the dense model>, or a DistillLoss "
                             "with lm_weight only")
        n_student = len(find_decoder_layers(unwrap_model(self.model))[1])
        if isinstance(teacher, nn.Module):
            kept = (layer_map(teacher_layers(teacher), n_student, removed_layers(self.model))
                    if self.distill.needs_hidden else None)
            teacher = InMemoryTeacher(teacher, top_k=self.distill.top_k, layers=kept)
        self.teacher = teacher
        self.last_losses: dict[str, float] = {}
        # the loss is a mean per batch: let the Trainer divide it by the gradient accumulation steps
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        ids = inputs["input_ids"]  # [B, L]
        mask, labels = inputs.get("attention_mask"), inputs.get("labels")
        target = None
        if self.distill.needs_teacher:
            if isinstance(self.teacher, InMemoryTeacher) and next(self.teacher.model.parameters()).device != ids.device:
                self.teacher.model.to(ids.device)
            target = self.teacher(ids, attention_mask=mask, device=ids.device)
        capture = LayerOutputs(model) if self.distill.needs_hidden else None
        try:
            if capture is not None:
                with capture.recording() as hidden:
                    outputs = model(input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                hidden, outputs = None, model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            if capture is not None:
                capture.remove()
        out = self.distill(outputs.logits, target, ids, student_hidden=hidden, attention_mask=mask, labels=labels)
        self.last_losses = out.parts
        return (out.loss, outputs) if return_outputs else out.loss
