#!/usr/bin/env python3
"""Structured-pruning peers of issue #28 on our protocol: fmchisel's OSSCAR, torch-pruning's LLM width pruning, ShortGPT.

Three sub-commands; the first two run in llmprune's own environment, ``worker`` runs inside each peer's venv
and never imports llmprune:

    # 1. venvs, the embedded model as an HF folder, the calibration tokens (once)
    python3 eval/peer_structured.py setup
    # 2. every peer x budget (resumable: a finished run is kept unless --force), then the table
    python3 eval/peer_structured.py run [--peers fmchisel,torch-pruning,shortgpt] [--budgets 0.1,0.2,0.3]
    # 3. only rebuild eval/results/structured_peers.{md,json} from the finished runs
    python3 eval/peer_structured.py report

Protocol (as eval/results/prune.md): the embedded SmolLM2-135M-Instruct in float32 on CPU; calibration 32 x 512
tokens of the local C4 slice, seed 0, drawn ONCE by llmprune's own sampler (``llmprune.calibration.get_calibration``)
and handed to every peer as the same saved tensor; budgets are fractions of the decoder-layer parameters removed
(embeddings, final norm and the tied output layer are not "decoder"); perplexity of each saved folder by OUR
evaluator (``llmprune eval DIR --ppl wikitext2 --max-windows 16``: WikiText-2 raw test, windows of 2048, first 16),
run from a clean export of the committed tree (the working tree is shared with other agents). Each peer run is a
separate process timed end to end (import, load, calibrate, prune, save) with its peak RSS from wait4().

Peers and how each budget is reached (SmolLM2-135M: 30 layers of 3,540,096 parameters; one MLP channel is
3 x 576 = 1,728 of them, one KV group (3 query heads + 1 KV head) 294,912, one layer 1/30 = 3.33 %):

* fmchisel 0.1.2 ``OSSCARModifier`` (llm-compressor 0.5.1 ``oneshot``, then fmchisel's own ``pack`` and
  ``cleanup_after_prune``, as its structured-pruning example). It takes per-layer counts: ``num_drop_mlp_neuron``
  and ``num_drop_attn_group``. Variant ``mlp``: MLP channels only, count = budget x layer params / 1,728 rounded to a
  multiple of 8; variant ``mix``: one of the 3 KV groups (8.3 % of a layer) plus MLP channels for the rest.
* torch-pruning 1.6.1, its ``examples/LLMs/prune_llm.py`` pruning block verbatim: ``GroupMagnitudeImportance(p=2)``
  (data-free: the calibration tokens are not used; the example traces "Hello world."), local pruning,
  ``pruning_ratio = head_pruning_ratio = r``, ``round_to=4``, hidden size, heads and MLP channels, then the example's
  config fix-up. ``r`` is the one knob: the smallest r on a 0.001 grid whose decoder fraction removed reaches the
  budget, found on a one-layer model of the same widths (the counts do not depend on the weights).
* ShortGPT (Men et al. 2024, arXiv:2403.03853): no package installs (PyPI ``shortgpt`` is an unrelated video tool),
  so this file has OUR implementation of the paper's method: block influence
  BI_i = 1 - mean over calibration tokens of cos(x_i, x_{i+1}) (x_i: input of layer i, x_{i+1}: its output), drop the
  n layers of lowest BI, n = round(budget x 30).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
VENVS = Path(os.environ.get("PEER_VENVS", "/work/venvs"))
MODELS = Path(os.environ.get("PEER_MODELS", "/work/peer-models"))
DENSE = MODELS / "smollm2-hf"
CALIB = MODELS / "calib-c4-32x512-seed0.pt"
RUNS = MODELS / "structured"
HEAD_EXPORT = VENVS / "llmprune-head"  # `git archive HEAD` of llmprune: our evaluator, unaffected by edits in progress
DATA_DIR = os.environ.get("LLMPRUNE_DATA_DIR", "/work/shared/data")
TIMEOUT_S = 900
TP_TRANSFORMERS_NOTE = (
    "torch-pruning 1.6.1 with transformers 5.25.0 (torch 2.13.0) and 4.57.6 (torch 2.13.0 and 2.7.1): "
    "`tp.pruner.BasePruner(...)` never returns: `DependencyGraph.get_pruning_group` "
    "(graph.py:241 `_fix_dependency_graph_non_recursive`) grows one group without bound through the attention's "
    "Reshape/Transpose/Slice nodes (14,000 dependencies after 40 s on a 1-layer 48-wide Llama, still growing; "
    "the same with prune_num_heads=False, untied embeddings or eager attention). With transformers 4.55.0 the "
    "groups close (51, 8, 32, ... dependencies), so the runs below use 4.55.0.")

# SmolLM2-135M decoder layer: attention 884,736 + MLP 2,654,208 + two norms 1,152
LAYER_PARAMS = 3_540_096
MLP_CHANNEL = 3 * 576
KV_GROUP = 3 * 576 * 64 + 576 * 64 * 2 + 3 * 64 * 576

PEERS = {
    "fmchisel": {
        "python": VENVS / "fmchisel" / "bin" / "python",
        "install": [
            # fmchisel pins torch<2.8 and transformers<5; the CPU wheel index is not reachable here, so PyPI's torch
            "pip install torch==2.7.1",
            "pip install 'fmchisel[inference]==0.1.2' gguf",
            # its resolve pairs numpy 1.26 (llmcompressor 0.5.1) with pyarrow 26, which needs numpy 2
            "pip install 'pyarrow<20'",
        ],
        "variants": ["mlp", "mix"],
    },
    "torch-pruning": {
        "python": VENVS / "torch-pruning-t4" / "bin" / "python",
        "install": [
            "pip install torch==2.13.0",
            # The example asks for the newest transformers; with 5.25.0 and 4.57.6 (torch 2.13.0 or 2.7.1)
            # BasePruner never returns (see TP_TRANSFORMERS_NOTE); 4.55.0 works.
            "pip install torch-pruning==1.6.1 transformers==4.55.0 accelerate datasets",
        ],
        "variants": ["width", "width-keepheads"],
    },
    "shortgpt": {"python": Path(sys.executable), "install": [], "variants": ["depth"]},
}


# =============================================================================== worker (inside a peer's venv)


def _load(path, **kw):
    """``from_pretrained`` in float32 across transformers versions (``dtype=`` is new in 4.56)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(path, **{key: torch.float32}, **kw)


