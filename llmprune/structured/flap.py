r"""FLAP's fluctuation metric (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI 2024): a structure matters when its input fluctuates and the consumer weighs it heavily.

For input column ``j`` of the consumer, ``S_j = Var_t(x_tj) · ‖W_{:,j}‖²`` (the "weighted input feature
variance"); a group's score is the sum over its columns. What is removed leaves its mean behind, and FLAP
puts it into the bias: ``b̂ = b + W_{:,R} μ_R`` — done here where the consumer has a bias (Qwen2's,
OPT's, GPT-2's projections); a model without one (Llama) cannot store it, and its config would have to
switch on biases for every projection to hold it, so the compensation is left out there. FLAP also
standardises scores across layers to choose a different width per layer; a Hugging Face config gives
every layer the same width, so the ranking inside each layer is all that is used. With
``structure_reconstruct`` (the default) the kept columns are also re-solved by least squares.
"""

from __future__ import annotations

from .base import ImportanceMethod, group_sums
from .registry import register_structure


@register_structure
class FLAP(ImportanceMethod):
    name = "flap"

    def scores(self, W, stats, groups):
        fluct = stats.var * W.pow(2).sum(0)  # [in]  Var(x_j) · ‖W_{:,j}‖²
        return group_sums(fluct, groups)
