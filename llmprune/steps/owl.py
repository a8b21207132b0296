"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024, https://arxiv.org/abs/2310.05175).

Reference code: https://github.com/luuyin/OWL, ``lib/prune_all.py`` (``check_outlier_mean`` and the
``all_layer_ratio`` block of ``prune_wanda_outlier``, the same in ``prune_sparsegpt_outlier`` and
``prune_mag_outlier``; ``prune_wanda_outlier_structure`` for N:M).

For decoder layer ``ℓ`` with Wanda scores ``A^ℓ_ij = |W_ij| · ‖X_j‖₂`` over all its targets, the
Layerwise Outlier Distribution is

    D_ℓ = Σ_ij 𝕀(A^ℓ_ij > M · Ā^ℓ) / #A^ℓ        (Ā^ℓ: the mean score over the whole layer)

and layers with more outliers are pruned less: ``S_ℓ ∝ 1 − D_ℓ``, each ``S_ℓ ∈ [S − λ, S + λ]``,
with mean ``S``. As in the reference, ``D`` is min-max normalised and spread over ``2λ``:

    u_ℓ = (D_ℓ − min D) / (max D − min D),      S_ℓ = c − 2λ · u_ℓ,

with ``c`` such that the mean of ``S_ℓ`` is ``S``. Defaults ``M = 5``, ``λ = 0.08``: the paper's
setting for LLaMA and the README's commands (``--Hyper_m 5 --Lamda 0.08``; ``main.py``'s own
default for ``Hyper_m`` is 3).

``Lamda`` vs ``Lamda*2`` in the reference: the three unstructured copies scale ``u`` by
``Lamda*2``, so the sparsities span ``2λ``, the width of the paper's band ``[S − λ, S + λ]``; the
two N:M copies scale by ``Lamda`` in units of N per group (the README's ``--Lamda 2`` for 5:8
moves N by ±1). We follow ``2λ``, the paper's band.

Deviations from the reference:

- ``c`` is found by bisection so that the mean weighted by layer size (number of pruned weights)
  is exactly ``S``, with every ``S_ℓ`` clamped into ``[S − λ, S + λ] ∩ [0, 0.99]`` (``MAX_LAYER_SPARSITY``,
  so every layer keeps weights; a target above it stays the ceiling). The reference
  subtracts the unweighted mean over layers (``c = S + 2λ·mean(u)``, which we reproduce when layers
  have equal sizes and no clamp applies); its overall sparsity is off when layer sizes differ, and
  its ``S_ℓ`` leave the band when ``mean(u) ≠ 1/2`` (it only clamps ``S_ℓ ≤ 0`` to 0.01).
- Equal outlier ratios (or ``λ = 0``) give the uniform ``S``; the reference divides by zero.
- ``D_ℓ`` is a fraction, not a percentage (the normalisation makes the two equivalent), and the
  mean score is computed in float64 as ``Σ_j ‖X_j‖₂ Σ_i |W_ij|`` without building all scores at once.
- N:M (see :func:`owl_nm`): ``λ`` keeps its meaning as a sparsity band, so each layer's N lies in
  ``[N − λM, N + λM]``; the reference's N:M copies round the centred allocation (in N units) and
  do not correct the resulting total.
