"""ADMM / conjugate-gradient reconstruction of the kept weights (llmprune.steps.admm) on bare tensors."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from llmprune.engine import PrunePlan
from llmprune.pruners.base import PruneResult
from llmprune.pruners.sparsegpt import SparseGPT
from llmprune.pruners.wanda import Wanda
from llmprune.registry import lookup
from llmprune.stats import InputStats
from llmprune.steps.admm import ADMM, ADMM_DAMP

PATTERNS = [(0.5, None), (0.7, None), (0.5, (2, 4)), (0.5, (4, 8))]


def make_layer(seed: int, out: int = 24, cols: int = 32, tokens: int = 512):
    """``W [out, cols]`` and correlated inputs ``X [tokens, cols]`` with uneven scales (as LLM activations),
    and their statistics (Hessian and Σx²)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)  # [out, cols]
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)  # [cols, cols]
    X = (torch.randn(tokens, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)  # [tokens, cols]
    stats = InputStats({"hessian", "sq"})
    stats.add(X)
    return W, X, stats


def optimum(W: torch.Tensor, M: torch.Tensor, stats: InputStats, damp: float) -> torch.Tensor:
    """The closed-form least squares on the support, row by row, in float64:
    ``min (w − ŵ)ᵀ H_d (w − ŵ)`` with ``ŵ = 0`` off the support S, ``H_d = H/n + λI``
    (λ = damp × mean diagonal). Setting the gradient on S to zero, ``(H_d (ŵ − w))_S = 0``, gives
    ``H_d[S, S] ŵ_S = (H_d w)_S``."""
    H = stats.H.double() / stats.n  # [in, in]
    H_d = H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out = torch.zeros_like(W, dtype=torch.float64)  # [out, in]
    for i in range(W.shape[0]):
        S = M[i].nonzero().squeeze(1)  # [k]
        rhs = (H_d @ W[i].double())[S]  # [k]
        out[i, S] = torch.linalg.solve(H_d[S][:, S], rhs)
    return out.float()


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F on the very inputs."""
    return float(((W - W_hat) @ X.T).norm() / (W @ X.T).norm())


def check_mask_kept(res: PruneResult, ref: PruneResult, nm) -> None:
    assert torch.equal(res.M, ref.M)
    assert torch.equal(res.W[~res.M], torch.zeros(int((~res.M).sum())))
    assert not torch.signbit(res.W[~res.M]).any()  # exact +0.0
    assert torch.equal(res.M.sum(1), ref.M.sum(1))
    if nm is not None:
        n, m = nm
        assert (res.M.reshape(res.M.shape[0], -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("damp", [0.01, 0.0])
@pytest.mark.parametrize("sparsity,nm", PATTERNS)
def test_reaches_the_least_squares_optimum_on_the_support(sparsity, nm, damp):
    W, X, stats = make_layer(0)
    res = Wanda().prune(W, stats, sparsity, nm)
    want = optimum(W, res.M, stats, damp)
    got, info = ADMM(admm_damp=damp, admm_pcg_iters=300, admm_tol=0).reconstruct(W, res, stats, nm)
    check_mask_kept(got, res, nm)
    assert torch.allclose(got.W, want, atol=2e-4 * float(want.abs().max()))
    assert info.error_after < info.error_before
    # the reported errors are the true relative output errors over the calibration inputs (damp 0)
    if damp == 0:
        assert info.error_before == pytest.approx(output_error(W, res.W, X), rel=1e-3)
        assert info.error_after == pytest.approx(output_error(W, got.W, X), rel=1e-3)


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.5, (2, 4))])
def test_admm_iterations_converge_to_the_optimum(sparsity, nm):
    W, _, stats = make_layer(1)
    res = Wanda().prune(W, stats, sparsity, nm)
    want = optimum(W, res.M, stats, ADMM_DAMP)
    got, info = ADMM(admm_iters=200, admm_pcg_iters=0, admm_tol=1e-7).reconstruct(W, res, stats, nm)
    check_mask_kept(got, res, nm)
    assert torch.allclose(got.W, want, atol=2e-3 * float(want.abs().max()))
    assert info.iterations > 1
    both, _ = ADMM(admm_iters=10, admm_pcg_iters=100, admm_tol=0).reconstruct(W, res, stats, nm)
    assert torch.allclose(both.W, want, atol=2e-4 * float(want.abs().max()))


@pytest.mark.parametrize("sparsity,nm", PATTERNS)
@pytest.mark.parametrize("pruner", [SparseGPT(), SparseGPT(act_order=True), Wanda()], ids=["sparsegpt", "act", "wanda"])
def test_never_increases_the_error_of_sparsegpt_or_wanda(pruner, sparsity, nm):
    for seed in range(3):
        W, X, stats = make_layer(seed + 10)
        stats.cache = {}
        res = pruner.prune(W, stats, sparsity, nm)
        got, info = ADMM().reconstruct(W, res, stats, nm)
        check_mask_kept(got, res, nm)
        before, after = output_error(W, res.W, X), output_error(W, got.W, X)
        assert after <= before * (1 + 1e-5)
        assert info.error_after <= info.error_before
        if isinstance(pruner, Wanda):
            assert after < 0.95 * before  # Wanda never updates its weights: much to gain


def test_a_row_already_optimal_is_returned_unchanged():
    W, _, stats = make_layer(2)
    res = Wanda().prune(W, stats, 0.5)
    best = PruneResult(optimum(W, res.M, stats, ADMM_DAMP), res.M)
    got, info = ADMM().reconstruct(W, best, stats)
    assert torch.allclose(got.W, best.W, atol=1e-5)
    assert info.error_after == pytest.approx(info.error_before, rel=1e-6)  # float noise only


def test_dead_inputs_and_the_shared_factor():
    W, X, _ = make_layer(3)
    X[:, :4] = 0  # inputs that never fire
    stats = InputStats({"hessian"})
    stats.add(X)
    res = Wanda().prune(W, InputStats({"sq"}, n=X.shape[0], sq=X.pow(2).sum(0)), 0.5)
    got, info = ADMM().reconstruct(W, res, stats)
    assert torch.isfinite(got.W).all() and info.error_after <= info.error_before
    cached = [k for k in stats.cache if k[0] == "lsq"]
    assert len(cached) == 1  # one normalised Hessian for every module fed these inputs
    ADMM().reconstruct(W[:8], PruneResult(res.W[:8], res.M[:8]), stats)
    assert [k for k in stats.cache if k[0] == "lsq"] == cached


def test_registration_options_and_errors():
    assert lookup("reconstruct", "admm") is ADMM
    params = inspect.signature(ADMM.__init__).parameters
    assert all(o in params for o in ADMM.options)
    assert ADMM.needs == {"hessian"}
    r = ADMM.from_config(SimpleNamespace(admm_damp=0.02, admm_iters=5, admm_rho=2.0, admm_pcg_iters=7, admm_tol=1e-4))
    assert (r.damp, r.iters, r.rho, r.pcg_iters, r.tol) == (0.02, 5, 2.0, 7, 1e-4)
    for bad, match in [(dict(admm_iters=-1), "admm_iters"), (dict(admm_pcg_iters=1.5), "admm_pcg_iters"),
                       (dict(admm_rho=0.0), "admm_rho"), (dict(admm_tol=-1.0), "admm_tol"),
                       (dict(admm_iters=0, admm_pcg_iters=0), "both 0"), (dict(admm_damp=1.0), "admm_damp")]:
        with pytest.raises(ValueError, match=match):
            ADMM(**bad)
    W, _, _ = make_layer(0)
    with pytest.raises(ValueError, match="Hessian"):
        ADMM().reconstruct(W, Wanda().prune(W, make_layer(0)[2], 0.5), InputStats({"sq"}, n=1, sq=torch.ones(32)))


def test_its_damping_is_its_own_not_the_pruners():
    from llmprune.config import ConfigError, PruneConfig
    from llmprune.pipeline.prune import build_methods

    assert ADMM().damp == ADMM_DAMP == PruneConfig.build({"reconstruct": "admm"}).admm_damp == 0.01  # measured
    cfg = PruneConfig.build({"method": "sparsegpt", "damp": 0.05, "reconstruct": "admm", "admm_damp": 0.2})
    pruner = build_methods(cfg)[0]
    assert (pruner.damp, ADMM.from_config(cfg).damp) == (0.05, 0.2)
    with pytest.raises(ConfigError, match="option 'damp' belongs to"):  # SparseGPT's damp no longer reaches ADMM
        PruneConfig.build({"method": "wanda", "reconstruct": "admm", "damp": 0.05})
    W, X, stats = make_layer(5)
    res = Wanda().prune(W, stats, 0.5)
    for damp in (0.01, 0.1):  # each damping reaches its own optimum
        got, _ = ADMM(admm_damp=damp, admm_pcg_iters=300, admm_tol=0).reconstruct(W, res, stats)
        want = optimum(W, res.M, stats, damp)
        assert torch.allclose(got.W, want, atol=2e-4 * float(want.abs().max()))


def test_plan_runs_it_after_the_pruner_and_reports_the_errors():
    from torch import nn

    from llmprune.engine.targets import Target

    W, X, _ = make_layer(4)
    lin = nn.Linear(32, 24, bias=False)
    lin.weight.data.copy_(W)
    plan = PrunePlan(Wanda(), lambda name: 0.5, reconstructor=ADMM())
    assert plan.needs == {"sq", "hessian"}
    stats = InputStats(plan.needs)
    stats.add(X, keep_sample=64)
    rep = plan(Target("model.layers.0.self_attn.q_proj", lin), stats)
    assert rep.reconstruct["error_after"] < rep.reconstruct["error_before"]
    assert rep.sparsity == 0.5
    plain = Wanda().prune(W, stats, 0.5)
    assert torch.equal(lin.weight.data != 0, plain.M)
    assert output_error(W, lin.weight.data, X) < output_error(W, plain.W, X)
