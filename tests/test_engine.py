"""The sequential engine on tiny models of every supported architecture: exact replay, measured
sparsity of every target, untouched non-targets, N:M along the input dimension, target filters,
one-pass vs two-pass, and restored model state."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from torch import nn

import llmprune
from llmprune import engine
from llmprune.engine import find_decoder_layers, run_sequential
from llmprune.pruners import get_pruner

DECODER_LAYERS = {"gpt2": "transformer.h", "opt": "model.decoder.layers"}  # others: model.layers




def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


def decoder_targets(model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """Every prunable weight inside the decoder layers as ``W [out, in]`` (a view, not a copy):
    nn.Linear and GPT-2 Conv1D weights, and each expert of fused 3-D MoE parameters."""
    path = DECODER_LAYERS.get(arch, "model.layers")
    layers = model.get_submodule(path)
    out = {}
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            prefix = f"{path}.{i}.{name}"
            if isinstance(mod, nn.Linear):
                out[prefix] = mod.weight.data
            elif _is_conv1d(mod):
                out[prefix] = mod.weight.data.T  # Conv1D stores [in, out]
            for p in ("gate_up_proj", "down_proj"):
                param = getattr(mod, p, None)
                if isinstance(param, nn.Parameter) and param.dim() == 3:  # [experts, out, in]
                    out.update({f"{prefix}.{p}[{e}]": param.data[e] for e in range(param.shape[0])})
    return out


def sparsity(W: torch.Tensor) -> float:
    return float((W == 0).float().mean())


def _prune(model, calib_ids, **kwargs):
    kwargs = {"method": "wanda", "nsamples": calib_ids.shape[0], "seqlen": calib_ids.shape[1],
              "device": "cpu", **kwargs}
    return llmprune.prune(model, None, calibration=calib_ids, progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# Replay equivalence
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def chunks_of_two(monkeypatch, calib_ids):
    """CPU forwards in chunks of 2 samples, so one-pass runs its chunks in lockstep."""
    monkeypatch.setattr(engine.lockstep, "CPU_CHUNK_TOKENS", 2 * calib_ids.shape[1])


@pytest.fixture
def tight_memory(monkeypatch):
    """Free memory too small for every chunk's activations at once: within-layer order is replayed."""
    monkeypatch.setattr(engine.passes, "plan_batch_size", lambda n, *a, **k: 1)


