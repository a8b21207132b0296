"""The opened engine: statistics declared by what needs them, the open registry, per-module
sparsity, and the observe-only pass whose first-layer statistics the prune pass reuses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

import llmprune
from llmprune import engine
from llmprune.api import build_methods
from llmprune.config import ConfigError, PruneConfig
from llmprune.engine import SequentialRun, find_decoder_layers
from llmprune.pruners import Pruner, Wanda
from llmprune.registry import PRUNERS, REFINERS, lookup, register_pruner
from llmprune.stats import InputStats
from llmprune.steps import Allocator, LayerTarget


def _prune(model, calib_ids, **kwargs):
    kwargs = {"method": "wanda", "nsamples": calib_ids.shape[0], "seqlen": calib_ids.shape[1],
              "device": "cpu", **kwargs}
    return llmprune.prune(model, None, calibration=calib_ids, progress=False, **kwargs)


def _zeros(W: torch.Tensor) -> float:
    return float((W == 0).float().mean())


class _Spy(Pruner):
    """Wanda's mask; records the statistics it was handed."""

    name = "spy"
    needs = frozenset({"sq", "sum"})
    seen: list = []

    def prune(self, W, stats, sparsity, nm=None):
        type(self).seen.append(stats)
        return Wanda().prune(W, stats, sparsity, nm)


@pytest.fixture
def spy():
    register_pruner(_Spy)
    _Spy.seen = []
    yield _Spy
    PRUNERS.pop("spy", None)


# ----------------------------------------------------------------------------------------------
# Declared statistics and the registry
# ----------------------------------------------------------------------------------------------


def test_statistics_are_the_declared_ones_shared_per_input(spy, calib_ids):
    model = make_tiny_model("llama")
    _prune(model, calib_ids, method="spy")
    assert spy.seen, "the registered pruner was not called"
    for st in spy.seen:
        assert st.needs == {"sq", "sum"} and st.sum is not None and st.sq is not None and st._H is None
    n_tokens = calib_ids.numel()
    assert all(st.n == n_tokens for st in spy.seen)
    # q/k/v read one input and gate/up another: 2 layers x (qkv, o, gate/up, down) = 8 statistics objects
    assert len({id(st) for st in spy.seen}) == 8
    X = torch.randn(5, 3)
    st = InputStats({"sq", "sum"})
    st.add(X)
    torch.testing.assert_close(st.mean, X.mean(0))
    torch.testing.assert_close(st.var, X.var(0, unbiased=False), atol=1e-6, rtol=1e-5)


def test_a_hessian_serves_as_the_squared_norms():
    X = torch.randn(40, 6)
    st = InputStats({"sq", "hessian"})
    st.add(X)
    assert st.sq is None  # not accumulated twice
    torch.testing.assert_close(st.col_sq_norms, (X**2).sum(0), atol=1e-5, rtol=1e-5)


def test_registry_lists_methods_and_rejects_unknown_ones():
    assert {"magnitude", "wanda", "sparsegpt", "ria"} <= set(lookup.__globals__["table"]("method"))
    assert "dsnot" in REFINERS and lookup("allocation", "owl").name == "owl"
    with pytest.raises(ValueError, match="unknown method 'wandaa'; choose one of: .*sparsegpt"):
        lookup("method", "wandaa")
    with pytest.raises(ConfigError, match="unknown refine 'dsnott'"):
        PruneConfig.build({"refine": "dsnott"})


