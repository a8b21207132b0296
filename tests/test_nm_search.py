"""SparseGPT's N:M group choice: exact set search up to a bound, greedy on the same loss beyond it,
the reference saliency on request; bounded time for wide groups, and the ordering of their losses."""

from __future__ import annotations

import math
import time

import pytest
import torch
import yaml

from llmprune import PruneConfig
from llmprune.config import ConfigError
from llmprune.pruners.sparsegpt import EXACT_SETS_AUTO, EXACT_SETS_MAX, SparseGPT
from llmprune.stats import InputStats, relative_error


def _group(m: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [rows, m]`` and the upper factor ``U [m, m]`` of ``H⁻¹`` for a random SPD ``H = XᵀX``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * m, m, generator=g, dtype=torch.float64) * torch.rand(m, generator=g, dtype=torch.float64)
    H = X.T @ X + 0.05 * torch.eye(m, dtype=torch.float64)  # [m, m]
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # [m, m] upper: H⁻¹ = Uᵀ U
    return torch.randn(rows, m, generator=g, dtype=torch.float64), U


def _loss(W: torch.Tensor, U: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Per row, the sweep's loss ‖e_S‖² (``e_S U[S, S] = w_S``) of the pruned set ``P [rows, m]``."""
    out = torch.empty(W.shape[0], dtype=W.dtype)
    for r in range(W.shape[0]):
        S = torch.nonzero(P[r]).flatten()
        e = torch.linalg.solve_triangular(U[S][:, S], W[r, S].unsqueeze(0), upper=True, left=False)
        out[r] = e.pow(2).sum()
    return out


def _saliency(W: torch.Tensor, U: torch.Tensor, prune_n: int) -> torch.Tensor:
    """The reference: the group's prune_n lowest w² / [H⁻¹]_jj² (as U_jj² = [H⁻¹]_jj after earlier columns)."""
    S = W.pow(2) / torch.diagonal(U).pow(2)  # [rows, m]
    return torch.zeros_like(W, dtype=torch.bool).scatter_(1, S.topk(prune_n, dim=1, largest=False).indices, True)


def _layer(out: int, inp: int, seed: int) -> tuple[torch.Tensor, InputStats, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)  # [out, in]
    X = torch.randn(256, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))  # [t, in]
    st = InputStats("hessian")
    st.add(X)
    return W, st, X


def _greedy(pattern: tuple[int, int]) -> SparseGPT:
    sg = SparseGPT()
    assert sg.nm_choice(pattern) == "greedy"
    return sg


# ----------------------------------------------------------------------------------------------
# Which choice runs
# ----------------------------------------------------------------------------------------------


def test_auto_is_exact_up_to_the_bound_and_greedy_beyond():
    sg = SparseGPT()  # nm_exact="auto" by default
    assert sg.nm_exact == "auto" and EXACT_SETS_AUTO == 70
    assert sg.nm_choice(None) is None
    assert sg.nm_choice((2, 4)) == "exact"  # 6 sets
    assert sg.nm_choice((4, 8)) == "exact"  # 70 sets
    assert sg.nm_choice((5, 10)) == "greedy"  # 252 sets
    assert sg.nm_choice((8, 16)) == "greedy"  # 12,870 sets
    assert sg.nm_choice((16, 32)) == "greedy"
    assert sg.nm_choice((15, 16)) == "exact"  # one weight of 16: 16 sets
    assert SparseGPT(nm_exact=True).nm_choice((8, 16)) == "exact"
    assert SparseGPT(nm_exact=False).nm_choice((2, 4)) == "saliency"
    assert SparseGPT(nm_exact=False).nm_choice((16, 32)) == "saliency"


def test_exact_beyond_the_cap_is_refused_with_the_set_count():
    W, st, _ = _layer(8, 64, seed=0)
    sg = SparseGPT(nm_exact=True)
    msg = r"C\(32, 16\) = 601,080,390 sets .* 16:32 .* limit of 100,000; set nm_exact to 'auto'"
    with pytest.raises(ValueError, match=msg):
        sg.nm_choice((16, 32))
    with pytest.raises(ValueError, match=msg):
        sg.prune(W, st, 0.5, (16, 32))
    assert math.comb(19, 9) <= EXACT_SETS_MAX < math.comb(20, 10)
    with pytest.raises(ValueError, match="nm_exact 'yes' is not understood; choose one of: auto, true, false"):
        SparseGPT(nm_exact="yes")


def test_default_2of4_and_4of8_run_the_exact_search():
    W, st, _ = _layer(16, 64, seed=1)
    for nm in [(2, 4), (4, 8)]:
        auto, exact = SparseGPT().prune(W, st, 0.5, nm), SparseGPT(nm_exact=True).prune(W, st, 0.5, nm)
        assert torch.equal(auto.M, exact.M) and torch.equal(auto.W, exact.W)


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("auto", "auto"), (None, "auto")])
def test_config_reads_true_false_and_auto(tmp_path, value, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sparsegpt\npattern: \"8:16\"\n" + (f"nm_exact: {value}\n" if value else ""))
    cfg = PruneConfig.from_yaml(recipe)
    assert cfg.nm_exact == expected
    assert SparseGPT.from_config(cfg).nm_exact == expected
    assert yaml.safe_load(cfg.to_yaml())["nm_exact"] == expected
    with pytest.raises(ConfigError, match="nm_exact"):
        PruneConfig.build({"method": "sparsegpt", "nm_exact": "exact"})


