"""What an activation threshold compares: the score of each entry of a tensor.

- ``teal`` (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models",
  arXiv:2408.14690): ``S_tj = |x_tj|`` on the input of every linear map of the decoder layers.
- ``wina`` (Chen et al. 2025, "WINA: Weight Informed Neuron Activation for Accelerating LLM
  Inference", arXiv:2505.19427): ``S_tj = |x_tj| · ‖W_:,j‖₂``, the size of input ``j``'s
  contribution to the output. One threshold per tensor on that score. For a tensor read by
  several maps (q/k/v, gate/up) ``W`` is their stack (``[W_q; W_k; W_v]``, the fused map), so
  one mask serves all. Deviation: the paper also orthogonalises the weights (an SVD rotation that
  makes the criterion optimal); llmprune keeps the weights as they are, so the checkpoint stays a
  plain model.
- ``cats`` (Lee et al. 2024, "CATS: Contextually-Aware Thresholding for Sparsity in Large Language
  Models", arXiv:2404.08763): ``S_tj = |act(gate(x))_tj|``, the gated MLP's activation, thresholded
  before it multiplies ``up(x)``; so the input of ``down_proj`` is as sparse. Gated MLPs only
  (``gate_proj``/``up_proj``, fused ``gate_up_proj``, MoE experts with a gate); attention and
  other layouts are left alone, and a model without any gated MLP is an error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.targets import Target

CRITERIA = ("teal", "wina", "cats")


def reader_weights(module: nn.Module) -> torch.Tensor:
    """The weight through which ``module`` reads its input, as ``W [out, in]`` float32: a Linear's or
    GPT-2 Conv1D's weight, or every expert's ``gate_up`` of a fused-experts module stacked."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return Target("", module).get_weight()
    W = module.gate_up_proj.detach().float()  # [E, 2I, H], or [E, H, 2I] transposed
    if getattr(module, "is_transposed", False) or (W.shape[1] != 2 * module.down_proj.shape[-1]
                                                   and W.shape[2] == 2 * module.down_proj.shape[1]):
        W = W.transpose(1, 2)
    return W.reshape(-1, W.shape[-1])  # [E·2I, H]


def column_norms(Ws: list[torch.Tensor]) -> torch.Tensor:
    """``‖W_:,j‖₂`` of the stacked maps ``Ws`` (each ``[out_i, in]``) reading one input: ``[in]``."""
    sq = sum(W.float().pow(2).sum(0) for W in Ws)  # [in]
    return sq.sqrt()


def is_gated_mlp(mlp: nn.Module) -> bool:
    """Whether ``mlp`` computes ``act(gate(x)) * up(x)``: it holds a ``gate_proj``, a fused
    ``gate_up_proj`` (a module or the 3-D parameter of fused experts), or ``w1`` with ``w3``."""
    return (hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj")
            or (hasattr(mlp, "w1") and hasattr(mlp, "w3")))


ACT_NAMES = ("act_fn", "activation_fn", "act")


def gated_activations(layer: nn.Module, prefix: str) -> tuple[list[str], list[str]]:
    """``(gated, plain)``: full names of the activation modules of ``layer`` inside gated MLPs (what
    CATS thresholds), and of those in MLPs that are not gated (what it cannot)."""
    gated, plain = [], []
    for name, mod in layer.named_modules():
        for attr in ACT_NAMES:
            act = getattr(mod, attr, None)
            if isinstance(act, nn.Module) and act in dict(mod.named_children()).values():
                (gated if is_gated_mlp(mod) else plain).append(f"{prefix}.{name}.{attr}" if name else
                                                               f"{prefix}.{attr}")
    return gated, plain
