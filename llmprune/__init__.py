"""llmprune: one-shot pruning of Hugging Face causal language models, and their evaluation.

The public names load lazily (PEP 562), so ``llmprune --help`` and the CLI's process settings
run before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "prune": ".api", "prune_checkpoint": ".api",
    "ConfigError": ".config", "EvalConfig": ".config", "PruneConfig": ".config",
    "EvalResults": ".evaluation", "evaluate": ".evaluation",
    "PRUNERS": ".pruners", "get_pruner": ".pruners",
    "PruneReport": ".report",
    "save": ".checkpoint.save", "load_model": ".checkpoint.load",
    "apply_thread_policy": ".runtime.threads",
    "apply_activation_sparsity": ".activation",
    "MergeReport": ".recovery", "SparsityError": ".recovery", "SparsityKeeper": ".recovery",
    "merge_and_keep_sparsity": ".recovery", "unwrap_model": ".recovery",
    "recover": ".recovery", "recover_checkpoint": ".recovery", "RecoverConfig": ".recovery",
    "RecoverResult": ".recovery", "DistillLoss": ".recovery", "DistillationTrainer": ".recovery",
    "compress": ".checkpoint", "decompress": ".checkpoint", "load": ".checkpoint", "push": ".checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
