"""Activation sparsity protocols aligned with the references (issue 27): where thresholds apply (decode
steps; the last fraction of a prefill, TEAL's half), TEAL's perplexity protocol, and WINA's official layout
(a threshold per reader, column norms on k_proj and gate_proj only)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch.nn import functional as F

import llmprune
from llmprune.activation import apply_activation_sparsity, installed
from llmprune.activation.apply import ActivationThreshold, CallShape, ThresholdSpec
from llmprune.config import ConfigError, PruneConfig
from llmprune.evaluation.perplexity import TEAL_SCORED, perplexity


def _prune(model, ids, **kw):
    n, L = ids.shape
    return llmprune.prune(model, None, calibration=ids, nsamples=n, seqlen=L, device="cpu", progress=False,
                          activation_holdout=None, **kw)


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 128, (8, 32), generator=g)  # [n, L]


def _threshold(prefill: float, call: CallShape | None = None) -> ActivationThreshold:
    return ActivationThreshold(ThresholdSpec("t", ["t"], 1.0), prefill=prefill, call=call)


# ---- where thresholds apply, on bare tensors ----------------------------------------------------
@pytest.mark.parametrize("prefill,dense", [(1.0, 0), (0.5, 3), (0.99, 1), (0.0, 6)])
def test_a_prefill_keeps_its_first_positions_dense(prefill, dense):
    """Of a call of L = 6 positions the last ⌊prefill·L⌋ are thresholded (TEAL: L // 2, WINA: int(0.99 L))."""
    x = torch.tensor([0.5, 2.0, -0.3, -1.5]).repeat(2, 6, 1)  # [b=2, L=6, in=4]
    y = _threshold(prefill)(x)
    assert torch.equal(y[:, :dense], x[:, :dense])
    assert torch.equal(y[:, dense:], x[:, dense:] * torch.tensor([0.0, 1.0, 0.0, 1.0]))


@pytest.mark.parametrize("prefill", [0.0, 0.5, 1.0])
def test_a_decode_step_is_always_thresholded(prefill):
    x = torch.tensor([[[0.5, 2.0, -0.3, -1.5]], [[3.0, 0.1, 0.2, -4.0]]])  # [b=2, L=1, in=4]
    assert torch.equal(_threshold(prefill)(x), torch.tensor([[[0.0, 2.0, 0.0, -1.5]], [[3.0, 0.0, 0.0, -4.0]]]))


def test_flattened_rows_take_the_positions_of_the_call():
    """Fused MoE experts read [b·L, in]: the rows are split by the (b, L) of the model call."""
    call = CallShape()
    thr = _threshold(0.5, call)
    x = torch.tensor([0.5, 2.0, -0.3, -1.5]).repeat(2 * 4, 1)  # [b·L = 8, in]
    assert torch.equal(thr(x), x * torch.tensor([0.0, 1.0, 0.0, 1.0]))  # no call known: every row
    call.shape = (2, 4)
    y = thr(x).view(2, 4, 4)
    assert torch.equal(y[:, :2], x.view(2, 4, 4)[:, :2]) and (y[:, 2:, 0] == 0).all()
    call.shape = (8, 1)  # a decode step of a batch of 8
    assert (thr(x)[:, 0] == 0).all()


def test_measuring_counts_the_thresholded_positions_only():
    thr = _threshold(0.5)
    thr.measuring = True
    thr(torch.tensor([0.5, 2.0, -0.3, -1.5]).repeat(1, 6, 1))
    assert (thr.zeros, thr.total) == (6, 12)  # 3 thresholded positions x 4 entries, half of them zero


# ---- where thresholds apply, on a model --------------------------------------------------------
def test_the_default_serves_decode_steps_sparse_and_the_prompt_dense(ids):
    model = make_tiny_model("llama")
    prompt = ids[:1, :10]
    with torch.no_grad():
        dense = model(prompt).logits
    report = _prune(model, ids, activation="teal", activation_sparsity=0.5)
    assert report.config["activation_prefill"] == 0.0 and report.metadata()["activation"]["prefill"] == 0.0
    handle = installed(model)
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, dense)  # a prefill: dense
        with handle.applied(1.0):
            assert not torch.equal(model(prompt).logits, dense)
    with handle.measure():
        model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    # every entry counted comes from the 4 decode steps (the 5th token comes from the prefill's logits)
    q = handle.modules[0]
    assert q.total == 4 * model.config.hidden_size and 0 < q.zeros < q.total
    assert abs(handle.sparsity()["weighted"] - 0.5) < 0.25


