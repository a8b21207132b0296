"""The search allocation (EvoPress): the level grid and its budget, budget-keeping mutations, staged
selection and resumption on a synthetic fitness; then the whole stage on a tiny model (database reuse,
never worse than uniform and OWL by its own fitness, a resumed search equal to an uninterrupted one)."""

from __future__ import annotations

import json
import random
from itertools import combinations
from fractions import Fraction

import pytest
import torch

import llmprune
from llmprune.engine.structured import SkipFitness, _skip_hook
from llmprune.engine.targets import find_decoder_layers
from llmprune.engine.variants import KLFitness, VariantDatabase
from llmprune.errors import ConfigError
from llmprune.pipeline.prune import prune_model
from llmprune.structured.depth import kl_from_dense
from llmprune.steps.evopress import SearchOptions, SearchState, evolve
from llmprune.steps.levels import LevelSpace, layer_space, level_space, mutate, project

from conftest import VOCAB, make_tiny_model

# the module sizes of one SmolLM2 decoder layer (q, k, v, o, gate, up, down), three layers
SIZES = [331776, 110592, 110592, 331776, 884736, 884736, 884736] * 3
NAMES = [f"model.layers.{i}.{n}" for i in range(3) for n in ("q", "k", "v", "o", "gate", "up", "down")]


LAYERS = [(f"layer {i}", list(zip(NAMES[7 * i:7 * i + 7], SIZES[7 * i:7 * i + 7]))) for i in range(3)]


def exact_budget(space: LevelSpace, levels) -> Fraction:
    """Pruned weights of a candidate, exactly (from its modules' targets)."""
    if space.members is not None:  # layer units: every module of a unit at the unit's level
        return sum((j * n * space.rate if space.rate is not None else Fraction(j * n, space.nm_m))
                   for u, j in enumerate(levels) for _, n in space.units(u))
    return sum((j * space.delta if space.delta is not None else Fraction(j * n, space.nm_m))
               for j, n in zip(levels, space.sizes))


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7, 0.65])
def test_uniform_start_is_the_target_exactly(sparsity):
    space = level_space(NAMES, SIZES, sparsity, 4, 0.0125)
    assert exact_budget(space, space.start) == Fraction(sparsity).limit_denominator(10_000) * sum(SIZES)
    for m in range(len(SIZES)):  # every module's uniform level is the target sparsity
        assert space.target(m, space.start[m]).sparsity == pytest.approx(sparsity, abs=1e-15)
        assert space.lo[m] <= space.start[m] <= space.hi[m]


def test_grid_is_shared_across_budgets_so_variants_are_reused():
    s7 = level_space(NAMES, SIZES, 0.7, 8, 0.0125)
    s6 = level_space(NAMES, SIZES, 0.6, 8, 0.0125, divisor=s7.divisor)
    assert s6.delta == s7.delta
    keys7 = {s7.key(m, j) for m in range(len(NAMES)) for j in range(s7.lo[m], s7.hi[m] + 1)}
    keys6 = {s6.key(m, j) for m in range(len(NAMES)) for j in range(s6.lo[m], s6.hi[m] + 1)}
    assert keys6 & keys7  # the bands overlap: a later search at 0.6 reuses 0.7's variants there


