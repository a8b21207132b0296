"""MoE targets: routers and gates stay dense by role (unless named), fused experts are read in
the layouts llmprune knows (standard and transposed) and refused with a clear error otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

import llmprune
from llmprune.engine.targets import find_targets

H, N_INTER, E = 64, 32, 4  # hidden size, expert intermediate size (I), experts


def tiny_qwen2_moe(seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=H, intermediate_size=128, moe_intermediate_size=N_INTER,
                         shared_expert_intermediate_size=H, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=E, num_experts_per_tok=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _prune(model, ids, **kw):
    return llmprune.prune(model, None, calibration=ids, method="wanda", nsamples=6, seqlen=16, device="cpu",
                          progress=False, **kw)


def _zeros(W: torch.Tensor) -> float:
    return (W == 0).float().mean().item()


# ---- routers and gates ---------------------------------------------------------------------
def test_mixtral_router_skipped_by_default(tiny_model):
    layer = tiny_model("mixtral").model.layers[0]
    found = find_targets(layer, "model.layers.0")
    names = {t.name for t in found.targets}
    assert "model.layers.0.mlp.gate" not in names
    assert "model.layers.0.self_attn.q_proj" in names and len(found.groups) == 1
    (name, reason), = found.skipped
    assert name == "model.layers.0.mlp.gate"
    assert reason.startswith(f"router: {E} outputs, one per expert of mlp.experts") and "mlp\\.gate$" in reason


@pytest.mark.parametrize("targets", [r"mlp\.gate$", "gate", r"mlp\.gate|experts"])
def test_router_named_in_targets_is_a_target(tiny_model, targets):
    found = find_targets(tiny_model("mixtral").model.layers[0], "L", targets=targets)
    assert "L.mlp.gate" in {t.name for t in found.targets} and not found.skipped


def test_router_not_named_by_a_block_regex(tiny_model):
    layer = tiny_model("mixtral").model.layers[0]
    found = find_targets(layer, "L", targets=r"mlp\.")  # every MLP weight, but not the router
    assert not found.targets and len(found.groups) == 1
    assert [n for n, _ in found.skipped] == ["L.mlp.gate"]
    # ignored by the user: neither a target nor listed as skipped
    assert not find_targets(layer, "L", ignore=r"mlp\.gate").skipped


def test_qwen2_moe_skips_router_and_shared_expert_gate():
    found = find_targets(tiny_qwen2_moe().model.layers[0], "L")
    assert dict(found.skipped).keys() == {"L.mlp.gate", "L.mlp.shared_expert_gate"}
    assert dict(found.skipped)["L.mlp.shared_expert_gate"].startswith("gate: one output")
    names = {t.name for t in found.targets}
    assert {f"L.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert not any("gate" in n and "proj" not in n for n in names)


def test_dbrx_router_inside_a_wrapper_and_flat_experts_refused():
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    cfg = DbrxConfig(d_model=H, ffn_config=dict(ffn_hidden_size=N_INTER, moe_num_experts=E, moe_top_k=2))
    layer = nn.Module()
    layer.ffn = DbrxFFN(cfg)
    with pytest.raises(ValueError, match=r"L\.ffn\.experts \(DbrxExperts: mlp\.w1 \[128, 64\].*--ignore 'ffn\\\.experts'"):
        find_targets(layer, "L")
    found = find_targets(layer, "L", ignore=r"ffn\.experts")
    assert not found.targets and [n for n, _ in found.skipped] == ["L.ffn.router.layer"]


# ---- pruning end to end --------------------------------------------------------------------
def test_prune_mixtral_leaves_routers_bit_identical(tiny_model, calib_ids):
    model = tiny_model("mixtral")
    routers = {n: p.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    assert len(routers) == 2
    report = _prune(model, calib_ids)
    params = dict(model.named_parameters())
    for n, W in routers.items():
        assert torch.equal(params[n], W), n
    assert not any(m.name.endswith("mlp.gate") for m in report.modules)
    assert _zeros(model.model.layers[1].mlp.experts.gate_up_proj) == 0.5


def test_prune_mixtral_router_when_named(tiny_model, calib_ids):
    model = tiny_model("mixtral")
    _prune(model, calib_ids, targets=r"mlp\.gate$")
    for layer in model.model.layers:
        assert _zeros(layer.mlp.gate.weight) == 0.5
        assert _zeros(layer.mlp.experts.gate_up_proj) == 0 and _zeros(layer.self_attn.q_proj.weight) == 0


def test_prune_qwen2_moe_shared_expert_not_its_gate(calib_ids):
    model = tiny_qwen2_moe()
    ref = copy.deepcopy(model)
    _prune(model, calib_ids)
    for layer, dense in zip(model.model.layers, ref.model.layers):
        mlp = layer.mlp
        for lin in (mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj, mlp.shared_expert.down_proj):
            assert _zeros(lin.weight) == 0.5
        assert _zeros(mlp.experts.down_proj) == 0.5
        assert torch.equal(mlp.gate.weight, dense.mlp.gate.weight)
        assert torch.equal(mlp.shared_expert_gate.weight, dense.mlp.shared_expert_gate.weight)


# ---- fused-expert layouts ------------------------------------------------------------------
class TransposedExperts(nn.Module):
    """Aria-style experts: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, applied as ``X @ W``."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module, flag: bool | None = None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up)
        self.down_proj = nn.Parameter(down)
        self.act_fn = act_fn
        if flag is not None:
            self.is_transposed = flag

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.gate_up_proj.shape[0]):
            token_idx, pos = torch.where(top_k_index == e)
            gate, up = (hidden_states[token_idx] @ self.gate_up_proj[e]).chunk(2, dim=-1)
            y = (self.act_fn(gate) * up) @ self.down_proj[e]
            out.index_add_(0, token_idx, y * top_k_weights[token_idx, pos, None])
        return out


