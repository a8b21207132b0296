r"""Choosing whole decoder layers to remove.

- **Block influence** (ShortGPT: Men et al., "ShortGPT: Layers in Large Language Models are More Redundant
  Than You Expect", 2024): ``BI_i = 1 − E_t[cos(x_t^{(i)}, x_t^{(i+1)})]``, the mean over calibration
  tokens of one minus the cosine between a layer's input and output hidden states; the layers of lowest
  influence go, all chosen at once on the dense model. Gromov et al.'s angular distance
  ``arccos(cos)/π`` ranks single layers the same way.
- **Calibrated** (``kl``): one layer at a time, remove the layer whose removal (with those already gone)
  changes the model's next-token distribution least, measured as the mean KL divergence
  ``KL(p_dense ‖ p)`` over held calibration tokens; then choose the next one on the shortened model.
  Costs one forward of the model per remaining candidate and step.
"""

from __future__ import annotations

import torch


class BlockInfluence:
    """Accumulates ``Σ_t cos(x_t, y_t)`` between a layer's input and output hidden states."""

    def __init__(self):
        self.cos_sum = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x, y [..., hidden]``: the layer's input and output for a batch of tokens."""
        x = x.reshape(-1, x.shape[-1]).float()
        y = y.reshape(-1, y.shape[-1]).float()
        self.cos_sum += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())
        self.n += x.shape[0]

    @property
    def value(self) -> float:
        """``1 − E_t[cos(x_t, y_t)]`` (0 for a layer that saw no token)."""
        return 1.0 - self.cos_sum / self.n if self.n else 0.0


def lowest(values: list[float], n: int) -> list[int]:
    """Indices of the ``n`` lowest values, ascending by index (ties: the lower index)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    return sorted(order[:n])


def kl_from_dense(logp_dense: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of ``KL(p_dense ‖ p)``; ``logp_dense`` log-probabilities, ``logits`` raw
    ``[..., vocab]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = (logp_dense.exp() * (logp_dense - logp)).sum(-1)  # [...]
    return float(kl.mean())
