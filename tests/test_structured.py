"""Structured removal: the width methods on bare tensors, the engine driver on tiny models (zeroed
structures and the cut model agree), depth and expert choice, the config and a saved checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from llmprune.config import PruneConfig
from llmprune.engine.anatomy import layer_parts
from llmprune.engine.passes import SequentialRun
from llmprune.engine.structured import LayerCut, StructuredPlan, block_influence, kl_choice
from llmprune.errors import ConfigError
from llmprune.pipeline.prune import prune_model
from llmprune.pipeline.structured import decoder_params
from llmprune.registry import lookup
from llmprune.stats import InputStats
from llmprune.structured.columns import ColumnGroups, Moments
from llmprune.structured.experts import REAPSaliency
from llmprune.structured.removal import Removal

METHODS = ("activation", "flap", "search")


def _stats(n=3000, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + torch.randn(d, generator=g)
    st = InputStats({"hessian", "sum"})
    st.add(X)
    return X, st


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bias", [False, True])
def test_width_method_never_worse_than_plain_removal(name, bias):
    X, st = _stats()
    W = torch.randn(12, 24, generator=torch.Generator().manual_seed(1))
    b = torch.randn(12) if bias else None
    groups = ColumnGroups.contiguous(6, 4, per_family=3)  # 2 families of 3 heads of 4 columns
    res = lookup("structure", name)().remove(W, b, st, groups, 1)
    assert len(res.removed) == 2 and {g // 3 for g in res.removed} == {0, 1}  # one head per family
    cols = groups.columns(res.removed)
    assert torch.all(res.W[:, cols] == 0)
    assert res.error <= res.error_plain + 1e-9
    # the reported error is the real output error over the calibration inputs
    Y = X @ W.T + (b if bias else 0)
    Y_hat = X @ res.W.T + (res.bias if bias else 0)
    assert res.error == pytest.approx(float((Y - Y_hat).norm() / (X @ W.T).norm()), rel=1e-3)


def test_least_squares_reconstruction_is_the_optimum_on_the_kept_columns():
    X, st = _stats()
    W = torch.randn(10, 24)
    res = lookup("structure", "activation")(damp=0.0).remove(W, None, st, ColumnGroups.contiguous(24, 1), 8)
    keep = [j for j in range(24) if j not in res.removed]
    sol = torch.linalg.lstsq(X[:, keep].double(), (X @ W.T).double()).solution.T.float()  # [out, k]
    assert torch.allclose(res.W[:, keep], sol, atol=1e-3)


def test_search_is_not_worse_than_importance_and_matches_least_squares():
    X, st = _stats(d=32, seed=3)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    groups = ColumnGroups.contiguous(32, 1)
    s = lookup("structure", "search")(damp=1e-8, search_batch=1).remove(W, None, st, groups, 12)
    a = lookup("structure", "activation")(damp=1e-8).remove(W, None, st, groups, 12)
    assert s.error <= a.error + 1e-6
    # the OBS downdates end at the least-squares solution on the columns the search kept
    keep = [j for j in range(32) if j not in s.removed]
    sol = torch.linalg.lstsq(X[:, keep].double(), (X @ W.T).double()).solution.T.float()
    assert torch.allclose(s.W[:, keep], sol, atol=1e-3)


def test_moments_error_with_and_without_bias_compensation():
    X, st = _stats()
    W = torch.randn(5, 24)
    W_hat = W.clone()
    W_hat[:, :6] = 0
    m = Moments.of(st, centred=True)
    plain = float((X @ (W - W_hat).T).norm() / (X @ W.T).norm())
    comp = X @ (W - W_hat).T
    comp = float((comp - comp.mean(0)).norm() / (X @ W.T).norm())
    assert m.error(W, W_hat, compensated=False) == pytest.approx(plain, rel=1e-3)
    assert m.error(W, W_hat, compensated=True) == pytest.approx(comp, rel=1e-3)


def test_reap_saliency_by_hand():
    acc = REAPSaliency(3)
    # expert 0: two tokens, weights 0.5 and 0.25, output norms 2 and 4 -> (1 + 1) / 2 = 1
    acc.add(0, torch.tensor([0.5, 0.25]), torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    # expert 1: one token, weight 1, norm 5 -> 5; expert 2: no token -> 0
    acc.add(1, torch.tensor([1.0]), torch.tensor([[3.0, 4.0]]))
    assert acc.saliency.tolist() == pytest.approx([1.0, 5.0, 0.0])


# ---- the engine on tiny models --------------------------------------------------------------------------


def _ids(n=8, L=32, seed=0):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"])
@pytest.mark.parametrize("name", METHODS)
def test_zeroed_model_equals_cut_model(arch, name):
    from llmprune.checkpoint.surgery import cut_widths

    model = make_tiny_model(arch)
    ids = _ids()
    parts = [layer_parts(model, i) for i in range(model.config.num_hidden_layers)]
    plan = StructuredPlan(lookup("structure", name)(), parts, list(range(len(parts))),
                          LayerCut(heads=2, channels=40), "model.layers")
    SequentialRun(model, ids, targets=plan.targets, progress=False).prune(plan)
    with torch.no_grad():
        zeroed = model(ids[:2]).logits
    removal = Removal(per_layer=dict(plan.per_layer))
    for r in removal.per_layer.values():
        assert len(r.heads) == 2 and len(r.channels) == 40
        assert len({h // 2 for h in r.heads}) == 2  # one head from each of the 2 key/value heads
    cut_widths(model, removal)
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 88
    assert model.generate(ids[:1, :6], max_new_tokens=3, do_sample=False).shape == (1, 9)
    with torch.no_grad():
        cut = model(ids[:2]).logits
    assert torch.allclose(zeroed, cut, atol=1e-5)


def test_kv_heads_then_heads_and_errors_reported():
    model = make_tiny_model("llama", num_attention_heads=8, num_key_value_heads=4)
    cfg = PruneConfig(remove_kv_heads=1, remove_heads=3, nsamples=8, seqlen=32)
    rep = prune_model(model, None, cfg, calibration=_ids(), progress=False)
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 3
    r = Removal.from_dict(rep.structure["removal"])
    for lr in r.per_layer.values():
        assert len(lr.kv_heads) == 1 and len(lr.heads) == 5  # 2 of the removed KV head + 1 from each other
    for m in rep.modules:
        assert m.reconstruct["error_after"] <= m.reconstruct["error_before"] + 1e-9


def test_identity_layer_is_chosen_first():
    model = make_tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: output = input
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = _ids()
    scores = block_influence(SequentialRun(model, ids, progress=False), progress=False)
    assert scores[1] == pytest.approx(0.0, abs=1e-6) and min(scores[0], scores[2]) > 1e-4
    assert kl_choice(model, ids[:2], 1, torch.device("cpu"), progress=False) == [1]


@pytest.mark.parametrize("depth", ["block-influence", "kl"])
def test_layers_removed_and_model_generates(depth):
    model = make_tiny_model("llama", num_hidden_layers=4)
    before = decoder_params(model)
    rep = prune_model(model, None, PruneConfig(remove_layers=2, depth_method=depth, nsamples=8, seqlen=32),
                      calibration=_ids(), progress=False)
    assert model.config.num_hidden_layers == 2
    assert len(rep.structure["removal"]["layers"]) == 2
    assert rep.structure["decoder_params"]["after"] == decoder_params(model) == before // 2
    out = model.generate(_ids(1, 8), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_budget_takes_the_rest_from_channels():
    model = make_tiny_model("llama")
    rep = prune_model(model, None, PruneConfig(structure_budget=0.3, remove_heads=2, nsamples=8, seqlen=32),
                      calibration=_ids(), progress=False)
    frac = rep.structure["decoder_params"]["fraction_removed"]
    assert 0.3 <= frac < 0.36
    assert model.config.intermediate_size % 8 == 0


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="second run"):
        PruneConfig(remove_channels=0.25, method="sparsegpt")
    with pytest.raises(ValueError, match="no removal is asked"):
        PruneConfig(structure="search", method="none", activation="teal")
    with pytest.raises(ValueError, match="unknown structure"):
        PruneConfig(structure="nope", remove_channels=0.2)
    assert PruneConfig(remove_channels=0.25).method == "none"
    model = make_tiny_model("llama")
    with pytest.raises(ConfigError, match="multiple of 2"):
        prune_model(model, None, PruneConfig(remove_heads=1, nsamples=8, seqlen=32), calibration=_ids(),
                    progress=False)
    gpt2 = make_tiny_model("gpt2")
    with pytest.raises(ConfigError, match="attention heads cannot be removed on gpt2"):
        prune_model(gpt2, None, PruneConfig(remove_heads=2, nsamples=8, seqlen=32), calibration=_ids(),
                    progress=False)


def test_cli_writes_a_smaller_checkpoint_plain_transformers_loads(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from llmprune.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 97} and some text number {i}." for i in range(400)))
    out = tmp_path / "small"
    rc = main(["prune", str(tiny_llama_dir), "--remove-channels", "0.25", "--remove-heads", "2", "--remove-layers",
               "1", "--calib", str(calib), "--nsamples", "8", "--seqlen", "32", "--output", str(out), "--quiet"])
    assert rc == 0
    small = AutoModelForCausalLM.from_pretrained(out)
    assert (small.config.num_hidden_layers, small.config.num_attention_heads, small.config.num_key_value_heads,
            small.config.intermediate_size) == (1, 2, 2, 96)
    meta = json.loads((out / "config.json").read_text())["llmprune"]["structure"]
    assert len(meta["removal"]["layers"]) == 1 and meta["params"]["after"] == sum(p.numel() for p in small.parameters())
    assert meta["decoder_params"]["fraction_removed"] > 0.5
    card = (out / "README.md").read_text()
    assert "removed" in card
    ids = torch.randint(3, 200, (1, 6))
    assert small.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_experts_removed_by_reap_and_model_generates(arch):
    model = make_tiny_model(arch)
    rep = prune_model(model, None, PruneConfig(remove_experts=1, remove_heads=2, nsamples=8, seqlen=32),
                      calibration=_ids(), progress=False)
    cfg = model.config
    assert getattr(cfg, "num_local_experts", getattr(cfg, "num_experts", None)) == 3
    assert cfg.num_experts_per_tok == 2
    r = Removal.from_dict(rep.structure["removal"])
    moe_layers = [i for i, p in enumerate(layer_parts(model, i) for i in range(cfg.num_hidden_layers)) if p.moe]
    assert moe_layers and all(len(r.per_layer[i].experts) == 1 for i in moe_layers)
    assert all(len(lr.heads) == 2 for lr in r.per_layer.values())
    assert model.generate(_ids(1, 8), max_new_tokens=3, do_sample=False).shape == (1, 11)
    with pytest.raises(ConfigError, match="remove at most 2"):
        prune_model(make_tiny_model("mixtral"), None, PruneConfig(remove_experts=3, nsamples=8, seqlen=32),
                    calibration=_ids(), progress=False)


def test_reap_saliency_from_the_engine_matches_the_definition():
    """The saliency the engine gathers equals REAP's definition computed by hand from the block's own routing."""
    from llmprune.engine.structured import expert_saliency

    model = make_tiny_model("mixtral", num_hidden_layers=1)
    ids = _ids(2, 16)
    parts = [layer_parts(model, 0)]
    got = expert_saliency(SequentialRun(model, ids, progress=False), parts)[0]
    block = model.model.layers[0].mlp
    seen = {}
    block.experts.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0], idx=a[1], w=a[2]), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    x, idx, w = seen["x"].reshape(-1, 64), seen["idx"], seen["w"]
    ex = block.experts
    want = []
    torch.set_grad_enabled(False)
    for e in range(4):
        tok = (idx == e).any(-1)
        if not tok.any():
            want.append(0.0)
            continue
        g = (w[tok] * (idx[tok] == e)).sum(-1)
        gate, up = torch.nn.functional.linear(x[tok], ex.gate_up_proj[e]).chunk(2, -1)
        out = torch.nn.functional.linear(ex.act_fn(gate) * up, ex.down_proj[e])
        want.append(float((g * out.norm(dim=-1)).mean()))
    torch.set_grad_enabled(True)
    assert got.tolist() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2_moe"])
def test_removing_nothing_changes_nothing(arch):
    from llmprune.checkpoint.surgery import apply_removal

    model = make_tiny_model(arch)
    ids = _ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
        n = sum(p.numel() for p in model.parameters())
        apply_removal(model, Removal())
        assert torch.equal(model(ids).logits, before) and sum(p.numel() for p in model.parameters()) == n


def test_structured_output_composes_with_a_second_prune(tiny_llama_dir, tmp_path):
    """The smaller model is a plain checkpoint: Wanda 2:4 on what is left, saved compressed, loads back."""
    from llmprune import load
    from llmprune.pipeline import prune_checkpoint

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"token{i % 53} text {i}." for i in range(400)))
    small = tmp_path / "small"
    prune_checkpoint(PruneConfig(model=str(tiny_llama_dir), remove_channels=0.25, calib=str(calib), nsamples=8,
                                 seqlen=32), small, progress=False)
    both = tmp_path / "small-2of4"
    rep = prune_checkpoint(PruneConfig(model=str(small), method="wanda", pattern="2:4", calib=str(calib),
                                       nsamples=8, seqlen=32, save_format="compressed"), both, progress=False)
    assert rep.sparsity == pytest.approx(0.5)
    model = load(both)
    assert model.config.intermediate_size == 96
    down = model.model.layers[0].mlp.down_proj.weight
    assert down.shape == (64, 96) and float((down == 0).float().mean()) == pytest.approx(0.5)


def test_budget_counts_the_removed_layers():
    model = make_tiny_model("llama", num_hidden_layers=4)
    rep = prune_model(model, None, PruneConfig(structure_budget=0.4, remove_layers=1, nsamples=8, seqlen=32),
                      calibration=_ids(), progress=False)
    assert 0.4 <= rep.structure["decoder_params"]["fraction_removed"] < 0.47  # of the 4-layer decoder
    with pytest.raises(ConfigError, match="already exceeded"):
        prune_model(make_tiny_model("llama", num_hidden_layers=4), None,
                    PruneConfig(structure_budget=0.2, remove_layers=1, nsamples=8, seqlen=32),
                    calibration=_ids(), progress=False)
