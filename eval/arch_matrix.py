"""Every causal-LM architecture transformers registers, pruned: which work, which llmprune refuses, which fail.

For each ``model_type -> class`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the run builds the config class
with tiny sizes (:func:`tiny_config`: every size-like field the class declares, found by name, plus a few
overrides per family), builds the model with ``AutoModelForCausalLM.from_config`` under
``torch.manual_seed(0)``, runs the dense model once, prunes it with Wanda 50 % on a random
``LongTensor [4, 16]``, saves it with ``save_pretrained``, reloads it with ``from_pretrained`` and checks
that the reloaded logits equal the pruned model's and that the pruned weights are 50 % zeros.

Each architecture runs in its own forked process (the parent has imported torch, transformers and llmprune
once: a fresh interpreter costs ~9 s here) with a timeout, two at a time. The outcome of each:

- ``works``: pruned, reloaded, same logits, sparsity 0.5;
- ``refused``: llmprune raised its own error (the first line is kept);
- ``fails``: anything else, with the stage it failed at. ``tiny config`` when the dense model does not
  build or run (nothing to do with llmprune), ``llmprune`` when it fails inside or after pruning a model
  that runs, ``transformers`` when a dense model's save/reload round trip fails the same way;
- ``skipped``: an extra package is missing, or a multimodal / encoder-decoder wrapper that does not build
  from the tiny text config.

Usage (from the repository root)::

    python eval/arch_matrix.py                      # every model type -> eval/results/architectures.{md,json}
    python eval/arch_matrix.py --only llama gpt2    # a few, printed, nothing written unless --out is given
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import machine  # noqa: E402  (one machine line for every benchmark)

import llmprune
from llmprune.engine import UnsupportedModelError, capture_layer_inputs, find_decoder_layers, inference_state

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RESULTS = ROOT / "eval" / "results"
NSAMPLES, SEQLEN = 4, 16
SPARSITY = 0.5
VOCAB = 256

# ---- tiny configs ---------------------------------------------------------------------------------
# Size-like fields by name: the value a 2-layer, 64-wide model gets. Only fields the config class declares
# (its __init__ parameters) are set; a field whose default is None stays None unless marked below.
SIZES = {
    # width
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "embedding_dim", "model_dim",
                     "n_embed", "word_embed_proj_dim", "emb_dim", "embedding_size", "d_embed"), 64),
    # depth
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_blocks",
                     "num_decoder_layers", "encoder_layers"), 2),
    # heads
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "num_attention_heads_per_layer"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                     "num_query_groups", "n_head_kv", "num_kv_groups"), 2),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "d_head", "attention_head_size",
                     "swa_head_dim", "global_head_dim"), 16),
    # feed-forward
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "decoder_ffn_dim",
                     "encoder_ffn_dim", "d_inner", "inner_hidden_size", "mlp_dim", "dense_intermediate_size",
                     "ffn_inner_dim", "feed_forward_size", "intermediate_size_mlp"), 128),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
                     "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "shared_intermediate_size",
                     "expert_ffn_dim", "moe_dim", "intermediate_size_moe"), 32),
    # vocabulary and positions
    "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "unpadded_vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
                     "seq_length", "max_sequence_length", "max_seq_length", "original_max_position_embeddings",
                     "block_size", "max_length"), 128),
    # experts
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_selected_experts", "moe_k", "top_k",
                     "num_experts_per_token", "router_topk"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    "first_k_dense_replace": 1,  # one dense layer, one MoE layer
    # local attention
    **dict.fromkeys(("sliding_window", "attention_chunk_size", "sliding_window_size", "local_window_size",
                     "window_size", "attention_window"), 8),
    # latent attention (DeepSeek MLA)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    # linear attention / state-space
    **dict.fromkeys(("linear_num_key_heads", "linear_num_value_heads", "mamba_n_heads", "n_mamba_heads",
                     "num_linear_heads", "ssm_num_heads", "mamba_num_heads"), 4),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "mamba_d_head", "mamba_headdim",
                     "mamba_head_dim", "ssm_head_dim"), 16),
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size", "d_state"), 8),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank", "dt_rank"), 8),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size", "ssm_chunk_size"), 16),
    "mamba_d_ssm": 64, "attention_hidden_size": 64, "hidden_size_per_layer_input": 16, "laurel_rank": 8,
    "num_kv_shared_layers": 0, "adapter_rank": 8, "lru_width": 64, "conv1d_width": 4, "rotary_dim": 8,
    # vision towers of multimodal wrappers
    **dict.fromkeys(("image_size",), 32), **dict.fromkeys(("patch_size",), 8),
}
# Fields set even when the default is None (the model reads them as they are), and fields left None.
_SET_WHEN_NONE = {"head_dim", "num_key_value_heads", "rotary_dim"}
_NONE_STAYS = {"sliding_window", "attention_chunk_size", "sliding_window_size", "attention_window"}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
             "cls_token_id", "mask_token_id", "unk_token_id")
LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "layers_type", "attn_type_list", "hybrid_override_pattern")

# Per-family fields on top of the generic ones (a family's own constraints between sizes).
OVERRIDES: dict[str, dict] = {
    "falcon_mamba": dict(state_size=8, time_step_rank=8),
    "mamba": dict(state_size=8, time_step_rank=8),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, state_size=8, chunk_size=16, expand=2),
    "bamba": dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_expand=2, attn_layer_indices=[1]),
    "nemotron_h": dict(mamba_num_heads=8, mamba_head_dim=16, n_groups=1, expand=2, hybrid_override_pattern="M*"),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_expand=2),
    "falcon_h1": dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_expand=2, mamba_d_ssm=128),
    "zamba": dict(mamba_expand=2, n_mamba_heads=2, layers_block_type=["hybrid", "hybrid"],
                  attention_hidden_size=128, attention_head_dim=32),  # attention on [hidden, embeddings]
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "reformer": dict(attn_layers=["local", "lsh"], axial_pos_shape=[8, 16], axial_pos_embds_dim=[32, 32],
                     local_attn_chunk_length=8, lsh_attn_chunk_length=8, num_buckets=4, is_decoder=True),
    "xlnet": dict(d_head=16),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "zaya": dict(num_experts_per_tok=1),
    "kolibri1_1": dict(index_num_heads=1),
    "dots1": dict(num_local_experts=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    "dots3_note_text": dict(num_key_value_heads=4),
    "deepseek_v2": dict(num_experts_per_tok=2),
    "longcat_flash": dict(head_dim=8),
    "blt": dict(encoder_hash_byte_group_vocab=64),
    "dbrx": dict(attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # clip None fails
                 ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=2),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "rwkv": dict(attention_hidden_size=64, intermediate_size=128),
}


# What a model needs after it is built (not in its config).
AFTER_BUILD = {
    "xmod": lambda model: model.set_default_language("en_XX"),
}


def _init_fields(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs", "args"}


def _pick_layers(values: list, n: int) -> list:
    """``n`` entries of a per-layer list of kinds, as varied as the list (a hybrid keeps both kinds)."""
    out = [values[0]]
    for v in values[1:]:
        if len(out) == n:
            break
        if v not in out:
            out.append(v)
    while len(out) < n:
        out.append(values[len(out) % len(values)])
    return out


def tiny_kwargs(cls, model_type: str | None = None) -> dict:
    """Keyword arguments that make ``cls`` a tiny config: the size-like fields it declares (:data:`SIZES`),
    its per-layer lists shortened, and the :data:`OVERRIDES` of ``model_type``."""
    fields = _init_fields(cls)
    kw = _generic_kwargs(cls, fields)
    kw.update({k: v for k, v in OVERRIDES.get(model_type or "", {}).items() if k in fields})
    return kw


def _generic_kwargs(cls, fields: set[str]) -> dict:
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - a config needing arguments: set what can be set
        default = None

    def get(name: str):
        try:
            return getattr(default, name, None)
        except Exception:  # noqa: BLE001 - per-layer attributes refuse a global read (Gemma 4)
            return None

    kw: dict = {}
    n_layers_default = None
    mla = "kv_lora_rank" in fields
    for name in fields:
        value = get(name)
        if name in SIZES:
            if isinstance(value, bool) or (mla and name == "head_dim"):  # MLA derives head_dim
                continue
            if value is None and default is not None and (name in _NONE_STAYS or name not in _SET_WHEN_NONE):
                continue
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                kw[name] = [SIZES[name]] * 2
            elif isinstance(value, int) or value is None:
                kw[name] = SIZES[name]
                if name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") and isinstance(value, int):
                    n_layers_default = value
    for name in TOKEN_IDS:
        if name in fields and default is not None:
            value = get(name)
            if isinstance(value, int) and value >= VOCAB:
                kw[name] = {"pad_token_id": 0, "bos_token_id": 1, "decoder_start_token_id": 1}.get(name, 2)
            elif isinstance(value, (list, tuple)) and any(isinstance(v, int) and v >= VOCAB for v in value):
                kw[name] = 2
    if default is not None:  # per-layer lists: shortened to the tiny depth
        for name in fields - set(kw):
            value = get(name)
            if isinstance(value, (list, tuple)) and n_layers_default and len(value) == n_layers_default:
                if name in LAYER_LISTS or all(isinstance(v, str) for v in value):
                    kw[name] = _pick_layers(list(value), 2)
                else:
                    kw[name] = list(value[:2])
            elif isinstance(value, str) and name in LAYER_LISTS and n_layers_default and len(value) == n_layers_default:
                kw[name] = "".join(_pick_layers(list(value), 2))
    if "is_decoder" in fields:  # BERT-like models as causal LMs: causal attention, as the warning asks
        kw["is_decoder"] = True
    if mla and "num_attention_heads" in kw:  # latent attention: keys and values have every query head
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    return kw


def tiny_config(model_type: str):
    """The config of ``model_type`` with tiny sizes; composite configs get tiny sub-configs."""
    cls = CONFIG_MAPPING[model_type]
    kw = tiny_kwargs(cls, model_type)
    subs = getattr(cls, "sub_configs", None) or {}
    default = None
    for key, sub in subs.items():
        if not isinstance(sub, type):
            continue
        if not _init_fields(sub) - {"transformers_version"} or sub.__name__ == "AutoConfig":
            # AutoConfig: the class is the one of the composite's default sub-config
            if default is None:
                default = cls()
            sub = type(getattr(default, key, None) or sub)
            if sub.__name__ == "AutoConfig":
                continue
        kw[key] = sub(**tiny_kwargs(sub, getattr(sub, "model_type", "") or ""))
    kw.update({k: v for k, v in OVERRIDES.get(model_type, {}).items() if k in subs})
    return cls(**kw)


# ---- one architecture (runs in a forked child) ----------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _where(e: BaseException) -> str:
    """``file:line`` of the innermost frame, relative to the package it lies in."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    path = f.filename
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{f.lineno}"


