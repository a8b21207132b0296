"""RIA: scores, masks, and the channel permutation for N:M, on tiny tensors."""

from __future__ import annotations

import pytest
import torch

import llmprune.pruners.ria  # noqa: F401 - registers the pruner
from llmprune.pruners.ria import (
    LSA_MAX_GROUPS,
    lsa_block_count,
    RIA,
    PermutedResult,
    channel_permutation,
    heuristic_allocation,
    kept_score,
    ria_scores,
    swap_scores,
)
from llmprune.registry import lookup
from llmprune.stats import InputStats


def _stats(X: torch.Tensor) -> InputStats:
    s = InputStats({"sq"})
    s.add(X)
    return s


def _groups_kept(M: torch.Tensor, m: int) -> torch.Tensor:
    return M.reshape(M.shape[0], -1, m).sum(-1)  # [out, groups]


W_HAND = torch.tensor([[1.0, 2.0], [-3.0, 4.0]])  # row sums 3, 7; column sums 4, 6


def test_scores_hand_computed():
    # X has one token (4, 9): ‖X_0‖ = 4, ‖X_1‖ = 9; α = 0.5 multiplies the columns by 2 and 3
    # RI = [[1/3 + 1/4, 2/3 + 2/6], [3/7 + 3/4, 4/7 + 4/6]] = [[7/12, 1], [33/28, 26/21]]
    x_norm = _stats(torch.tensor([[4.0, 9.0]])).col_sq_norms.sqrt()
    S = ria_scores(W_HAND, x_norm, alpha=0.5)
    expected = torch.tensor([[7 / 6, 3.0], [33 / 14, 26 / 7]])
    torch.testing.assert_close(S, expected)
    # α = 0: relative importance alone
    torch.testing.assert_close(ria_scores(W_HAND, x_norm, alpha=0.0), torch.tensor([[7 / 12, 1.0], [33 / 28, 26 / 21]]))


def test_unstructured_compares_the_whole_matrix():
    # equal activations: scores = RI = [[0.583, 1.0], [1.179, 1.238]]; 50% per matrix prunes all of
    # row 0 (a per-row comparison would prune column 0)
    res = RIA().prune(W_HAND, _stats(torch.tensor([[1.0, 1.0]])), 0.5)
    assert type(res) is not PermutedResult
    assert res.M.tolist() == [[False, False], [True, True]]
    assert res.W.tolist() == [[0.0, 0.0], [-3.0, 4.0]]


def test_zero_row_and_column_give_zero_importance():
    W = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    S = ria_scores(W, torch.ones(3), alpha=0.5)
    assert torch.isfinite(S).all()
    torch.testing.assert_close(S, torch.tensor([[0.0, 0.0, 0.0], [1 / 4 + 1.0, 0.0, 3 / 4 + 1.0]]))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_unstructured_sparsity_exact(sparsity):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    res = RIA().prune(W, _stats(torch.randn(64, 32, generator=g)), sparsity)
    assert int((~res.M).sum()) == int(sparsity * W.numel())
    assert torch.equal(res.W, W * res.M)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_without_permutation_consecutive(nm):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 32, generator=g)
    res = RIA(ria_permute=False).prune(W, _stats(torch.randn(40, 32, generator=g)), 0.0, nm)
    assert type(res) is not PermutedResult
    assert (_groups_kept(res.M, nm[1]) == nm[0]).all()
    assert ((res.W != 0).reshape(8, -1, nm[1]).sum(-1) <= nm[0]).all()


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_with_permutation(nm):
    n, m = nm
    g = torch.Generator().manual_seed(2)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(40, 32, generator=g)
    res = RIA().prune(W, _stats(X), 0.0, nm)
    assert isinstance(res, PermutedResult)
    perm = res.perm
    assert perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(32))
    # N:M in groups of permuted channels
    assert (_groups_kept(res.M[:, perm], m) == n).all()
    assert ((res.W[:, perm] != 0).reshape(8, -1, m).sum(-1) <= n).all()
    # the pruned weight is W where kept, 0 elsewhere, in the original order
    assert torch.equal(res.W[res.M], W[res.M]) and (res.W[~res.M] == 0).all()
    # undoing the permutation keeps the function
    torch.testing.assert_close(X @ res.W.T, X[:, perm] @ res.W[:, perm].T)
    # the mask is the N:M mask of the permuted scores
    S = ria_scores(W, _stats(X).col_sq_norms.sqrt(), 0.5)
    assert float(kept_score(S[:, perm], n, m)) == pytest.approx(float((S * res.M).sum()), rel=1e-6)


