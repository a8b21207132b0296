"""llmprune: one-shot pruning of Hugging Face causal language models."""

from .api import prune, prune_checkpoint
from .config import ConfigError, PruneConfig
from .pruners import PRUNERS, get_pruner
from .report import PruneReport

__version__ = "0.1.0"

__all__ = ["PRUNERS", "ConfigError", "PruneConfig", "PruneReport", "get_pruner", "prune", "prune_checkpoint"]