@pytest.mark.parametrize("nm", [None, (4, 8), (2, 4)])
def test_every_mutation_keeps_the_budget_exactly_and_the_bounds(nm):
    space = level_space(NAMES, SIZES, 0.5, 3, 0.02, nm=nm)
    budget = exact_budget(space, space.start)
    rng = random.Random(0)
    levels, moved = space.start, set()
    for _ in range(500):
        levels = mutate(levels, space, rng)
        assert exact_budget(space, levels) == budget
        assert all(a <= j <= b for j, a, b in zip(levels, space.lo, space.hi))
        moved |= {m for m, (j, j0) in enumerate(zip(levels, space.start)) if j != j0}
    assert len(moved) > len(NAMES) // 2
    if nm is not None:  # every level is a valid N:M pattern of the same M
        for m, j in enumerate(levels):
            t = space.target(m, j)
            assert t.nm[1] == nm[1] and 1 <= t.nm[0] < nm[1] and t.sparsity == 1 - t.nm[0] / nm[1]


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.65])
@pytest.mark.parametrize("nm", [None, (4, 8)])
def test_layer_units_move_every_module_of_a_layer_alike_and_keep_the_budget(sparsity, nm):
    space = layer_space(LAYERS, sparsity, 4, 0.025, nm=nm)
    assert len(space.names) == 3 and space.members is not None
    budget = exact_budget(space, space.start)
    want = Fraction(sparsity).limit_denominator(10_000) if nm is None else Fraction(nm[1] - nm[0], nm[1])
    assert budget == want * sum(SIZES)
    if nm is None:
        assert space.rate == Fraction(1, 40)  # 1/step, a multiple of the target's denominator
    rng = random.Random(0)
    levels = space.start
    for _ in range(200):
        levels = mutate(levels, space, rng)
        assert exact_budget(space, levels) == budget
        assigned = space.assign(levels)
        assert set(assigned) == set(NAMES)
        for u, (_, members) in enumerate(LAYERS):  # one sparsity for every module of a layer
            assert {assigned[n][1] for n, _ in members} == {space.target(u, levels[u])}
    assert levels != space.start
    # every variant a candidate can use is in the catalog (what the database is built with)
    catalog = space.catalog()
    assert all(v in catalog[n] for n, v in space.assign(levels).items())


def test_variant_names_are_shared_between_granularities_where_counts_agree():
    mod = level_space(NAMES, SIZES, 0.7, 8, 0.0125)
    lay = layer_space(LAYERS, 0.7, 4, 0.025)
    assert mod.assign(mod.start) == lay.assign(lay.start)  # the uniform variants are the same files


def test_projection_meets_the_budget_and_follows_the_wanted_direction():
    space = level_space(NAMES, SIZES, 0.7, 8, 0.02)
    want = [0.62] * 7 + [0.70] * 7 + [0.78] * 7  # first layer less sparse, last more
    levels = project(space, want)
    assert exact_budget(space, levels) == exact_budget(space, space.start)
    s = [space.target(m, j).sparsity for m, j in enumerate(levels)]
    assert sum(s[:7]) / 7 < 0.7 < sum(s[14:]) / 7


def _toy_fitness(space: LevelSpace, seen: list):
    """A fitness with a known optimum: distance to a hidden allocation (plus a window-dependent offset)."""
    rng = random.Random(5)
    hidden = list(space.start)
    for _ in range(30):
        hidden = mutate(hidden, space, rng)

    def fitness(levels, windows, tokens):
        seen.append(exact_budget(space, levels))
        return sum((a - b) ** 2 for a, b in zip(levels, hidden)) + 1e-3 * sum(windows) + 1e-6 * tokens

    return fitness, hidden


def _opts(**kw) -> SearchOptions:
    base = dict(search_generations=12, search_offspring=8, search_survivors=[3, 1], search_tokens=[32, 96])
    return SearchOptions(**{**base, **kw})


def test_search_improves_keeps_the_budget_and_is_deterministic():
    space = level_space(NAMES, SIZES, 0.7, 6, 0.0125)
    seen: list = []
    fitness, hidden = _toy_fitness(space, seen)
    a = evolve(space, fitness, _opts(), n_windows=6, seqlen=16, progress=False)
    b = evolve(space, fitness, _opts(), n_windows=6, seqlen=16, progress=False)
    assert a == b  # the same seed gives the same search
    assert set(seen) == {exact_budget(space, space.start)}  # every candidate scored met the budget exactly
    start = sum((x - y) ** 2 for x, y in zip(space.start, hidden))
    assert sum((x - y) ** 2 for x, y in zip(a.parent, hidden)) < start
    assert len(a.history) == 12 and a.generation == 12
    c = evolve(space, fitness, _opts(search_seed=1), n_windows=6, seqlen=16, progress=False)
    assert c.parent != a.parent


