"""OWL layerwise allocation: outlier ratio, band, weighted mean, N:M rounding, end to end."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import pytest
import torch

import llmprune.steps.owl  # noqa: F401 - registers "owl"
from llmprune.registry import lookup
from llmprune.stats import InputStats
from llmprune.steps.base import LayerTarget, ObservedModule
from llmprune.steps.owl import OWL, layer_outlier_ratio, owl_nm, owl_sparsities


def _module(W, sq, name="m"):
    W = torch.as_tensor(W, dtype=torch.float32)  # [out, in]
    return ObservedModule(name, W, InputStats("sq", n=1, sq=torch.as_tensor(sq, dtype=torch.float32)))


def _wmean(values, sizes):
    return sum(v * w for v, w in zip(values, sizes)) / sum(sizes)


def test_outlier_ratio_by_hand_uses_the_layer_mean():
    # A = |W| * sqrt(sq): module a -> [[1, 4], [3, 8]], module b -> [[10]]
    # layer mean 26/5 = 5.2, threshold 1.5 * 5.2 = 7.8: scores 8 and 10 are outliers -> 2/5
    # (per-module means would give 1/5: 8 > 1.5 * 4 in a, but 10 < 1.5 * 10 in b)
    a = _module([[-1.0, 2.0], [3.0, -4.0]], [1.0, 4.0], "a")
    b = _module([[10.0]], [1.0], "b")
    assert layer_outlier_ratio([a, b], 1.5) == pytest.approx(0.4)
    assert layer_outlier_ratio([a], 1.5) == pytest.approx(0.25)  # mean 4, threshold 6: only 8
    assert layer_outlier_ratio([a, b], 5.0) == pytest.approx(0.0)  # threshold 26 > every score
    assert layer_outlier_ratio([], 5.0) == 0.0


def test_matches_reference_when_sizes_equal_and_band_not_hit():
    # u = [0, 0.5, 1], mean(u) = 1/2: the reference's S - 2λ(u - mean u) = [S + λ, S, S - λ]
    S = owl_sparsities([0.01, 0.02, 0.03], [10, 10, 10], 0.7, 0.08)
    assert S == pytest.approx([0.78, 0.70, 0.62], abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("equal_sizes", [True, False])
def test_weighted_mean_band_and_monotone(seed, equal_sizes):
    rng = random.Random(seed)
    L, target, lam = 12, 0.7, 0.08
    ratios = [rng.random() * 0.05 for _ in range(L)]
    sizes = [1000] * L if equal_sizes else [rng.randint(100, 5000) for _ in range(L)]
    S = owl_sparsities(ratios, sizes, target, lam)
    assert abs(_wmean(S, sizes) - target) < 1e-6
    assert all(target - lam - 1e-12 <= s <= target + lam + 1e-12 for s in S)
    order = sorted(range(L), key=lambda i: ratios[i])
    assert all(S[order[k]] >= S[order[k + 1]] - 1e-12 for k in range(L - 1))  # more outliers -> lower


def test_band_holds_where_the_reference_leaves_it():
    # one outlier-heavy layer: the reference gives it S - 2λ(1 - 1/5) = S - 1.6λ, below the band
    sizes = [1, 1, 1, 1, 1]
    S = owl_sparsities([0.05, 0.0, 0.0, 0.0, 0.0], sizes, 0.7, 0.08)
    assert S[0] == pytest.approx(0.62)
    assert S[1:] == pytest.approx([0.72] * 4)
    assert _wmean(S, sizes) == pytest.approx(0.7, abs=1e-9)


def test_equal_ratios_or_zero_lambda_give_uniform():
    assert owl_sparsities([0.02] * 4, [1, 2, 3, 4], 0.6, 0.08) == [0.6] * 4
    assert owl_sparsities([0.01, 0.03, 0.02], [1, 2, 3], 0.6, 0.0) == [0.6] * 3


def test_band_is_clipped_to_valid_sparsities():
    S = owl_sparsities([0.0, 0.1], [1, 3], 0.05, 0.08)
    assert all(0.0 <= s <= 0.13 for s in S)
    assert _wmean(S, [1, 3]) == pytest.approx(0.05, abs=1e-9)


def test_no_layer_is_emptied():
    """A band reaching 1 (0.95 ± 0.08) stops at 0.99: every layer keeps weights, and the mean is still met."""
    sizes = [1, 1, 1, 1]
    S = owl_sparsities([0.0, 0.1, 0.5, 1.0], sizes, 0.95, 0.08)
    assert max(S) <= 0.99 and min(S) >= 0.87 and _wmean(S, sizes) == pytest.approx(0.95, abs=1e-9)
    assert owl_sparsities([0.0, 1.0], [1, 1], 0.995, 0.08) == pytest.approx([0.995, 0.995])  # target above the cap


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("equal_sizes", [True, False])
def test_nm_allocation(seed, equal_sizes):
    rng = random.Random(seed)
    L, (N, M), lam = 10, (4, 8), 0.25  # band: N in [2, 6]
    ratios = [rng.random() * 0.05 for _ in range(L)]
    sizes = [64] * L if equal_sizes else [rng.randint(1, 50) * 64 for _ in range(L)]
    Ns = owl_nm(ratios, sizes, (N, M), lam)
    assert all(isinstance(n, int) and 1 <= n <= M - 1 and N - lam * M <= n <= N + lam * M for n in Ns)
    density = _wmean(Ns, sizes) / M
    assert density <= N / M + 1e-12  # never denser than the global N:M pattern
    if equal_sizes:
        assert density == pytest.approx(N / M)
    else:
        assert N / M - density <= max(sizes) / sum(sizes) / M  # within one group-step of the smallest move
    order = sorted(range(L), key=lambda i: ratios[i])
    assert all(Ns[order[k]] <= Ns[order[k + 1]] for k in range(L - 1))  # more outliers -> keep more
    assert len(set(Ns)) > 1


def test_nm_by_hand():
    # u = [0, 0.5, 1] at S = 1/2, λ = 1/4: kept per 4 = 4(1 - S_ℓ) = [1, 2, 3]
    assert owl_nm([0.0, 0.1, 0.2], [1, 1, 1], (2, 4), 0.25) == [1, 2, 3]


@pytest.mark.parametrize("nm, lam", [((2, 4), 0.08), ((1, 2), 0.5)])
def test_nm_fallback_keeps_global_pattern(nm, lam, caplog):
    with caplog.at_level(logging.INFO, logger="llmprune.steps.owl"):
        Ns = owl_nm([0.0, 0.1, 0.3], [1, 2, 3], nm, lam)
    assert Ns == [nm[0]] * 3
    assert f"every layer keeps {nm[0]}:{nm[1]}" in caplog.text


def _layer(rng: torch.Generator, out: int, inp: int, heavy: bool):
    W = torch.randn(out, inp, generator=rng)  # [out, in]
    sq = torch.ones(inp)  # [in]
    if heavy:  # a few large input features: many scores far above the mean
        sq[: inp // 8] = 400.0
    return [_module(W, sq, "q"), _module(torch.randn(out, inp, generator=rng), sq, "k")]


def test_class_end_to_end():
    rng = torch.Generator().manual_seed(0)
    owl = lookup("allocation", "owl").from_config(SimpleNamespace(owl_m=5.0, owl_lambda=0.08))
    assert isinstance(owl, OWL) and owl.needs == frozenset({"sq"})
    shapes = [(16, 32, False), (16, 64, True), (32, 32, False), (16, 32, True)]
    for i, (o, n, heavy) in enumerate(shapes):
        owl.observe(i, _layer(rng, o, n, heavy))
    sizes = [2 * o * n for o, n, _ in shapes]
    assert owl.ratios[1] > owl.ratios[0] and owl.ratios[3] > owl.ratios[2]

    targets = owl.allocate(0.7)
    assert all(isinstance(t, LayerTarget) and t.nm is None for t in targets)
    S = [t.sparsity for t in targets]
    assert abs(_wmean(S, sizes) - 0.7) < 1e-6
    assert all(0.62 - 1e-12 <= s <= 0.78 + 1e-12 for s in S)
    assert S[1] < S[0] and S[3] < S[2]

    nm_targets = OWL(owl_lambda=0.25)
    for i, (o, n, heavy) in enumerate(shapes):
        nm_targets.observe(i, _layer(rng, o, n, heavy))
    t = nm_targets.allocate(0.5, (4, 8))
    assert all(x.nm[1] == 8 and x.sparsity == pytest.approx(1 - x.nm[0] / 8) for x in t)
    assert t[1].nm[0] >= t[0].nm[0] and _wmean([x.nm[0] for x in t], sizes) <= 4


def test_registration_and_errors():
    assert lookup("allocation", "owl") is OWL
    assert OWL.options == ("owl_m", "owl_lambda")
    with pytest.raises(ValueError, match="owl_m"):
        OWL(owl_m=0)
    with pytest.raises(ValueError, match="owl_lambda"):
        OWL(owl_lambda=-0.1)
    with pytest.raises(ValueError, match="before any layer"):
        OWL().allocate(0.5)