@pytest.mark.parametrize("mode", ["one-forward", "lockstep", "replay", "two-pass"])
@pytest.mark.parametrize("arch", ARCHS)
def test_replay_at_sparsity_zero_equals_forward(arch, mode, calib_ids, request):
    chunk, batch_size, sequential = calib_ids.shape[0], None, "within-layer"
    if mode in ("lockstep", "replay"):
        request.getfixturevalue("chunks_of_two")
        chunk = 2
    if mode == "replay":
        request.getfixturevalue("tight_memory")
    if mode == "two-pass":
        batch_size, sequential = 4, "dense-layer"
    model = make_tiny_model(arch)
    with torch.no_grad():
        ref_logits = model(calib_ids).logits  # [n, L, V]
    layers_name, layers = find_decoder_layers(model)
    assert layers_name == DECODER_LAYERS.get(arch, "model.layers")

    # record every decoder layer's outputs as the engine replays it
    outs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(layers)
    ]
    run_sequential(model, calib_ids, get_pruner("wanda"), lambda name: 0.0, batch_size=batch_size, progress=False,
                   sequential=sequential)
    for h in hooks:
        h.remove()
    n_chunks = -(-calib_ids.shape[0] // (chunk if batch_size is None else batch_size))
    # two-pass: statistics, then outputs; a replayed chunk's stopped forwards never return; lockstep
    # learns the call order from one dense forward of the first layer per chunk
    expected_calls = 2 * n_chunks if mode == "two-pass" else n_chunks
    assert all(len(v) == expected_calls + (n_chunks if mode == "lockstep" and i == 0 else 0)
               for i, v in outs.items())
    replayed = {i: torch.cat(v[-n_chunks:]) for i, v in outs.items()}  # [n, L, H]

    # the model's own forward, each layer's output checked against the replay; the last layer's
    # output is replaced by the replayed one, so the logits come from the replay
    def check(i):
        def hook(m, a, o):
            h = o[0] if isinstance(o, tuple) else o
            torch.testing.assert_close(replayed[i], h, atol=1e-5, rtol=0)
            if i == len(layers) - 1:
                return (replayed[i], *o[1:]) if isinstance(o, tuple) else replayed[i]

        return hook

    hooks = [layer.register_forward_hook(check(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            replay_logits = model(calib_ids).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(replay_logits, ref_logits, atol=1e-5, rtol=0)
    with torch.no_grad():  # and sparsity 0 leaves the weights alone
        torch.testing.assert_close(model(calib_ids).logits, ref_logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Wanda 50 % on every architecture, in one and two passes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sequential", ["within-layer", "dense-layer"])
@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_half_prunes_every_target_and_nothing_else(arch, sequential, calib_ids, caplog):
    model = make_tiny_model(arch)
    model.train()  # the engine must put it back as it found it
    model.config.use_cache = True
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)

    with caplog.at_level(logging.INFO, logger="llmprune.engine"):
        report = _prune(model, calib_ids, sequential=sequential, batch_size=None if sequential == "within-layer" else 4)
    assert ("within-layer order, one forward per layer" if sequential == "within-layer"
            else "dense-layer order, two passes per layer") in caplog.text

    assert model.training and model.config.use_cache is True
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads

    targets = decoder_targets(model, arch)
    if arch == "mixtral":
        assert any("experts.gate_up_proj[3]" in n for n in targets)
        assert any("experts.down_proj[0]" in n for n in targets)
    for name, W in targets.items():
        assert sparsity(W) == 0.5, name
    assert {m.name for m in report.modules} == set(targets)
    assert all(m.sparsity == 0.5 and m.target_sparsity == 0.5 for m in report.modules)
    assert report.sparsity == pytest.approx(0.5)
    assert report.pruned_params == sum(W.numel() for W in targets.values())

    # embeddings, lm_head, norms, biases, routers: untouched
    target_params = {n.split("[")[0] if "[" in n else f"{n}.weight" for n in targets}
    ref_params = dict(ref.named_parameters())
    untouched = [n for n in ref_params if n not in target_params]
    assert any("embed" in n or "wte" in n for n in untouched)
    for name, p in model.named_parameters():
        if name not in target_params:
            assert torch.equal(p, ref_params[name]), name
    assert torch.equal(model.get_output_embeddings().weight, ref.get_output_embeddings().weight)
    assert torch.equal(model.get_input_embeddings().weight, ref.get_input_embeddings().weight)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_magnitude_needs_no_calibration(arch):
    model = make_tiny_model(arch)
    ref = decoder_targets(copy.deepcopy(model), arch)
    report = llmprune.prune(model, None, method="magnitude", device="cpu", progress=False)
    assert report.calibration["source"] is None and report.calibration["nsamples"] == 0
    for name, W in decoder_targets(model, arch).items():
        assert sparsity(W) == 0.5, name
        kept = W != 0
        assert torch.equal(W[kept], ref[name][kept])  # kept weights unchanged
        assert ref[name][kept].abs().min() >= ref[name][~kept].abs().max()  # the largest |w| of the matrix


def test_state_restored_in_eval_and_without_cache(calib_ids):
    model = make_tiny_model("llama")
    model.eval()
    model.config.use_cache = False
    _prune(model, calib_ids)
    assert not model.training and model.config.use_cache is False


# ----------------------------------------------------------------------------------------------
# N:M through the engine, including GPT-2's transposed Conv1D
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsegpt_2of4_groups_along_the_input_dimension(arch, calib_ids):
    model = make_tiny_model(arch)
    report = _prune(model, calib_ids, method="sparsegpt", pattern="2:4")
    targets = decoder_targets(model, arch)
    assert len(report.modules) == len(targets)
    for name, W in targets.items():  # W [out, in]: for Conv1D this is weight.T, groups along weight dim 0
        out, inp = W.shape
        kept = (W != 0).reshape(out, inp // 4, 4).sum(-1)  # [out, groups]
        assert torch.all(kept == 2), name
    if arch == "gpt2":
        # the stored Conv1D weight is [in, out]: the groups run down its columns, not along its rows
        c_fc = model.transformer.h[0].mlp.c_fc.weight  # [64, 256]
        assert torch.all((c_fc != 0).reshape(-1, 4, c_fc.shape[1]).sum(1) == 2)
        assert not torch.all((c_fc != 0).reshape(c_fc.shape[0], -1, 4).sum(-1) == 2)
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids).logits).all()


# ----------------------------------------------------------------------------------------------
# targets / ignore
# ----------------------------------------------------------------------------------------------


def test_targets_regex_prunes_only_matching_modules(calib_ids):
    model = make_tiny_model("llama")
    ref = decoder_targets(copy.deepcopy(model), "llama")
    report = _prune(model, calib_ids, targets=r"mlp\.")
    pruned = {m.name for m in report.modules}
    assert pruned and all(".mlp." in n for n in pruned)
    assert len(pruned) == 2 * 3  # gate, up, down in each of the 2 layers
    for name, W in decoder_targets(model, "llama").items():
        if ".mlp." in name:
            assert sparsity(W) == 0.5, name
        else:
            assert torch.equal(W, ref[name]), name


@pytest.mark.parametrize(
    "arch, ignore, dense", [("llama", "down_proj", "down_proj"), ("mixtral", r"experts\.down_proj", "experts.down_proj")]
)
def test_ignore_regex_leaves_modules_dense(calib_ids, arch, ignore, dense):
    model = make_tiny_model(arch)
    ref = decoder_targets(copy.deepcopy(model), arch)
    report = _prune(model, calib_ids, ignore=ignore)
    assert not any(dense in m.name for m in report.modules)
    for name, W in decoder_targets(model, arch).items():
        if dense in name:
            assert torch.equal(W, ref[name]), name
        else:
            assert sparsity(W) == 0.5, name


def test_no_matching_target_is_an_error(calib_ids):
    model = make_tiny_model("llama")
    ref = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"targets='nomatch' ignore='q_proj'"):
        _prune(model, calib_ids, targets="nomatch", ignore="q_proj")
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------------------------
# One pass is true-sequential inside the layer
# ----------------------------------------------------------------------------------------------


def test_one_pass_is_true_sequential(calib_ids):
    """In one pass o_proj sees the outputs of the already-pruned q/k/v, in two passes the dense
    ones: q_proj (same inputs either way) comes out the same, o_proj differently."""
    one, two = make_tiny_model("llama"), make_tiny_model("llama")
    _prune(one, calib_ids, method="sparsegpt", batch_size=None)
    _prune(two, calib_ids, method="sparsegpt", batch_size=3, sequential="dense-layer")
    a1, a2 = one.model.layers[0].self_attn, two.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        w1, w2 = getattr(a1, name).weight, getattr(a2, name).weight
        assert torch.equal(w1 == 0, w2 == 0), name
        torch.testing.assert_close(w1, w2, atol=1e-5, rtol=0)
    assert not torch.equal(a1.o_proj.weight == 0, a2.o_proj.weight == 0)
    assert (a1.o_proj.weight - a2.o_proj.weight).abs().max() > 1e-3
    for m in (a1.o_proj, a2.o_proj):
        assert sparsity(m.weight) == 0.5


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral", "gemma2"])
def test_lockstep_chunks_prune_like_the_whole_batch(arch, method, calib_ids, monkeypatch):
    """One pass over chunks in lockstep (each chunk's forward parks at every target until all
    chunks have added their inputs) gives the masks and weights of one pass over the whole
    batch at once, routed experts included; only summation order differs."""
    whole, chunked = make_tiny_model(arch), make_tiny_model(arch)
    ra = _prune(whole, calib_ids, method=method, pattern="2:4")
    monkeypatch.setattr(engine.lockstep, "CPU_CHUNK_TOKENS", 2 * calib_ids.shape[1])
    rb = _prune(chunked, calib_ids, method=method, pattern="2:4")
    a, b = decoder_targets(whole, arch), decoder_targets(chunked, arch)
    assert a.keys() == b.keys()
    assert [(m.name, m.tokens) for m in ra.modules] == [(m.name, m.tokens) for m in rb.modules]  # same routing
    if arch == "mixtral" and method == "sparsegpt":
        # an expert sees ~40 tokens for 64 inputs: its damped Hessian is so ill-conditioned that
        # summation order flips a few OBS choices (and the next module's inputs with them)
        same = sum(int(torch.eq(a[k] == 0, b[k] == 0).sum()) for k in a) / sum(a[k].numel() for k in a)
        assert same > 0.97
        a = {k: v for k, v in a.items() if "experts" not in k}
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0), name
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method, pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral", "gemma2"])
def test_replayed_chunks_prune_exactly_like_lockstep(arch, method, pattern, calib_ids, chunks_of_two,
                                                     monkeypatch, caplog):
    """Whether the chunks of the within-layer order run in lockstep or are replayed depends on free
    memory; the masks and weights must not: the same statistics in the same summation order."""
    lock, replay = make_tiny_model(arch), make_tiny_model(arch)
    ra = _prune(lock, calib_ids, method=method, pattern=pattern)
    monkeypatch.setattr(engine.passes, "plan_batch_size", lambda n, *a, **k: 1)
    with caplog.at_level(logging.INFO, logger="llmprune.engine"):
        rb = _prune(replay, calib_ids, method=method, pattern=pattern)
    assert (ra.execution, rb.execution) == ("lockstep", "replay") and "within-layer order, replay" in caplog.text
    for k, v in lock.state_dict().items():
        assert torch.equal(replay.state_dict()[k], v), k
    assert ra.masks_sha256 == rb.masks_sha256
    meta = rb.metadata()
    assert (meta["sequential"], meta["execution"], meta["masks_sha256"]) == ("within-layer", "replay", rb.masks_sha256)


def test_execution_setting_overrides_free_memory(calib_ids, chunks_of_two, monkeypatch):
    """``execution='replay'`` / ``'lockstep'`` choose the path whatever the free memory; same weights."""
    from llmprune.config import ConfigError, PruneConfig

    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    ra = _prune(a, calib_ids, method="sparsegpt", execution="replay")
    monkeypatch.setattr(engine.passes, "plan_batch_size", lambda n, *a, **k: 1)  # would replay on its own
    rb = _prune(b, calib_ids, method="sparsegpt", execution="lockstep")
    assert (ra.execution, rb.execution) == ("replay", "lockstep")
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="execution"):
        PruneConfig.build({"execution": "fast"})


