"""EvoPress: evolutionary search of non-uniform compression (Sieberling et al., ICML 2025,
https://arxiv.org/abs/2410.14649). Reference code: https://github.com/IST-DASLab/EvoPress
(``prune.py`` builds the database of sparse variants, ``evo_prune_search.py`` searches it).

Every target module ``m`` (``n_m`` weights) has variants at integer *levels* ``j``; level ``j`` prunes
``j·w_m`` weights, where ``w_m`` is the module's step:

- unstructured: ``w_m = Δ``, the same number of weights for every module (the reference's
  ``weights_diff``), so the sparsity of level ``j`` is ``j·Δ / n_m``;
- N:M with a fixed ``M``: ``w_m = n_m / M``, one more pruned weight per group of ``M``, so level ``j``
  is the pattern ``(M − j):M``.

A candidate is one level per module; its budget ``Σ_m j_m·w_m`` (pruned weights) stays exactly that of
the uniform start through every mutation: a mutation lowers module ``a`` by ``p`` levels and raises
``b`` by ``q`` with ``p·w_a = q·w_b`` (``p = q = 1`` when the steps are equal, always so in the
unstructured case, which is the reference's move). One to three such moves per offspring,
``min(randint(1, 3), randint(1, 3))`` as in the reference, duplicates skipped.

Selection in stages (the reference's ``survivors_per_selection`` / ``tokens_per_selection``): the
offspring are scored on a random draw of a few calibration tokens, the best ``survivors[0]`` go on to
a larger draw, ..., the parent joins the last stage (elitism), one survives and becomes the parent.
Fitness is given from outside (the whole model's KL from the dense model, in the pipeline), lower is
better.

Deviations from the reference:

- The level grid is absolute (level ``j`` always prunes ``j·w_m`` weights) instead of relative to the
  target, so one database serves searches at several budgets (each builds only the levels it lacks).
  ``Δ`` is a fraction of the mean target size (``search_step``; the reference's default
  ``0.5·min(S, 1 − S)/L·hidden²`` is about ``0.0125`` of the mean Llama target at ``S = 0.7``, ``L = 8``).
- Unequal steps (N:M modules of different sizes) move in the smallest integer ratio ``p:q`` up to
  ``MAX_RATIO``; the reference has only unstructured (equal) steps.
- The search state (parent, its fitness, generation, the random generator) is plain data, saved after
  every generation, so a killed search resumes where it stopped and ends where an uninterrupted one ends.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..registry import register_allocator, table
from ..settings import Settings, split_list
from .base import Allocator, LayerTarget, ObservedModule

MAX_RATIO = 4  # a move between modules of unequal steps changes at most this many levels of one of them
MUTATION_TRIES = 1000  # random picks before a parent is declared unable to move


class SearchOptions(Settings):
    """The search allocation's options (``allocation: search``), fields of :class:`llmprune.PruneConfig`.
    Defaults are the reference's for unstructured sparsity (``scripts/run_prune_search.sh``)."""

    search_dir: str | None = Field(
        None, description="search: folder of the database of per-module variants and of the search state, reused "
        "by later searches of the same model, calibration and method (at any budget); default "
        "~/.cache/llmprune/search/<fingerprint> ($LLMPRUNE_CACHE replaces ~/.cache/llmprune).",
    )
    search_levels: int = Field(
        8, ge=1, le=64, description="search: levels built either side of the uniform one per module (the paper's "
        "num_levels); with N:M, N moves by at most this many.",
    )
    search_step: float = Field(
        0.0125, gt=0, lt=1, description="search (unstructured): weights one level moves, as a fraction of the mean "
        "target size; the same count for every module, so any two can trade.",
    )
    search_generations: int = Field(400, ge=0, description="search: generations of the evolutionary search.")
    search_offspring: int = Field(64, ge=1, description="search: offspring per generation.")
    search_survivors: list[int] = Field(
        [8, 2, 1], description="search: survivors of each selection stage, ending with 1 (comma-separated).",
    )
    search_tokens: list[int] = Field(
        [2048, 16384, 65536], description="search: fitness tokens of each selection stage (comma-separated); a stage "
        "asking for more than the fitness windows hold uses them all.",
    )
    search_windows: int | None = Field(
        None, ge=1, description="search: fitness windows (of --seqlen tokens), drawn apart from the calibration "
        "windows; default: enough for the last stage's tokens.",
    )
    search_topk: int | None = Field(
        None, ge=1, description="search: fitness KL over the dense model's top-k tokens and one bucket for the rest "
        "(memory: windows x seqlen x k instead of x vocabulary); none: the full vocabulary.",
    )
    search_seed: int = Field(0, description="search: seed of mutations and token draws.")
    search_method: str | None = Field(
        None, description="search: the pruner whose variants fill the database (default: --method), e.g. sparsegpt "
        "for a database many times faster than ALPS's; the chosen allocation is then pruned with --method.",
    )
    search_start: Literal["uniform", "owl"] = Field(
        "uniform", description="search: the first parent: 'uniform' (the paper's), or OWL's allocation on the grid "
        "(a warm start when generations are few).",
    )

    _split = field_validator("search_survivors", "search_tokens", mode="before")(split_list)

    @model_validator(mode="after")
    def _check_stages(self) -> SearchOptions:
        s, t = self.search_survivors, self.search_tokens
        if not s or len(s) != len(t):
            raise ValueError(f"search_survivors {s} and search_tokens {t} must give one value per selection stage "
                             "(the same number of each, at least one)")
        if s[-1] != 1 or any(a < b for a, b in zip(s, s[1:])) or min(s) < 1:
            raise ValueError(f"search_survivors {s} must not increase from stage to stage and end with 1 (one "
                             "parent survives)")
        if min(t) < 1:
            raise ValueError(f"search_tokens {t} must be positive token counts")
        return self


