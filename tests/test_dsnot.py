"""DSnoT refinement (llmprune.steps.dsnot) on small random tensors and hand-made rows."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

import llmprune.steps.dsnot  # noqa: F401 - registers the refiner
from llmprune.masks import nm_mask
from llmprune.pruners.base import PruneResult
from llmprune.pruners.magnitude import Magnitude
from llmprune.pruners.sparsegpt import SparseGPT
from llmprune.pruners.wanda import Wanda
from llmprune.registry import lookup
from llmprune.stats import InputStats
from llmprune.steps.dsnot import DSnoT

PATTERNS = [(0.5, None), (0.7, None), (0.5, (2, 4)), (0.5, (4, 8))]


def make_inputs(seed: int, out: int = 48, cols: int = 64, tokens: int = 512, needs=("sq", "sum")):
    """``W [out, cols]``, inputs ``X [tokens, cols]`` with a nonzero, feature-dependent mean (as LLM
    activations have), and their statistics."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * 0.05  # [out, cols]
    scale = torch.rand(cols, generator=g) * 2 + 0.1  # [cols]
    shift = torch.randn(cols, generator=g) * 0.7  # [cols]
    X = torch.randn(tokens, cols, generator=g) * scale + shift  # [tokens, cols]
    stats = InputStats(set(needs))
    stats.add(X)
    return W, X, stats


