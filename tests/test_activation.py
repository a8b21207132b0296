"""Activation sparsity (issue 11): calibrated thresholds (teal, wina, cats), their storage and loading,
removal, the sparse decode path, every architecture, half precisions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, byte_tokenizer, make_tiny_model
from torch import nn

import llmprune
from llmprune.activation import apply_activation_sparsity, apply_from_config, installed
from llmprune.activation.apply import SparseDecodeLinear
from llmprune.activation.calibrate import ActivationCalibration, _Group
from llmprune.checkpoint import LoadError
from llmprune.config import ConfigError, PruneConfig

TEXT = " ".join(f"Line {i}: the {w} fox jumps over the lazy dog by river {i % 5}." for i, w in
                enumerate(["quick", "brown", "red", "sly"] * 12))


def _prune(model, ids, **kw):
    """Thresholds on every position (``activation_prefill=1``) unless told otherwise: these tests check what
    the thresholds do to whole windows; tests/test_activation_protocols.py checks where they apply."""
    n, L = ids.shape
    kw.setdefault("activation_prefill", 1.0)
    return llmprune.prune(model, None, calibration=ids, nsamples=n, seqlen=L, device="cpu", progress=False,
                          activation_holdout=None, **kw)


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 128, (8, 32), generator=g)  # [n, L]


def _logits(model, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw).logits


# ---- calibration -----------------------------------------------------------------------------
@pytest.mark.parametrize("criterion,allocation", [("teal", "uniform"), ("wina", "uniform"), ("teal", "greedy"),
                                                   ("cats", "uniform")])
def test_thresholds_reach_the_target_on_calibration_data(ids, criterion, allocation):
    model = make_tiny_model("llama")
    report = _prune(model, ids, activation=criterion, activation_sparsity=0.4, activation_allocation=allocation)
    res = report.activation
    assert report.config["method"] == "none" and report.sparsity == 0.0  # weights untouched
    for s in res.specs:
        assert abs(s.calibration - s.target) <= 0.01, (s.name, s.target, s.calibration)
    assert abs(res.calibration_sparsity["weighted"] - 0.4) <= 0.01
    # independently: the installed thresholds, run as at inference over the calibration windows
    handle = installed(model)
    with handle.measure():
        _logits(model, ids)
    got = handle.sparsity()
    for s in res.specs:
        assert abs(got["tensors"][s.name] - s.target) <= 0.01, (s.name, got["tensors"][s.name])
    assert abs(got["weighted"] - 0.4) <= 0.01
    if allocation == "greedy":  # per-layer weighted mean at the target, tensors allocated unevenly
        layer0 = [s for s in res.specs if ".layers.0." in s.name]
        w = sum(s.weights for s in layer0)
        assert abs(sum(s.target * s.weights for s in layer0) / w - 0.4) < 1e-6
        assert len({round(s.target, 4) for s in layer0}) > 1


def test_greedy_no_worse_than_uniform_on_the_layer_error(ids):
    """TEAL's greedy starts from zero and each step takes the least-error tensor: its model output is not
    farther from the dense one than uniform's, on the calibration windows (tiny Llama, 50 %)."""
    dense = make_tiny_model("llama")
    ref = _logits(dense, ids)
    errs = {}
    for alloc in ("uniform", "greedy"):
        model = make_tiny_model("llama")
        _prune(model, ids, activation="teal", activation_sparsity=0.5, activation_allocation=alloc)
        errs[alloc] = float((_logits(model, ids) - ref).norm())
    assert errs["greedy"] <= errs["uniform"] * 1.05, errs


def test_calibration_sees_earlier_layers_thresholded(ids):
    """Layer 1's thresholds are quantiles of the inputs it gets with layer 0 thresholded: with the same
    thresholds installed, layer 1 reaches its target exactly (not only on the dense model's inputs)."""
    model = make_tiny_model("llama")
    report = _prune(model, ids, activation="teal", activation_sparsity=0.6)
    spec = next(s for s in report.activation.specs if s.name.endswith("layers.1.mlp.down_proj"))
    handle = installed(model)
    with handle.measure():
        _logits(model, ids)
    assert abs(handle.sparsity()["tensors"][spec.name] - 0.6) <= 0.005
    # a dense-input calibration would differ: the same quantile on the dense model's inputs
    seen = []
    dense = make_tiny_model("llama")
    h = dense.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().flatten()))
    _logits(dense, ids)
    h.remove()
    assert float(torch.quantile(torch.cat(seen), 0.6)) != pytest.approx(spec.threshold, rel=1e-6)