def _decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def _shape(model) -> dict:
    c = model.config
    return {
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "intermediate_size": c.intermediate_size,
    }


def fmchisel_counts(budget: float, variant: str) -> tuple[int, int]:
    """(num_drop_mlp_neuron, num_drop_attn_group) per layer for a decoder budget."""
    groups = 1 if variant == "mix" else 0
    rest = budget * LAYER_PARAMS - groups * KV_GROUP
    return 8 * round(rest / MLP_CHANNEL / 8), groups


def run_fmchisel(model_dir: str, tokens, budget: float, variant: str, out: Path) -> dict:
    """fmchisel's structured-pruning example (OSSCAR through llm-compressor's oneshot, then pack), our tokens."""
    from datasets import Dataset
    from fmchisel.pruning.osscar.base import OSSCARModifier
    from fmchisel.pruning.osscar.utils.helpers import cleanup_after_prune, pack
    from llmcompressor import oneshot

    n_mlp, n_attn = fmchisel_counts(budget, variant)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": [[1] * tokens.shape[1]] * tokens.shape[0]})
    recipe = OSSCARModifier(num_drop_mlp_neuron=n_mlp, num_drop_attn_group=n_attn)
    oneshot(model=model_dir, dataset=ds, recipe=recipe, save_compressed=True, output_dir=str(out),
            max_seq_length=tokens.shape[1], num_calibration_samples=tokens.shape[0])
    pack(str(out), n_mlp, n_attn, model_dir)
    cleanup_after_prune(str(out))
    shutil.rmtree(f"{out}-uncompressed", ignore_errors=True)  # pack's copy of the zero-padded model
    return {"num_drop_mlp_neuron": n_mlp, "num_drop_attn_group": n_attn, "osscar_defaults": {
        "update_iter_mlp": recipe.update_iter_mlp, "update_iter_attn": recipe.update_iter_attn,
        "dampening_frac": recipe.dampening_frac}}