def test_a_resumed_search_equals_an_uninterrupted_one():
    space = level_space(NAMES, SIZES, 0.6, 6, 0.0125)
    fitness, _ = _toy_fitness(space, [])
    whole = evolve(space, fitness, _opts(), n_windows=6, seqlen=16, progress=False)
    saved = []
    evolve(space, fitness, _opts(search_generations=5), n_windows=6, seqlen=16, progress=False,
           on_generation=lambda s: saved.append(json.dumps(s.to_dict())))
    state = SearchState.from_dict(json.loads(saved[-1]))  # what a killed search left on disk
    assert state.generation == 5
    resumed = evolve(space, fitness, _opts(), n_windows=6, seqlen=16, state=state, progress=False)
    assert resumed == whole


def test_stage_settings_are_validated():
    with pytest.raises(ValueError, match="one value per selection stage"):
        SearchOptions(search_survivors=[4, 1], search_tokens=[512])
    with pytest.raises(ValueError, match="end with 1"):
        SearchOptions(search_survivors=[4, 2], search_tokens=[512, 1024])
    with pytest.raises(ConfigError, match="low-memory"):
        llmprune.PruneConfig.build(dict(allocation="search", low_memory=True))  # before any model loads


def test_topk_fitness_with_the_whole_vocabulary_equals_the_full_kl(tmp_path):
    model = make_tiny_model("llama")
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    db = VariantDatabase(tmp_path, {"k": 1})
    full = KLFitness(model, ids, db, {}, torch.device("cpu"))
    top = KLFitness(model, ids, db, {}, torch.device("cpu"), topk=VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.3)  # a different model than the dense one
    assert full({}, [0, 2], 20) > 0
    assert top({}, [0, 2], 20) == pytest.approx(full({}, [0, 2], 20), rel=1e-4)


# ---- the whole stage on a tiny model -----------------------------------------------------------------

SEARCH = dict(method="sparsegpt", sparsity=0.6, allocation="search", search_granularity="module", nsamples=8,
              seqlen=16, search_levels=3, search_step=0.05, search_offspring=6, search_survivors=[2, 1], search_tokens=[32, 64],
              search_windows=4)


def _calibration():
    return torch.randint(3, VOCAB, (40, 16), generator=torch.Generator().manual_seed(1))


def _prune(tmp_path, folder="db", **kw):
    model = make_tiny_model("llama")
    rep = llmprune.prune(model, None, {**SEARCH, "search_dir": str(tmp_path / folder), **kw},
                         calibration=_calibration(), progress=False)
    return model, rep


def test_search_stage_beats_or_equals_uniform_and_owl_and_reuses_its_database(tmp_path):
    model, rep = _prune(tmp_path, search_generations=3)
    s = rep.search
    kl = s["fitness_kl"]
    assert kl[s["chosen"]] <= min(kl["uniform"], kl["owl"])  # never worse by its own fitness
    assert s["variants_built"] > 0 and s["generations"] == 3
    # the per-module targets keep the budget: their size-weighted mean is the target
    mods = [m for layer in rep.layers for m in layer.modules]
    mean = sum(m.target_sparsity * m.shape[0] * m.shape[1] for m in mods) / sum(m.shape[0] * m.shape[1] for m in mods)
    assert mean == pytest.approx(0.6, abs=1e-9)
    assert abs(rep.sparsity - 0.6) < 0.01
    meta = rep.metadata()
    assert meta["allocation"] == "search" and meta["search"]["chosen"] == s["chosen"]
    assert "database" not in meta["search"]  # no local path in a published config.json
    # a second search on the same model and calibration reads every variant from disk
    model2, rep2 = _prune(tmp_path, search_generations=3)
    assert rep2.search["variants_built"] == 0
    assert rep2.search["fitness_kl"] == kl
    for (n, p), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, p2), n