def test_heuristic_allocation_hand_computed():
    # one row, channel sums 10 11 12 13 1 2 3 4; ascending order 4 5 6 7 0 1 2 3, cut into 4 runs
    # of 2: [4 5], [6 7] reversed, [0 1], [2 3] reversed -> groups {4 7 0 3}, {5 6 1 2}
    S = torch.tensor([[10.0, 11.0, 12.0, 13.0, 1.0, 2.0, 3.0, 4.0]])
    perm = heuristic_allocation(S, 4)
    assert perm.tolist() == [4, 7, 0, 3, 5, 6, 1, 2]
    # 2:4 keeps 13 + 12 + 4 + 3 = 32 in the identity order, 13 + 10 + 12 + 11 = 46 permuted (the optimum)
    assert float(kept_score(S, 2, 4)) == 32.0
    assert float(kept_score(S[:, perm], 2, 4)) == 46.0
    assert float(kept_score(S[:, channel_permutation(S, 2, 4)], 2, 4)) == 46.0


def test_swap_scores_match_explicit_masks():
    # the closed form against the reference's definition: put the candidate in, keep the n highest, sum
    g = torch.Generator().manual_seed(3)
    n, m, G = 2, 4, 3
    S = torch.rand(5, G * m, generator=g)
    S3 = S.reshape(5, G, m)
    for c in range(m):
        C = swap_scores(S, c, n, m)
        for r in range(G):
            for gg in range(G):
                grp = S3[:, gg].clone()  # [out, m]
                grp[:, c] = S3[:, r, c]
                assert float(C[r, gg]) == pytest.approx(float(grp.topk(n, dim=-1).values.sum()), rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("nm,blocks", [((2, 4), 1), ((2, 4), 2), ((1, 4), 1), ((4, 8), 1)])
def test_permutation_keeps_at_least_identity_and_heuristic(seed, nm, blocks):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(12, 48, generator=g)
    S = ria_scores(W, torch.rand(48, generator=g) * 3, 0.5)
    S_before = S.clone()
    perm = channel_permutation(S, n, m, blocks=blocks)
    assert torch.equal(S, S_before)  # pure
    assert torch.equal(perm.sort().values, torch.arange(48))
    kept = float(kept_score(S[:, perm], n, m))
    assert kept >= float(kept_score(S, n, m)) - 1e-5
    heur = channel_permutation(S, n, m, lsa_rounds=0, blocks=blocks)
    assert kept >= float(kept_score(S[:, heur], n, m)) - 1e-5


def test_permutation_rejects_indivisible_inputs():
    with pytest.raises(ValueError, match="multiple of 4"):
        channel_permutation(torch.rand(2, 6), 2, 4)


def test_options_and_registration():
    assert lookup("method", "ria") is RIA
    assert RIA.needs == frozenset({"sq"})
    assert RIA.options[:2] == ("ria_alpha", "ria_permute")
    with pytest.raises(ValueError, match="ria_lsa_blocks"):
        RIA(ria_lsa_blocks=0)


def test_default_blocks_bound_the_assignment_size():
    # one assignment up to LSA_MAX_GROUPS groups (every module of the embedded model), then the fewest
    # blocks of at most that many: the O(G³) solver's cost grows linearly with the width
    assert lsa_block_count(384, None) == 1
    assert lsa_block_count(LSA_MAX_GROUPS, None) == 1
    assert lsa_block_count(LSA_MAX_GROUPS + 1, None) == 2
    assert lsa_block_count(3584, None) == 7  # a Llama-3-8B down_proj at 2:4
    assert lsa_block_count(3584, 1) == 1 and lsa_block_count(10, 64) == 10
    assert RIA().lsa_blocks is None


def test_default_blocks_equal_one_assignment_on_small_modules():
    torch.manual_seed(3)
    S = ria_scores(torch.randn(16, 96), torch.rand(96), 0.5)
    assert torch.equal(channel_permutation(S, 2, 4, blocks=None), channel_permutation(S, 2, 4, blocks=1))
