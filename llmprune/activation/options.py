"""The activation-sparsity settings: fields of :class:`llmprune.PruneConfig`, declared beside the
activation code that reads them (as each pruning method's options are declared beside the method).

The checks that involve other fields (``activation`` alone means method 'none'; method 'none' needs
an activation criterion) stay with the config's cross-field checks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..settings import Settings


class ActivationOptions(Settings):
    """Activation sparsity: which criterion, how sparse, how allocated and where it is measured."""

    activation: Literal["teal", "wina", "cats"] | None = Field(
        None, description="Activation sparsity: calibrated thresholds that zero small entries of the inputs of the "
        "decoder layers' linear maps at inference, stored in config.json and applied by llmprune.load. 'teal' |x| "
        "on every input; 'wina' |x_j|·‖W_:,j‖₂ (see --activation-wina); 'cats' |act(gate(x))| of gated MLPs only. "
        "None: dense activations.",
    )
    activation_sparsity: float | None = Field(
        None, description="Activation sparsity: target fraction of zeroed entries, model-wide, weighted by the "
        "weights each thresholded tensor feeds (cats: of the gated MLPs' activations), in [0, 1); default 0.5.",
    )
    activation_allocation: Literal["uniform", "greedy"] = Field(
        "uniform", description="Activation sparsity per tensor: 'uniform' (every tensor at the target) or 'greedy' "
        "(TEAL's block-wise greedy: each layer meets the target with the least output error).",
    )
    activation_greedy_step: float = Field(
        0.025, gt=0, lt=1, description="Activation greedy allocation: weighted layer sparsity added per step "
        "(smaller: finer allocation, more layer forwards).",
    )
    activation_prefill: float = Field(
        0.0, ge=0, le=1, description="Activation sparsity at inference: decode steps (one position per call) are "
        "always thresholded; of a longer call (a prefill) only the last fraction of its positions. 0: prefill "
        "dense, decode only (where the speed is; TEAL's kernels); 0.5: TEAL's reference and paper evaluations; "
        "0.99: WINA's reference; 1: every position. Stored in config.json; calibration and perplexity "
        "protocols do not depend on it.",
    )
    activation_wina: Literal["official", "stacked"] = Field(
        "official", description="WINA layout: 'official' (microsoft/wina: q, k, v and gate, up each with their own "
        "threshold; column norms on k_proj and gate_proj only, |x| on the others) or 'stacked' (one threshold per "
        "input tensor, column norms of the stacked readers on every tensor).",
    )
    activation_holdout: str | None = Field(
        "wikitext2", description="Activation sparsity: held-out text the reached sparsity is measured on (a perplexity "
        "dataset or .txt/.jsonl file, never the calibration text); 'none' skips the measurement.",
    )
    activation_holdout_windows: int = Field(
        4, ge=1, description="Activation sparsity: windows of --seqlen tokens of the held-out text measured.",
    )

    @field_validator("activation_holdout")
    @classmethod
    def _holdout_none(cls, v: str | None) -> str | None:
        return None if v in (None, "none", "") else v

    @field_validator("activation_sparsity")
    @classmethod
    def _check_activation_sparsity(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"activation sparsity {v} is out of range; give a fraction in [0, 1), e.g. 0.5")
        return v

    @model_validator(mode="after")
    def _check_activation_stray(self) -> ActivationOptions:
        if self.activation is None:
            stray = sorted(k for k in self.model_fields_set if k.startswith("activation_")
                           and getattr(self, k) != type(self).model_fields[k].default)  # a full dump repeats defaults
            if stray:
                raise ValueError(f"{', '.join(stray)} set but no activation criterion; add --activation teal "
                                 "(or wina, cats), or remove them")
        elif self.activation != "wina" and "activation_wina" in self.model_fields_set \
                and self.activation_wina != type(self).model_fields["activation_wina"].default:
            raise ValueError(f"activation_wina = {self.activation_wina!r} set but the criterion is "
                             f"{self.activation!r}; it applies to --activation wina only, remove it")
        return self

    @property
    def activation_target(self) -> float:
        """The model-wide activation sparsity target (0.5 when only the criterion is given)."""
        return 0.5 if self.activation_sparsity is None else self.activation_sparsity