def test_layer_granularity_searches_one_sparsity_per_layer_and_never_loses_to_uniform_or_owl(tmp_path):
    model, rep = _prune(tmp_path, search_generations=3, search_granularity="layer", search_step=0.1)
    s = rep.search
    assert s["granularity"] == "layer" and s["step_sparsity"] == pytest.approx(0.1)
    assert sorted(s["levels"]) == [f"layer {i}" for i in range(len(rep.layers))]
    assert s["fitness_kl"][s["chosen"]] <= min(s["fitness_kl"]["uniform"], s["fitness_kl"]["owl"])
    for layer in rep.layers:  # one target for every module of a layer
        assert len({m.target_sparsity for m in layer.modules}) == 1
    mods = [m for layer in rep.layers for m in layer.modules]
    mean = sum(m.target_sparsity * m.shape[0] * m.shape[1] for m in mods) / sum(m.shape[0] * m.shape[1] for m in mods)
    assert mean == pytest.approx(0.6, abs=1e-9)
    # module and layer searches share one database: the uniform variants are not built again
    _, again = _prune(tmp_path, search_generations=1, search_granularity="module")
    assert again.search["variants_built"] < s["variants_built"]


def test_search_stage_resumes_and_continues_with_more_generations(tmp_path):
    _, whole = _prune(tmp_path, "a", search_generations=4)
    _, first = _prune(tmp_path, "b", search_generations=2)  # stopped after two generations
    _, rest = _prune(tmp_path, "b", search_generations=4)  # the same search, resumed from its saved state
    assert first.search["generations"] == 2 and rest.search["variants_built"] == 0
    assert rest.search["history"] == whole.search["history"]
    assert rest.search["levels"] == whole.search["levels"]


def test_search_with_nm_mixes_keeps_every_group_valid(tmp_path):
    model, rep = _prune(tmp_path, pattern="4:8", sparsity=None, search_generations=2, search_levels=1)
    kept = 0
    total = 0
    for layer in model.model.layers:
        for lin in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, 8).sum(-1)  # [out, in/8]
            assert int(groups.max()) <= 5 and int(groups.min()) >= 3
            kept += int(groups.sum())
            total += lin.weight.numel()
    assert kept == total // 2  # 4:8 on average, exactly


def test_a_database_of_another_run_is_refused_with_the_fix(tmp_path):
    _prune(tmp_path, search_generations=1)
    with pytest.raises(ConfigError, match="another --search-dir"):
        _prune(tmp_path, search_generations=1, method="wanda")


def test_a_damaged_variant_file_names_the_file_and_the_fix(tmp_path):
    _prune(tmp_path, search_generations=1)
    victim = next((tmp_path / "db" / "variants").rglob("p*.safetensors"))
    victim.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="delete it"):
        _prune(tmp_path, search_generations=1)


def test_search_method_builds_the_database_with_another_pruner(tmp_path):
    _, rep = _prune(tmp_path, method="wanda", search_method="magnitude", search_generations=1)
    key = json.loads((tmp_path / "db" / "manifest.json").read_text())["key"]
    assert key["method"]["method"] == "magnitude"  # the variants are magnitude's
    assert rep.config["method"] == "wanda"  # the chosen allocation is pruned by --method
    with pytest.raises(ConfigError, match="not a pruner"):
        llmprune.PruneConfig.build(dict(allocation="search", search_method="owl"))


def test_fitness_memory_is_checked_before_any_work():
    from llmprune.pipeline.search import _check_memory

    with pytest.raises(ConfigError, match="--search-topk"):
        _check_memory(10**6, 2048, 49152, None)
    _check_memory(4, 16, VOCAB, None)  # a small one passes


