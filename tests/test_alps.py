"""ALPS (llmprune.pruners.alps) on bare tensors: exact sparsity, N:M, error against Wanda and SparseGPT."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

import llmprune.reconstruction as lsq
from llmprune.pruners.alps import ALPS
from llmprune.pruners.sparsegpt import SparseGPT
from llmprune.pruners.wanda import Wanda
from llmprune.registry import lookup
from llmprune.stats import InputStats

from test_admm import make_layer, optimum, output_error

PATTERNS = [(0.5, None), (0.7, None), (0.5, (2, 4)), (0.5, (4, 8))]


@pytest.mark.parametrize("sparsity,nm", PATTERNS)
def test_exact_sparsity_valid_nm_and_lower_error_than_wanda(sparsity, nm):
    for seed in range(3):
        W, X, stats = make_layer(seed, out=32, cols=64)
        res = ALPS().prune(W, stats, sparsity, nm)
        assert torch.equal(res.W != 0, res.M)  # no kept weight is exactly zero here, every pruned one is
        assert not torch.signbit(res.W[~res.M]).any()
        if nm is None:
            assert int((~res.M).sum()) == int(W.numel() * sparsity)
        else:
            n, m = nm
            assert (res.M.reshape(W.shape[0], -1, m).sum(-1) == n).all()
        err = output_error(W, res.W, X)
        assert err < output_error(W, Wanda().prune(W, stats, sparsity, nm).W, X)
        stats.cache = {}
        assert err < output_error(W, SparseGPT(act_order=None).prune(W, stats, sparsity, nm).W, X) * 1.02


def test_the_weights_are_the_least_squares_optimum_of_the_mask():
    W, _, stats = make_layer(5, out=16, cols=32)
    res = ALPS(alps_pcg_iters=200).prune(W, stats, 0.6)
    # the back-solve stops at a relative change of 1e-4: close to the optimum of the mask it found
    want = optimum(W, res.M, stats, 0.01)
    assert torch.allclose(res.W, want, atol=1e-2 * float(want.abs().max()))


def test_the_eigendecomposition_is_shared_by_modules_on_one_input(monkeypatch):
    calls = []
    real = lsq._eigh64
    monkeypatch.setattr(lsq, "_eigh64", lambda A: calls.append(A.shape) or real(A))
    W, _, stats = make_layer(6, out=24, cols=32)
    alps = ALPS()
    for rows in (slice(0, 8), slice(8, 16), slice(16, 24)):  # q, k, v fed the same tensor
        alps.prune(W[rows], stats, 0.5)
    assert calls == [(32, 32)]
    assert alps.last["iterations"] > 0 and alps.last["rho"] > 0


class _OneFlipPerCall(ALPS):
    """ALPS whose projection keeps the first magnitude mask but flips one weight on every call: the support
    changes by exactly one weight at every check (fewer than 0.0003 k here, more than none)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls, self.base = 0, None

    def _project(self, B, sparsity, nm):
        if self.base is None:
            self.base = ALPS._project(B, sparsity, nm)
        self.calls += 1
        M = self.base.clone()
        M.view(-1)[0] ^= bool(self.calls % 2)
        return M


def test_the_nearly_fixed_support_stops_it_at_the_references_iteration():
    # the reference checks every 3 iterations and stops on a nearly fixed support once i_admm >= 30
    # (0-based): at iteration 33, not at the check of iteration 30
    W, _, stats = make_layer(7, out=128, cols=64)  # k = 4096 kept: one change is < 0.0003 k
    alps = _OneFlipPerCall()
    alps.prune(W, stats, 0.5)
    assert alps.last["iterations"] == 33


def test_no_admm_iterations_is_magnitude_on_the_normalised_weight_then_the_back_solve():
    W, X, stats = make_layer(7)
    res = ALPS(alps_iters=0).prune(W, stats, 0.5)
    nh = lsq.normalized_hessian(stats, 0.01)
    Wn = (W * nh.s).abs()  # [out, in]
    assert torch.equal(res.M, Wn >= Wn.flatten().kthvalue(int(W.numel() * 0.5) + 1).values)
    assert output_error(W, res.W, X) < output_error(W, W * res.M, X)


def test_registration_options_and_errors():
    assert lookup("method", "alps") is ALPS
    params = inspect.signature(ALPS.__init__).parameters
    assert all(o in params for o in ALPS.options)
    assert ALPS.needs == {"hessian"}
    a = ALPS.from_config(SimpleNamespace(damp=0.05, alps_rho=0.3, alps_iters=7, alps_pcg_iters=3))
    assert (a.damp, a.rho0, a.iters, a.pcg_iters) == (0.05, 0.3, 7, 3)
    for bad, match in [(dict(alps_rho=0), "alps_rho"), (dict(alps_iters=-2), "alps_iters"),
                       (dict(alps_pcg_iters=True), "alps_pcg_iters"), (dict(damp=2.0), "damp")]:
        with pytest.raises(ValueError, match=match):
            ALPS(**bad)
    W, _, stats = make_layer(0, cols=30)
    with pytest.raises(ValueError, match="multiple of 4"):
        ALPS().prune(W, stats, 0.5, (2, 4))
    with pytest.raises(ValueError, match="Hessian"):
        ALPS().prune(W, InputStats({"sq"}, n=1, sq=torch.ones(30)), 0.5)


def test_the_cholesky_path_of_wide_inputs_gives_the_eigendecomposition_s_products(monkeypatch):
    W, _, stats = make_layer(8, out=24, cols=64)
    nh = lsq.normalized_hessian(stats, 0.01)
    R = torch.randn(5, 64)
    by_eig = nh.shifted_solver(0.3)(R)
    monkeypatch.setattr(lsq, "EIGH_MAX_INPUTS", 32)  # 64 inputs count as wide: Cholesky factors
    calls = []
    real = lsq._eigh64
    monkeypatch.setattr(lsq, "_eigh64", lambda A: calls.append(A.shape) or real(A))
    by_chol = nh.shifted_solver(0.3)(R)
    torch.testing.assert_close(by_chol, by_eig, rtol=1e-4, atol=1e-5)
    # ALPS on the wide path: no eigendecomposition, the same support up to rounding, the same error
    stats.cache = {}
    wide = ALPS().prune(W, stats, 0.5, (2, 4))
    assert calls == []
    monkeypatch.setattr(lsq, "EIGH_MAX_INPUTS", 2048)
    stats.cache = {}
    narrow = ALPS().prune(W, stats, 0.5, (2, 4))
    assert (wide.M != narrow.M).float().mean() < 0.02
    X = make_layer(8, out=24, cols=64)[1]
    assert output_error(W, wide.W, X) == pytest.approx(output_error(W, narrow.W, X), rel=0.02)


def test_cached_matrices_are_bounded_in_bytes(monkeypatch):
    _, _, stats = make_layer(9, out=8, cols=32)
    nh = lsq.normalized_hessian(stats, 0.01)
    one = 32 * 32 * 4
    monkeypatch.setattr(lsq, "CACHE_BYTES", 2 * one)
    for rho in (0.1, 0.2, 0.3):
        nh.inverse(rho)
    assert [k[1] for k in nh.inverses] == [0.2, 0.3]  # two fit, the oldest went
    monkeypatch.setattr(lsq, "CACHE_BYTES", one - 1)
    nh.inverses = {}
    nh.inverse(0.4)
    assert nh.inverses == {}  # one larger than the bound is never kept