def tp_prune(model, tokenizer, ratio: float, keep_heads: bool = False) -> None:
    """torch-pruning 1.6's examples/LLMs/prune_llm.py, its pruning block and config fix-up (float32 on CPU here).

    ``keep_heads`` (NOT the example): the example's head grouping fails on this GQA model (9 query / 3 KV heads:
    ``shape '[9, -1]' is invalid for input of size 192``, torch-pruning issue #516), so this variant passes no
    ``num_heads`` and ignores the attention projections as roots: hidden size and MLP channels are pruned, heads kept.
    """
    import torch
    import torch_pruning as tp

    inputs = torch.tensor(tokenizer.encode("Hello world.")).unsqueeze(0).to(model.device)
    num_heads, out_channel_groups, seperate_qkv = {}, {}, False
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            if hasattr(m, "q_proj"):
                seperate_qkv = True
                num_heads[m.q_proj] = model.config.num_attention_heads
                num_heads[m.k_proj] = model.config.num_key_value_heads
                num_heads[m.v_proj] = model.config.num_key_value_heads
            elif hasattr(m, "qkv_proj"):
                num_heads[m.qkv_proj] = model.config.num_attention_heads
        if name.endswith("mlp") and hasattr(m, "gate_up_proj"):
            out_channel_groups[m.gate_up_proj] = 2
    _is_gqa = model.config.num_attention_heads != model.config.num_key_value_heads
    ignored = [model.lm_head]
    if keep_heads:
        num_heads = {}
        ignored += [p for layer in model.model.layers for p in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj)]
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    pruner = tp.pruner.BasePruner(
        model, example_inputs=inputs, importance=importance, global_pruning=False,
        output_transform=lambda x: x.logits, pruning_ratio=ratio, ignored_layers=ignored,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        out_channel_groups=out_channel_groups, round_to=4,
    )
    for g in pruner.step(interactive=True):
        g.prune()
    model.config.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            m.hidden_size = m.q_proj.out_features if seperate_qkv else m.qkv_proj.out_features // 3
            m.num_heads = m.hidden_size // m.head_dim
            model.config.num_attention_heads = m.num_heads
            if not _is_gqa:
                m.num_key_value_heads = m.num_heads
                model.config.num_key_value_heads = m.num_heads
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = m.num_heads // model.config.num_key_value_heads
        elif name.endswith("mlp"):
            if hasattr(m, "gate_proj"):
                m.hidden_size = m.gate_proj.in_features
                model.config.intermediate_size = m.gate_proj.out_features
            elif hasattr(m, "gate_up_proj"):
                m.hidden_size = m.gate_up_proj.in_features
                model.config.intermediate_size = m.gate_up_proj.out_features // 2
    if not _is_gqa:
        model.config.num_key_value_heads = model.config.num_attention_heads


def tp_ratio_for(budget: float, config, keep_heads: bool) -> tuple[float, float]:
    """Smallest ratio (0.001 grid) whose decoder fraction removed reaches ``budget``, on a 1-layer copy of the widths."""
    import torch
    from transformers import AutoModelForCausalLM

    class _Tok:  # "Hello world." is only a tracing input; any 4 ids trace the same graph
        def encode(self, _):
            return [1, 2, 3, 4]

    def fraction(ratio: float) -> float:
        small = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 256})
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(small).eval()
        before = _decoder_params(m)
        tp_prune(m, _Tok(), ratio, keep_heads)
        return 1 - _decoder_params(m) / before

    lo, hi = 0, 500  # ratio in thousandths; fraction is monotone non-decreasing in ratio
    while lo < hi:
        mid = (lo + hi) // 2
        if fraction(mid / 1000) >= budget - 0.002:
            hi = mid
        else:
            lo = mid + 1
    return lo / 1000, fraction(lo / 1000)


def run_torch_pruning(model_dir: str, budget: float, out: Path, keep_heads: bool) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    ratio, frac_probe = tp_ratio_for(budget, AutoConfig.from_pretrained(model_dir), keep_heads)
    model = _load(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tp_prune(model, tokenizer, ratio, keep_heads)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"pruning_ratio": ratio, "head_pruning_ratio": ratio, "round_to": 4,
            "importance": "GroupMagnitudeImportance(p=2, group_reduction='mean')",
            "probe_fraction": round(frac_probe, 6)}