def test_module_sparsity_rules_stay_out_of_the_search(tmp_path):
    model, rep = _prune(tmp_path, search_generations=1, module_sparsity={r"mlp\.down_proj": 0.3})
    mods = {m.name: m for layer in rep.layers for m in layer.modules}
    downs = [m for n, m in mods.items() if n.endswith("down_proj")]
    assert all(m.target_sparsity == 0.3 for m in downs)
    assert not any(n.endswith("down_proj") for n in rep.search["levels"])
    assert all(abs(m.sparsity - 0.3) < 0.02 for m in downs)


# ---- depth: which decoder layers to remove (structured --depth-method search) ---------------------------

DEPTH = dict(remove_layers=2, depth_method="search", nsamples=8, seqlen=16, search_generations=6,
             search_offspring=8, search_survivors=[2, 1], search_tokens=[128, 128], search_windows=8)


def test_depth_search_finds_the_best_layers_by_its_fitness_and_never_loses_to_block_influence(tmp_path):
    dense = make_tiny_model("llama", num_hidden_layers=6)
    ids = _calibration()[:8]
    fitness = SkipFitness(dense, ids, torch.device("cpu"))
    brute = {c: fitness(list(c), list(range(8)), ids.numel()) for c in combinations(range(6), 2)}
    # a skipped layer costs nothing and gives what skipping it with kl_choice's forward hook gives
    hooks = [dense.model.layers[k].register_forward_hook(_skip_hook, with_kwargs=True) for k in (1, 4)]
    with torch.no_grad():
        hooked = [kl_from_dense(fitness.dense[i], dense(ids[i:i + 1]).logits[0]) for i in range(8)]
    for h in hooks:
        h.remove()
    assert brute[(1, 4)] == pytest.approx(sum(hooked) / 8, rel=1e-6)
    assert "forward" not in vars(dense.model.layers[1])  # the layer's own forward is back
    model = make_tiny_model("llama", num_hidden_layers=6)
    rep = prune_model(model, None, llmprune.PruneConfig(**DEPTH, search_dir=str(tmp_path)),
                      calibration=_calibration(), progress=False)
    d = rep.structure["depth"]["search"]
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    gone = tuple(rep.structure["removal"]["layers"])
    assert len(gone) == 2 and d["fitness_kl"][d["chosen"]] <= d["fitness_kl"]["block-influence"]
    assert brute[gone] == pytest.approx(min(brute.values()), rel=1e-5)  # the optimum of its own fitness
    assert brute[tuple(d["start"])] == pytest.approx(d["fitness_kl"]["block-influence"], rel=1e-5)
    out = model.generate(_calibration()[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_depth_search_resumes_where_it_stopped(tmp_path):
    def run(folder, generations):
        model = make_tiny_model("llama", num_hidden_layers=6)
        cfg = llmprune.PruneConfig(**{**DEPTH, "search_generations": generations, "search_tokens": [32, 96]},
                                   search_dir=str(tmp_path / folder))
        return prune_model(model, None, cfg, calibration=_calibration(), progress=False).structure["depth"]["search"]

    whole = run("a", 5)
    assert run("b", 2)["generations"] == 2
    rest = run("b", 5)  # the saved state of the first two generations goes on
    assert rest["history"] == whole["history"] and rest["fitness_kl"] == whole["fitness_kl"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "opt", "gpt2", "mixtral", "gemma3", "qwen2_moe",
                                  "qwen3_moe"])
def test_a_skipped_layer_is_the_identity_on_every_architecture(arch):
    model = make_tiny_model(arch)
    _, layers = find_decoder_layers(model)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    fitness = SkipFitness(model, ids, torch.device("cpu"))
    assert fitness([], [0, 1], 24) == pytest.approx(0.0, abs=1e-6)
    hooks = [layers[1].register_forward_hook(_skip_hook, with_kwargs=True)]
    with torch.no_grad():
        hooked = sum(kl_from_dense(fitness.dense[i], model(ids[i:i + 1]).logits[0]) for i in range(2)) / 2
    hooks[0].remove()
    assert fitness([1], [0, 1], 24) == pytest.approx(hooked, rel=1e-5) and hooked > 0