def test_teal_prefill_on_a_model_equals_half_dense_half_thresholded(ids):
    """prefill 0.5 on a window = each layer's first half of positions with every threshold off, the second
    half thresholded: the first half's logits are the dense model's (causal), the second half's are not."""
    model = make_tiny_model("llama")
    x = ids[:2]
    with torch.no_grad():
        dense = model(x).logits
    _prune(model, ids, activation="teal", activation_sparsity=0.5, activation_prefill=0.5)
    with torch.no_grad():
        got = model(x).logits
    assert torch.equal(got[:, :16], dense[:, :16])
    assert not torch.allclose(got[:, 16:], dense[:, 16:])


def test_the_setting_travels_with_the_thresholds(ids, tmp_path):
    from llmprune.checkpoint.save import save_pruned

    model = make_tiny_model("llama")
    report = _prune(model, ids, activation="teal", activation_sparsity=0.4, activation_prefill=0.5)
    save_pruned(model, None, tmp_path / "out", report)
    loaded = llmprune.load(tmp_path / "out")
    assert installed(loaded).prefill == 0.5 and {m.prefill for m in installed(loaded).modules} == {0.5}
    fast = llmprune.load(tmp_path / "out", sparse_decode=True)
    assert installed(fast).prefill == 0.5
    old = {k: v for k, v in report.metadata()["activation"].items() if k != "prefill"}  # before issue 27
    report.activation_handle.remove()
    with apply_activation_sparsity(model, old) as handle:
        assert handle.prefill == 1.0


def test_prefill_settings_are_checked():
    assert PruneConfig(activation="teal").activation_prefill == 0.0
    with pytest.raises(ConfigError, match="activation_prefill"):
        PruneConfig.build({"activation": "teal", "activation_prefill": 1.5})
    with pytest.raises(ConfigError, match="activation_prefill set but no activation criterion"):
        PruneConfig.build({"method": "wanda", "activation_prefill": 0.5})


# ---- perplexity protocols -----------------------------------------------------------------------
def test_teal_protocol_scores_the_last_512_of_strided_windows(ids):
    """TEAL's utils/eval_ppl.py: windows of seqlen + 512 tokens every 512, the last half thresholded, the
    last 512 tokens scored; computed here by hand on the first two windows."""
    model = make_tiny_model("llama", max_position_embeddings=1024)
    _prune(model, ids, activation="teal", activation_sparsity=0.5)  # served: decode only
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(3, 128, (2000,), generator=g)  # [T]
    seqlen = 64
    r = perplexity(model, input_ids=stream, seqlen=seqlen, max_windows=2, activation_protocol="teal")
    L = seqlen + TEAL_SCORED
    assert (r.windows, r.seqlen, r.tokens, r.protocol) == (2, L, 2 * TEAL_SCORED, "teal")
    handle = installed(model)
    total = 0.0
    with torch.no_grad(), handle.applied(0.5):
        for b in (0, TEAL_SCORED):
            w = stream[b : b + L][None]  # [1, L]
            logits = model(w).logits[0, -TEAL_SCORED - 1 : -1]  # [512, V]
            total += float(F.cross_entropy(logits.float(), w[0, -TEAL_SCORED:], reduction="sum"))
    assert r.nll == pytest.approx(total / (2 * TEAL_SCORED), rel=1e-6)
    assert handle.modules[0].prefill == 0.0  # the served setting comes back after


def test_our_protocol_thresholds_every_position_whatever_the_served_setting(ids):
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    _prune(a, ids, activation="teal", activation_sparsity=0.5)
    _prune(b, ids, activation="teal", activation_sparsity=0.5, activation_prefill=1.0)
    stream = ids.reshape(-1)
    ra, rb = perplexity(a, input_ids=stream, seqlen=32), perplexity(b, input_ids=stream, seqlen=32)
    assert ra.nll == rb.nll and ra.protocol == "all"
    installed(b).remove()
    assert perplexity(b, input_ids=stream, seqlen=32).nll < ra.nll  # and the thresholds did something
    with pytest.raises(ValueError, match="unknown activation protocol 'paper'; choose one of: all, teal"):
        perplexity(a, input_ids=stream, seqlen=32, activation_protocol="paper")