# ----------------------------------------------------------------------------------------------
# Wide groups finish quickly with valid masks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nm, inp", [((8, 16), 64), ((16, 32), 128)], ids=["8:16", "16:32"])
def test_wide_groups_finish_quickly_with_valid_masks(nm, inp):
    n, m = nm
    W, st, X = _layer(32, inp, seed=2)
    sg = _greedy(nm)
    t0 = time.perf_counter()
    res = sg.prune(W, st, 0.5, nm)
    assert time.perf_counter() - t0 < 2.0
    assert torch.all(res.M.reshape(32, -1, m).sum(-1) == n)
    assert torch.equal(res.M, res.W != 0)
    assert relative_error(W, res.W, X) < relative_error(W, SparseGPT(nm_exact=False).prune(W, st, 0.5, nm).W, X)


# ----------------------------------------------------------------------------------------------
# The greedy choice against the exact one and the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, prune_n", [(8, 4), (12, 5), (6, 3)])
def test_greedy_adds_the_cheapest_column_given_those_chosen(m, prune_n):
    """The incremental update against its definition, recomputed with a triangular solve per candidate."""
    W, U = _group(m, 24, seed=m)
    P = SparseGPT._group_mask_greedy(W, U, prune_n)  # [rows, m]
    for r in range(W.shape[0]):
        S: list[int] = []
        for _ in range(prune_n):
            costs = {}
            for c in set(range(m)) - set(S):
                T = torch.zeros(1, m, dtype=torch.bool)
                T[0, S + [c]] = True
                costs[c] = float(_loss(W[r : r + 1], U, T))
            S.append(min(costs, key=costs.get))
        assert sorted(S) == torch.nonzero(P[r]).flatten().tolist()


@pytest.mark.parametrize("m", [4, 8, 16])
def test_greedy_is_exact_when_one_weight_per_group_is_pruned(m):
    W, U = _group(m, 64, seed=m)
    greedy = SparseGPT._group_mask_greedy(W, U, 1)
    assert torch.equal(greedy, SparseGPT._group_mask(W, U, 1))
    assert torch.equal(greedy, _saliency(W, U, 1))  # and so is the reference


def test_greedy_2of4_equals_exact_where_the_optimum_holds_the_least_salient_weight():
    """With two weights to prune, greedy takes the least salient column, then the best partner for it:
    the exact set wherever that set holds the least salient column; elsewhere it may differ."""
    W, U = _group(4, 2000, seed=5)
    greedy, exact = SparseGPT._group_mask_greedy(W, U, 2), SparseGPT._group_mask(W, U, 2)
    first = _saliency(W, U, 1)  # [rows, 4] the column greedy takes first
    must = (exact & first).any(1)  # [rows]
    assert must.float().mean() > 0.5
    assert torch.equal(greedy[must], exact[must])
    differ = (greedy != exact).any(1)
    assert differ.any() and not (differ & must).any()
    assert torch.all(_loss(W[differ], U, greedy[differ]) >= _loss(W[differ], U, exact[differ]))


@pytest.mark.parametrize("m, prune_n", [(4, 2), (8, 4), (16, 8)], ids=["2:4", "4:8", "8:16"])
def test_greedy_loss_lies_between_exact_and_the_reference(m, prune_n):
    for seed in range(3):
        W, U = _group(m, 64, seed=100 * m + seed)
        exact = _loss(W, U, SparseGPT._group_mask(W, U, prune_n))  # [rows]
        greedy = _loss(W, U, SparseGPT._group_mask_greedy(W, U, prune_n))
        reference = _loss(W, U, _saliency(W, U, prune_n))
        assert torch.all(greedy >= exact * (1 - 1e-9))  # the exact choice is the minimum, row by row
        assert torch.all(reference >= exact * (1 - 1e-9))
        assert greedy.sum() <= reference.sum()  # on average; a single row may go either way


def test_greedy_prune_beats_the_reference_on_average():
    errors = {"greedy": 0.0, "saliency": 0.0}
    for seed in range(3):
        W, st, X = _layer(32, 128, seed=10 + seed)
        errors["greedy"] += relative_error(W, _greedy((8, 16)).prune(W, st, 0.5, (8, 16)).W, X)
        errors["saliency"] += relative_error(W, SparseGPT(nm_exact=False).prune(W, st, 0.5, (8, 16)).W, X)
    assert errors["greedy"] < errors["saliency"], errors


def test_exact_search_in_row_chunks_is_the_same(monkeypatch):
    import llmprune.pruners.sparsegpt as sparsegpt

    W, U = _group(8, 50, seed=7)
    whole = SparseGPT._group_mask(W, U, 4)
    monkeypatch.setattr(sparsegpt, "_EXACT_CHUNK", 70 * 4 * 16)  # 16 rows a chunk: 4 chunks
    assert torch.equal(SparseGPT._group_mask(W, U, 4), whole)



def test_the_choice_that_ran_is_in_the_report_and_too_large_exact_is_refused_early(calib_ids):
    import llmprune
    from conftest import make_tiny_model
    from llmprune.cli import build_parser
    from llmprune.config import ConfigError, PruneConfig

    report = llmprune.prune(make_tiny_model("llama"), None, calibration=calib_ids, method="sparsegpt",
                            pattern="8:16", nsamples=6, seqlen=16, device="cpu", progress=False)
    assert report.nm_search == {"8:16": "greedy"} and report.metadata()["nm_search"] == {"8:16": "greedy"}
    with pytest.raises(ConfigError, match=r"C\(32, 16\) = 601,080,390 sets"):
        PruneConfig.build({"pattern": "16:32", "nm_exact": True})
    ns = build_parser().parse_args(["prune", "--nm-exact", "auto", "--output", "x"])
    assert ns.nm_exact == "auto" and PruneConfig.build({"nm_exact": "true"}).nm_exact is True
