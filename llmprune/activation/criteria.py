"""What an activation threshold compares: the score of each entry of a tensor.

- ``teal`` (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models",
  arXiv:2408.14690): ``S_tj = |x_tj|`` on the input of every linear map of the decoder layers.
- ``wina`` (Chen et al. 2025, "WINA: Weight Informed Neuron Activation for Accelerating LLM
  Inference", arXiv:2505.19427; official code microsoft/wina): ``S_tj = |x_tj| · ‖W_:,j‖₂``, the
  size of input ``j``'s contribution to the output. Two layouts (``activation_wina``):

  * ``official`` (the default), as ``wina/self_attn.py`` and ``wina/mlp.py``: every map reading the
    tensor keeps its own threshold and mask (q, k and v separately; gate and up separately), and only
    ``k_proj`` and ``gate_proj`` (and a fused ``qkv_proj`` / ``gate_up_proj``: Phi-3) are scored with
    their own column norms; q, v, o, up and down are scored by ``|x|`` alone (their norms are set to 1
    there). Those are the maps whose SVD the official transform takes to orthogonalise the stream, and
    the code keeps the norms there with or without the transform. For architectures the official code
    does not cover, the same role: Mixtral's ``w1``, the fused ``c_attn`` / ``query_key_value`` /
    ``Wqkv``, a plain MLP's first map (``fc1``, ``c_fc``), fused MoE experts; see :data:`WINA_NORMED`.
  * ``stacked`` (llmprune before issue 27): one threshold per tensor; for a tensor read by several
    maps (q/k/v, gate/up) ``W`` is their stack (``[W_q; W_k; W_v]``, the fused map), so one mask
    serves all (one gather of surviving rows per input in the sparse decode path).

  Deviations from the official code, both layouts: the paper's orthogonalisation of the weights (the
  SVD rotation that makes the criterion optimal) is not done, so the checkpoint stays a plain model; and
  masks come from calibrated thresholds (the official code's ``mask_by='threshold'``), not its scripts'
  per-token top-k (``mask_by='topk'``), because a threshold is data the checkpoint stores and the sparse
  decode path reads, and top-k needs a sort per token. 'stacked' is kept as an option: on the embedded
  SmolLM2-135M it gave 32.67 at 50 % uniform against the official layout's 31.78 (TEAL 31.73, dense
  20.60; one calibration seed; eval/results/activation.md).
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
WINA_LAYOUTS = ("official", "stacked")
# maps scored with their own column norms under WINA 'official' (wina/self_attn.py, wina/mlp.py: k_proj,
# gate_proj, Phi-3's fused qkv_proj and gate_up_proj; the others by role); every other reader: |x| alone
WINA_NORMED = frozenset({"k_proj", "gate_proj", "qkv_proj", "gate_up_proj", "w1", "c_attn", "query_key_value",
                         "Wqkv", "fc1", "c_fc"})


def wina_normed(name: str, module: nn.Module) -> bool:
    """Whether WINA 'official' scores the input of ``name`` with its column norms (see :data:`WINA_NORMED`);
    a fused-experts module (no Linear weight, a 3-D ``gate_up_proj``) is."""
    return name.rsplit(".", 1)[-1] in WINA_NORMED or not (isinstance(module, nn.Linear)
                                                            or type(module).__name__ == "Conv1D")


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
