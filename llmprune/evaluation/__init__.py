"""Evaluation of (pruned) models: perplexity by the papers' protocol and lm-eval task accuracy."""

from .evaluate import evaluate
from .perplexity import (
    PPL_DATASETS,
    DatasetError,
    PerplexityResult,
    dataset_perplexity,
    load_text,
    perplexity,
    tokenize_once,
    wikitext2_test_text,
)
from .results import EvalResults, compare_chart, compare_table, load_all, save_all
from .tasks import TaskError, offline_task_names, offline_tasks_dir

__all__ = [
    "PPL_DATASETS", "DatasetError", "EvalResults", "PerplexityResult", "TaskError", "compare_chart",
    "compare_table", "dataset_perplexity", "evaluate", "load_all", "load_text", "offline_task_names",
    "offline_tasks_dir", "perplexity", "save_all", "tokenize_once", "wikitext2_test_text",
]
