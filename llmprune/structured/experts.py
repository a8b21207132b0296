r"""Choosing routed experts to remove: REAP (Lasby et al., "REAP: Router-weighted Expert Activation Pruning",
2025).

An expert's saliency is the mean, over the calibration tokens routed to it, of its router weight times the
norm of its output:

    S_j = (1 / |X_j|) Σ_{x ∈ X_j} g_j(x) · ‖f_j(x)‖₂

with ``X_j`` the tokens whose top-k includes ``j``, ``g_j(x)`` the weight the router gives ``j`` in the
combination (after the top-k renormalisation the model uses) and ``f_j(x)`` the expert's output. The
experts of lowest saliency go; an expert that received no token has saliency 0 and goes first.
"""

from __future__ import annotations

import torch


class REAPSaliency:
    """Accumulates ``Σ g_j(x) ‖f_j(x)‖`` and the routed-token count of every expert of one MoE block."""

    def __init__(self, n_experts: int):
        self.total = torch.zeros(n_experts, dtype=torch.float64)
        self.count = torch.zeros(n_experts, dtype=torch.long)

    def add(self, expert: int, gate: torch.Tensor, out: torch.Tensor) -> None:
        """``gate [t]``: the routing weights of the tokens routed to ``expert``; ``out [t, hidden]``: its
        outputs for them (before the weighting)."""
        self.total[expert] += float((gate.float() * out.float().norm(dim=-1)).sum())
        self.count[expert] += int(gate.numel())

    @property
    def saliency(self) -> torch.Tensor:
        """``[n_experts]``: ``S_j`` (0 for an expert no token reached)."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1), torch.zeros_like(self.total))