def _raised_by_llmprune(e: BaseException) -> bool:
    """llmprune's own refusal: an error raised by a ``raise`` in the llmprune package (not a crash in it)."""
    if isinstance(e, UnsupportedModelError):
        return True
    tb = traceback.extract_tb(e.__traceback__)
    return bool(tb) and "/llmprune/" in tb[-1].filename and isinstance(e, ValueError) \
        and (tb[-1].line or "").lstrip().startswith("raise")


def calibration_ids(vocab: int):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (NSAMPLES, SEQLEN), generator=g)  # [n, L]


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def pruned_sparsity(model, report) -> float:
    """Zeros over the weights the report says were pruned, read from ``model`` (the reloaded copy)."""
    zeros = total = 0
    for m in report.modules:
        name, index = m.name, None
        if name.endswith("]"):
            name, _, rest = name[:-1].rpartition("[")
            index = int(rest)
            W = model.get_parameter(name)[index]
        else:
            W = model.get_parameter(f"{name}.weight")
        zeros += int((W == 0).sum())
        total += W.numel()
    return zeros / max(total, 1)


def replay_difference(model, ids) -> float | None:
    """Largest difference between each decoder layer's input in the model's own forward (a forward pre-hook)
    and in the engine's replay (its capture, then layer after layer on the dense weights): 0.0 when the
    engine feeds every layer what the model does; None when the engine refuses the model."""
    _, layers = find_decoder_layers(model)
    real: list = []

    def pre_hook(mod, args, kwargs):
        real.append(args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v)))

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    try:
        with inference_state(model):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    real = real[:len(layers)]
    with inference_state(model):
        try:
            hidden, calls = capture_layer_inputs(model, layers, [ids], torch.device("cpu"))
        except UnsupportedModelError:
            return None
        h, worst = hidden[0], 0.0
        for i, layer in enumerate(layers):
            if h.shape != real[i].shape:
                return float("inf")
            worst = max(worst, float((h.float() - real[i].float()).abs().max()))
            h = calls[0][i](layer, h)
    return worst


