"""RIA, DSnoT and OWL through the engine on the tiny model of every architecture of the core
tests, alone and composed: measured sparsity, N:M validity (over permuted channels for RIA),
finite outputs, the report and the saved checkpoint's metadata."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from test_engine import decoder_targets

import llmprune
from llmprune.checkpoint.save import save_pruned

COMBOS = {
    "ria-60": dict(method="ria", sparsity=0.6),
    "ria-2of4": dict(method="ria", pattern="2:4"),
    "wanda-dsnot-60": dict(method="wanda", refine="dsnot", sparsity=0.6),
    "sparsegpt-dsnot-2of4": dict(method="sparsegpt", refine="dsnot", pattern="2:4"),
    "wanda-owl-70": dict(method="wanda", allocation="owl", sparsity=0.7),
    "ria-owl-dsnot-4of8": dict(method="ria", allocation="owl", refine="dsnot", pattern="4:8", owl_lambda=0.25),
}


def _prune(model, calib_ids, **kwargs):
    kwargs = {"nsamples": calib_ids.shape[0], "seqlen": calib_ids.shape[1], "device": "cpu", **kwargs}
    return llmprune.prune(model, None, calibration=calib_ids, progress=False, **kwargs)


def _nm_ok(W: torch.Tensor, n: int, m: int) -> bool:
    return bool(((W.reshape(W.shape[0], -1, m) != 0).sum(-1) <= n).all())


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("arch", ARCHS)
def test_methods_on_every_architecture(arch, combo, calib_ids):
    model = make_tiny_model(arch)
    report = _prune(model, calib_ids, **COMBOS[combo])
    weights = decoder_targets(model, arch)
    mods = {m.name: m for m in report.modules}
    assert set(mods) <= set(weights) and len(mods) > 0
    total = zeros = 0
    for name, m in mods.items():
        W = weights[name]
        measured = float((W == 0).float().mean())
        assert measured == pytest.approx(m.sparsity, abs=1e-6)
        if m.pattern != "unstructured":
            n, mm = map(int, m.pattern.split()[0].split(":"))
            perm = report.permutations.get(name)
            assert (perm is not None) == m.pattern.endswith("permuted")
            assert _nm_ok(W[:, perm.long()] if perm is not None else W, n, mm), name
        else:
            assert measured == pytest.approx(m.target_sparsity, abs=1.5 / W.shape[1] + 1e-6)
        total += W.numel()
        zeros += measured * W.numel()
    if COMBOS[combo].get("allocation") is None:
        target = report.config["target_sparsity"]
        assert zeros / total == pytest.approx(target, abs=0.02)
    else:  # OWL: per-layer targets, their size-weighted mean the target
        assert report.layer_targets is not None and len(report.layer_targets) == 2
        assert zeros / total == pytest.approx(report.config["target_sparsity"], abs=0.03)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(3, 19).unsqueeze(0)).logits).all()


def test_checkpoint_records_refine_allocation_and_permutations(calib_ids, tmp_path):
    model = make_tiny_model("llama")
    report = _prune(model, calib_ids, method="ria", pattern="2:4", allocation="owl", refine="dsnot",
                    owl_lambda=0.25)
    out = save_pruned(model, None, tmp_path / "out", report)
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    assert meta["refine"] == "dsnot" and meta["allocation"] == "owl"
    assert [x["pattern"] for x in meta["layer_sparsity"]] == [p for _, p in report.layer_targets]
    assert meta["permutations"]["modules"] == len(report.permutations) > 0
    from safetensors.torch import load_file

    perms = load_file(out / meta["permutations"]["file"])
    assert set(perms) == set(report.permutations)
    for perm in perms.values():
        assert torch.equal(torch.sort(perm.long()).values, torch.arange(perm.numel()))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_dsnot_in_the_engine_never_increases_the_expected_error(calib_ids, monkeypatch):
    """On a tiny model, every module DSnoT refines ends with an expected reconstruction error
    ‖(W − Ŵ) E[x]‖² no larger than the pruner's, with the same count in every row."""
    from llmprune.steps.dsnot import DSnoT

    seen = []
    refine = DSnoT.refine

    def spy(self, W, result, stats, sparsity, nm=None):
        out = refine(self, W, result, stats, sparsity, nm)
        mu = stats.mean  # [in]
        before = float((((W - result.W) @ mu) ** 2).sum())
        after = float((((W - out.W) @ mu) ** 2).sum())
        seen.append((before, after))
        assert torch.equal(out.M.sum(1), result.M.sum(1))
        return out

    monkeypatch.setattr(DSnoT, "refine", spy)
    report = _prune(make_tiny_model("llama"), calib_ids, method="wanda", refine="dsnot", sparsity=0.6,
                    dsnot_skip="")
    assert len(seen) == len(report.modules) == 14
    assert all(after <= before * (1 + 1e-5) + 1e-9 for before, after in seen)
    assert sum(a for _, a in seen) < sum(b for b, _ in seen)


def test_owl_in_the_engine_stays_in_its_band_and_averages_to_the_target(calib_ids):
    model = make_tiny_model("llama", num_hidden_layers=4)
    report = _prune(model, calib_ids, method="wanda", allocation="owl", sparsity=0.6, owl_lambda=0.1)
    targets = [s for s, _ in report.layer_targets]
    assert all(0.5 - 1e-9 <= s <= 0.7 + 1e-9 for s in targets) and len(set(targets)) > 1
    sizes = [sum(m.shape[0] * m.shape[1] for m in layer.modules) for layer in report.layers]
    assert sum(s * n for s, n in zip(targets, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-6)
    for layer, s in zip(report.layers, targets):
        assert all(m.target_sparsity == pytest.approx(s) for m in layer.modules)
