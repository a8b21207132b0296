"""The settings and the result of a recovery run: :class:`RecoverConfig` (every setting a typed field with a
default and a help text; ``llmprune recover``'s flags are generated from it) and :class:`RecoverResult` (what
:func:`~.recover.recover` did, and the ``recovery`` entry of ``config.json`` it writes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from ..calibration import portable_source
from ..settings import Settings, split_list
from .distill import DistillLoss

__all__ = ["NOT_HASHED", "RecoverConfig", "RecoverResult"]

# settings that change how a run executes or reports, never its weights: a resume may change them
NOT_HASHED = ("eval_every", "eval_ppl", "eval_seqlen", "eval_windows", "save_every", "teacher", "offline_teacher",
              "device", "data_dir")


class RecoverConfig(Settings):
    """How to recover a pruned model: the losses, the teacher, the data, the optimizer and the run."""

    # the losses
    kd_weight: float = Field(1.0, ge=0, description="Weight of the logit distillation loss (forward KL at "
                             "--temperature, times T²).")
    squarehead_weight: float = Field(0.0, ge=0, description="Weight of SquareHead, the per-layer loss (each layer's "
                                     "MSE against the teacher's, over the teacher's variance).")
    lm_weight: float = Field(0.0, ge=0, description="Weight of the plain language-model loss on the data.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the logit distillation.")
    top_k: int | None = Field(None, ge=1, description="Distil from the teacher's top-k logits only (renormalised); "
                              "unset: the full vocabulary in memory, 64 for an offline teacher.")
    # the teacher
    teacher: str | None = Field(None, description="The teacher: a Hub id or folder, or 'embedded'; unset: the dense "
                                "model the pruned checkpoint records.")
    offline_teacher: str | None = Field(None, description="Folder for the teacher's top-k logits (and layer outputs) "
                                        "computed once before training and streamed from disk: only one model is in "
                                        "memory at a time. Reused when it already holds these windows.")
    offline_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the values stored by --offline-teacher (bfloat16 halves the disk).")
    # the data
    calib: str = Field("c4", description="Training data, any calibration source: c4, wikitext2, a .txt/.jsonl/"
                       ".json/.parquet file or an HF dataset; windows held apart from the pruning's calibration.")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Windows per step.")
    seqlen: int = Field(256, ge=2, description="Tokens per window.")
    seed: int = Field(0, description="Seed of the run (LoRA's initialisation); the windows are drawn with seed + 1.")
    text_field: str = Field("text", description="Text field of .jsonl/.json/.parquet/HF dataset records.")
    data_dir: str | None = Field(None, description="Folder with offline copies of the datasets (also "
                                 "$LLMPRUNE_DATA_DIR).")
    # the optimizer
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to --lr.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning rate after the warmup: constant, or decaying to 0 at the last step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradients' global norm (of the masked "
                                        "gradients) to this; unset: no clipping.")
    # LoRA
    lora: bool = Field(False, description="Train a LoRA adapter on the frozen student and merge it at the end, "
                       "keeping the zeros (sparsity and N:M exact).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    lora_targets: list[str] | None = Field(None, description="Module names LoRA adapts, comma-separated; unset: "
                                           "every linear layer but the output head.")
    # execution
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the models load in; train in float32 on the CPU (bf16 autocast is used on "
        "CUDA whatever this is).")
    autocast: bool = Field(True, description="bf16 autocast on CUDA (ignored on the CPU).")
    gradient_checkpointing: bool = Field(False, description="Recompute the student's activations in the backward "
                                         "pass: less memory, about a third more time.")
    # evaluation and progress
    eval_every: int = Field(0, ge=0, description="Perplexity every K steps (and before and after); 0: never.")
    eval_ppl: str = Field("wikitext2", description="Perplexity dataset of --eval-every: wikitext2, c4 or a file.")
    eval_seqlen: int = Field(512, ge=2, description="Window length of --eval-every's perplexity.")
    eval_windows: int = Field(16, ge=1, description="Windows of --eval-every's perplexity.")
    save_every: int = Field(25, ge=0, description="Save the progress for --resume every N steps; 0: never.")

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        return split_list(v)

    @model_validator(mode="after")
    def _check(self) -> RecoverConfig:
        if self.kd_weight == self.squarehead_weight == self.lm_weight == 0:
            raise ValueError("every loss weight is 0; set kd_weight, squarehead_weight or lm_weight above 0")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is more than steps ({self.steps}); lower it")
        return self

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.squarehead_weight > 0

    def loss(self) -> DistillLoss:
        return DistillLoss(self.kd_weight, self.squarehead_weight, self.lm_weight, self.temperature, self.top_k)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): linear warmup, then the schedule."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        frac = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)  # 0 at the first step after warmup
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclasses.dataclass
class RecoverResult:
    """What :func:`recover` did. ``model`` is the recovered student (LoRA merged, a plain model)."""

    model: nn.Module
    steps: int
    tokens: int
    history: list[dict[str, float]]  # per step: loss and each term, lr
    evals: list[dict[str, float]]  # {"step", "ppl"} before, every eval_every steps and after
    seconds: float
    seconds_per_step: float
    sparsity: dict[str, Any]  # kept weights' sparsity before and after, pruned weights revived (0)
    data: dict[str, Any]
    teacher: str | None
    config: dict[str, Any]
    merge: dict[str, Any] | None = None  # LoRA: the MergeReport's numbers
    peak_cuda_bytes: int | None = None
    resumed_from: int | None = None

    def metadata(self) -> dict[str, Any]:
        """The ``recovery`` entry of ``config.json``'s ``llmprune`` block."""
        last = self.history[-min(len(self.history), 10):]
        return {
            "method": "distillation" if self.config["kd_weight"] or self.config["squarehead_weight"] else "fine-tuning",
            "teacher": self.teacher, "steps": self.steps, "tokens": self.tokens,
            "losses": {"first": self.history[0] if self.history else None,
                       "last10_mean": {k: round(sum(h[k] for h in last) / len(last), 6) for k in last[0] if k != "lr"}
                       if last else None,
                       "per_step": [round(h["loss"], 6) for h in self.history]},
            "evals": self.evals, "sparsity": self.sparsity, "data": self.data, "merge": self.merge,
            "seconds": round(self.seconds, 2), "config": _portable(self.config),
        }


def _portable(cfg: dict[str, Any]) -> dict[str, Any]:
    out = dict(cfg)
    for k in ("calib", "eval_ppl", "teacher", "offline_teacher"):
        if isinstance(out.get(k), str):
            out[k] = portable_source(out[k])
    if out.get("data_dir"):
        out["data_dir"] = "(set)"
    return out