def build(model_type: str):
    config = tiny_config(model_type)
    with torch.device("meta"):
        n = sum(p.numel() for p in _from_config(config, model_type).parameters())
    if n > 40_000_000:
        raise RuntimeError(f"tiny config still has {n / 1e6:.0f} M parameters")
    torch.manual_seed(0)
    model = _from_config(config, model_type).eval()
    if model_type in AFTER_BUILD:
        AFTER_BUILD[model_type](model)
    return model


def _from_config(config, model_type: str):
    """``AutoModelForCausalLM.from_config``; for a composite config whose causal-LM class takes one of its
    sub-configs (Musicgen's decoder), that class built from that sub-config."""
    try:
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, AttributeError, TypeError):
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
        subs = getattr(type(config), "sub_configs", None) or {}
        part = next((getattr(config, k) for k in subs if cls is not None
                     and isinstance(getattr(config, k, None), cls.config_class)), None)
        if part is None:
            raise
        return cls._from_config(part)


def reload(model, folder: str):
    """``AutoModelForCausalLM.from_pretrained``, or the model's own class where the Auto class does not map the
    config it saved (a text config of a multimodal family: Emu3, Mllama)."""
    try:
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        return type(model).from_pretrained(folder).eval()


def run_one(model_type: str, class_name: str) -> dict:
    """Build, run, prune, save, reload and compare one architecture; the outcome as a dict."""
    rec: dict = {"model_type": model_type, "class": class_name, "status": None, "stage": "config", "reason": ""}
    subs = list(getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or [])
    # a wrapper of several models (towers, encoders, a drafter's text config), not a config split in parts (DBRX)
    composite = any(k in ("text_config", "vision_config", "audio_config", "decoder", "encoder_config",
                          "patcher_config") for k in subs)
    try:
        rec["stage"] = "build"
        model = build(model_type)
        rec["params"] = sum(p.numel() for p in model.parameters())
        rec["layers"] = find_decoder_layers(model)[0]
        rec["stage"] = "dense forward"
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", VOCAB)  # Musicgen: one per codebook
        ids = calibration_ids(min(vocab, VOCAB))
        _logits(model, ids[:1])
    except ImportError as e:
        return {**rec, "status": "skipped", "reason": f"needs a package that is not installed: {_first_line(e)}"}
    except Exception as e:  # noqa: BLE001
        if composite:
            return {**rec, "status": "skipped", "reason": f"wrapper of {', '.join(subs)} that does not build or "
                                                          f"run on token ids alone with tiny sizes: {_first_line(e)} "
                                                          f"({_where(e)})"}
        return {**rec, "status": "fails", "culprit": "tiny config", "reason": f"{_first_line(e)} ({_where(e)})"}
    rec["stage"] = "replay"
    try:
        rec["replay_diff"] = replay_difference(model, ids)
    except Exception as e:  # noqa: BLE001
        rec["replay_diff"] = f"{_first_line(e)} ({_where(e)})"
    rec["stage"] = "prune"
    try:
        report = llmprune.prune(model, None, method="wanda", sparsity=SPARSITY, nsamples=NSAMPLES, seqlen=SEQLEN,
                                calibration=ids, progress=False)
    except Exception as e:  # noqa: BLE001
        if _raised_by_llmprune(e):
            return {**rec, "status": "refused", "reason": _first_line(e), "where": _where(e)}
        return {**rec, "status": "fails", "culprit": "llmprune", "reason": f"{_first_line(e)} ({_where(e)})",
                "traceback": traceback.format_exc()[-3000:]}
    try:
        rec["stage"] = "pruned forward"
        pruned = _logits(model, ids)
        if not torch.isfinite(pruned).all():
            raise RuntimeError("pruned logits are not finite")
        in_memory = pruned_sparsity(model, report)
        rec["stage"] = "save"
        with tempfile.TemporaryDirectory(prefix="arch-matrix-") as tmp:
            model.save_pretrained(tmp)
            rec["stage"] = "reload"
            reloaded = reload(model, tmp)
            rec["stage"] = "compare"
            again = _logits(reloaded, ids)
            rec["max_abs_diff"] = float((again - pruned).abs().max())
            rec["sparsity"] = round(pruned_sparsity(reloaded, report), 6)
            rec["report_sparsity"] = round(report.sparsity, 6)
            rec["decoder_sparsity"] = round(report.decoder_sparsity, 6)
            rec["modules"] = len(report.modules)
        if not torch.equal(again, pruned):
            dense = _dense_roundtrip(model_type, ids)
            raise RuntimeError(f"reloaded logits differ by up to {rec['max_abs_diff']:.3g}"
                               + (f"; a dense model's round trip: {dense}" if dense else ""))
        if rec["replay_diff"] != 0.0:
            raise RuntimeError(f"the engine's dense replay does not feed the layers what the model's forward does: "
                               f"{rec['replay_diff']}")
        # at least the target in every pruned weight; zeros the random init already had count too (xLSTM's
        # zero-initialised gates are all zeros), so a model's measured sparsity may exceed it
        least = min(m.sparsity for m in report.modules)
        if least < SPARSITY - 0.02:
            raise RuntimeError(f"a pruned weight has sparsity {least:.3f}, under {SPARSITY}")
        if rec["sparsity"] != round(in_memory, 6) or rec["sparsity"] < SPARSITY - 0.02:
            raise RuntimeError(f"reloaded pruned weights are {rec['sparsity']:.3f} zeros (in memory {in_memory:.3f}), "
                               f"not at least {SPARSITY}")
    except Exception as e:  # noqa: BLE001
        dense = "round trip:" in str(e) or rec["stage"] in ("save", "reload") and _dense_roundtrip(model_type, ids)
        culprit = "transformers" if dense else "llmprune"
        if dense and "round trip:" not in str(e):
            rec["reason_dense"] = dense
        return {**rec, "status": "fails", "culprit": culprit, "reason": f"{_first_line(e)} ({_where(e)})",
                "traceback": traceback.format_exc()[-3000:]}
    return {**rec, "status": "works", "stage": "done"}


