"""llmprune: one-shot pruning of Hugging Face causal language models."""

from .api import prune, prune_checkpoint
from .config import ConfigError, EvalConfig, PruneConfig
from .evaluation import EvalResults, evaluate
from .pruners import PRUNERS, get_pruner
from .report import PruneReport

__version__ = "0.1.0"

__all__ = [
    "PRUNERS", "ConfigError", "EvalConfig", "EvalResults", "PruneConfig", "PruneReport", "evaluate", "get_pruner",
    "prune", "prune_checkpoint",
]