def _transposed_copy(model, flag: bool | None = None):
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        ex = layer.mlp.experts
        layer.mlp.experts = TransposedExperts(ex.gate_up_proj.data.transpose(1, 2).contiguous(),
                                              ex.down_proj.data.transpose(1, 2).contiguous(), ex.act_fn, flag)
    return model


@pytest.mark.parametrize("flag", [None, True])
def test_transposed_experts_prune_like_the_standard_layout(tiny_model, calib_ids, flag):
    model = tiny_model("mixtral")
    moved = _transposed_copy(model, flag)
    with torch.no_grad():
        torch.testing.assert_close(moved(calib_ids).logits, model(calib_ids).logits)
    _prune(model, calib_ids)
    _prune(moved, calib_ids)
    for a, b in zip(model.model.layers, moved.model.layers):
        for p in ("gate_up_proj", "down_proj"):
            W, W_moved = getattr(a.mlp.experts, p), getattr(b.mlp.experts, p).transpose(1, 2)  # [E, out, in]
            assert torch.equal(W == 0, W_moved == 0), p
            torch.testing.assert_close(W_moved, W)


class _Block(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.route = nn.Linear(H, E, bias=False)  # a router by role, under a name of its own
        self.experts = experts


class _Layer(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.q_proj = nn.Linear(H, H)
        self.mlp = _Block(experts)


class _Llama4Like(nn.Module):
    """Transposed shapes, but called with the hidden states alone (tokens pre-sorted per expert)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, H, 2 * N_INTER))
        self.down_proj = nn.Parameter(torch.randn(E, N_INTER, H))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states):
        return hidden_states


class _Biased(TransposedExperts):
    def __init__(self):
        super().__init__(torch.randn(E, 2 * N_INTER, H), torch.randn(E, H, N_INTER), nn.SiLU())
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * N_INTER))


class _ParallelExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, 2 * N_INTER, H))


@pytest.mark.parametrize("experts, why", [
    (_Llama4Like(), r"called as forward\(hidden_states\)"),
    (_Biased(), "also holds gate_up_proj_bias"),
    (TransposedExperts(torch.randn(E, 2 * N_INTER, H), torch.randn(E, H, N_INTER), nn.SiLU(), flag=True),
     "is_transposed=True disagrees with the shapes"),
    (TransposedExperts(torch.randn(E, H, 3 * N_INTER), torch.randn(E, N_INTER, H), nn.SiLU()), "shapes match neither layout"),
    (_ParallelExperts(), "no 3-D gate_up_proj and down_proj"),
])
def test_unknown_expert_layouts_are_refused(experts, why):
    layer = _Layer(experts)
    with pytest.raises(ValueError, match=rf"^L\.mlp\.experts \({type(experts).__name__}: .*\[{E}, .*\({why}\).*"
                                         r"--ignore 'mlp\\\.experts'"):
        find_targets(layer, "L")
    found = find_targets(layer, "L", ignore=r"mlp\.experts")
    assert [t.name for t in found.targets] == ["L.q_proj"] and not found.groups
    assert [n for n, _ in found.skipped] == ["L.mlp.route"]
    assert not find_targets(layer, "L", targets=r"q_proj").groups  # experts not selected: no error


def test_skipped_routers_are_listed_in_the_report_and_config(calib_ids):
    model = make_tiny_model("mixtral")
    report = llmprune.prune(model, None, calibration=calib_ids, method="wanda", nsamples=6, seqlen=16,
                            device="cpu", progress=False)
    assert set(report.skipped) == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    assert all("router" in why for why in report.skipped.values())
    assert report.metadata()["skipped"] == report.skipped and report.to_dict()["skipped"] == report.skipped
    assert "left dense by role: 2 module(s)" in report.summary()
