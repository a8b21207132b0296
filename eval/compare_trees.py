"""Do two source trees of llmprune prune to bit-identical weights? A refactoring check.

Each tree runs in its own worker process with ``PYTHONPATH=<tree>`` (``llmprune.__file__`` is checked to
lie inside the tree), one torch thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``,
``LLMPRUNE_THREADS=1``), and only the stable public API: ``llmprune.prune``, ``llmprune.PruneConfig``
and ``llmprune.prune_checkpoint``. On a grid of tiny random models (one per architecture the engine
tests build, plus a Qwen2-MoE) x pruning configs, the worker prunes a copy of the seeded model on a
fixed random calibration tensor and records the sha256 of every ``state_dict`` tensor after pruning,
the report's ``masks_sha256``, its adapters (EoRA), permutations (RIA N:M), activation thresholds,
layer targets (OWL) and the logits of a fixed input. Two more cells prune a saved tiny Llama
checkpoint with ``prune_checkpoint`` (in memory, and streamed with ``low_memory``) and hash the
tensors of the written safetensors shards (not the file bytes: their metadata may differ).

Usage (from the repository root)::

    # both trees now
    python eval/compare_trees.py --tree /path/to/old --tree /path/to/new --out /tmp/compare_trees.md
    # keep tree A's results, then later run only the new tree against them
    python eval/compare_trees.py --tree /path/to/old --save-a /tmp/ref_compare.json
    python eval/compare_trees.py --reference-json /tmp/ref_compare.json --tree /path/to/new
    # a 3 architectures x 3 methods subset
    python eval/compare_trees.py --tree A --tree B --quick

The exit status is 0 when every cell is identical, 1 otherwise. Results depend on the torch and
transformers versions (random init, kernels): compare runs made with the same ones (the report
says which each side used, and warns when they differ).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
FORMAT = 1  # version of the results JSON layout

# ---- the grid -----------------------------------------------------------------------------------
VOCAB = 128
NSAMPLES, SEQLEN = 8, 32  # calibration tensor [NSAMPLES, SEQLEN]
MODEL_SEED, CALIB_SEED, PRUNE_SEED = 0, 1, 0

# Copied from tests/conftest.py (ARCH_CONFIGS): one tiny config per architecture the engine tests build.
ARCH_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    sliding_window=8)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=64)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    # Copied from tests/test_targets_moe.py (tiny_qwen2_moe): shared expert + its gate, fused experts.
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2)),
}

_COMMON = dict(nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", seed=PRUNE_SEED)
METHODS = {
    "magnitude-50": dict(method="magnitude", sparsity=0.5),
    "magnitude-2:4": dict(method="magnitude", pattern="2:4"),
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "ria-50": dict(method="ria", sparsity=0.5),
    "ria-2:4": dict(method="ria", pattern="2:4"),
    "alps-50": dict(method="alps", sparsity=0.5),
    "alps-2:4": dict(method="alps", pattern="2:4"),
    "wanda+dsnot-50": dict(method="wanda", refine="dsnot", sparsity=0.5),
    "sparsegpt+owl-60": dict(method="sparsegpt", allocation="owl", sparsity=0.6),
    "sparsegpt+admm-50": dict(method="sparsegpt", reconstruct="admm", sparsity=0.5),
    "sparsegpt-2:4+eora-r4": dict(method="sparsegpt", pattern="2:4", compensate="eora", rank=4),
    # activation sparsity; no held-out text (it would need the offline data folder)
    "teal": dict(activation="teal", activation_holdout="none"),
    "sparsegpt-50+teal": dict(method="sparsegpt", sparsity=0.5, activation="teal", activation_holdout="none"),
}
CHECKPOINT_CELLS = {  # prune_checkpoint on a saved tiny Llama (byte tokenizer, calibration from a .txt)
    "prune_checkpoint": dict(method="sparsegpt", sparsity=0.5, low_memory=False),
    "prune_checkpoint-low_memory": dict(method="sparsegpt", sparsity=0.5, low_memory=True),
}
QUICK_ARCHS = ["llama", "gpt2", "mixtral"]
QUICK_METHODS = ["magnitude-50", "wanda-50", "sparsegpt-2:4"]


def grid(quick: bool) -> tuple[list[str], list[str], list[str]]:
    """(architectures, methods, checkpoint cells) of the run."""
    if quick:
        return QUICK_ARCHS, QUICK_METHODS, []
    return list(ARCH_CONFIGS), list(METHODS), list(CHECKPOINT_CELLS)


def cell_ids(quick: bool) -> list[str]:
    archs, methods, ckpts = grid(quick)
    return [f"{a}/{m}" for a in archs for m in methods] + [f"checkpoint/{c}" for c in ckpts]


# ---- worker (runs inside one tree) ---------------------------------------------------------------
def _sha(t) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes."""
    import torch

    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha_json(x) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True, default=repr).encode()).hexdigest()


