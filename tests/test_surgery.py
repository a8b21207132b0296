"""Structured surgery (llmprune.checkpoint.surgery) and the layer anatomy it reads (llmprune.engine.anatomy).

The equivalence the design rests on: a model whose removed heads/channels are zeroed in their consumer
(o_proj / down_proj columns) computes what the cut model computes; a model whose removed layers are identities
computes what the model without them computes; a model whose router can only pick the kept experts computes
what the model without the others computes. After every cut: the checkpoint reloads with plain transformers
(no missing or unexpected keys), has the parameter count of its config, and generates with a KV cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCH_CONFIGS, EXTRA_CONFIGS, VOCAB, make_tiny_model
from transformers import AutoModelForCausalLM

from llmprune.checkpoint.surgery import apply_removal, cut_widths, remove_layers
from llmprune.engine.anatomy import expert_modules, layer_parts, text_config
from llmprune.engine.targets import find_decoder_layers
from llmprune.structured.removal import LayerRemoval, Removal

ALL = [*ARCH_CONFIGS, *EXTRA_CONFIGS]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
NO_HEADS = {"gpt2", "opt"}  # head_dim = hidden_size // num_attention_heads


def tiny(arch: str, seed: int = 0):
    return make_tiny_model(arch, seed)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))  # [B, L]


def n_layers(model) -> int:
    return len(find_decoder_layers(model)[1])


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def check_checkpoint(model, ids, tmp_path):
    """Reloads with no missing/unexpected keys and the same logits; as many parameters as its config says;
    generates with a KV cache exactly what it generates without one."""
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    loaded.eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in fresh.parameters())
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = loaded.generate(ids[:1], use_cache=True, **kw)
    without = loaded.generate(ids[:1], use_cache=False, **kw)
    assert torch.equal(with_cache, without)


# ---------------------------------------------------------------- anatomy


@pytest.mark.parametrize("arch", ALL)
def test_anatomy_finds_the_parts(arch):
    model = tiny(arch)
    for i in range(n_layers(model)):
        parts = layer_parts(model, i)
        att = parts.attention
        assert att.n_heads == 4 and att.head_dim == 16
        assert att.n_kv_heads == (4 if arch in NO_HEADS else 2)
        assert isinstance(model.get_submodule(att.out), torch.nn.Module)
        assert (att.why_not is not None) == (arch in NO_HEADS)
        if arch in NO_HEADS:
            assert arch in att.why_not and "head_dim" in att.why_not
        moe_layer = arch in MOE and not (arch == "qwen2_moe" and i == 1)
        assert (parts.moe is not None) == moe_layer
        assert (parts.mlp is None) == moe_layer  # Qwen2-MoE's shared expert is not the layer's MLP
        if moe_layer:
            assert (parts.moe.n_experts, parts.moe.top_k, parts.moe.why_not) == (4, 2, None)
            assert parts.moe.router.endswith("mlp.gate")
        else:
            assert parts.mlp.why_not is None
            assert parts.mlp.n_channels == {"gpt2": 256, "qwen2_moe": 96}.get(arch, 128)
            assert parts.mlp.out.split(".")[-1] in ("down_proj", "fc2", "c_proj")


# ---------------------------------------------------------------- widths


def zero_consumers(model, removal: Removal) -> None:
    """What the engine does while pruning: the removed heads' and channels' consumer columns are zero."""
    with torch.no_grad():
        for i, r in removal.per_layer.items():
            parts = layer_parts(model, i)
            cols = []
            if r.heads or r.kv_heads:
                att = parts.attention
                g = att.n_heads // att.n_kv_heads
                heads = set(r.heads) | {h for kv in r.kv_heads for h in range(kv * g, (kv + 1) * g)}
                cols = [h * att.head_dim + d for h in heads for d in range(att.head_dim)]
                out = model.get_submodule(att.out)
                out.weight[:, cols] = 0
            if r.channels:
                out = model.get_submodule(parts.mlp.out)
                if type(out).__name__ == "Conv1D":  # [in, out]
                    out.weight[list(r.channels), :] = 0
                else:
                    out.weight[:, list(r.channels)] = 0


def width_removal(model, kind: str) -> Removal:
    per_layer = {}
    for i in range(n_layers(model)):
        parts = layer_parts(model, i)
        r = {}
        if parts.attention is not None and parts.attention.why_not is None:
            r = {"heads": dict(heads=(1, 3), kv_heads=()), "kv": dict(kv_heads=(0,))}[kind]
        if parts.mlp is not None:
            n = parts.mlp.n_channels
            r["channels"] = tuple(range(i % 3, n, 3))[: n // 4]  # different channels in every layer, same count
        per_layer[i] = LayerRemoval(**r)
    return Removal(per_layer=per_layer)


@pytest.mark.parametrize("kind", ["heads", "kv"])
@pytest.mark.parametrize("arch", ALL)
def test_cut_widths_equals_zeroing(arch, kind, ids, tmp_path):
    if kind == "kv" and arch in NO_HEADS:
        pytest.skip("no heads to remove on this architecture (channels alone: the 'heads' case)")
    model = tiny(arch)
    dense = logits(model, ids)
    removal = width_removal(model, kind)
    zero_consumers(model, removal)
    expected = logits(model, ids)
    assert not torch.allclose(expected, dense)  # something was removed
    before = [layer_parts(model, i) for i in range(n_layers(model))]
    cut_widths(model, removal)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    cfg = text_config(model)
    for i, parts in enumerate(before):
        after = layer_parts(model, i)
        if arch not in NO_HEADS:
            assert (after.attention.n_heads, after.attention.n_kv_heads) == {"heads": (2, 2), "kv": (2, 1)}[kind]
            assert after.attention.head_dim == parts.attention.head_dim == cfg.head_dim
            assert cfg.num_attention_heads == after.attention.n_heads
            assert cfg.num_key_value_heads == after.attention.n_kv_heads
        if parts.mlp is not None:
            assert after.mlp.n_channels == parts.mlp.n_channels - parts.mlp.n_channels // 4
    check_checkpoint(model, ids, tmp_path)


def test_cut_keeps_the_right_rows():
    """Hand-checked on Llama: kept q/k/v rows, o_proj columns and gate/up rows are the original ones."""
    model = tiny("llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, k, o, gate, down = (m.weight.detach().clone() for m in (attn.q_proj, attn.k_proj, attn.o_proj,
                                                                 mlp.gate_proj, mlp.down_proj))
    removal = Removal(per_layer={i: LayerRemoval(kv_heads=(0,), channels=(0, 5)) for i in (0, 1)})
    cut_widths(model, removal)
    torch.testing.assert_close(attn.q_proj.weight, q[32:])  # heads 2, 3 (group 1)
    torch.testing.assert_close(attn.k_proj.weight, k[16:])
    torch.testing.assert_close(attn.o_proj.weight, o[:, 32:])
    keep = [j for j in range(128) if j not in (0, 5)]
    torch.testing.assert_close(mlp.gate_proj.weight, gate[keep])
    torch.testing.assert_close(mlp.down_proj.weight, down[:, keep])
    assert (attn.num_key_value_groups, mlp.gate_proj.out_features, mlp.down_proj.in_features) == (2, 126, 126)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (
        2, 1, 126)


def test_heads_cannot_be_removed_where_the_config_derives_head_dim():
    for arch in sorted(NO_HEADS):
        model = tiny(arch)
        size = sum(p.numel() for p in model.parameters())
        with pytest.raises(ValueError, match=rf"attention heads.*{arch}.*head_dim"):
            apply_removal(model, Removal(per_layer={0: LayerRemoval(heads=(1,)), 1: LayerRemoval(heads=(1,))}))
        assert sum(p.numel() for p in model.parameters()) == size  # untouched


def test_widths_must_agree_across_layers():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"MLP channels kept differ across layers \(layer 0: 126, layer 1: 128\)"):
        cut_widths(model, Removal(per_layer={0: LayerRemoval(channels=(0, 1))}))
    with pytest.raises(ValueError, match=r"query heads kept per key/value group differ \(\{0: 1, 1: 2\}\)"):
        cut_widths(model, Removal(per_layer={i: LayerRemoval(heads=(0,)) for i in (0, 1)}))
    with pytest.raises(ValueError, match=r"out of range"):
        cut_widths(model, Removal(per_layer={i: LayerRemoval(channels=(128,)) for i in (0, 1)}))
    assert model.config.intermediate_size == 128 and model.model.layers[0].mlp.down_proj.in_features == 128
    # a dense layer among MoE layers (Qwen2-MoE's mlp_only_layers) loses channels alone
    moe = tiny("qwen2_moe")
    cut_widths(moe, Removal(per_layer={1: LayerRemoval(channels=tuple(range(8)))}))
    assert moe.config.intermediate_size == 88 and moe.config.moe_intermediate_size == 32


# ---------------------------------------------------------------- experts


@pytest.mark.parametrize("arch", MOE)
def test_cut_experts_routes_among_the_kept(arch, ids, tmp_path):
    """The cut router's logits are the kept rows of the original router's; the cut model equals the original
    whose router picks (and weighs) among the kept experts only, the experts renumbered back."""
    model = tiny(arch)
    cut = copy.deepcopy(model)
    gone = (1,)
    moe_layers = [i for i in range(n_layers(model)) if layer_parts(model, i).moe is not None]
    cut_widths(cut, Removal(per_layer={i: LayerRemoval(experts=gone) for i in moe_layers}))
    kept = torch.tensor([e for e in range(4) if e not in gone])
    hooks = []
    for i in moe_layers:
        _, experts, router = expert_modules(model, layer_parts(model, i).moe)
        _, cut_experts, cut_router = expert_modules(cut, layer_parts(cut, i).moe)
        torch.testing.assert_close(cut_router.weight, router.weight[kept])
        torch.testing.assert_close(cut_experts.down_proj, experts.down_proj[kept])
        torch.testing.assert_close(cut_experts.gate_up_proj, experts.gate_up_proj[kept])
        assert cut_experts.num_experts == cut_router.num_experts == 3

        def pick_kept(mod, args, output, cut_router=cut_router):
            router_logits, scores, index = cut_router(*args)
            torch.testing.assert_close(router_logits, output[0][:, kept])
            return output[0], scores, kept[index]

        hooks.append(router.register_forward_hook(pick_kept))
    expected = logits(model, ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(logits(cut, ids), expected, atol=1e-5, rtol=1e-5)
    key = "num_local_experts" if arch == "mixtral" else "num_experts"
    assert getattr(cut.config, key) == 3 and cut.config.num_experts_per_tok == 2
    check_checkpoint(cut, ids, tmp_path)


def test_top_k_stays_within_the_experts(ids, tmp_path):
    model = tiny("mixtral")
    apply_removal(model, Removal(per_layer={i: LayerRemoval(experts=(0, 2, 3)) for i in (0, 1)}))
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (1, 1)
    assert model.model.layers[0].mlp.gate.top_k == 1
    check_checkpoint(model, ids, tmp_path)
    with pytest.raises(ValueError, match=r"experts kept differ across layers \(layer 0: 1, layer 1: 0\)|every expert"):
        apply_removal(tiny("mixtral"), Removal(per_layer={0: LayerRemoval(experts=(0,)),
                                                          1: LayerRemoval(experts=(0, 1, 2, 3))}))
    with pytest.raises(ValueError, match=r"experts kept differ across layers \(layer 0: 3, layer 1: 4\)"):
        apply_removal(tiny("mixtral"), Removal(per_layer={0: LayerRemoval(experts=(0,))}))


# ---------------------------------------------------------------- layers


def skip_layers(model, gone):
    """Forward hooks that make the ``gone`` layers identities (their output is their input)."""
    _, layers = find_decoder_layers(model)

    def identity(mod, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return [layers[i].register_forward_hook(identity, with_kwargs=True) for i in gone]


@pytest.mark.parametrize("arch", ALL)
def test_remove_layers_equals_identity_layers(arch, ids, tmp_path):
    model = tiny(arch)
    n = n_layers(model)
    gone = [0] if n == 2 else [1]
    hooks = skip_layers(model, gone)
    expected = logits(model, ids)
    for h in hooks:
        h.remove()
    types = getattr(model.config, "layer_types", None)
    remove_layers(model, gone)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    cfg = model.config
    assert cfg.num_hidden_layers == n_layers(model) == n - 1
    if types is not None:
        assert cfg.layer_types == [t for i, t in enumerate(types) if i not in gone]
    for j, layer in enumerate(find_decoder_layers(model)[1]):
        assert all(m.layer_idx == j for m in layer.modules() if hasattr(m, "layer_idx"))
    if arch == "qwen2_moe":  # layer 1 was the dense one: every layer left is sparse
        assert cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1
    check_checkpoint(model, ids, tmp_path)


def test_apply_removal_maps_original_indices(ids, tmp_path):
    """Layers and widths together on Gemma 3 (sliding, global, sliding): per_layer keys are original indices."""
    model = tiny("gemma3")
    removal = Removal(layers=(0,), per_layer={i: LayerRemoval(heads=(0, 2), channels=tuple(range(i, 128, 4)))
                                              for i in (1, 2)})
    zero_consumers(model, removal)
    hooks = skip_layers(model, removal.layers)
    expected = logits(model, ids)
    for h in hooks:
        h.remove()
    apply_removal(model, removal)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (2, 96)
    check_checkpoint(model, ids, tmp_path)
    with pytest.raises(ValueError, match=r"per_layer names layers \[0\], which removal.layers removes"):
        apply_removal(tiny("gemma3"), Removal(layers=(0,), per_layer={0: LayerRemoval(channels=(1,))}))
    with pytest.raises(ValueError, match=r"keep at least one"):
        remove_layers(tiny("llama"), [0, 1])