def block_influence(model, tokens) -> list[float]:
    """ShortGPT's BI_i = 1 - E_tokens[cos(x_i, x_{i+1})], x_i the input and x_{i+1} the output of layer i."""
    import torch

    layers = model.model.layers
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)  # [layers]
    count = 0
    x_in: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            x_in[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def post(i):
        def hook(_m, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.pop(i).float(), y.float(), dim=-1)  # [b, t]
            cos_sum[i] += cos.double().sum()
        return hook

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(pre(i), with_kwargs=True), layer.register_forward_hook(post(i)))]
    try:
        with torch.no_grad():
            for row in tokens:
                model(input_ids=row[None], use_cache=False)
                count += row.numel()
    finally:
        for h in handles:
            h.remove()
    return (1 - cos_sum / count).tolist()


def run_shortgpt(model_dir: str, tokens, budget: float, out: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    model = _load(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # BI depends on the model and the tokens only, not on the budget: computed once, reused by the other budgets
    cache = out.parent / "structured" / "shortgpt-block-influence.json"
    key = f"{model_dir}|{tokens.shape}|{int(tokens.sum())}"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    reused = cached.get("key") == key
    bi = cached["bi"] if reused else block_influence(model, tokens)
    if not reused:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "bi": bi}))
    n = round(budget * len(bi))
    drop = sorted(sorted(range(len(bi)), key=bi.__getitem__)[:n])
    keep = [layer for i, layer in enumerate(model.model.layers) if i not in drop]
    model.model.layers = torch.nn.ModuleList(keep)
    for i, layer in enumerate(keep):  # the KV cache is indexed by layer_idx
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"block_influence": [round(b, 6) for b in bi], "dropped_layers": drop, "block_influence_reused": reused}