def _dense_roundtrip(model_type: str, ids) -> str:
    """What goes wrong when the dense tiny model is saved and reloaded ("" when nothing does): a failure there
    is transformers' (or the tiny config's), not llmprune's."""
    model = build(model_type)
    try:
        with tempfile.TemporaryDirectory(prefix="arch-matrix-dense-") as tmp:
            model.save_pretrained(tmp)
            again = reload(model, tmp)
            return "" if torch.equal(_logits(model, ids), _logits(again, ids)) else "the logits differ too"
    except Exception as e:  # noqa: BLE001
        return f"fails too ({_first_line(e)})"


def _child(model_type: str, class_name: str, out: str) -> None:
    import logging
    import warnings

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    try:
        rec = run_one(model_type, class_name)
    except BaseException as e:  # noqa: BLE001 - whatever happens, the parent gets a record
        rec = {"model_type": model_type, "class": class_name, "status": "fails", "culprit": "harness",
               "reason": _first_line(e)}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    Path(out).write_text(json.dumps(rec, default=str))
    os._exit(0)


# ---- the run ------------------------------------------------------------------------------------------
def run_all(types: list[tuple[str, str]], jobs: int, timeout: float, verbose: bool = True) -> list[dict]:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    todo = list(types)
    running: dict[str, tuple] = {}
    results: dict[str, dict] = {}
    tmpdir = tempfile.mkdtemp(prefix="arch-matrix-out-")
    while todo or running:
        while todo and len(running) < jobs:
            mt, cls = todo.pop(0)
            out = os.path.join(tmpdir, f"{mt}.json")
            p = ctx.Process(target=_child, args=(mt, cls, out), daemon=True)
            p.start()
            running[mt] = (p, cls, out, time.perf_counter())
        time.sleep(0.05)
        for mt, (p, cls, out, t0) in list(running.items()):
            elapsed = time.perf_counter() - t0
            if p.is_alive() and elapsed < timeout:
                continue
            if p.is_alive():
                p.kill()
                p.join()
                rec = {"model_type": mt, "class": cls, "status": "fails", "culprit": "timeout",
                       "reason": f"no result within {timeout:.0f} s (killed)", "seconds": round(elapsed, 2)}
            else:
                p.join()
                try:
                    rec = json.loads(Path(out).read_text())
                except (OSError, ValueError):
                    rec = {"model_type": mt, "class": cls, "status": "fails", "culprit": "crash",
                           "reason": f"the process died (exit code {p.exitcode})", "seconds": round(elapsed, 2)}
            results[mt] = rec
            del running[mt]
            if verbose:
                print(f"[{len(results):3d}/{len(types)}] {mt:28s} {rec['status']:8s} {rec.get('seconds', 0):6.1f}s "
                      f"{rec.get('reason', '')[:110]}", flush=True)
    return [results[mt] for mt, _ in types]


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def write_results(records: list[dict], out_md: Path, command: str, wall: float, jobs: int, timeout: float) -> None:
    counts = {s: sum(r["status"] == s for r in records) for s in ("works", "refused", "fails", "skipped")}
    meta = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), **_versions(), "jobs": jobs, "timeout_s": timeout, "wall_s": round(wall, 1),
            "protocol": {"method": "wanda", "sparsity": SPARSITY, "nsamples": NSAMPLES, "seqlen": SEQLEN,
                         "vocab": VOCAB, "seed": 0},
            "counts": counts}
    clean = [{k: v for k, v in r.items() if k != "traceback"} for r in records]
    out_md.with_suffix(".json").write_text(json.dumps({"meta": meta, "architectures": clean}, indent=1) + "\n")
    lines = [
        "# Every causal-LM architecture transformers registers, pruned (issue 6)",
        "",
        f"Command: `{command}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']}, Python {meta['python']}  ",
        f"Versions: transformers {meta['transformers']}, torch {meta['torch']}  ",
        f"Run: {len(records)} model types of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {jobs} at a time, each in its "
        f"own forked process with a {timeout:.0f} s timeout; {meta['wall_s']} s in all.",
        "",
        "Protocol: the config class of each model type with tiny sizes (`tiny_config` in `eval/arch_matrix.py`: "
        "hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, vocabulary 256, 128 positions, 4 experts of "
        "which 2 per token, every other size-like field the class declares, and a few per-family overrides), "
        "`AutoModelForCausalLM.from_config` under `torch.manual_seed(0)`, one dense forward, "
        f"`llmprune.prune(model, None, method=\"wanda\", sparsity={SPARSITY}, nsamples={NSAMPLES}, seqlen={SEQLEN}, "
        "calibration=<LongTensor [4, 16]>)`, `save_pretrained` + `from_pretrained`: **works** when the engine's "
        "dense replay feeds every decoder layer exactly what the model's own forward does (a forward pre-hook "
        "on each layer), the reloaded logits equal the pruned model's bit for bit, every pruned weight is at "
        "least 50 % zeros (within 0.02) and the reloaded weights hold the same zeros. The sparsity column counts "
        "zeros over the pruned weights, so zeros of the random init count too (xLSTM's zero-initialised gates).",
        "",
        f"**Counts: {counts['works']} work, {counts['refused']} refused, {counts['fails']} fail, "
        f"{counts['skipped']} skipped** (of {len(records)}).",
        "",
        "Failures are attributed: `tiny config` (the dense model does not build or run with the tiny sizes: not "
        "llmprune's), `llmprune` (the dense model runs; pruning or its result fails), `transformers` (the dense "
        "model's save/reload fails or differs too), `timeout`.",
        "",
        "| model type | class | status | time (s) | reason / measured |",
        "|---|---|---|---:|---|",
    ]
    for r in records:
        if r["status"] == "works":
            why = (f"sparsity {r['sparsity']:.4f} over {r['modules']} pruned weights (decoder "
                   f"{r['decoder_sparsity']:.4f}) in `{r['layers']}`; {r['params'] / 1e3:.0f} k params")
        else:
            why = r.get("reason", "")
            if r["status"] == "fails":
                why = f"[{r.get('culprit', '?')}, at {r.get('stage', '?')}] {why}"
                if r.get("reason_dense"):
                    why += f"; the dense model's save/reload {r['reason_dense']}"
        why = why.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['model_type']} | {r['class']} | {r['status']} | {r.get('seconds', 0):.1f} | {why} |")
    notes = ""
    if out_md.exists():  # hand-written notes are kept
        old = out_md.read_text()
        if "\n## Notes" in old:
            notes = "\n## Notes" + old.split("\n## Notes", 1)[1]
    out_md.write_text("\n".join(lines) + "\n" + notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="these model types only (printed; written only with --out)")
    p.add_argument("--jobs", type=int, default=2, help="architectures at a time (default 2)")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds per architecture (default 90)")
    p.add_argument("--out", type=Path, help="markdown report (default eval/results/architectures.md for a full run)")
    args = p.parse_args(argv)

    os.environ.setdefault("LLMPRUNE_THREADS", "torch")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # the children inherit it (forked), two of them on two cores
    transformers.utils.logging.disable_progress_bar()
    warm = time.perf_counter()  # what every child would import again: transformers' generic parts, llmprune's
    run_one("llama", "LlamaForCausalLM")
    print(f"warm-up (imports shared by the forked children): {time.perf_counter() - warm:.1f} s", flush=True)
    types = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())
    if args.only:
        types = [(mt, c) for mt, c in types if mt in set(args.only)]
    t0 = time.perf_counter()
    records = run_all(types, args.jobs, args.timeout)
    wall = time.perf_counter() - t0
    out = args.out or (None if args.only else RESULTS / "architectures.md")
    if out is not None:
        command = "python " + " ".join(shlex.quote(a) for a in [str(HERE.relative_to(ROOT)), *(argv or sys.argv[1:])])
        write_results(records, out, command, wall, args.jobs, args.timeout)
        print(f"wrote {out} and {out.with_suffix('.json')}")
    counts = {s: sum(r["status"] == s for r in records) for s in ("works", "refused", "fails", "skipped")}
    print(f"{counts} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