def test_options_reach_their_method_and_foreign_options_are_errors():
    cfg = PruneConfig.build({"method": "sparsegpt", "blocksize": 32, "damp": 0.05})
    pruner, refiner, allocator = build_methods(cfg)
    assert (pruner.blocksize, pruner.damp) == (32, 0.05) and refiner is None and allocator is None
    cfg = PruneConfig.build({"method": "wanda", "allocation": "owl", "owl_m": 7, "owl_lambda": 0.1})
    _, _, owl = build_methods(cfg)
    assert (owl.M, owl.lam) == (7, 0.1)
    with pytest.raises(ConfigError, match="option 'blocksize' belongs to sparsegpt"):
        PruneConfig.build({"method": "wanda", "blocksize": 64})
    with pytest.raises(ConfigError, match="option 'owl_m' belongs to owl"):
        PruneConfig.build({"method": "wanda", "owl_m": 3})
    with pytest.raises(ConfigError, match="unknown key 'blocksizee'"):
        PruneConfig.build({"blocksizee": 64})


def test_recipe_of_another_method_drops_its_options_when_the_method_is_overridden(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sparsegpt\nblocksize: 64\nsparsity: 0.6\n")
    cfg = PruneConfig.from_yaml(recipe, method="wanda")
    assert cfg.method == "wanda" and cfg.sparsity == 0.6 and "blocksize" not in cfg.model_fields_set
    assert PruneConfig.from_yaml(recipe).blocksize == 64


# ----------------------------------------------------------------------------------------------
# Per-module sparsity
# ----------------------------------------------------------------------------------------------


def test_module_and_layer_sparsity(calib_ids, tmp_path):
    model = make_tiny_model("llama")
    report = _prune(model, calib_ids, layer_sparsity=[0.3, 0.6],
                    module_sparsity={r"mlp\.down_proj": 0.8, r"layers\.1\.self_attn\.q_proj": "2:4"})
    by_name = {m.name: m for m in report.modules}
    layers = model.model.layers
    assert _zeros(layers[0].self_attn.k_proj.weight) == pytest.approx(0.3, abs=0.02)
    assert _zeros(layers[1].mlp.up_proj.weight) == pytest.approx(0.6, abs=0.02)
    for i in range(2):
        assert _zeros(layers[i].mlp.down_proj.weight) == pytest.approx(0.8, abs=0.02)
    q = layers[1].self_attn.q_proj.weight
    assert ((q.reshape(q.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    m = by_name["model.layers.1.self_attn.q_proj"]
    assert (m.pattern, m.target_sparsity) == ("2:4", 0.5)
    assert by_name["model.layers.0.mlp.down_proj"].target_sparsity == 0.8
    meta = report.metadata()
    assert meta["module_target_sparsity"]["model.layers.0.self_attn.k_proj"] == 0.3
    assert meta["layer_sparsity"] == [{"sparsity": 0.3, "pattern": "unstructured"},
                                      {"sparsity": 0.6, "pattern": "unstructured"}]
    json.dumps(report.to_dict())


def test_layer_sparsity_length_must_match_the_model(calib_ids):
    with pytest.raises(ConfigError, match="layer_sparsity gives 3 values but the model has 2 decoder layers"):
        _prune(make_tiny_model("llama"), calib_ids, layer_sparsity=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="out of range"):
        PruneConfig.build({"layer_sparsity": "0.5,1.2"})
    with pytest.raises(ConfigError, match="give one of them"):
        PruneConfig.build({"layer_sparsity": [0.5], "allocation": "owl"})
    assert PruneConfig.build({"module_sparsity": r"mlp\.=0.6;q_proj=2:4"}).module_sparsity == {
        r"mlp\.": 0.6, "q_proj": "2:4"}


# ----------------------------------------------------------------------------------------------
# The observe-only pass
# ----------------------------------------------------------------------------------------------


class _Recorder(Allocator):
    """Records what the observe pass hands over; allocates the given per-layer targets."""

    name = "recorder"

    def __init__(self, targets=None, needs=frozenset({"sq"})):
        self.layers, self.targets = [], targets
        self.needs = needs

    def observe(self, layer, modules):
        self.layers.append((layer, [(m.name, m.W.clone(), m.stats.col_sq_norms.clone(), m.stats.n)
                                    for m in modules]))

    def allocate(self, sparsity, nm=None):
        return self.targets or [LayerTarget(sparsity, nm)] * len(self.layers)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_observe_pass_sees_the_dense_model_and_changes_nothing(arch, calib_ids):
    model = make_tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, layers = find_decoder_layers(model)
    # the dense inputs of every linear module, from the model's own forward
    dense: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(mod, args):
            dense.setdefault(name, args[0].reshape(-1, args[0].shape[-1]))

        return hook

    hooks = [mod.register_forward_pre_hook(record(name)) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and name != "lm_head" or type(mod).__name__ == "Conv1D"]
    with torch.no_grad():
        model(calib_ids)
    for h in hooks:
        h.remove()
    rec = _Recorder()
    SequentialRun(model, calib_ids, progress=False).observe(rec.needs, rec.observe)
    assert [i for i, _ in rec.layers] == list(range(len(layers)))
    checked = 0
    for _, mods in rec.layers:
        for name, _W, sq, n in mods:
            if name in dense:
                torch.testing.assert_close(sq, dense[name].float().pow(2).sum(0), rtol=1e-4, atol=1e-4)
                assert n == dense[name].shape[0]
                checked += 1
    assert checked >= 4 * len(layers)  # every dense Linear / Conv1D of every layer (experts: routed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode", ["one-pass", "lockstep", "two-pass"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_observe_then_prune_equals_prune_and_reuses_layer_zero(method, mode, calib_ids, monkeypatch):
    """A uniform allocation after the observe pass gives the very weights of a plain run: the first
    layer's reused statistics are the ones the prune pass would have gathered."""
    if mode == "lockstep":
        monkeypatch.setattr(engine.lockstep, "CPU_CHUNK_TOKENS", 2 * calib_ids.shape[1])
    kw = {"batch_size": 4, "sequential": "dense-layer"} if mode == "two-pass" else {}
    plain = make_tiny_model("llama")
    _prune(plain, calib_ids, method=method, sparsity=0.5, **kw)

    model = make_tiny_model("llama")
    pruner, _, _ = build_methods(PruneConfig.build({"method": method}))
    run = SequentialRun(model, calib_ids, progress=False, **kw)
    rec = _Recorder()
    run.observe(rec.needs, rec.observe, keep_first=pruner.needs)
    reused = dict(run._reuse)
    assert reused and all(pruner.needs <= st.needs for st in reused.values())
    adds = []
    orig_add = InputStats.add
    monkeypatch.setattr(InputStats, "add", lambda self, X, **k: (adds.append(id(self)), orig_add(self, X, **k))[1])
    run.prune(engine.PrunePlan(pruner, lambda name: 0.5))
    if mode == "two-pass":  # every statistic of layer 0 is the dense one: none recomputed
        assert not {id(s) for s in reused.values()} & set(adds)
    for k, v in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # reused: q/k/v of layer 0 in every mode; in two-pass mode all of layer 0 (dense statistics)
    q_stats = reused["model.layers.0.self_attn.q_proj"]
    assert id(q_stats) not in adds


def test_allocator_targets_are_applied_per_layer(calib_ids):
    model = make_tiny_model("llama")
    targets = [LayerTarget(0.25), LayerTarget(0.5, (2, 4))]
    rec = _Recorder(targets)
    from llmprune.registry import ALLOCATORS

    ALLOCATORS["recorder"] = type("Rec", (_Recorder,), {"from_config": classmethod(lambda cls, c: rec)})
    try:
        report = _prune(model, calib_ids, allocation="recorder", sparsity=0.4)
    finally:
        ALLOCATORS.pop("recorder")
    assert len(rec.layers) == 2 and "observe" in report.seconds
    layers = model.model.layers
    assert _zeros(layers[0].mlp.up_proj.weight) == pytest.approx(0.25, abs=0.02)
    W = layers[1].mlp.up_proj.weight
    assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert report.layer_targets == [(0.25, "unstructured"), (0.5, "2:4")]
