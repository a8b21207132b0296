"""Recovery after pruning: fine-tuning with the masks kept (:mod:`.keeper`: ``SparsityKeeper`` for plain
PyTorch loops and ``transformers.Trainer``; :mod:`.masks`: the packed-bit masks it holds; :mod:`.merge`: the
PEFT merge that keeps sparsity)."""

from .keeper import MergeReport, SparsityError, SparsityKeeper, merge_and_keep_sparsity, unwrap_model

__all__ = ["MergeReport", "SparsityError", "SparsityKeeper", "merge_and_keep_sparsity", "unwrap_model"]