# ---- WINA as its official code -----------------------------------------------------------------
def test_wina_official_gives_each_reader_its_threshold_and_norms_only_to_k_and_gate(ids):
    model = make_tiny_model("llama")
    report = _prune(model, ids, activation="wina", activation_sparsity=0.5, activation_prefill=1.0)
    layer0 = {s.name.split("layers.0.")[1]: s for s in report.activation.specs if ".layers.0." in s.name}
    assert sorted(layer0) == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    assert {n for n, s in layer0.items() if s.norms} == {"self_attn.k_proj", "mlp.gate_proj"}
    for s in layer0.values():
        assert len(s.members) == 1 and abs(s.calibration - 0.5) <= 0.01
    handle = installed(model)
    by_name = {m.spec.name: m for m in handle.modules}
    k = model.model.layers[0].self_attn.k_proj.weight.detach()
    kmod = by_name["model.layers.0.self_attn.k_proj"]
    assert torch.allclose(kmod.per_feature, kmod.threshold / k.norm(dim=0))  # t / ‖W_k[:, j]‖
    assert by_name["model.layers.0.self_attn.q_proj"].per_feature is None  # |x| alone
    # q and k read one tensor but keep their own masks
    seen = {}
    hooks = [model.model.layers[0].self_attn.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0] != 0)) for n in ("q_proj", "k_proj")]
    with torch.no_grad():
        model(ids[:2])
    for h in hooks:
        h.remove()
    assert not torch.equal(seen["q_proj"], seen["k_proj"])


def test_wina_official_norms_decide_the_k_mask(ids):
    """Inputs whose k_proj columns are large survive k's threshold; q's mask (|x| alone) ignores them."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[:, :8] *= 20
    _prune(model, ids, activation="wina", activation_sparsity=0.5, activation_prefill=1.0)
    seen = {}
    attn = model.model.layers[0].self_attn
    hooks = [attn.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
             for n in ("q_proj", "k_proj")]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    kept_k = (seen["k_proj"] != 0).float().mean(dim=(0, 1))  # [in]
    kept_q = (seen["q_proj"] != 0).float().mean(dim=(0, 1))
    assert kept_k[:8].mean() > 0.9 > kept_k[8:].mean()
    assert kept_q[:8].mean() < 0.9


def test_wina_stacked_stays_available_and_old_checkpoints_keep_their_meaning(ids):
    model = make_tiny_model("llama")
    report = _prune(model, ids, activation="wina", activation_wina="stacked", activation_sparsity=0.5,
                    activation_prefill=1.0)
    meta = report.metadata()["activation"]
    assert meta["wina"] == "stacked"
    assert meta["thresholds"]["model.layers.0.self_attn.k_proj"]["group"] == "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        expected = model(ids).logits
    report.activation_handle.remove()
    for entry in meta["thresholds"].values():  # a checkpoint written before issue 27: no 'norms', no 'prefill'
        del entry["norms"]
    old = {k: v for k, v in meta.items() if k not in ("wina", "prefill")}
    with apply_activation_sparsity(model, old), torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-6)


def test_wina_layout_only_with_wina():
    assert PruneConfig(activation="wina").activation_wina == "official"
    with pytest.raises(ConfigError, match="activation_wina = 'stacked' set but the criterion is 'teal'"):
        PruneConfig.build({"activation": "teal", "activation_wina": "stacked"})


@pytest.mark.parametrize("arch", ["phi3", "mixtral", "gpt2"])
def test_wina_official_on_fused_and_expert_layouts(ids, arch):
    """Phi-3's fused qkv/gate_up, Mixtral's experts, GPT-2's c_attn: scored with their norms, as the official
    code does for Phi-3's fused maps; the output maps by |x|."""
    model = make_tiny_model(arch)
    report = _prune(model, ids[:, :16], activation="wina", activation_sparsity=0.4, activation_prefill=1.0)
    normed = {s.name.rsplit(".", 1)[-1] for s in report.activation.specs if s.norms}
    plain = {s.name.rsplit(".", 1)[-1] for s in report.activation.specs if not s.norms}
    assert normed and plain and not normed & plain
    assert {"o_proj", "down_proj", "c_proj"} & plain