def worker(args) -> int:
    import torch

    torch.manual_seed(0)
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    tokens = torch.load(args.calib, weights_only=True)  # [nsamples, seqlen] int64
    dense = _load(args.model)
    dense_decoder, dense_total = _decoder_params(dense), sum(p.numel() for p in dense.parameters())
    del dense
    t0 = time.perf_counter()
    if args.peer == "fmchisel":
        info = run_fmchisel(args.model, tokens, args.budget, args.variant, out)
    elif args.peer == "torch-pruning":
        info = run_torch_pruning(args.model, args.budget, out, args.variant == "width-keepheads")
    else:
        info = run_shortgpt(args.model, tokens, args.budget, out)
    t_prune = time.perf_counter() - t0
    # the saved folder, reloaded with this venv's transformers
    model = _load(out)
    decoder = _decoder_params(model)
    import transformers

    result = {
        "peer": args.peer, "variant": args.variant, "budget": args.budget, "peer_info": info,
        "config": _shape(model), "decoder_params": decoder, "dense_decoder_params": dense_decoder,
        "decoder_fraction_removed": round(1 - decoder / dense_decoder, 6),
        "total_params": sum(p.numel() for p in model.parameters()), "dense_total_params": dense_total,
        "time_prune_s": round(t_prune, 2), "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peer_versions": _versions(), "peer_transformers_reload": f"ok ({transformers.__version__})",
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "fmchisel", "llmcompressor", "compressed-tensors", "torch-pruning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# ====================================================================== orchestration (llmprune's environment)


def setup(args) -> int:
    for name in args.peers:
        spec = PEERS[name]
        if not spec["install"]:
            continue
        venv = spec["python"].parent.parent
        if not spec["python"].exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for cmd in spec["install"]:
            print(f"[{name}] {cmd}", flush=True)
            rc = subprocess.run(f"{venv}/bin/{cmd}", shell=True).returncode
            if rc:
                print(f"[{name}] install failed ({rc}): {cmd}", file=sys.stderr)
                break
    export_head()
    MODELS.mkdir(parents=True, exist_ok=True)
    code = f"""
import json, torch, llmprune
from llmprune.calibration import get_calibration
m, t, _ = llmprune.load_model(None, dtype="float32")
m.save_pretrained({str(DENSE)!r}); t.save_pretrained({str(DENSE)!r})
p = {str(DENSE / 'config.json')!r}
c = json.load(open(p))
# transformers < 5 (fmchisel's pin) reads `rope_theta`, not `rope_parameters`: without it RoPE silently uses 10,000
c["rope_theta"] = c["rope_parameters"]["rope_theta"]
json.dump(c, open(p, "w"), indent=2)
# transformers < 5 does not know the class name 5.x writes (TokenizersBackend); both read GPT2Tokenizer's files
p = {str(DENSE / 'tokenizer_config.json')!r}
c = json.load(open(p))
c["tokenizer_class"] = "GPT2Tokenizer"
json.dump(c, open(p, "w"), indent=2)
ids = get_calibration("c4", t, 32, 512, seed=0, data_dir={DATA_DIR!r})  # [32, 512]
torch.save(ids, {str(CALIB)!r})
print(tuple(ids.shape))
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=_our_env())
    return 0


def export_head() -> str:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    stamp = HEAD_EXPORT / "COMMIT"
    if not stamp.exists() or stamp.read_text().strip() != commit:
        shutil.rmtree(HEAD_EXPORT, ignore_errors=True)
        HEAD_EXPORT.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "llmprune", "eval/tasks"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(HEAD_EXPORT)], input=archive, check=True)
        stamp.write_text(commit + "\n")
    return commit


def _our_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(HEAD_EXPORT), LLMPRUNE_DATA_DIR=DATA_DIR, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def timed(cmd: list[str], log: Path, timeout: int, env: dict | None = None) -> dict:
    """Run ``cmd`` in its own process group; wall time, peak RSS (wait4), exit code; kill the group on timeout."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}


def last_error(log: Path) -> str:
    lines = [ln.rstrip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if ("Error" in ln or "error:" in ln) and not ln.startswith(" ")]
    return (errs[-1] if errs else lines[-1] if lines else "no output")[:400]


LOAD_CHECK = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
ref = AutoModelForCausalLM.from_config(m.config)
t = AutoTokenizer.from_pretrained(d)
ids = t("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    g = m.generate(ids, max_new_tokens=8, do_sample=False)
print("LOAD " + json.dumps({"transformers": transformers.__version__,
    "params": sum(p.numel() for p in m.parameters()), "params_from_config": sum(p.numel() for p in ref.parameters()),
    "decoder_params": sum(p.numel() for p in m.model.layers.parameters()),
    "generated": t.decode(g[0, ids.shape[1]:])}))
"""


def run_one(peer: str, variant: str, budget: float, force: bool) -> dict:
    tag = f"{peer}-{variant}-{round(budget * 100)}"
    run_dir = RUNS / tag
    out = MODELS / tag
    res_file = run_dir / "result.json"
    if res_file.exists() and not force:
        return json.loads(res_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").unlink(missing_ok=True)
    py = PEERS[peer]["python"]
    row: dict = {"peer": peer, "variant": variant, "budget": budget, "folder": str(out)}
    if not py.exists():
        row["error"] = f"venv python {py} missing: run `setup` (install failed?)"
    else:
        cmd = [str(py), str(Path(__file__).resolve()), "worker", "--peer", peer, "--variant", variant,
               "--budget", str(budget), "--model", str(DENSE), "--calib", str(CALIB), "--output", str(out)]
        row["command"] = " ".join(cmd)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)
        print(f"[{tag}] pruning ...", flush=True)
        row.update(timed(cmd, run_dir / "prune.log", TIMEOUT_S, env))
        found = [ln for ln in (run_dir / "prune.log").read_text(errors="replace").splitlines()
                 if ln.startswith("RESULT ")]
        if row["rc"] != 0 or not found:
            row["error"] = last_error(run_dir / "prune.log")
            if row["timed_out"]:
                tail = (run_dir / "prune.log").read_text(errors="replace").replace("\r", "\n").strip().splitlines()
                row["error"] = f"timeout after {TIMEOUT_S} s; last output: {tail[-1][-200:] if tail else ''}"
        else:
            row.update(json.loads(found[-1][len("RESULT "):]))
    if "error" not in row:
        row.update(check_and_eval(out, run_dir, tag))
    res_file.write_text(json.dumps(row, indent=2))
    return row


def check_and_eval(folder: Path, run_dir: Path, tag: str) -> dict:
    out: dict = {}
    print(f"[{tag}] plain transformers load ...", flush=True)
    load = timed([sys.executable, "-c", LOAD_CHECK, str(folder)], run_dir / "load.log", 600, _our_env())
    found = [ln for ln in (run_dir / "load.log").read_text(errors="replace").splitlines() if ln.startswith("LOAD ")]
    if load["rc"] == 0 and found:
        info = json.loads(found[-1][5:])
        out["loads_in_transformers"] = info["params"] == info["params_from_config"]
        out["load_check"] = info
    else:
        out["loads_in_transformers"] = False
        out["load_error"] = last_error(run_dir / "load.log")
    print(f"[{tag}] perplexity ...", flush=True)
    cmd = [sys.executable, "-m", "llmprune.cli", "eval", str(folder), "--ppl", "wikitext2", "--max-windows", "16",
           "--seqlen", "2048", "--device", "cpu", "--dtype", "float32", "-q", "-o", str(run_dir / "eval.json")]
    ev = {"rc": 0, "wall_s": None}
    if not (run_dir / "eval.json").exists():  # a finished evaluation of this folder is reused
        ev = timed(cmd, run_dir / "eval.log", 1800, _our_env())
        out["eval_wall_s"] = ev["wall_s"]
    if ev["rc"] == 0 and (run_dir / "eval.json").exists():
        p = json.loads((run_dir / "eval.json").read_text())["perplexity"]["wikitext2"]
        out.update(ppl=round(p["ppl"], 4), ppl_windows=p["windows"], ppl_tokens=p["tokens"])
    else:
        out["ppl_error"] = last_error(run_dir / "eval.log")
    return out


def removed_text(row: dict) -> str:
    c, info = row.get("config"), row.get("peer_info", {})
    if not c:
        return "-"
    parts = []
    if c["num_hidden_layers"] != 30:
        parts.append(f"layers 30→{c['num_hidden_layers']} (dropped {info.get('dropped_layers')})")
    if c["hidden_size"] != 576:
        parts.append(f"hidden 576→{c['hidden_size']}")
    if c["num_attention_heads"] != 9 or c["num_key_value_heads"] != 3:
        parts.append(f"heads 9/3→{c['num_attention_heads']}/{c['num_key_value_heads']}")
    if c["intermediate_size"] != 1536:
        parts.append(f"MLP 1536→{c['intermediate_size']}")
    return "; ".join(parts) or "nothing"


def report(rows: list[dict], dense: dict | None) -> None:
    RESULTS.mkdir(exist_ok=True)
    stamp = HEAD_EXPORT / "COMMIT"  # the export the runs' evaluations used (run re-exports when HEAD moved)
    commit = stamp.read_text().strip() if stamp.exists() else export_head()
    versions = {r["peer"]: r.get("peer_versions") for r in rows if r.get("peer_versions")}
    doc = {
        "command": "python3 eval/peer_structured.py setup && python3 eval/peer_structured.py run",
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Linux, shared with other jobs (times indicative)",
        "date": datetime.date.today().isoformat(),
        "evaluator_commit": commit,
        "protocol": {
            "model": "embedded SmolLM2-135M-Instruct, float32, CPU", "dense_folder": str(DENSE),
            "calibration": "llmprune get_calibration('c4', nsamples=32, seqlen=512, seed=0) on "
                           "c4/c4_validation_2k.jsonl, saved once and handed to every peer: " + str(CALIB),
            "budget": "fraction of the decoder-layer parameters removed (dense 106,202,880 in 30 layers)",
            "ppl": "llmprune eval --ppl wikitext2 --max-windows 16 --seqlen 2048 (WikiText-2 raw test)",
            "wall_peak": "whole peer process (import, load, calibrate, prune, save), wait4() ru_maxrss",
        },
        "peer_versions": versions, "dense": dense, "runs": rows,
    }
    (RESULTS / "structured_peers.json").write_text(json.dumps(doc, indent=2) + "\n")

    lines = [
        "# Structured-pruning peers (issue #28) on our protocol",
        "",
        f"- command: `{doc['command']}` (a finished run is reused; `--force` redoes it)",
        f"- machine: {doc['machine']}. Wall times and peak RSS were measured while other agents' jobs ran on "
        "the same 2 cores: indicative only, not a speed comparison.",
        f"- date: {doc['date']}; evaluator: llmprune at commit `{commit[:12]}` (`git archive`, so edits in "
        "progress in the shared checkout do not enter)",
        "- protocol: embedded SmolLM2-135M-Instruct (30 layers, hidden 576, 9/3 heads, MLP 1536), float32, CPU; "
        "calibration 32 x 512 tokens of the local C4 slice, seed 0, drawn once by llmprune's sampler and handed to "
        "every peer as the same tensor file; perplexity of every saved folder by `llmprune eval DIR --ppl wikitext2 "
        "--max-windows 16` (WikiText-2 raw test, windows of 2048, first 16 = 32,752 tokens). Budget = fraction of "
        "the decoder-layer parameters removed (106,202,880 dense; embeddings and the tied 49,152 x 576 output "
        "layer are not counted, and only torch-pruning shrinks them, by pruning the hidden size).",
        f"- peer versions: {json.dumps(versions)}",
        "",
        "| peer | variant | budget | removed (per layer, uniform) | decoder params | fraction removed "
        "| total params | WikiText-2 ppl | wall (s) | peak RSS (GB) | loads in plain transformers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if dense:
        lines.append(f"| dense | - | 0 % | nothing | {dense['decoder_params']:,} | 0 | {dense['total_params']:,} "
                     f"| {dense['ppl']:.2f} | - | - | yes |")
    for r in rows:
        budget = f"{round(r['budget'] * 100)} %"
        if "error" in r:
            lines.append(f"| {r['peer']} | {r['variant']} | {budget} | **failed**: `{r['error']}` | - | - | - | - "
                         f"| {r.get('wall_s', '-')} | - | - |")
            continue
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else f"error: `{r.get('ppl_error')}`"
        if r.get("loads_in_transformers"):
            loads = f"yes ({r['load_check']['transformers']})"
        else:
            loads = f"no: `{r.get('load_error') or 'parameter count differs from the config'}`"
        lines.append(
            f"| {r['peer']} | {r['variant']} | {budget} | {removed_text(r)} | {r['decoder_params']:,} "
            f"| {r['decoder_fraction_removed']:.4f} | {r['total_params']:,} | {ppl} | {r['wall_s']:.0f} "
            f"| {r['peak_rss_mb'] / 1024:.2f} | {loads} |")
    lines += [
        "",
        "How each budget was reached (per-layer counts, the same in every layer):",
        "",
        "- fmchisel OSSCAR: `num_drop_mlp_neuron` = budget x 3,540,096 / 1,728 rounded to a multiple of 8 (`mlp`); "
        "`mix` removes 1 of the 3 KV groups (294,912 parameters a layer, 8.3 %) and MLP channels for the rest. "
        "OSSCAR's own defaults otherwise (update_iter 1, dampening 0.01); llm-compressor `oneshot`, then fmchisel's "
        "`pack` and `cleanup_after_prune`, as in fmchisel's structured-pruning example.",
        "- torch-pruning `width` (the example, faithful): one ratio r for hidden size, MLP channels and heads "
        "(head ratio = r, round_to 4). It fails on this model at every budget, see below. `width-keepheads` (NOT the "
        "example, our workaround to get a number): no `num_heads`, attention projections ignored as roots; "
        "torch-pruning then prunes only MLP channels (the hidden size stays 576). r = smallest value on a 0.001 grid "
        "reaching the budget (within 0.002), found on a 1-layer model of the same widths. Importance is the example's "
        "`GroupMagnitudeImportance(p=2)`: weight magnitudes only, the calibration tokens are not used. The example "
        "runs float16 on GPU; here float32 on CPU.",
        "- ShortGPT: OUR implementation of the paper's method (no package exists): BI from the layer inputs/outputs "
        "on the calibration tokens, drop round(budget x 30) layers of lowest BI (each layer = 3.33 %).",
        "",
        "Failures and environment notes (exact errors):",
        "",
        *[f"- {r['peer']} {r['variant']} {round(r['budget'] * 100)} %: {r['note']}" for r in rows if r.get("note")],
        "- torch-pruning, example as written (`width`, every budget): `RuntimeError: shape '[9, -1]' is invalid for "
        "input of size 192` in `pruner.step()` (GroupMagnitudeImportance `imp.view(ch_groups, -1)`): the example "
        "groups k_proj/v_proj (3 KV heads x 64 = 192 channels) by the 9 query heads. Same error reported upstream for "
        "Llama-3.2-3B (VainF/Torch-Pruning issue #516, open). Checked on the full model too, not only the probe.",
        "- " + TP_TRANSFORMERS_NOTE,
        "- fmchisel: pins torch<2.8 and transformers<5; the PyTorch CPU wheel index is not reachable from this "
        "machine, so torch 2.7.1 is PyPI's (CUDA) build, run on CPU; its resolve gave transformers 4.57.6, "
        "llm-compressor 0.5.1, numpy 1.26.4 and pyarrow 26 (needs numpy 2: `ImportError: pyarrow requires NumPy 2.0 "
        "or newer, found 1.26.4`), fixed with `pyarrow<20`.",
        "- the embedded model as saved by transformers 5 has no `rope_theta` (only `rope_parameters`) and a "
        "tokenizer class `TokenizersBackend`; transformers 4.x would silently use RoPE theta 10,000 and cannot load "
        "the tokenizer, so `setup` adds `rope_theta` and writes `GPT2Tokenizer` (same ids in both versions).",
        "- ShortGPT: the block influence is computed once (first budget run, included in its wall time) and reused by "
        "the other budgets; their wall time excludes it.",
        "",
        "Per-run logs: `" + str(RUNS) + "/<peer>-<variant>-<budget>/` (prune.log, load.log, eval.log, result.json); "
        "pruned folders: `" + str(MODELS) + "/<peer>-<variant>-<budget>` (paths in the json, field `folder`).",
    ]
    (RESULTS / "structured_peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def dense_row(force: bool) -> dict | None:
    run_dir = RUNS / "dense"
    f = run_dir / "result.json"
    if f.exists() and not force:
        return json.loads(f.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    row = check_and_eval(DENSE, run_dir, "dense")
    if "ppl" not in row:
        return None
    row.update(decoder_params=row["load_check"]["decoder_params"], total_params=row["load_check"]["params"])
    f.write_text(json.dumps(row, indent=2))
    return row


def collect(peers: list[str], budgets: list[float]) -> list[dict]:
    rows = []
    for peer in peers:
        for variant in PEERS[peer]["variants"]:
            for budget in budgets:
                f = RUNS / f"{peer}-{variant}-{round(budget * 100)}" / "result.json"
                if f.exists():
                    rows.append(json.loads(f.read_text()))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("setup", "run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--peers", default=",".join(PEERS), help="comma-separated: " + ", ".join(PEERS))
        p.add_argument("--budgets", default="0.1,0.2,0.3", help="decoder fractions removed, comma-separated")
        p.add_argument("--variants", default=None, help="restrict to these variants, comma-separated")
        p.add_argument("--force", action="store_true", help="redo finished runs")
    w = sub.add_parser("worker", help="one peer x budget, inside the peer's venv (no llmprune import)")
    w.add_argument("--peer", choices=list(PEERS), required=True)
    w.add_argument("--variant", required=True)
    w.add_argument("--budget", type=float, required=True)
    w.add_argument("--model", required=True)
    w.add_argument("--calib", required=True)
    w.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        return worker(args)

    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in args.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; choose from: {', '.join(PEERS)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.cmd == "setup":
        return setup(args)
    if args.cmd == "run":
        export_head()
        for peer in args.peers:
            for variant in PEERS[peer]["variants"]:
                if args.variants and variant not in args.variants.split(","):
                    continue
                for budget in budgets:
                    row = run_one(peer, variant, budget, args.force)
                    print(f"  -> {json.dumps({k: row.get(k) for k in ('decoder_fraction_removed', 'ppl', 'wall_s', 'error')})}",
                          flush=True)
    report(collect(list(PEERS), [0.1, 0.2, 0.3]), dense_row(False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
