r"""Activation importance (Minitron: Muralidharan et al., "Compact Language Models via Pruning and Knowledge
Distillation", 2024): a structure's importance is the size of what it outputs on the calibration tokens.

A query head's score is the squared L2 norm of its attention output over every token, ``Σ_t ‖o_{t,h}‖²``
(the ``head_dim`` input columns of ``o_proj``); an MLP channel's the squared norm of its activation
``Σ_t a_{tj}²`` (an input column of ``down_proj``). Minitron aggregates with a mean over the batch and an
L2 norm over the sequence; over one stream of tokens the ranking is that of the plain sum of squares.
No weights are read: this is the cheapest baseline. With ``structure_reconstruct`` (the default) the
consumer's kept columns are re-solved by least squares afterwards (see :mod:`.columns`).
"""

from __future__ import annotations

from .base import ImportanceMethod, group_sums
from .registry import register_structure


@register_structure
class ActivationImportance(ImportanceMethod):
    name = "activation"

    def scores(self, W, stats, groups):
        return group_sums(stats.col_sq_norms, groups)  # [n_groups]  Σ_t x_tj² over the group's columns