@dataclass
class LevelSpace:
    """The levels of every module: ``weights[m]`` pruned weights per level, ``lo[m] <= j <= hi[m]``,
    and the uniform ``start``."""

    names: list[str]
    sizes: list[int]  # n_m
    weights: list[float]  # w_m
    lo: list[int]
    hi: list[int]
    start: list[int]
    nm_m: int | None = None  # M of N:M levels; None: unstructured
    delta: Fraction | None = None  # Δ, exactly (unstructured)

    @property
    def divisor(self) -> int | None:
        """``D`` of ``Δ = gcd(n_m)/D`` (unstructured)."""
        if self.delta is None:
            return None
        g = 0
        for n in self.sizes:
            g = math.gcd(g, n)
        return int(Fraction(g) / self.delta)

    def budget(self, levels: Sequence[int]) -> float:
        """Pruned weights of a candidate: ``Σ_m j_m·w_m``."""
        return math.fsum(j * w for j, w in zip(levels, self.weights))

    def target(self, m: int, j: int) -> LayerTarget:
        """What level ``j`` of module ``m`` is pruned to."""
        if self.nm_m is not None:
            return LayerTarget(j / self.nm_m, (self.nm_m - j, self.nm_m))
        return LayerTarget(float(j * self.delta / self.sizes[m]), None)

    def key(self, m: int, j: int) -> str:
        """The variant's name in the database: its pruned count, independent of the budget searched."""
        if self.nm_m is not None:
            return f"{self.nm_m - j}of{self.nm_m}"
        count = j * self.delta  # pruned weights, exactly: the same name from any grid that holds it
        return f"p{count.numerator}" if count.denominator == 1 else f"p{count.numerator}_{count.denominator}"

    def needed(self) -> dict[str, list[int]]:
        return {n: list(range(a, b + 1)) for n, a, b in zip(self.names, self.lo, self.hi)}


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


@dataclass
class SearchState:
    """Everything a search needs to go on after a kill: plain data (JSON)."""

    parent: list[int]
    fitness: float = math.inf  # the parent's, on its last stage's tokens
    generation: int = 0
    rng: list = field(default_factory=list)  # random.Random.getstate(), as lists
    history: list[float] = field(default_factory=list)  # the parent's fitness after each generation

    def to_dict(self) -> dict:
        return {"parent": self.parent, "fitness": self.fitness, "generation": self.generation, "rng": self.rng,
                "history": self.history}

    @classmethod
    def from_dict(cls, d: dict) -> SearchState:
        return cls(list(d["parent"]), float(d["fitness"]), int(d["generation"]), d["rng"], list(d["history"]))


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


# fitness(candidate levels, window indices, tokens) -> a number, lower is better
Fitness = Callable[[list[int], list[int], int], float]


