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
- ``search_granularity: layer`` (not in the reference; the default) gives every target of a decoder layer one
  level, a fraction ``1/D`` of its weights, as OWL allocates. With equal-count steps a level is ``Δ/n_m`` of a module,
  so under grouped-query attention (``k_proj`` 8× smaller than an MLP projection) one level moves ``k_proj``
  by 10 % and ``down_proj`` by 1.25 %; per layer, every module moves alike and the space has one dimension
  per layer instead of seven, which few generations can explore.
- The search state (parent, its fitness, generation, the random generator) is plain data, saved after
  every generation, so a killed search resumes where it stopped and ends where an uninterrupted one ends.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..registry import register_allocator, table
from ..settings import Settings, split_list
from .base import Allocator, LayerTarget, ObservedModule
from .levels import LevelSpace, mutate


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
        0.0125, gt=0, lt=1, description="search (unstructured): what one level moves: with granularity 'layer' a "
        "fraction of the layer's weights; with 'module' a fraction of the mean target size, the same count for "
        "every module, so any two can trade.",
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
    search_granularity: Literal["module", "layer"] = Field(
        "layer", description="search: what one level belongs to: 'layer' (every target of a decoder layer at one "
        "sparsity, as OWL allocates; a level is search_step of the layer's weights, so a small module moves as far "
        "as a large one, and the space has one dimension per layer; SparseGPT 70 %: 193.62 against OWL's 239.79 "
        "over 3 seeds) or 'module' (each linear target its own level, the paper's; 243.89 in the same budget).",
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


def window_cuts(windows: Sequence[int], tokens: int, seqlen: int) -> list[tuple[int, int]]:
    """``(window, length)`` of each window a fitness reads so that ``tokens`` tokens count (the last one cut)."""
    cuts = []
    for k, w in enumerate(windows):
        n = min(seqlen, tokens - k * seqlen)
        if n <= 0:
            break
        cuts.append((w, n))
    return cuts


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
