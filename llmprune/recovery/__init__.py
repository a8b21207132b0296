"""Recovery after pruning: fine-tuning and distillation with the masks kept (:mod:`.keeper`:
``SparsityKeeper`` for plain PyTorch loops and ``transformers.Trainer``; :mod:`.masks`: the packed-bit masks
it holds; :mod:`.merge`: the PEFT merge that keeps sparsity; :mod:`.distill`: the losses (logit KD,
SquareHead, LM); :mod:`.teacher`: the teacher in memory or precomputed to disk; :mod:`.recover`: the
training loop and ``llmprune recover``, with :mod:`.options` its settings and result, :mod:`.data` its training
windows held apart from the calibration and :mod:`.progress` its progress for ``--resume``; :mod:`.trainer`:
``DistillationTrainer``)."""

from .data import training_windows
from .distill import (
    DistillLoss,
    LayerOutputs,
    TeacherOutput,
    kd_loss,
    layer_map,
    lm_loss,
    removed_layers,
    squarehead_loss,
    topk_kd_loss,
)
from .keeper import MergeReport, SparsityError, SparsityKeeper, merge_and_keep_sparsity, unwrap_model
from .options import RecoverConfig, RecoverResult
from .recover import recover, recover_checkpoint
from .teacher import InMemoryTeacher, OfflineTeacher, TeacherError, precompute_teacher
from .trainer import DistillationTrainer

__all__ = ["DistillLoss", "DistillationTrainer", "InMemoryTeacher", "LayerOutputs", "MergeReport", "OfflineTeacher",
           "RecoverConfig", "RecoverResult", "SparsityError", "SparsityKeeper", "TeacherError", "TeacherOutput",
           "kd_loss", "layer_map", "lm_loss", "merge_and_keep_sparsity", "precompute_teacher", "recover",
           "recover_checkpoint", "removed_layers", "squarehead_loss", "topk_kd_loss", "training_windows",
           "unwrap_model"]
