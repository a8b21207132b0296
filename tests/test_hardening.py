"""Silent fallbacks made loud (issue 10, item 5): a model that changes its hidden states between
layers is refused, targets no calibration token reached are warned about and listed, and
non-finite statistics or weights fail naming the module."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

import llmprune
from llmprune.engine import PrunePlan, Target, UnsupportedModelError
from llmprune.engine.plan import NonFiniteError
from llmprune.pruners import Wanda
from llmprune.stats import InputStats


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, hidden_states):
        return hidden_states + self.proj(hidden_states)


class _ScalesBetweenLayers(nn.Module):
    """A toy causal LM that rescales the hidden states between its blocks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 16)
        self.layers = nn.ModuleList([_Block() for _ in range(3)])

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h) * 0.5
        return h


def test_hidden_states_changed_between_layers_is_an_error(calib_ids):
    with pytest.raises(UnsupportedModelError, match="_ScalesBetweenLayers changes the hidden states between "
                                                    "decoder layers 0 and 1"):
        llmprune.prune(_ScalesBetweenLayers(), None, calibration=calib_ids, method="wanda", device="cpu",
                       progress=False, nsamples=6, seqlen=16)


def test_targets_without_calibration_tokens_are_warned_about_and_listed(caplog):
    model = make_tiny_model("mixtral", num_local_experts=16, num_experts_per_tok=1)
    ids = torch.randint(3, 128, (1, 3), generator=torch.Generator().manual_seed(0))  # 3 tokens, 16 experts
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        report = llmprune.prune(model, None, calibration=ids, method="wanda", device="cpu", progress=False,
                                nsamples=1, seqlen=3)
    fallbacks = report.fallbacks
    assert fallbacks and all("experts" in name for name in fallbacks)
    assert all(v.startswith("magnitude: no calibration tokens") for v in fallbacks.values())
    assert "received no calibration tokens" in caplog.text
    assert report.metadata()["fallbacks"] == fallbacks
    assert "pruned by magnitude" in report.summary()
    for m in report.modules:  # still pruned, by magnitude
        assert m.sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("needs, field", [({"sq"}, "sq"), ({"hessian"}, "_H"), ({"sq", "sum"}, "sum")])
def test_non_finite_statistics_fail_naming_the_module(needs, field):
    lin = nn.Linear(8, 4)
    st = InputStats(needs)
    st.add(torch.randn(10, 8))
    getattr(st, field)[..., 0] = float("inf")
    plan = PrunePlan(Wanda(), lambda name: 0.5)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.mlp\.up_proj .* not finite.*--dtype float32"):
        plan(Target("model.layers.0.mlp.up_proj", lin), st)
    assert torch.isfinite(lin.weight).all()  # nothing written


def test_non_finite_weights_fail_naming_the_module():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    st = InputStats({"sq"})
    st.add(torch.randn(10, 8))
    with pytest.raises(NonFiniteError, match="model.layers.1.self_attn.q_proj: wanda produced non-finite weights"):
        PrunePlan(Wanda(), lambda name: 0.5)(Target("model.layers.1.self_attn.q_proj", lin), st)


class _ReversedMoE(nn.Module):
    """Top-1 routing to separate Linear experts, run from the last expert to the first."""

    def __init__(self, width=16, experts=4):
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList([nn.Linear(width, width) for _ in range(experts)])
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.weight[:, :experts] = torch.eye(experts)

    def forward(self, hidden_states):
        top1 = self.router(hidden_states).argmax(-1)  # [B, L]
        out = torch.zeros_like(hidden_states)
        for e in reversed(range(len(self.experts))):
            idx = top1 == e
            if idx.any():
                out[idx] = self.experts[e](hidden_states[idx])
        return hidden_states + out


class _ReversedMoELM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 16)
        with torch.no_grad():  # token t goes to expert t % 4
            self.embed.weight.zero_()
            self.embed.weight[torch.arange(128), torch.arange(128) % 4] = 10.0
        self.layers = nn.ModuleList([_ReversedMoE()])

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


def test_experts_run_out_of_order_never_drop_tokens(monkeypatch):
    from llmprune import engine

    # chunk 0 reaches experts 3 then 1; chunk 1 only expert 1: released in registration order,
    # expert 1 would be pruned before chunk 0 got there, without chunk 0's tokens. Lockstep
    # releases in the call order learned from the first layer's chunks instead.
    ids = torch.tensor([[3, 1, 3, 1], [1, 5, 9, 13]])
    monkeypatch.setattr(engine.lockstep, "CPU_CHUNK_TOKENS", 4)
    kw = dict(calibration=ids, method="wanda", device="cpu", progress=False, nsamples=2, seqlen=4)
    dense = llmprune.prune(_ReversedMoELM(), None, sequential="dense-layer", **kw)
    tokens = {m.name: m.tokens for m in dense.modules}
    assert tokens["layers.0.experts.1"] == 6 and tokens["layers.0.experts.3"] == 2  # every routed token
    assert "layers.0.router" in dense.skipped
    report = llmprune.prune(_ReversedMoELM(), None, **kw)
    assert report.execution == "lockstep"
    assert {m.name: m.tokens for m in report.modules} == tokens
    # with the learned order switched off, the late chunk is caught, never silently dropped
    monkeypatch.setattr(engine.passes, "call_order", lambda layer, forwards: None)
    with pytest.raises(RuntimeError, match=r"reached layers\.0\.experts\.1 after it was pruned.*--sequential "
                                           "dense-layer"):
        llmprune.prune(_ReversedMoELM(), None, **kw)
    monkeypatch.setattr(engine.passes, "plan_batch_size", lambda n, *a, **k: 1)  # replayed: refused
    with pytest.raises(RuntimeError, match="different orders"):
        llmprune.prune(_ReversedMoELM(), None, **kw)


def test_modules_left_dense_count_in_the_decoder_sparsity(calib_ids):
    model = make_tiny_model("llama")
    report = llmprune.prune(model, None, calibration=calib_ids, method="wanda", ignore=r"mlp\.", device="cpu",
                            progress=False, nsamples=6, seqlen=16)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)  # over the targets only
    weights = [p for layer in model.model.layers for p in layer.parameters() if p.dim() >= 2]
    expected = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert report.decoder_sparsity == pytest.approx(expected, abs=1e-9) and report.decoder_sparsity < 0.3
    assert report.metadata()["decoder_sparsity"] == round(report.decoder_sparsity, 6)
    assert "over every weight matrix of the decoder layers" in report.summary()
