"""What to evaluate a model on, and by which protocol: the evaluation's own settings."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from ..settings import Settings, split_list


class EvalConfig(Settings):
    """What to evaluate a model on, and by which protocol."""

    ppl: list[str] = Field(
        default_factory=list,
        description="Perplexity datasets, comma-separated: wikitext2, c4, or .txt/.jsonl/.json files.",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks, comma-separated, e.g. piqa,arc_easy,hellaswag (offline configs: eval/tasks/).",
    )
    seqlen: int = Field(2048, ge=2, description="Perplexity window length in tokens (clipped to the model's context).")
    max_windows: int | None = Field(None, ge=1, description="Score at most this many perplexity windows.")
    limit: float | None = Field(
        None, gt=0, description="Tasks: at most this many documents per task (a fraction if below 1)."
    )
    num_fewshot: int | None = Field(None, ge=0, description="Tasks: few-shot examples (default: each task's own).")
    batch_size: str = Field(
        "1", description="Windows / requests per forward: an integer, or 'auto' (lm-eval picks for tasks)."
    )
    include_path: list[str] = Field(
        default_factory=list, description="Extra folders of lm-eval task YAML files, comma-separated."
    )
    task_source: Literal["auto", "local", "hub"] = Field(
        "auto",
        description="Task configs: 'local' (eval/tasks, data from the data dir), 'hub' (lm-eval's own), or "
        "'auto' (local when a data dir is set and every task has an offline config).",
    )
    data_dir: str | None = Field(
        None, description="Folder with offline copies of the datasets (also $LLMPRUNE_DATA_DIR)."
    )

    @field_validator("ppl", "tasks", "include_path", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return split_list(v)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _check_batch_size(cls, v: Any) -> str:
        s = str(v).strip()
        if not (re.fullmatch(r"[1-9]\d*", s) or re.fullmatch(r"auto(:[1-9]\d*)?", s)):
            raise ValueError(f"batch size {v!r} is not understood; give a positive integer or 'auto'")
        return s

    @field_validator("limit")
    @classmethod
    def _check_limit(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and v != int(v):
            raise ValueError(f"limit {v} must be a whole number of documents, or a fraction below 1")
        return v

    @property
    def ppl_batch_size(self) -> int:
        return int(self.batch_size) if self.batch_size.isdigit() else 1

    @property
    def task_limit(self) -> int | float | None:
        if self.limit is None:
            return None
        return int(self.limit) if self.limit >= 1 else self.limit

    @property
    def empty(self) -> bool:
        return not self.ppl and not self.tasks