"""

from __future__ import annotations

import logging
import math

from pydantic import Field

from ..registry import register_allocator
from ..settings import Settings
from .base import Allocator, LayerTarget, ObservedModule

logger = logging.getLogger(__name__)


def layer_outlier_ratio(modules: list[ObservedModule], M: float) -> float:
    """``D_ℓ``: the fraction of Wanda scores ``|W_ij|·‖X_j‖₂`` of all the layer's targets above
    ``M`` times their mean over the whole layer (``check_outlier_mean`` on the concatenated scores,
    as in the reference)."""
    total, count = 0.0, 0
    for m in modules:
        x_norm = m.stats.col_sq_norms.sqrt()  # [in]  ‖X_j‖₂
        total += float(m.W.abs().sum(0).double() @ x_norm.double())  # Σ_ij A_ij
        count += m.W.numel()
    if count == 0:
        return 0.0
    threshold = M * total / count  # M · Ā
    outliers = 0
    for m in modules:
        A = m.W.abs() * m.stats.col_sq_norms.sqrt().unsqueeze(0)  # [out, in]
        outliers += int((A > threshold).sum())
    return outliers / count


# No layer is given more than this sparsity (unless the target itself is higher): a band that reached 1 could
# empty a layer. At the paper's settings the band never gets near it (70 % ± 0.08: at most 78 %).
MAX_LAYER_SPARSITY = 0.99


def _band(sparsity: float, lam: float) -> tuple[float, float]:
    return max(sparsity - lam, 0.0), min(sparsity + lam, max(sparsity, MAX_LAYER_SPARSITY))


def owl_sparsities(ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """``S_ℓ = clamp(c − 2λ·u_ℓ, S − λ, S + λ)`` with ``u`` the min-max normalised outlier ratios
    and ``c`` solved (bisection) so that ``Σ_ℓ size_ℓ·S_ℓ / Σ_ℓ size_ℓ = S``."""
    if len(ratios) != len(sizes):
        raise ValueError(f"got {len(ratios)} outlier ratios but {len(sizes)} layer sizes; give one of each per layer")
    L = len(ratios)
    lo, hi = _band(sparsity, lam)
    d_min, d_max = min(ratios, default=0.0), max(ratios, default=0.0)
    total = float(sum(sizes))
    if L == 0 or lam <= 0 or d_max <= d_min or total <= 0:
        return [sparsity] * L
    u = [(d - d_min) / (d_max - d_min) for d in ratios]  # in [0, 1], 1 = most outliers

    def at(c: float) -> list[float]:
        return [min(max(c - 2 * lam * u_l, lo), hi) for u_l in u]

    def mean(c: float) -> float:
        return sum(w * s for w, s in zip(sizes, at(c))) / total

    # mean(c) is continuous and non-decreasing: every S_ℓ = lo at c = lo, = hi at c = hi + 2λ
    a, b = lo, hi + 2 * lam
    for _ in range(200):
        c = 0.5 * (a + b)
        if mean(c) < sparsity:
            a = c
        else:
            b = c
        if b - a <= 1e-15:
            break
    return at(0.5 * (a + b))


def _monotone_ok(i: int, step: int, Ns: list[int], ratios: list[float]) -> bool:
    """Whether ``Ns[i] += step`` keeps "more outliers → more kept" (non-strictly) for every pair."""
    new = Ns[i] + step
    for j, d in enumerate(ratios):
        if j == i:
            continue
        if d > ratios[i] and Ns[j] < new:  # a layer with more outliers would keep fewer
            return False
        if d < ratios[i] and Ns[j] > new:  # a layer with fewer outliers would keep more
            return False
    return True


def owl_nm(ratios: list[float], sizes: list[int], nm: tuple[int, int], lam: float) -> list[int]:
    """An integer ``N_ℓ`` per layer (same ``M``) from the continuous OWL allocation at sparsity
    ``1 − N/M``: each ``N_ℓ ∈ [N − λM, N + λM] ∩ [1, M − 1]``, non-decreasing in the outlier ratio.

    The continuous kept count ``M·(1 − S_ℓ)`` is rounded to the nearest integer and clamped into
    the band, then a greedy pass fixes the total: it takes one from the layer rounded up the most
    while the size-weighted mean density is above ``N/M``, then gives one to the layer rounded down
    the most while that keeps the mean at or below ``N/M``, every move keeping the band and the
    monotone order. The result never keeps more weights than the global ``N:M`` pattern; with
    equal layer sizes it keeps exactly as many. When the band holds no integer but ``N`` (``λM < 1``,
    or ``M = 2``), every layer keeps the global pattern (logged).
    """
    N, M = nm
    L = len(ratios)
    lo = max(min(1, N), math.ceil(N - lam * M - 1e-9))
    hi = min(max(M - 1, N), math.floor(N + lam * M + 1e-9))
    if lo == hi:
        logger.info(
            "OWL with %d:%d: the band [S - λ, S + λ] (λ = %g) allows no N other than %d per group of %d "
            "(it needs owl_lambda >= 1/M = %g and 1 <= N±1 <= M-1); every layer keeps %d:%d",
            N, M, lam, N, M, 1 / M, N, M,
        )
        return [N] * L
    S = 1 - N / M
    n_cont = [M * (1 - s) for s in owl_sparsities(ratios, sizes, S, lam)]  # continuous kept per group
    Ns = [min(max(int(math.floor(n + 0.5)), lo), hi) for n in n_cont]  # round half up: monotone
    target = N * sum(sizes)
    excess = sum(w * n for w, n in zip(sizes, Ns)) - target  # kept weights per M-group above N:M
    while excess > 0:  # always possible: the lowest-ratio layer at the largest N > N can go down
        cand = [i for i in range(L) if Ns[i] > lo and _monotone_ok(i, -1, Ns, ratios)]
        i = max(cand, key=lambda k: (Ns[k] - n_cont[k], -ratios[k]))
        Ns[i] -= 1
        excess -= sizes[i]
    while True:
        cand = [i for i in range(L)
                if Ns[i] < hi and 0 < sizes[i] <= -excess and _monotone_ok(i, +1, Ns, ratios)]
        if not cand:
            break
        i = max(cand, key=lambda k: (n_cont[k] - Ns[k], ratios[k]))
        Ns[i] += 1
        excess += sizes[i]
    return Ns


class OWLOptions(Settings):
    """OWL's options, fields of :class:`llmprune.PruneConfig`."""

    owl_m: float = Field(
        5.0, gt=0, description="OWL: a Wanda score |W|·‖X‖ counts as an outlier above owl_m x the mean score "
        "of its decoder layer (the paper's M).",
    )
    owl_lambda: float = Field(
        0.08, ge=0, lt=1, description="OWL: every layer's sparsity stays within sparsity ± owl_lambda (the paper's "
        "λ); with N:M a layer's N moves by at most owl_lambda·M, so it needs at least 1/M to change anything.",
    )