def draw_windows(rng: random.Random, n_windows: int, tokens: int, seqlen: int) -> tuple[list[int], int]:
    """Random distinct fitness windows holding ``tokens`` tokens (the last one cut), as the reference's
    ``selection``; all of them when ``tokens`` exceeds what they hold. Returns ``(windows, tokens)``."""
    tokens = min(tokens, n_windows * seqlen)
    k = math.ceil(tokens / seqlen)
    return rng.sample(range(n_windows), k), tokens


def evolve(space: LevelSpace, fitness: Fitness, options: SearchOptions, n_windows: int, seqlen: int,
           state: SearchState | None = None, on_generation: Callable[[SearchState], None] | None = None,
           progress: bool = True, start: Sequence[int] | None = None) -> SearchState:
    """Run the generations left in ``state`` (a fresh search from ``start``, by default the uniform levels,
    when None). After each generation ``on_generation(state)`` sees the new state (to save it)."""
    from tqdm.auto import tqdm

    rng = random.Random(options.search_seed)
    if state is None:
        state = SearchState(list(space.start if start is None else start), rng=_rng_state(rng))
    _set_rng(rng, state.rng)
    stages = list(zip(options.search_survivors, options.search_tokens))
    bar = tqdm(total=options.search_generations, initial=state.generation, desc="searching", unit="generation",
               disable=not progress)
    budget = space.budget(space.start)
    while state.generation < options.search_generations:
        parent = state.parent
        offspring: list[list[int]] = []
        tries = 0
        while len(offspring) < options.search_offspring and tries < 20 * options.search_offspring:
            tries += 1
            child = mutate(parent, space, rng)
            if child != parent and child not in offspring:
                offspring.append(child)
        fits: list[float] = []
        for s, (survive, tokens) in enumerate(stages):
            if s == len(stages) - 1 and parent not in offspring:  # elitism: the parent competes at the end
                offspring.append(parent)
            windows, used = draw_windows(rng, n_windows, tokens, seqlen)
            scored = [(fitness(c, windows, used), k) for k, c in enumerate(offspring)]
            scored.sort()
            offspring = [offspring[k] for _, k in scored[:survive]]
            fits = [f for f, _ in scored[:survive]]
        best = offspring[0]
        if abs(space.budget(best) - budget) > 1e-6 * max(budget, 1.0):
            raise AssertionError(f"a candidate left the budget: {space.budget(best)} != {budget}")
        state = SearchState(best, fits[0], state.generation + 1, _rng_state(rng), [*state.history, fits[0]])
        bar.update(1)
        bar.set_postfix(fitness=f"{state.fitness:.4g}")
        if on_generation is not None:
            on_generation(state)
    bar.close()
    return state


def project(space: LevelSpace, sparsities: Sequence[float]) -> list[int]:
    """The grid candidate nearest to per-module ``sparsities`` (e.g. OWL's, each module its layer's) with
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


@register_allocator
class Search(Allocator):
    """EvoPress allocation: per-module levels searched by the whole model's KL from the dense model. It runs
    as a pipeline stage (:mod:`llmprune.pipeline.search`): it needs the whole model, not one layer at a time."""

    name = "search"
    needs = frozenset()
    options = tuple(SearchOptions.model_fields)
    whole_model = True

    def __init__(self, **options):
        self.settings = SearchOptions(**options)

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse what the search cannot run before any model loads."""
        if config.low_memory:
            raise ValueError("allocation 'search' holds the whole model in memory (each candidate is scored by a "
                             "forward of the whole model); drop --low-memory, or use --allocation owl")
        if config.method == "none":
            raise ValueError("allocation 'search' allocates weight sparsity; give a pruning --method")
        if config.search_method is not None and config.search_method not in table("method"):
            raise ValueError(f"search_method {config.search_method!r} is not a pruner; choose one of: "
                             f"{', '.join(sorted(table('method')))}")

    def observe(self, layer: int, modules: list[ObservedModule]) -> None:
        raise NotImplementedError("allocation 'search' runs as its own stage (llmprune.pipeline.search)")

    def allocate(self, sparsity: float, nm: tuple[int, int] | None = None) -> list[LayerTarget]:
        raise NotImplementedError("allocation 'search' runs as its own stage (llmprune.pipeline.search)")
