"""The search allocation's level grid (:mod:`llmprune.steps.evopress`): which variants each unit (a module,
or every target of a decoder layer) may take, what they prune, their budget, budget-keeping mutations, and
the projection of another allocation (OWL's) onto the grid. Pure arithmetic: no model, no tensors."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from .base import LayerTarget

MAX_RATIO = 4  # a move between units of unequal steps changes at most this many levels of one of them
MUTATION_TRIES = 1000  # random picks before a parent is declared unable to move


@dataclass
class LevelSpace:
    """The levels of every *unit* (a module, or with ``granularity: layer`` all targets of one decoder layer):
    ``weights[u]`` pruned weights per level, ``lo[u] <= j <= hi[u]``, and the uniform ``start``."""

    names: list[str]  # units
    sizes: list[int]  # n_u
    weights: list[float]  # w_u
    lo: list[int]
    hi: list[int]
    start: list[int]
    nm_m: int | None = None  # M of N:M levels; None: unstructured
    delta: Fraction | None = None  # Δ, exactly (unstructured, module units)
    members: list[list[tuple[str, int]]] | None = None  # layer units: each one's (module, n_m); None: modules
    rate: Fraction | None = None  # layer units, unstructured: the sparsity of one level, exactly

    @property
    def divisor(self) -> int | None:
        """``D`` of ``Δ = gcd(n_m)/D`` (unstructured module units; what a database keeps)."""
        if self.delta is None:
            return None
        g = 0
        for n in self.sizes:
            g = math.gcd(g, n)
        return int(Fraction(g) / self.delta)

    def budget(self, levels: Sequence[int]) -> float:
        """Pruned weights of a candidate: ``Σ_u j_u·w_u``."""
        return math.fsum(j * w for j, w in zip(levels, self.weights))

    def target(self, u: int, j: int) -> LayerTarget:
        """What level ``j`` of unit ``u`` prunes each of its modules to."""
        if self.nm_m is not None:
            return LayerTarget(j / self.nm_m, (self.nm_m - j, self.nm_m))
        if self.rate is not None:
            return LayerTarget(float(j * self.rate), None)
        return LayerTarget(float(j * self.delta / self.sizes[u]), None)

    def units(self, u: int) -> list[tuple[str, int]]:
        """The modules of unit ``u`` with their sizes."""
        return self.members[u] if self.members is not None else [(self.names[u], self.sizes[u])]

    def key(self, u: int, j: int, n: int | None = None) -> str:
        """A variant's name in the database: its pruned count (of a module of ``n`` weights in unit ``u`` at
        level ``j``), independent of the budget and granularity searched, so any search that holds it reuses it."""
        if self.nm_m is not None:
            return f"{self.nm_m - j}of{self.nm_m}"
        count = j * self.delta if self.rate is None else j * (self.sizes[u] if n is None else n) * self.rate
        return f"p{count.numerator}" if count.denominator == 1 else f"p{count.numerator}_{count.denominator}"

    def assign(self, levels: Sequence[int]) -> dict[str, tuple[str, LayerTarget]]:
        """Every module's variant name and target for a candidate."""
        return {name: (self.key(u, j, n), self.target(u, j))
                for u, j in enumerate(levels) for name, n in self.units(u)}

    def catalog(self) -> dict[str, list[tuple[str, LayerTarget]]]:
        """Every module's variants the search may use (what the database must hold)."""
        return {name: [(self.key(u, j, n), self.target(u, j)) for j in range(self.lo[u], self.hi[u] + 1)]
                for u in range(len(self.names)) for name, n in self.units(u)}


def level_space(names: Sequence[str], sizes: Sequence[int], sparsity: float, levels: int, step: float,
                nm: tuple[int, int] | None = None, divisor: int | None = None) -> LevelSpace:
    """The grid around the uniform ``sparsity`` (or ``N:M``): ``levels`` either side of each module's
    uniform level, clipped to what the module can take (at least one weight kept, none pruned below 0).

    Unstructured: one ``Δ`` for all modules, near ``step · mean(n_m)``, such that every module's uniform
    count ``S·n_m`` is a whole number of levels: ``Δ = gcd(n_m)/D`` with ``D`` a multiple of ``S``'s
    denominator (``S`` with at most four decimals). Databases keep ``D`` so that searches at other
    budgets land on the same grid where they can."""
    if nm is not None:
        N, M = nm
        j0 = M - N
        return LevelSpace(list(names), list(sizes), [n / M for n in sizes], [max(j0 - levels, 1)] * len(names),
                          [min(j0 + levels, M - 1)] * len(names), [j0] * len(names), M)
    a, b = _fraction(sparsity)  # S = a/b in lowest terms
    if a <= 0:
        raise ValueError(f"search needs a positive sparsity, got {sparsity}")
    g = 0
    for n in sizes:
        g = math.gcd(g, n)
    # Δ = g/D: every uniform count S·n_m = a·(n_m/g)·D/b levels is whole when b divides D. D is the multiple
    # of b nearest to g/(step·mean n), or ``divisor`` (an existing database's) when b divides it.
    want = step * sum(sizes) / len(sizes)
    D = divisor if divisor is not None and divisor % b == 0 else b * max(1, round(g / (want * b)))
    delta = Fraction(g, D)
    start = [int(Fraction(a * n, b) / delta) for n in sizes]
    lo = [max(s - levels, 0) for s in start]
    hi = [min(s + levels, math.floor((n - 1) / delta)) for s, n in zip(start, sizes)]
    return LevelSpace(list(names), list(sizes), [float(delta)] * len(names), lo, hi, start, None, delta)