def test_masks_hash_tells_masks_apart(calib_ids):
    a, b = (_prune(make_tiny_model("llama"), calib_ids, sparsity=s) for s in (0.5, 0.6))
    assert a.masks_sha256 != b.masks_sha256 and len(a.masks_sha256) == 64
    assert a.masks_sha256 == _prune(make_tiny_model("llama"), calib_ids, sparsity=0.5).masks_sha256


def test_hidden_states_spill_to_a_file_when_memory_is_short(calib_ids, monkeypatch, caplog):
    ref = make_tiny_model("llama")
    _prune(ref, calib_ids)
    model = make_tiny_model("llama")
    monkeypatch.setattr(engine.passes, "SPILL_FRACTION", 0.0)
    with caplog.at_level(logging.INFO, logger="llmprune.engine"):
        _prune(model, calib_ids)
    assert "spilled to a file" in caplog.text
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_sparsegpt_beats_magnitude_on_the_model(calib_ids):
    """The per-module relative errors the engine reports follow the methods' quality."""
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        model = make_tiny_model("llama")
        report = _prune(model, calib_ids, method=method)
        errs[method] = [m.error for m in report.modules]
        assert all(math.isfinite(e) and e >= 0 for e in errs[method])  # measured, not NaN
    assert sum(errs["sparsegpt"]) < sum(errs["magnitude"])


def test_bfloat16_model_keeps_its_dtype(calib_ids):
    model = make_tiny_model("llama").to(torch.bfloat16)
    _prune(model, calib_ids, method="sparsegpt")
    for name, W in decoder_targets(model, "llama").items():
        assert W.dtype == torch.bfloat16
        assert sparsity(W) == 0.5, name