def _make_model(arch: str):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = ARCH_CONFIGS[arch]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    torch.manual_seed(MODEL_SEED)
    return AutoModelForCausalLM.from_config(config).eval()


def _calibration():
    import torch

    g = torch.Generator().manual_seed(CALIB_SEED)
    return torch.randint(3, VOCAB, (NSAMPLES, SEQLEN), generator=g)  # [n, L]


def _report_extras(report) -> dict:
    """What the report says about the run, beyond the weights: hashes only, each when the report has it."""
    out = {}
    masks = getattr(report, "masks_sha256", None)
    if masks is not None:
        out["masks_sha256"] = masks
    adapters = getattr(report, "adapters", None) or {}
    for name, lr in sorted(adapters.items()):
        for part in ("A", "B"):
            t = getattr(lr, part, None)
            if t is not None:
                out[f"adapter:{name}.{part}"] = _sha(t)
    for name, perm in sorted((getattr(report, "permutations", None) or {}).items()):
        out[f"permutation:{name}"] = _sha(perm)
    act = getattr(report, "activation", None)
    if act is not None:
        meta = act.metadata() if hasattr(act, "metadata") else None
        if meta is not None:
            out["activation_thresholds"] = _sha_json(meta.get("thresholds"))
    lt = getattr(report, "layer_targets", None)
    if lt is not None:
        out["layer_targets"] = _sha_json([list(x) for x in lt])
    nm = getattr(report, "nm_search", None)
    if nm:
        out["nm_search"] = _sha_json(nm)
    try:
        out["report_sparsity"] = repr(float(report.sparsity))
    except Exception:  # noqa: BLE001 - absent or not a number: nothing to compare
        pass
    return out


def _run_cell(arch: str, method: str, dense, calib, llmprune) -> dict:
    import torch

    try:
        cfg = llmprune.PruneConfig.build({**_COMMON, **METHODS[method]})
    except ValueError as e:  # ConfigError: this tree does not accept the config
        return {"invalid": _error(e)["error"]}
    model = copy.deepcopy(dense)
    torch.manual_seed(PRUNE_SEED)  # a method drawing from the global generator gets the same draws in any order
    report = llmprune.prune(model, None, config=cfg, calibration=calib.clone(), progress=False)
    out = {"tensors": {k: _sha(v) for k, v in model.state_dict().items()}}
    dense_sd = dense.state_dict()
    out["changed"] = sum(not torch.equal(v, dense_sd[k]) for k, v in model.state_dict().items() if k in dense_sd)
    extras = _report_extras(report)
    with torch.no_grad():  # the pruned model as it runs (installed activation thresholds included)
        extras["logits"] = _sha(model(calib[:2, :16]).logits)
    out["extras"] = extras
    return out