def _fraction(x: float) -> tuple[int, int]:
    """``x`` as ``a/b`` with a small ``b`` (sparsities are given with few decimals)."""
    f = Fraction(x).limit_denominator(10_000)
    if abs(float(f) - x) > 1e-12:
        raise ValueError(f"search needs a sparsity with at most four decimals, got {x}")
    return f.numerator, f.denominator


def layer_space(groups: Sequence[tuple[str, Sequence[tuple[str, int]]]], sparsity: float, levels: int,
                step: float, nm: tuple[int, int] | None = None) -> LevelSpace:
    """The grid with one level per decoder layer (``groups``: each layer's name and its modules with their
    sizes). A level is the sparsity ``1/D`` of every module of the layer, ``D`` a multiple of ``S``'s
    denominator nearest to ``1/step`` (so the uniform level ``S·D`` is whole); with N:M one level is one
    ``N``. Layers trade levels in the ratio of their sizes (1:1 when they are alike)."""
    names = [g for g, _ in groups]
    members = [list(ms) for _, ms in groups]
    sizes = [sum(n for _, n in ms) for ms in members]
    k = len(names)
    if nm is not None:
        N, M = nm
        j0 = M - N
        return LevelSpace(names, sizes, [n / M for n in sizes], [max(j0 - levels, 1)] * k,
                          [min(j0 + levels, M - 1)] * k, [j0] * k, M, None, members)
    a, b = _fraction(sparsity)
    if a <= 0:
        raise ValueError(f"search needs a positive sparsity, got {sparsity}")
    D = b * max(1, round(1 / (step * b)))
    rate = Fraction(1, D)
    j0 = a * D // b
    return LevelSpace(names, sizes, [float(n * rate) for n in sizes], [max(j0 - levels, 0)] * k,
                      [min(j0 + levels, D - 1)] * k, [j0] * k, None, None, members, rate)


def depth_space(n_layers: int, removed: Sequence[int]) -> LevelSpace:
    """Depth as levels: level 1 removes a decoder layer, 0 keeps it. Every layer weighs one, so a move swaps a
    removed layer for a kept one (EvoPress's depth mutation) and the number removed stays exact; ``removed``
    is the start."""
    gone = set(removed)
    n = n_layers
    return LevelSpace([f"layer {i}" for i in range(n)], [1] * n, [1.0] * n, [0] * n, [1] * n,
                      [int(i in gone) for i in range(n)])


def mutate(parent: Sequence[int], space: LevelSpace, rng: random.Random) -> list[int]:
    """One offspring: one to three budget-keeping moves (module ``a`` down ``p`` levels, ``b`` up ``q``,
    ``p·w_a = q·w_b``). Raises ``ValueError`` when no move is possible (every module at a bound)."""
    child = list(parent)
    flips = min(rng.randint(1, 3), rng.randint(1, 3))  # biased towards fewer moves, as the reference
    n = len(child)
    for _ in range(flips):
        for _try in range(MUTATION_TRIES):
            a, b = rng.randrange(n), rng.randrange(n)
            if a == b:
                continue
            p, q = _ratio(space.weights[a], space.weights[b])
            if p > MAX_RATIO or q > MAX_RATIO:
                continue
            if child[a] - p < space.lo[a] or child[b] + q > space.hi[b]:
                continue
            child[a] -= p
            child[b] += q
            break
        else:
            raise ValueError("no budget-keeping move is left: every module is at the edge of its levels; build more "
                             "levels (search_levels) or a finer step (search_step)")
    return child


def _ratio(wa: float, wb: float) -> tuple[int, int]:
    """Smallest whole ``(p, q)`` with ``p·wa = q·wb``."""
    if wa == wb:
        return 1, 1
    f = Fraction(wb / wa).limit_denominator(MAX_RATIO * 4)
    if abs(float(f) * wa - wb) > 1e-9 * max(wa, wb):
        return MAX_RATIO + 1, MAX_RATIO + 1  # no small ratio: these two never trade
    return f.numerator, f.denominator


def project(space: LevelSpace, sparsities: Sequence[float]) -> list[int]:
    """The grid candidate nearest to per-unit ``sparsities`` (e.g. OWL's, each unit its layer's) with
    the uniform budget exactly: each module's level rounded and clipped, then budget-keeping single moves
    towards the wanted sparsities until the budget is met."""
    want = [s * n / w for s, n, w in zip(sparsities, space.sizes, space.weights)]  # continuous levels
    levels = [min(max(round(x), a), b) for x, a, b in zip(want, space.lo, space.hi)]
    budget = space.budget(space.start)
    for _ in range(100_000):
        gap = space.budget(levels) - budget  # > 0: too many pruned weights
        if abs(gap) <= 1e-6 * max(budget, 1.0):
            return levels
        sign = 1 if gap > 0 else -1
        # lower (or raise) the module furthest above (below) its wanted level whose step fits in the gap
        cand = [m for m in range(len(levels))
                if space.weights[m] <= abs(gap) * (1 + 1e-9) and space.lo[m] <= levels[m] - sign <= space.hi[m]]
        if not cand:
            break
        m = max(cand, key=lambda k: sign * (levels[k] - want[k]))
        levels[m] -= sign
    # the greedy pass could not land exactly (unequal N:M steps): the uniform start is always exact
    return list(space.start)


__all__ = ["LevelSpace", "depth_space", "layer_space", "level_space", "mutate", "project"]