# ---- criteria --------------------------------------------------------------------------------
def test_cats_thresholds_the_gated_activation_only(ids):
    model = make_tiny_model("llama")
    report = _prune(model, ids, activation="cats", activation_sparsity=0.5)
    specs = report.activation.specs
    assert [s.members for s in specs] == [[f"model.layers.{i}.mlp.act_fn"] for i in range(2)]
    assert all(s.site == "output" for s in specs)
    # attention and gate/up inputs are untouched; down_proj's input is at least as sparse as the activation
    seen: dict[str, torch.Tensor] = {}
    layer = model.model.layers[0]
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.update(q=a[0])),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.update(down=a[0]))]
    _logits(model, ids)
    q_sparse, down_sparse = seen["q"].clone(), seen["down"].clone()
    installed(model).remove()
    _logits(model, ids)
    for h in hooks:
        h.remove()
    assert torch.equal(seen["q"], q_sparse)
    assert float((down_sparse == 0).float().mean()) >= 0.49


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_cats_on_an_ungated_mlp_is_a_clear_error(ids, arch):
    model = make_tiny_model(arch)
    with pytest.raises(ValueError, match="gated MLPs.*use --activation teal or wina"):
        _prune(model, ids[:, :16], activation="cats")


def test_wina_scores_inputs_by_column_norms(ids):
    """WINA 'stacked' keeps |x_j|·‖W_:,j‖ above one threshold on every tensor: inputs with larger column
    norms survive smaller (official WINA: tests/test_activation_protocols.py)."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, :8] *= 20  # 8 inputs with large columns
    report = _prune(model, ids, activation="wina", activation_wina="stacked", activation_sparsity=0.5)
    seen = []
    h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    _logits(model, ids)
    h.remove()
    kept = (seen[0] != 0).float().mean(dim=(0, 1))  # [in]
    assert kept[:8].mean() > 0.9 > kept[8:].mean()
    assert report.activation.criterion == "wina"


# ---- apply / remove / storage ----------------------------------------------------------------
def test_remove_restores_exact_dense_outputs(ids):
    model = make_tiny_model("llama")
    ref = _logits(model, ids)
    report = _prune(model, ids, activation="teal", activation_sparsity=0.5)
    assert not torch.equal(_logits(model, ids), ref)
    report.activation_handle.remove()
    assert installed(model) is None
    assert torch.equal(_logits(model, ids), ref)
    handle = apply_activation_sparsity(model, report.metadata()["activation"], sparse_decode=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SparseDecodeLinear)
    handle.remove()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight.is_contiguous()
    assert torch.equal(_logits(model, ids), ref)


def test_installing_twice_is_refused(ids):
    model = make_tiny_model("llama")
    report = _prune(model, ids, activation="teal", activation_sparsity=0.3)
    with pytest.raises(RuntimeError, match="already installed.*remove"):
        apply_activation_sparsity(model, report.metadata()["activation"])


def test_save_load_apply_gives_the_in_memory_logits(ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmprune.checkpoint.save import save_pruned

    model = make_tiny_model("llama")
    report = _prune(model, ids, method="wanda", sparsity=0.5, activation="wina", activation_sparsity=0.4)
    expected = _logits(model, ids)
    save_pruned(model, None, tmp_path / "out", report)
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["llmprune"]["activation"]
    assert meta["criterion"] == "wina" and meta["target_sparsity"] == 0.4
    assert len(meta["thresholds"]) == 2 * 7 and meta["wina"] == "official"  # every module, each its own group
    k = meta["thresholds"]["model.layers.0.self_attn.k_proj"]
    assert k["group"] == "model.layers.0.self_attn.k_proj" and k["norms"] is True
    assert meta["thresholds"]["model.layers.0.self_attn.q_proj"]["norms"] is False

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # transformers alone: dense activations
    report.activation_handle.remove()
    assert torch.equal(_logits(plain, ids), _logits(model, ids))
    handle = apply_from_config(plain)
    assert handle is not None
    assert torch.allclose(_logits(plain, ids), expected, atol=1e-5, rtol=0)
    loaded = llmprune.load(tmp_path / "out")  # installs them from config.json
    assert installed(loaded) is not None
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-5, rtol=0)
    fast = llmprune.load(tmp_path / "out", sparse_decode=True)
    assert isinstance(fast.model.layers[0].mlp.down_proj, SparseDecodeLinear)
    assert fast.config._attn_implementation == "eager"  # CPU decode steps: faster than sdpa
    fast_sdpa = llmprune.load(tmp_path / "out", sparse_decode=True, attn_implementation="sdpa")
    assert fast_sdpa.config._attn_implementation == "sdpa"
    with pytest.raises(LoadError, match="attn_implementation='nope'"):
        llmprune.load(tmp_path / "out", attn_implementation="nope")
    # prefill: the dense path (with the attention of `expected`: eager's rounding can move an entry across
    # its threshold, 0.013 in the logits here)
    assert torch.allclose(_logits(fast_sdpa, ids), expected, atol=1e-5, rtol=0)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert fast.generate(ids[:1, :5], **kw).tolist() == loaded.generate(ids[:1, :5], **kw).tolist()
    dense = llmprune.load(tmp_path / "out", hooks=False)
    assert installed(dense) is None
    with pytest.raises(ValueError, match="sparse_decode needs activation thresholds"):
        llmprune.load(tmp_path / "out", hooks=False, sparse_decode=True)


def test_batch_and_padding_do_not_change_a_row(ids):
    """Thresholds are per entry: a padded batch gives each row what it gives alone."""
    model = make_tiny_model("llama")
    _prune(model, ids, activation="teal", activation_sparsity=0.5)
    a, b = ids[0, :20], ids[1, :12]
    batch = torch.stack([a, torch.cat([torch.full((8,), 2), b])])  # left padding
    mask = torch.stack([torch.ones(20, dtype=torch.long), torch.cat([torch.zeros(8, dtype=torch.long),
                                                                     torch.ones(12, dtype=torch.long)])])
    out = _logits(model, batch, attention_mask=mask)
    assert torch.allclose(out[0], _logits(model, a[None])[0], atol=1e-5)
    assert torch.allclose(out[1, 8:], _logits(model, b[None])[0], atol=1e-4)


# ---- sparse decode ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch,criterion", [("llama", "teal"), ("llama", "cats"), ("gpt2", "wina"), ("phi3", "teal")])
def test_sparse_decode_gives_the_tokens_of_the_dense_path(ids, arch, criterion):
    model = make_tiny_model(arch)
    report = _prune(model, ids[:, :16], activation=criterion, activation_sparsity=0.5)
    meta = report.metadata()["activation"]
    prompt = ids[:1, :6]
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, **kw)
    report.activation_handle.remove()
    handle = apply_activation_sparsity(model, meta, sparse_decode=True)
    assert any(isinstance(m, SparseDecodeLinear) for m in model.modules())
    with handle.measure():
        got = model.generate(prompt, **kw)
    assert got.tolist() == ref.tolist()
    fast = handle.sparsity()
    handle.remove()
    # the sparse path counts the zeros it skips as the thresholded dense path counts them
    handle = apply_activation_sparsity(model, meta)
    with handle.measure():
        model.generate(prompt, **kw)
    assert fast["tensors"] == pytest.approx(handle.sparsity()["tensors"], abs=1e-12)
    handle.remove()
    # and each single-token step of a swapped module equals its dense map on the thresholded input
    handle = apply_activation_sparsity(model, meta, sparse_decode=True)
    for lin in (m for m in model.modules() if isinstance(m, SparseDecodeLinear)):
        x = torch.randn(1, 1, lin.in_features) * 3
        x[x.abs() < 0.7] = 0
        xs = lin.thr[0](x) if lin.thr else x
        dense = torch.nn.functional.linear(xs, lin.weight if not lin.conv1d else lin.weight.t(), lin.bias)
        assert torch.allclose(lin(x), dense, atol=1e-5)
    handle.remove()


# ---- every architecture, dtypes ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_through_the_prune_path(ids, arch):
    model = make_tiny_model(arch)
    x = ids[:, :16]
    ref = _logits(model, x)
    report = _prune(model, x, method="magnitude", sparsity=0.5, activation="teal", activation_sparsity=0.4)
    assert abs(report.sparsity - 0.5) < 0.01
    res = report.activation
    assert res.specs and abs(res.calibration_sparsity["weighted"] - 0.4) <= 0.03  # OPT's ReLU zeros add some
    out = _logits(model, x)
    assert torch.isfinite(out).all()
    report.activation_handle.remove()
    assert not torch.equal(_logits(model, x), ref)  # the weights stay pruned; activations dense again


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions(ids, dtype):
    model = make_tiny_model("llama")
    report = _prune(model, ids, activation="teal", activation_sparsity=0.5)
    meta = report.metadata()["activation"]
    report.activation_handle.remove()
    model = model.to(dtype)
    handle = apply_activation_sparsity(model, meta)
    with handle.measure():
        out = _logits(model, ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert abs(handle.sparsity()["weighted"] - 0.5) < 0.02
    handle.remove()
    handle = apply_activation_sparsity(model, meta, sparse_decode=True)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert model.generate(ids[:1, :5], **kw).shape == (1, 11)
    handle.remove()


# ---- config, CLI, evaluation --------------------------------------------------------------------
def test_config_activation_only_and_errors():
    assert PruneConfig.build({"activation": "teal"}).method == "none"
    assert PruneConfig.build({"activation": "teal", "sparsity": 0.5}).method == "sparsegpt"
    for bad, msg in [({"activation_sparsity": 0.5}, "no activation criterion"),
                     ({"method": "none"}, "prunes nothing"),
                     ({"method": "none", "activation": "teal", "pattern": "2:4"}, "leaves the weights dense"),
                     ({"activation": "teal", "activation_sparsity": 1.0}, "out of range"),
                     ({"activation": "relu"}, "activation")]:
        with pytest.raises(ConfigError, match=msg):
            PruneConfig.build(bad)


def test_cli_activations_only_end_to_end(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from llmprune.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), "--activation", "teal", "--activation-sparsity", "0.5",
               "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--activation-holdout", str(calib),
               "--output", str(out), "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "activation sparsity teal (uniform): target 0.500" in stdout
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    assert meta["method"] == "none" and meta["activation"]["measured_sparsity"] is not None
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain = AutoModelForCausalLM.from_pretrained(out)  # still loads, dense activations, weights unchanged
    x = torch.randint(3, 200, (1, 10))
    assert torch.equal(_logits(plain, x), _logits(dense, x))
    # `llmprune eval` installs the recorded thresholds and reports the sparsity they reach
    res = tmp_path / "eval.json"
    assert main(["eval", str(out), "--ppl", str(calib), "--seqlen", "32", "--output", str(res), "--quiet"]) == 0
    metrics = json.loads(res.read_text())["metrics"]
    assert 0.3 < metrics["calib/activation_sparsity"] < 0.7


def test_evaluation_reports_the_activation_sparsity(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 32), generator=g)
    from transformers import LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    _prune(model, ids, activation="teal", activation_sparsity=0.5)
    res = llmprune.evaluate(model, tok, ppl=[str(text)], seqlen=32, progress=False)
    assert 0.3 < res.metrics["held/activation_sparsity"] < 0.7
    assert set(res.perplexity["held"]["activation_sparsity"]["tensors"]) == {
        s.name for s in installed(model).specs}


def test_pruning_results_unchanged_when_activation_is_off(ids):
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    ra = llmprune.prune(a, None, calibration=ids, method="wanda", nsamples=8, seqlen=32, progress=False)
    rb = _prune(b, ids, method="wanda", sparsity=0.5, activation="teal", activation_sparsity=0.5)
    assert ra.masks_sha256 == rb.masks_sha256  # the activation pass runs after pruning: same weights


def test_sampled_scores_are_the_full_scores_at_the_sampled_entries():
    """Sampling draws indices before scoring, so no float32 copy of the whole chunk is made; the values are
    those of scoring everything and indexing (the sample of earlier releases, bit for bit)."""
    cal = ActivationCalibration("wina", 0.5)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(x.numel(), (40,), generator=gen)
    for norms in (None, torch.rand(16) + 0.5):
        g = _Group(["q_proj"], "input", norms=norms)
        assert torch.equal(cal._scores(g, x, idx), cal._scores(g, x)[idx])