def byte_tokenizer():
    """As tests/conftest.py's (eval scripts do not import the tests): one token per byte (259 ids with the
    specials), built offline. eval/bench_recovery_distill.py uses it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny_llama_checkpoint(path: Path) -> Path:
    """A tiny Llama checkpoint with the byte tokenizer and a calibration text (as tests/test_stream.py)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=272, bos_token_id=0, eos_token_id=1, pad_token_id=2, **ARCH_CONFIGS["llama"][1])
    torch.manual_seed(MODEL_SEED)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    (path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    return path


def _run_checkpoint_cell(name: str, src: Path, work: Path, llmprune) -> dict:
    import torch
    from safetensors.torch import load_file

    try:
        cfg = llmprune.PruneConfig.build({**CHECKPOINT_CELLS[name], "model": str(src), "calib": str(src / "calib.txt"),
                                          "nsamples": 4, "seqlen": SEQLEN, "device": "cpu", "seed": PRUNE_SEED})
    except ValueError as e:  # ConfigError: this tree does not accept the config
        return {"invalid": _error(e)["error"]}
    out_dir = work / name
    torch.manual_seed(PRUNE_SEED)
    report = llmprune.prune_checkpoint(cfg, out_dir, progress=False)
    tensors = {}
    shards = sorted(p for p in out_dir.iterdir() if p.suffix == ".safetensors" and p.name.startswith("model"))
    if not shards:
        raise RuntimeError(f"no model*.safetensors written in {out_dir}")
    dense = {}
    for shard in sorted(p for p in src.iterdir() if p.suffix == ".safetensors" and p.name.startswith("model")):
        dense.update(load_file(shard))
    changed = 0
    for shard in shards:
        for k, v in load_file(shard).items():
            if k in tensors:
                raise RuntimeError(f"tensor {k} in two shards")
            tensors[k] = _sha(v)
            changed += k in dense and not torch.equal(v, dense[k])
    extras = _report_extras(report)
    cfg_json = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if "masks_sha256" in (cfg_json.get("llmprune") or {}):
        extras["config.json:masks_sha256"] = cfg_json["llmprune"]["masks_sha256"]
    return {"tensors": tensors, "changed": changed, "extras": extras}


def _error(e: BaseException) -> dict:
    msg = str(e).strip().splitlines()
    return {"error": f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]}


