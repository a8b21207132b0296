"""EoRA compensation (llmprune.steps.eora): the math on bare tensors, the PEFT adapter on a tiny model,
and every new option (alps, reconstruct, compensate) through the recipe and CLI paths."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import llmprune
from llmprune.config import ConfigError, PruneConfig
from llmprune.pruners.sparsegpt import SparseGPT
from llmprune.pruners.wanda import Wanda
from llmprune.registry import lookup
from llmprune.steps.eora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXACT_SVD_MAX, EoRA, applied, randomized_svd

from conftest import ARCHS, make_tiny_model
from test_admm import make_layer


def h_error(dW: torch.Tensor, X: torch.Tensor) -> float:
    """‖ΔW Xᵀ‖_F: the output error the correction should reduce."""
    return float((dW @ X.T).norm())


def eigenspace_eora(dW: torch.Tensor, H: torch.Tensor, r: int) -> torch.Tensor:
    """The paper's form, in float64: ``Q' = Q √Λ``, SVD of ``ΔW Q'``, ``B A = U_r Σ_r V_rᵀ Q'⁻¹``."""
    L, Q = torch.linalg.eigh(H.double())  # [in], [in, in]
    Qp = Q * L.sqrt()  # [in, in]
    U, S, Vh = torch.linalg.svd(dW.double() @ Qp, full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(Qp)).float()  # [out, in]


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.5, (2, 4)), (0.7, None)])
def test_the_correction_is_the_eigenspace_low_rank_approximation(sparsity, nm):
    W, X, stats = make_layer(0, out=24, cols=32)
    res = SparseGPT().prune(W, stats, sparsity, nm)
    eora = EoRA(rank=6, damp=0.0)
    lr = eora.compensate(W, res.W, stats)
    assert lr.A.shape == (6, 32) and lr.B.shape == (24, 6) and lr.params == 6 * (24 + 32)
    dW = W - res.W  # [out, in]
    want = eigenspace_eora(dW, stats.H / stats.n, 6)  # the paper's projection, truncation and back-projection
    assert torch.allclose(lr.B @ lr.A, want, atol=1e-3 * float(want.abs().max()))
    before, after = h_error(dW, X), h_error(dW - lr.B @ lr.A, X)
    assert after < 0.9 * before
    # better in the output norm than the plain SVD of ΔW at the same rank (which ignores the inputs)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    assert after < h_error(dW - (U[:, :6] * S[:6]) @ Vh[:6], X)
    # the reported errors are relative output errors over the calibration inputs
    ref = h_error(W, X)
    assert lr.error_before == pytest.approx(before / ref, rel=1e-3)
    assert lr.error_after == pytest.approx(after / ref, rel=1e-3)


def test_the_factors_share_the_scale():
    """B = U_r Σ_r^½ and A = Σ_r^½ V_rᵀ L⁻¹: column i of B and row i of A L both have norm √σ_i."""
    W, X, stats = make_layer(1, out=24, cols=32)
    res = SparseGPT().prune(W, stats, 0.5, None)
    eora = EoRA(rank=6, damp=0.0)
    lr = eora.compensate(W, res.W, stats)
    L = eora.factor(stats)  # [in, in]
    sigma = torch.linalg.svdvals((W - res.W) @ L)[:6]  # [r]
    torch.testing.assert_close(lr.B.norm(dim=0), sigma.sqrt(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((lr.A @ L).norm(dim=1), sigma.sqrt(), rtol=1e-4, atol=1e-6)


def test_rank_and_budget():
    assert EoRA(rank=8).rank_of(576, 1536) == 8
    assert EoRA(rank=8000).rank_of(64, 128) == 64  # at most the smaller dimension
    e = EoRA(eora_budget=0.05)
    r = e.rank_of(576, 1536)
    assert r == round(0.05 * 576 * 1536 / (576 + 1536))
    assert abs(r * (576 + 1536) / (576 * 1536) - 0.05) < 0.001  # the module adds ~5 % of its weights
    assert EoRA(eora_budget=1e-6).rank_of(8, 8) == 1
    assert lookup("compensate", "eora") is EoRA and EoRA.needs == {"hessian"}
    assert EoRA.from_config(SimpleNamespace(damp=0.02, rank=3, eora_svd="auto", eora_budget=None)).rank == 3
    for bad, match in [(dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(eora_budget=1.5), "eora_budget"),
                       (dict(damp=-1), "damp"), (dict(eora_svd="fast"), "eora_svd")]:
        with pytest.raises(ValueError, match=match):
            EoRA(**bad)


def test_the_correction_of_wanda_and_the_shared_factor():
    W, X, stats = make_layer(1)
    res = Wanda().prune(W, stats, 0.5, (2, 4))
    e = EoRA(rank=4)
    lr = e.compensate(W, res.W, stats)
    assert h_error(W - res.W - lr.B @ lr.A, X) < h_error(W - res.W, X)
    assert e.compensate(W[:5], res.W[:5], stats).rank == 4
    assert len([k for k in stats.cache if k[0] == "eora"]) == 1  # one Cholesky factor per input


def test_randomized_svd_is_exact_on_a_low_rank_matrix_and_deterministic():
    g = torch.Generator().manual_seed(0)
    P = torch.randn(40, 5, generator=g) @ torch.randn(5, 60, generator=g)  # rank 5
    U, S, Vh = randomized_svd(P, 8, 2)
    assert U.shape == (40, 8) and S.shape == (8,) and Vh.shape == (8, 60)
    torch.testing.assert_close(S[:5], torch.linalg.svdvals(P)[:5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((U[:, :5] * S[:5]) @ Vh[:5], P, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(U.T @ U, torch.eye(8), atol=1e-5, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip((U, S, Vh), randomized_svd(P, 8, 2)))  # fixed seed


def test_the_randomized_correction_is_close_to_the_exact_one():
    """A flat-spectrum pruning error (the sketch's hard case): the randomized rank-r residual is within 1 %
    of the exact one, and the reported errors are the true residual's."""
    W, X, stats = make_layer(2, out=96, cols=128)
    res = Wanda().prune(W, stats, 0.5, None)
    exact = EoRA(rank=8, damp=0.0, eora_svd="exact").compensate(W, res.W, stats)
    rand = EoRA(rank=8, damp=0.0, eora_svd="randomized").compensate(W, res.W, stats)
    dW = W - res.W
    e_exact, e_rand = h_error(dW - exact.B @ exact.A, X), h_error(dW - rand.B @ rand.A, X)
    assert e_exact <= e_rand * (1 + 1e-5) and e_rand < 1.01 * e_exact
    assert rand.error_before == pytest.approx(exact.error_before, rel=1e-4)
    assert rand.error_after == pytest.approx(e_rand / h_error(W, X), rel=1e-3)
    # auto: exact up to EXACT_SVD_MAX on the smaller side (every module of the embedded model)
    auto = EoRA(rank=8, damp=0.0).compensate(W, res.W, stats)
    assert EXACT_SVD_MAX >= 576 and torch.equal(auto.A, exact.A) and torch.equal(auto.B, exact.B)


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_every_option_through_a_recipe_on_each_architecture(arch, tmp_path, calib_ids):
    path = _recipe(tmp_path, "method: alps\npattern: '2:4'\nalps_iters: 9\nalps_pcg_iters: 3\nalps_rho: 0.2\n"
                             "damp: 0.02\nreconstruct: admm\nadmm_iters: 2\nadmm_rho: 0.5\nadmm_pcg_iters: 4\n"
                             "admm_tol: 0.0001\ncompensate: eora\nrank: 3\nnsamples: 6\nseqlen: 16\n")
    cfg = PruneConfig.from_yaml(path)
    model = make_tiny_model(arch)
    ids = calib_ids[:, :16] if arch != "opt" else calib_ids
    report = llmprune.prune(model, None, cfg, calibration=ids, progress=False)
    assert report.sparsity == pytest.approx(0.5)
    for m in report.modules:
        assert m.reconstruct["error_after"] <= m.reconstruct["error_before"] + 1e-6
        W = dict(model.named_parameters()).get(m.name + ".weight")
        if W is not None:  # N:M over consecutive inputs of [out, in] (GPT-2's Conv1D stores [in, out])
            W = W.T if arch == "gpt2" else W
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all()
    assert report.adapters and all(lr.rank == 3 for lr in report.adapters.values())
    meta = report.metadata()
    assert meta["reconstruct"] == "admm" and meta["compensate"] == "eora"
    assert meta["compensation"]["adapter_fraction"] == pytest.approx(report.adapter_params / report.pruned_params)
    if arch == "mixtral":  # fused experts have no Linear module to carry a LoRA pair
        assert meta["compensation"]["uncompensated"]
    with torch.no_grad():
        base = model(calib_ids).logits
        with applied(model, report.adapters):
            adapted = model(calib_ids).logits
        assert not torch.equal(base, adapted)
        assert torch.equal(model(calib_ids).logits, base)  # the hooks are gone after the context


def test_options_of_unused_steps_and_unknown_names_are_errors():
    with pytest.raises(ConfigError, match="rank.*eora"):
        PruneConfig.build({"method": "wanda", "rank": 8})
    with pytest.raises(ConfigError, match="admm_iters.*admm"):
        PruneConfig.build({"method": "sparsegpt", "admm_iters": 3})
    with pytest.raises(ConfigError, match="alps_rho.*alps"):
        PruneConfig.build({"method": "sparsegpt", "alps_rho": 0.2})
    with pytest.raises(ConfigError, match="unknown reconstruct 'adm'.*admm"):
        PruneConfig.build({"reconstruct": "adm"})
    with pytest.raises(ConfigError, match="unknown compensate 'lora'.*eora"):
        PruneConfig.build({"compensate": "lora"})
    with pytest.raises(ConfigError, match="eora_budget"):
        PruneConfig.build({"compensate": "eora", "eora_budget": 1.5})
    cfg = PruneConfig.build({"method": "wanda", "reconstruct": "admm", "compensate": "eora", "rank": 8, "damp": 0.05})
    assert cfg.selected_methods() == {"wanda", "admm", "eora"}
    assert PruneConfig.build(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    assert PruneConfig.build({"reconstruct": "none", "compensate": ""}).reconstruct is None


def test_cli_saves_a_peft_adapter_that_loads_and_is_what_was_evaluated(tiny_llama_dir, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.cli import main
    from llmprune.evaluation import perplexity

    text = "The quick brown fox jumps over the lazy dog. " * 60
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), "--method", "wanda", "--pattern", "2:4", "--reconstruct", "admm",
               "--admm-iters", "3", "--compensate", "eora", "--eora-budget", "0.1", "--calib", str(calib),
               "--nsamples", "4", "--seqlen", "32", "--eval", str(calib), "--output", str(out), "--quiet"])
    assert rc == 0
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()
    acfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert acfg["peft_type"] == "LORA" and acfg["lora_alpha"] == acfg["r"]
    assert acfg["base_model_name_or_path"] == str(out.resolve())  # its base: the sparse folder, not the source
    assert all(acfg["alpha_pattern"][k] == v for k, v in acfg["rank_pattern"].items())  # scale 1 everywhere
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    comp = meta["compensation"]
    assert comp["modules"] == 14 and 0.05 < comp["adapter_fraction"] < 0.15
    assert meta["reconstruction"]["mean_error_after"] < meta["reconstruction"]["mean_error_before"]

    tok = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out).eval()
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == comp["adapter_params"]
    # the perplexity written at pruning time is that of base + adapter
    evaluated = json.loads((out / "llmprune_eval.json").read_text())
    key = next(k for k in evaluated["metrics"] if k.endswith("/ppl"))
    with torch.no_grad():
        ppl = perplexity(model, tok, text, seqlen=2048).to_dict()["ppl"]
        assert ppl == pytest.approx(evaluated["metrics"][key], rel=1e-4)
        base = model.unload()  # the sparse base alone: exact zeros, N:M
        W = base.model.layers[0].self_attn.q_proj.weight
        assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all()
        assert perplexity(base, tok, text, seqlen=2048).to_dict()["ppl"] != pytest.approx(ppl, rel=1e-4)