def expected_error(W: torch.Tensor, W_hat: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """``(W − Ŵ) E[x]  [out]``: per row, what DSnoT drives toward zero."""
    return (W - W_hat) @ stats.mean


def initial(method: str, W, stats, sparsity, nm):
    pruner = {"wanda": Wanda(), "magnitude": Magnitude()}[method]
    return pruner.prune(W, stats, sparsity, nm)


def sequential_dsnot(W, res, stats, nm=None, cycles=50, threshold=0.1 / 2048, var_power=1.0, same_sign=None,
                     monotone=True):
    """The algorithm of the docstring, one row and one swap at a time (slow, for comparison)."""
    mu, x_norm = stats.mean, stats.col_sq_norms.sqrt()  # [in], [in]
    var = stats.var  # [in]
    c = mu / var.clamp_min(var.max() * 1e-10).pow(var_power) if var_power else mu  # [in]
    same_sign = (nm is not None) if same_sign is None else same_sign
    M = res.M.clone()  # [out, in]
    for i in range(W.shape[0]):
        w, w_hat, kept0 = W[i].tolist(), res.W[i].tolist(), res.M[i].tolist()
        mu_l, c_l, xn = mu.tolist(), c.tolist(), x_norm.tolist()
        eps = float(((W[i] - res.W[i]) * mu).sum())
        sign0 = (eps > 0) - (eps < 0)
        grown, pruned = set(), set()
        for _ in range(cycles):
            if not abs(eps) > threshold:
                break
            s = 1 if eps > 0 else -1
            grow = [j for j in range(len(w)) if not kept0[j] and j not in grown and w[j] * c_l[j] * s > 0]
            if not grow:
                break
            gj = max(grow, key=lambda j: w[j] * c_l[j] * s)
            if nm is None:
                cand = [j for j in range(len(w)) if kept0[j] and j not in pruned and w_hat[j] * mu_l[j] * s < 0]
            else:
                start = gj // nm[1] * nm[1]
                cand = [j for j in range(start, start + nm[1]) if kept0[j] and j not in pruned]
            if not cand:
                break
            pj = min(cand, key=lambda j: abs(w_hat[j]) * xn[j])
            after = eps - w[gj] * mu_l[gj] + w_hat[pj] * mu_l[pj]
            if (monotone and not abs(after) < abs(eps)) or (same_sign and not after * sign0 > 0):
                break
            grown.add(gj)
            pruned.add(pj)
            M[i, gj], M[i, pj] = True, False
            eps = after
    return M


@pytest.mark.parametrize("sparsity,nm", PATTERNS)
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_expected_error_never_increases_and_counts_kept(method, sparsity, nm):
    for seed in range(3):
        W, _, stats = make_inputs(seed)
        res = initial(method, W, stats, sparsity, nm)
        ref = DSnoT().refine(W, res, stats, sparsity, nm)
        e0, e1 = expected_error(W, res.W, stats), expected_error(W, ref.W, stats)  # [out]
        assert (e1.abs() <= e0.abs() + 1e-6).all()  # row by row, so ‖(W − Ŵ) E[x]‖² too
        assert e1.norm() < 0.9 * e0.norm()  # and it does reduce it
        assert torch.equal(ref.M.sum(1), res.M.sum(1))  # exact per-row counts
        assert (ref.M != res.M).any()
        assert torch.equal(ref.W[~ref.M], torch.zeros(int((~ref.M).sum())))
        assert not torch.signbit(ref.W[~ref.M]).any()  # +0.0, not -0.0
        assert torch.equal(ref.W[ref.M], W[ref.M])  # Wanda/magnitude keep dense values
        if nm is not None:
            n, m = nm
            groups = ref.M.reshape(W.shape[0], -1, m).sum(-1)  # [out, groups]
            assert (groups == n).all()


@pytest.mark.parametrize("monotone", [True, False])
@pytest.mark.parametrize("same_sign", [None, True, False])
@pytest.mark.parametrize("sparsity,nm", PATTERNS)
def test_matches_the_sequential_algorithm(sparsity, nm, same_sign, monotone):
    for seed, var_power, cycles in [(0, 1.0, 50), (1, 0.0, 50), (2, 2.0, 3)]:
        W, _, stats = make_inputs(seed, out=24, cols=48)
        res = initial("wanda", W, stats, sparsity, nm)
        ref = DSnoT(dsnot_cycles=cycles, dsnot_var_power=var_power, dsnot_same_sign=same_sign,
                    dsnot_monotone=monotone)
        got = ref.refine(W, res, stats, sparsity, nm)
        want = sequential_dsnot(W, res, stats, nm, cycles=cycles, var_power=var_power, same_sign=same_sign,
                                monotone=monotone)
        assert torch.equal(got.M, want)
        if cycles == 3:
            assert ((got.M & ~res.M).sum(1) <= 3).all()


def many_swaps(seed: int, nm: tuple[int, int] | None, out: int = 16, cols: int = 128):
    """Rows with a large error worked off in many small swaps: past the first candidate lists, up to
    the cycle limit and, for N:M, several swaps in one group."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, cols, generator=g) * (torch.rand(cols, generator=g) + 0.05) + 1.0  # [512, cols]
    stats = InputStats({"sq", "sum"})
    stats.add(X)
    if nm is None:
        W = torch.randn(out, cols, generator=g)  # [out, cols]
        small = W.abs() < 0.67
        W[small] = W[small].abs()  # magnitude prunes positive weights only: ε ≫ 0
        return W, Magnitude().prune(W, stats, 0.5, None), stats
    n, m = nm
    W = torch.rand(out, cols, generator=g) * 0.9 + 0.1  # [out, cols] pruned: positive
    M = (torch.arange(cols) % m < n).expand(out, cols).clone()  # [out, cols]
    W[M] = -(torch.rand(int(M.sum()), generator=g) * 0.05 + 0.05)  # kept: small, negative
    return W, PruneResult(W * M, M), stats


@pytest.mark.parametrize("same_sign", [None, False])
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_matches_the_sequential_algorithm_over_many_swaps(nm, same_sign):
    W, res, stats = many_swaps(0, nm)
    got = DSnoT(dsnot_same_sign=same_sign).refine(W, res, stats, 0.5, nm)
    assert torch.equal(got.M, sequential_dsnot(W, res, stats, nm, same_sign=same_sign))
    swaps = (got.M & ~res.M).sum(1)  # [out]
    assert swaps.max() > 2 * 8  # the candidate lists (8) were refilled
    if nm is not None:
        assert swaps.max() == 50  # the cycle limit
        assert ((got.M & ~res.M).reshape(W.shape[0], -1, nm[1]).sum(-1) > 1).any()
        assert (got.M.reshape(W.shape[0], -1, nm[1]).sum(-1) == nm[0]).all()


def test_output_error_on_inputs_with_a_mean():
    # DSnoT works on the mean part of the output error:
    #   ‖(W − Ŵ) Xᵀ‖² = n (‖(W − Ŵ) μ‖² + tr((W − Ŵ) Σ (W − Ŵ)ᵀ)).
    # The covariance part is not minimised and can rise (a revived weight of a low-variance input
    # replaces a low-Wanda-score one), so the paper's claim, a lower reconstruction error when
    # inputs have a nonzero mean, is checked on average over seeds rather than for every layer.
    ratios = []
    for seed in range(6):
        W, X, stats = make_inputs(seed, tokens=1024)
        for sparsity, nm in [(0.6, None), (0.5, (2, 4))]:
            res = Wanda().prune(W, stats, sparsity, nm)
            ref = DSnoT().refine(W, res, stats, sparsity, nm)
            ratios.append(float(((W - ref.W) @ X.T).norm() / ((W - res.W) @ X.T).norm()))
    assert sum(ratios) / len(ratios) < 0.97


def test_hand_made_rows():
    X = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])  # E[x] = 1, Var[x] = 1, ‖X_j‖ = 2
    stats = InputStats({"sq", "sum"})
    stats.add(X)
    W = torch.tensor([
        [2.0, -0.5, 0.5, 1.0],  # ε = 0.5 + 1.0 = 1.5; revive 1.0, prune -0.5: ε = 0 exactly
        [2.0, -3.0, 0.5, 1.0],  # the same swap prunes -3.0: ε = -2.5, |ε| grows, refused
        [2.0, -0.25, 0.5, 1.0],  # revive 1.0, prune -0.25: ε = 0.25; no negative kept weight left
    ])
    M = torch.tensor([[True, True, False, False]] * 3)
    res = DSnoT().refine(W, PruneResult(W * M, M), stats, 0.5)
    assert res.M.tolist() == [[True, False, False, True], [True, True, False, False],
                              [True, False, False, True]]
    assert res.W.tolist() == [[2.0, 0.0, 0.0, 1.0], [2.0, -3.0, 0.0, 0.0], [2.0, 0.0, 0.0, 1.0]]
    assert expected_error(W, res.W, stats).tolist() == [0.0, 1.5, 0.25]

    # 2:4 (sign check on by default, as in the reference): row 0 would reach ε = 0, a change of
    # sign, refused; row 2 swaps within its group (pruning the lowest Wanda score, -0.25), then
    # reviving 0.5 would force pruning 2.0 (ε = 1.75): refused
    res = DSnoT().refine(W, PruneResult(W * M, M), stats, 0.5, (2, 4))
    assert res.M.tolist() == [[True, True, False, False], [True, True, False, False],
                              [True, False, False, True]]
    assert expected_error(W, res.W, stats).tolist() == [1.5, 1.5, 0.25]


def test_variance_orders_the_weights_to_revive():
    X = torch.tensor([[1.0, 1.0, 3.0, 2.0], [1.0, 1.0, -1.0, 0.0]])  # μ = 1 everywhere; σ² = 0, 0, 4, 1
    stats = InputStats({"sq", "sum"})
    stats.add(X)
    W = torch.tensor([[3.0, -0.8, 1.0, 0.6]])
    M = torch.tensor([[True, True, False, False]])  # ε = 1.6
    # W μ / σ²: 1.0 / 4 < 0.6 / 1, so 0.6 is revived (and -0.8 pruned): ε = 0.2; then no negative
    # kept weight is left
    res = DSnoT().refine(W, PruneResult(W * M, M), stats, 0.5)
    assert res.M.tolist() == [[True, False, False, True]]
    assert expected_error(W, res.W, stats).tolist() == pytest.approx([0.2])
    # by W μ alone 1.0 is revived: ε = -0.2 (a change of sign, allowed unstructured by default);
    # then no negative pruned weight is left
    no_var = DSnoT(dsnot_var_power=0).refine(W, PruneResult(W * M, M), stats, 0.5)
    assert no_var.M.tolist() == [[True, False, True, False]]
    assert expected_error(W, no_var.W, stats).tolist() == pytest.approx([-0.2])
    same_sign = DSnoT(dsnot_var_power=0, dsnot_same_sign=True).refine(W, PruneResult(W * M, M), stats, 0.5)
    assert torch.equal(same_sign.M, M)


def test_sparsegpt_result():
    W, X, stats = make_inputs(3, needs=("hessian", "sum"))
    for sparsity, nm in [(0.6, None), (0.5, (2, 4))]:
        res = SparseGPT().prune(W, stats, sparsity, nm)
        ref = DSnoT().refine(W, res, stats, sparsity, nm)
        e0, e1 = expected_error(W, res.W, stats), expected_error(W, ref.W, stats)
        assert (e1.abs() <= e0.abs() + 1e-6).all() and e1.norm() < e0.norm()
        assert torch.equal(ref.M.sum(1), res.M.sum(1))
        assert torch.equal(ref.W[~ref.M], torch.zeros(int((~ref.M).sum())))
        grown, stayed = ref.M & ~res.M, ref.M & res.M
        assert grown.any()
        assert torch.equal(ref.W[grown], W[grown])  # revived: dense value
        assert torch.equal(ref.W[stayed], res.W[stayed])  # kept: SparseGPT's updated value
        if nm is not None:
            assert (ref.M.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()


@dataclasses.dataclass
class _Permuted(PruneResult):
    perm: torch.Tensor  # [in] permuted position -> input index (as RIA's PermutedResult)


def test_nm_groups_of_a_permuted_result():
    W, _, stats = make_inputs(4)
    perm = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(0))  # [in]
    S = W.abs() * stats.col_sq_norms.sqrt()  # [out, in]
    M = torch.empty_like(W, dtype=torch.bool)  # [out, in]
    M[:, perm] = nm_mask(S[:, perm], 2, 4)  # 2:4 in groups of permuted inputs
    assert not (M.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
    res = _Permuted(W * M, M, perm)
    ref = DSnoT().refine(W, res, stats, 0.5, (2, 4))
    assert isinstance(ref, _Permuted) and ref.perm is perm
    assert (ref.M != res.M).any()
    assert (ref.M[:, perm].reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
    assert (expected_error(W, ref.W, stats).abs() <= expected_error(W, res.W, stats).abs() + 1e-6).all()


def test_threshold_does_not_depend_on_the_token_count():
    W, X, stats = make_inputs(5)
    twice = InputStats({"sq", "sum"})
    twice.add(X)
    twice.add(X)
    res = Wanda().prune(W, stats, 0.6)
    a = DSnoT(dsnot_threshold=1e-3).refine(W, res, stats, 0.6)
    b = DSnoT(dsnot_threshold=1e-3).refine(W, res, twice, 0.6)
    assert torch.equal(a.M, b.M) and (a.M != res.M).any()


def test_nothing_to_do():
    W, _, stats = make_inputs(6)
    res = Wanda().prune(W, stats, 0.5)
    for refiner in (DSnoT(dsnot_cycles=0), DSnoT(dsnot_threshold=1e9)):
        out = refiner.refine(W, res, stats, 0.5)
        assert torch.equal(out.M, res.M) and torch.equal(out.W, res.W)


def test_registration_options_and_errors():
    assert lookup("refine", "dsnot") is DSnoT
    params = inspect.signature(DSnoT.__init__).parameters
    assert all(o.startswith("dsnot_") and o in params for o in DSnoT.options)
    assert DSnoT.needs == {"sq", "sum"}
    cfg = SimpleNamespace(dsnot_cycles=7, dsnot_threshold=0.0, dsnot_var_power=0.5, dsnot_same_sign=True,
                          dsnot_monotone=False, dsnot_skip="")
    r = DSnoT.from_config(cfg)
    assert (r.cycles, r.threshold, r.var_power, r.same_sign, r.monotone, r.skip) == (7, 0.0, 0.5, True, False, None)
    assert r.applies("model.layers.0.mlp.up_proj")
    d = DSnoT()
    assert (d.cycles, d.threshold, d.var_power, d.same_sign, d.monotone) == (50, 0.1 / 2048, 1.0, None, True)
    # the reference refines attention only (--skip_layer mlp)
    assert d.applies("model.layers.3.self_attn.o_proj") and d.applies("transformer.h.0.attn.c_attn")
    for name in ("model.layers.3.mlp.down_proj", "model.decoder.layers.0.fc1", "transformer.h.0.mlp.c_fc",
                 "model.layers.0.mlp.experts.down_proj[2]"):
        assert not d.applies(name), name
    for bad in (dict(dsnot_cycles=-1), dict(dsnot_cycles=2.5), dict(dsnot_threshold=-1.0),
                dict(dsnot_var_power=float("nan"))):
        with pytest.raises(ValueError, match="dsnot_"):
            DSnoT(**bad)
    W, _, stats = make_inputs(0, cols=66)
    res = Wanda().prune(W, stats, 0.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        DSnoT().refine(W, res, stats, 0.5, (2, 4))