def worker(tree: Path, cells: list[str], out: Path) -> int:
    """Run ``cells`` with the llmprune of ``tree``; write {"env": ..., "cells": {cell: result}} to ``out``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("LLMPRUNE_THREADS", "1")
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE.parent:
        sys.path.pop(0)  # this script's folder: never where llmprune comes from
    import torch

    torch.set_num_threads(1)
    import llmprune

    where = Path(llmprune.__file__).resolve()
    if tree.resolve() not in where.parents:
        print(f"[worker] llmprune imported from {where}, not from {tree}", file=sys.stderr)
        return 2
    print(f"[worker] {tree}: llmprune from {where}", file=sys.stderr, flush=True)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    env = {"llmprune_file": str(where), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    results: dict[str, dict] = {}
    calib = _calibration()
    dense_cache: dict[str, object] = {}
    src = None
    with tempfile.TemporaryDirectory(prefix="compare_trees-") as tmp:
        for cell in cells:
            group, name = cell.split("/", 1)
            t0 = time.perf_counter()
            try:
                if group == "checkpoint":
                    if src is None:
                        src = _tiny_llama_checkpoint(Path(tmp) / "tiny-llama")
                    res = _run_checkpoint_cell(name, src, Path(tmp), llmprune)
                else:
                    if group not in dense_cache:
                        dense_cache.clear()
                        dense_cache[group] = _make_model(group)
                    res = _run_cell(group, name, dense_cache[group], calib, llmprune)
            except Exception as e:  # noqa: BLE001 - recorded and compared like a result
                res = _error(e)
            res["seconds"] = round(time.perf_counter() - t0, 3)
            results[cell] = res
            status = res.get("error") or res.get("invalid") or f"{res['changed']} of {len(res['tensors'])} tensors changed"
            print(f"[worker] {cell}: {status} ({res['seconds']:.1f}s)", file=sys.stderr, flush=True)
        out.write_text(json.dumps({"env": env, "cells": results}, indent=1), encoding="utf-8")
    return 0


# ---- parent ---------------------------------------------------------------------------------------
def _git(tree: Path) -> dict:
    def run(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": None if status == "?" else bool(status)}


def _source_digest(tree: Path) -> str:
    """sha256 over the package's files (relative path + bytes): names the code of a dirty tree too."""
    pkg = package_root(tree) / "llmprune"
    h = hashlib.sha256()
    for f in sorted(x for x in pkg.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
        h.update(f"{f.relative_to(pkg).as_posix()}\0".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _machine() -> dict:
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def package_root(tree: Path) -> Path | None:
    """The folder that holds the ``llmprune`` package: the tree itself, or its ``src/`` (a src layout)."""
    for root in (tree, tree / "src"):
        if (root / "llmprune" / "__init__.py").is_file():
            return root
    return None


def _grid_settings() -> dict:
    """Everything a cell's result depends on besides the tree: a reference JSON must match it."""
    return json.loads(json.dumps({"archs": ARCH_CONFIGS, "methods": METHODS, "checkpoint": CHECKPOINT_CELLS,
                                  "common": _COMMON, "vocab": VOCAB, "calibration": [NSAMPLES, SEQLEN],
                                  "seeds": [MODEL_SEED, CALIB_SEED, PRUNE_SEED]}))


def run_tree(tree: Path, quick: bool, jobs: int) -> dict:
    """Run the grid for ``tree`` in ``jobs`` worker processes (cells split round-robin; each cell's result
    does not depend on which process ran it or in which order)."""
    cells = cell_ids(quick)
    shards = [cells[i::jobs] for i in range(jobs)]
    env = {**os.environ, "PYTHONPATH": str(package_root(tree)), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "LLMPRUNE_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TQDM_DISABLE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}  # nothing written into the trees
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare_trees-parent-") as tmp:
        procs = []
        for i, shard in enumerate(s for s in shards if s):
            out = Path(tmp) / f"shard{i}.json"
            cmd = [sys.executable, str(HERE), "--worker", "--tree", str(tree), "--worker-out", str(out),
                   "--worker-cells", ",".join(shard)]
            procs.append((subprocess.Popen(cmd, env=env, cwd=tmp), out))
        rcs = [p.wait() for p, _ in procs]
        if any(rcs):
            raise SystemExit(f"a worker for {tree} failed (exit status {rcs}); see its messages above")
        merged: dict = {"cells": {}}
        for _, out in procs:
            data = json.loads(out.read_text(encoding="utf-8"))
            merged["env"] = data["env"]
            merged["cells"].update(data["cells"])
    merged["cells"] = {c: merged["cells"][c] for c in cells}
    return {"format": FORMAT, "tree": str(tree), "git": _git(tree), "source_sha256": _source_digest(tree),
            "quick": quick, "grid": cells,
            "configs": _grid_settings(),
            "machine": _machine(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 1), **merged}


def compare_cell(a: dict, b: dict) -> tuple[str, list[str]]:
    """('identical' | 'differs' | 'error' | 'dropped', what differs)."""
    if "invalid" in a:
        return "dropped", [f"A: {a['invalid']}"]
    if "invalid" in b:
        return "error", [f"B refuses the config: {b['invalid']}"]
    if "error" in a or "error" in b:
        ea, eb = a.get("error"), b.get("error")
        return "error", [f"A: {ea or 'ok'}", f"B: {eb or 'ok'}"]
    diff = []
    ta, tb = a["tensors"], b["tensors"]
    diff += [f"{k} (only in A)" for k in sorted(set(ta) - set(tb))]
    diff += [f"{k} (only in B)" for k in sorted(set(tb) - set(ta))]
    diff += [k for k in sorted(set(ta) & set(tb)) if ta[k] != tb[k]]
    xa, xb = a.get("extras", {}), b.get("extras", {})
    for k in sorted(set(xa) | set(xb)):
        if xa.get(k) != xb.get(k):
            diff.append(f"[report] {k}" + ("" if k in xa and k in xb else f" (only in {'A' if k in xa else 'B'})"))
    return ("identical" if not diff else "differs"), diff


def _describe(tree_result: dict, label: str) -> list[str]:
    g, env = tree_result["git"], tree_result["env"]
    dirty = {True: "dirty (uncommitted changes to tracked files)", False: "clean", None: "?"}[g["dirty"]]
    where = "not a git checkout" if g["commit"] == "?" else f"at commit `{g['commit']}`, {dirty}"
    digest = tree_result.get("source_sha256", "?")[:16]
    return [f"- **{label}**: `{tree_result['tree']}` {where}, package files sha256 {digest}; "
            f"llmprune from `{env['llmprune_file']}`; torch {env['torch']}, transformers {env['transformers']}, "
            f"Python {env['python']}; run {tree_result['date']} in {tree_result['seconds']} s"]


def _config_of(cell: str) -> str:
    return cell.split("/", 1)[1]


def write_report(a: dict, b: dict, command: str, out: Path | None, wall: float) -> bool:
    results = {c: compare_cell(a["cells"][c], b["cells"][c]) for c in a["grid"]}
    # a config tree A refuses is dropped from the grid (every architecture), and said so
    dropped = {}
    for c, (status, why) in results.items():
        if status == "dropped":
            dropped.setdefault(_config_of(c), why[0])
    cells = [c for c in a["grid"] if _config_of(c) not in dropped]
    n_same = sum(results[c][0] == "identical" for c in cells)
    mark = {"identical": "=", "differs": "**DIFF**", "error": "**ERR**"}
    archs = list(dict.fromkeys(c.split("/")[0] for c in cells if not c.startswith("checkpoint/")))
    methods = list(dict.fromkeys(_config_of(c) for c in cells if not c.startswith("checkpoint/")))

    def changed(cfg: str) -> str:  # how many tensors pruning changed on tree A, over the architectures
        n = [a["cells"][c].get("changed") for c in cells if _config_of(c) == cfg]
        n = [x for x in n if x is not None]
        return "" if not n else f" (tensors changed on A: {min(n)}" + (f" to {max(n)}" if max(n) != min(n) else "") + ")"
    ckpts = [c for c in cells if c.startswith("checkpoint/")]
    m = a["machine"]
    lines = [
        "# llmprune: two source trees, bit-identical pruned weights?",
        "",
        f"**{n_same} of {len(cells)} cells identical**"
        + ("" if n_same == len(cells) else f"; {len(cells) - n_same} not (listed below)") + ".",
        "",
        f"- Command: `{command}`",
        f"- Date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}; wall time {wall:.0f} s "
        "(tree runs included; a side read from --reference-json costs nothing)",
        f"- Machine: nproc {m['nproc']} (affinity {m['affinity']}), {m['platform']}, {m['processor']}; "
        "every worker at 1 torch thread (OMP_NUM_THREADS=1, LLMPRUNE_THREADS=1)",
        *_describe(a, "A"), *_describe(b, "B"),
    ]
    if a["env"]["torch"] != b["env"]["torch"] or a["env"]["transformers"] != b["env"]["transformers"]:
        lines.append("- **Warning**: A and B ran with different torch/transformers versions; differences may come "
                     "from them, not from llmprune.")
    if a["machine"] != b["machine"]:
        lines.append(f"- Note: B ran on another machine ({b['machine']}).")
    lines += [
        "",
        f"Grid: {len(archs)} architectures x {len(methods)} configs"
        + (f" + {len(ckpts)} prune_checkpoint cells" if ckpts else "") + f" = {len(cells)} cells. "
        f"Each cell: a seeded tiny random model (torch.manual_seed({MODEL_SEED})), a calibration LongTensor "
        f"[{NSAMPLES}, {SEQLEN}] (seed {CALIB_SEED}), `llmprune.prune(copy, None, config=PruneConfig(...), "
        "calibration=...)`; compared: sha256 of every state_dict tensor after pruning, and from the report "
        "masks_sha256, EoRA adapter A/B, RIA permutations, activation thresholds, layer targets, nm_search, "
        "measured sparsity, plus the logits of a fixed input. `=` identical, **DIFF** differs, **ERR** an error "
        "on either side.",
        "",
        "| architecture | " + " | ".join(f"`{x}`" for x in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for arch in archs:
        lines.append(f"| {arch} | " + " | ".join(mark[results[f"{arch}/{x}"][0]] for x in methods) + " |")
    if ckpts:
        lines += ["", "| prune_checkpoint (tiny Llama, sparsegpt 0.5, tensors of the written shards) | result |",
                  "|---|---|"]
        lines += [f"| `{c.split('/', 1)[1]}` | {mark[results[c][0]]} |" for c in ckpts]
    lines += ["", "Configs (PruneConfig fields; every cell also sets "
              f"nsamples={NSAMPLES}, seqlen={SEQLEN}, device=cpu, seed={PRUNE_SEED}):", ""]
    lines += [f"- `{x}`: `{json.dumps(METHODS[x])}`{changed(x)}" for x in methods]
    lines += [f"- `{_config_of(c)}`: `{json.dumps(CHECKPOINT_CELLS[_config_of(c)])}`, nsamples=4 windows of a .txt "
              f"calibration file{changed(_config_of(c))}" for c in ckpts]
    lines += ["", "Dropped configs (refused by tree A's PruneConfig): " + (
        "; ".join(f"`{k}` ({v})" for k, v in dropped.items()) if dropped else "none.")]
    bad = [(c, results[c]) for c in cells if results[c][0] != "identical"]
    if bad:
        lines += ["", "## Not identical", ""]
        for c, (status, diff) in bad:
            shown = ", ".join(f"`{d}`" for d in diff[:20]) + (f" ... ({len(diff)} in all)" if len(diff) > 20 else "")
            lines.append(f"- {c}: {status}: {shown}")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    print(text)
    return n_same == len(cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", action="append", type=Path, default=[],
                   help="source tree (the folder holding the llmprune package); twice: A and B")
    p.add_argument("--reference-json", type=Path, help="tree A's results from an earlier --save-a; then one --tree (B)")
    p.add_argument("--quick", action="store_true", help="3 architectures x 3 methods")
    p.add_argument("--out", type=Path, default=Path("eval/results/compare_trees.md"), help="markdown report")
    p.add_argument("--save-a", type=Path, help="write tree A's results JSON here (usable as --reference-json)")
    p.add_argument("--save-b", type=Path, help="write tree B's results JSON here")
    p.add_argument("--jobs", type=int, default=2, help="worker processes in all, each at 1 thread (default 2; with two trees: one per tree)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-cells", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        return worker(ns.tree[0], ns.worker_cells.split(","), ns.worker_out)

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    t0 = time.perf_counter()
    ns.tree = [t.resolve() for t in ns.tree]
    for t in ns.tree:
        if package_root(t) is None:
            p.error(f"{t} holds no llmprune package (llmprune/__init__.py or src/llmprune/__init__.py)")
    if ns.reference_json:
        if len(ns.tree) != 1:
            p.error("with --reference-json give exactly one --tree (B)")
        a = json.loads(ns.reference_json.read_text(encoding="utf-8"))
        if a.get("format") != FORMAT:
            p.error(f"{ns.reference_json} has results format {a.get('format')}, this script writes {FORMAT}")
        if not set(cell_ids(ns.quick)) <= set(a["grid"]):
            p.error(f"{ns.reference_json} holds the {'quick' if a['quick'] else 'full'} grid; make a full one with "
                    "--save-a (it serves --quick too)")
        a["grid"] = cell_ids(ns.quick)  # a full reference serves --quick
        if a.get("configs") != _grid_settings():
            p.error(f"{ns.reference_json} was made with other grid settings (models, configs, seeds) than this "
                    "script's; make it again with --save-a")
        trees = [("B", ns.tree[0])]
    else:
        if len(ns.tree) not in (1, 2):
            p.error("give --tree twice (A and B), or once with --reference-json, or once with --save-a")
        if len(ns.tree) == 1 and not ns.save_a:
            p.error("one --tree without --reference-json only records results: give --save-a FILE")
        trees = list(zip("AB", ns.tree))
        a = None
    jobs = max(1, ns.jobs)
    if len(trees) == 2 and jobs >= 2:  # both trees at once, jobs // 2 processes each
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(2) as pool:
            futs = {label: pool.submit(run_tree, t, ns.quick, max(1, jobs // 2)) for label, t in trees}
            res = {label: f.result() for label, f in futs.items()}
    else:
        res = {label: run_tree(t, ns.quick, jobs) for label, t in trees}
    a = a or res["A"]
    b = res.get("B")
    for label, path in (("A", ns.save_a), ("B", ns.save_b)):
        if path is not None and (label in res):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res[label], indent=1), encoding="utf-8")
            print(f"tree {label} results: {path}", file=sys.stderr)
    if b is None:
        errors = [c for c, r in a["cells"].items() if "error" in r or "invalid" in r]
        print(f"{len(a['cells'])} cells recorded for {a['tree']} in {time.perf_counter() - t0:.0f} s"
              + (f"; errors in: {', '.join(errors)}" if errors else ""))
        return 1 if errors else 0
    same = write_report(a, b, command, ns.out, time.perf_counter() - t0)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