@register_allocator
class OWL(Allocator):
    """Outlier Weighed Layerwise sparsity: fewer pruned weights in layers with more Wanda-score
    outliers (see the module docstring for the formulas and the deviations from the reference)."""

    name = "owl"
    needs = frozenset({"sq"})
    options = tuple(OWLOptions.model_fields)

    def __init__(self, owl_m: float = 5.0, owl_lambda: float = 0.08):
        if not owl_m > 0:
            raise ValueError(f"owl_m must be > 0 (a score is an outlier above owl_m x the layer mean), got {owl_m}")
        if not 0 <= owl_lambda < 1:
            raise ValueError(f"owl_lambda must be in [0, 1) (layer sparsities lie in [S - λ, S + λ]), got {owl_lambda}")
        self.M = float(owl_m)
        self.lam = float(owl_lambda)
        self.ratios: dict[int, float] = {}  # layer -> D_ℓ
        self.sizes: dict[int, int] = {}  # layer -> number of weights pruned in the layer

    def observe(self, layer: int, modules: list[ObservedModule]) -> None:
        self.ratios[layer] = layer_outlier_ratio(modules, self.M)
        self.sizes[layer] = sum(m.W.numel() for m in modules)
        logger.debug("OWL layer %d: outlier ratio %.4f%% (M = %g)", layer, 100 * self.ratios[layer], self.M)

    def allocate(self, sparsity: float, nm: tuple[int, int] | None = None) -> list[LayerTarget]:
        if not self.ratios:
            raise ValueError("OWL.allocate was called before any layer was observed; run the observe pass first")
        layers = sorted(self.ratios)
        ratios = [self.ratios[i] for i in layers]
        sizes = [self.sizes[i] for i in layers]
        if nm is not None:
            M = nm[1]
            Ns = owl_nm(ratios, sizes, nm, self.lam)
            logger.info("OWL N:M per layer (M = %d): %s", M, Ns)
            return [LayerTarget(1 - n / M, (n, M)) for n in Ns]
        S = owl_sparsities(ratios, sizes, sparsity, self.lam)
        logger.info("OWL sparsities: min %.4f, max %.4f (target %.4f, λ = %g)", min(S), max(S), sparsity, self.lam)
        return [LayerTarget(s) for s in S]
