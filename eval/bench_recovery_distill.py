"""Benchmark: recovery after pruning by distillation from the dense model (issue 29).

Protocol: the embedded SmolLM2-135M-Instruct in float32 on the CPU (``--device cuda`` with bf16 autocast is the
same command on a GPU), pruned three ways from 32 C4 windows of 512 tokens (seed 0, as eval/results/prune.md):
Wanda 60 %, SparseGPT 2:4, and the ``structured-25`` recipe (a quarter of the decoder's parameters removed).
Each is then trained by :func:`llmprune.recovery.recover` on C4 windows of 4 x 256 tokens per step, drawn with
seed ``seed + 1`` and held apart from the calibration windows (no run of 32 tokens shared), with three losses
on the same tokens: the LM loss only, logit KD (T = 1), and KD + SquareHead (weight 1 each); AdamW at
``--lr`` (constant, clipping at 1.0), masks kept by ``SparsityKeeper``.

Measured: WikiText-2 perplexity (raw test, ``--ppl-seqlen`` tokens, the first ``--ppl-windows`` windows) after
0, 25 and 100 steps (seed 0), the 25-step point also over seeds 1 and 2 (mean and spread); the zero-shot
tasks of the data dir (``--tasks``, ``--limit`` documents each) before and after the 100 steps; seconds per
step and the peak resident memory of the run's process (each run is a process of its own, started by this
script, so peaks do not mix; on CUDA the peak allocated memory). Also: KD from an offline top-k teacher
(``--top-k``) against the in-memory teacher (perplexity and peak memory), and the LoRA merge: the merged
model's sparsity and perplexity against the unmerged adapter's.

    python eval/bench_recovery_distill.py --data-dir ../shared/data [--steps 25,100 --seeds 0,1,2 --lr 1e-4]
    python eval/bench_recovery_distill.py --smoke      # a tiny random model, 1 step of each run: checks the script

Writes eval/results/recovery_distill.json and eval/results/recovery_distill.md (``--output``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

PRUNED = {  # name -> the prune command's flags (the model and --output are added)
    "wanda-60": ["--method", "wanda", "--sparsity", "0.6"],
    "sparsegpt-2of4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "structured-25": ["--recipe", "structured-25"],
}
LOSSES = {  # name -> RecoverConfig weights
    "lm": {"kd_weight": 0.0, "squarehead_weight": 0.0, "lm_weight": 1.0},
    "kd": {"kd_weight": 1.0, "squarehead_weight": 0.0, "lm_weight": 0.0},
    "kd+squarehead": {"kd_weight": 1.0, "squarehead_weight": 1.0, "lm_weight": 0.0},
}


def _peak_reset() -> None:
    """Reset the process's peak resident size (Linux: ``5 > /proc/self/clear_refs``), so the peak of the
    training is measured, not that of what ran before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# One run, in a process of its own
# ---------------------------------------------------------------------------------------------
def run_one(spec: dict) -> dict:
    """Recover ``spec["student"]`` with ``spec["config"]``; perplexity at the steps of ``spec["eval_at"]``."""
    import torch

    import llmprune
    from llmprune.checkpoint.load import load_model
    from llmprune.recovery import OfflineTeacher, RecoverConfig, recover

    torch.set_num_threads(spec["threads"]) if spec.get("threads") else None
    torch.manual_seed(0)
    eval_kw = dict(ppl=[spec["ppl"]], seqlen=spec["ppl_seqlen"], max_windows=spec["ppl_windows"],
                   data_dir=spec.get("data_dir"), progress=False)

    def ppl(model, tok) -> float:
        r = llmprune.evaluate(model, tok, **eval_kw)
        return next(v for k, v in r.metrics.items() if k.endswith("/ppl"))

    student, tok, _ = load_model(spec["student"], dtype="float32")
    out: dict = {"name": spec["name"]}
    if spec.get("eval_only"):
        out["ppl"] = {"0": ppl(student, tok)}
        if spec.get("tasks"):
            r = llmprune.evaluate(student, tok, tasks=spec["tasks"], limit=spec["limit"], data_dir=spec.get("data_dir"),
                                  progress=False)
            out["tasks"] = {k: v for k, v in r.metrics.items() if "/acc" in k}
        return out
    cfg = RecoverConfig(**spec["config"])
    if spec.get("offline"):
        teacher = OfflineTeacher(spec["offline"])
    elif cfg.needs_teacher:
        teacher, _, _ = load_model(spec.get("teacher"), dtype="float32")
    else:
        teacher = None
    points: dict[str, float] = {}
    unmerged: dict[str, float] = {}

    def at_step(step: int, losses: dict) -> None:
        if str(step) in map(str, spec["eval_at"]) and step != cfg.steps:
            points[str(step)] = ppl(student, tok)
        if cfg.lora and step == cfg.steps:  # before the merge: the adapter on the sparse base
            unmerged["ppl"] = ppl(student, tok)

    _peak_reset()
    t0 = time.perf_counter()
    r = recover(student, teacher, tok, cfg, progress=spec.get("progress", False), callback=at_step)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = _peak_rss()
    out["peak_cuda_bytes"] = r.peak_cuda_bytes
    out["seconds_per_step"] = r.seconds_per_step
    points[str(cfg.steps)] = ppl(r.model, tok)
    out["ppl"] = points
    out["losses"] = {"first": r.history[0], "last": r.history[-1]}
    out["sparsity"] = r.sparsity
    out["data"] = r.data
    if cfg.lora:
        out["lora"] = {"merged_ppl": points[str(cfg.steps)], "unmerged_ppl": unmerged.get("ppl"), "merge": r.merge}
    if spec.get("tasks"):
        t = llmprune.evaluate(r.model, tok, tasks=spec["tasks"], limit=spec["limit"], data_dir=spec.get("data_dir"),
                              progress=False)
        out["tasks"] = {k: v for k, v in t.metrics.items() if "/acc" in k}
    return out


def spawn(spec: dict, work: Path) -> dict:
    """:func:`run_one` in a child process (its own peak memory); the spec and the result go through files. A
    result of the same spec already in ``work`` is reused (a rerun with ``--work`` redoes only what changed)."""
    path = work / f"spec-{spec['name']}.json"
    res = work / f"result-{spec['name']}.json"
    if res.is_file() and path.is_file() and json.loads(path.read_text()) == spec:
        print(f"== {spec['name']} (reused: the same spec finished in {work})", flush=True)
        return json.loads(res.read_text())
    path.write_text(json.dumps(spec))
    res.unlink(missing_ok=True)
    print(f"== {spec['name']}", flush=True)
    subprocess.run([sys.executable, __file__, "--one", str(path), "--result", str(res)], check=True)
    return json.loads(res.read_text())


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def prune_all(args, work: Path, model: str | None, extra: list[str]) -> dict[str, Path]:
    from llmprune.cli import main as cli

    out = {}
    for name, flags in PRUNED.items():
        if name not in args.models:
            continue
        folder = work / name
        if not (folder / "config.json").is_file():
            argv = ["prune", *([model] if model else []), *flags, *extra, "--output", str(folder), "--quiet"]
            print("llmprune " + " ".join(argv), flush=True)
            if cli(argv) != 0:
                raise SystemExit(f"pruning {name} failed")
        out[name] = folder
    return out


def grid(args, work: Path, pruned: dict[str, Path], teacher: str | None, base: dict, base_cfg: dict) -> dict:
    steps = sorted(args.steps)
    long, short = steps[-1], steps[0]
    res: dict = {"dense": spawn({**base, "name": "dense", "student": teacher, "eval_only": True}, work)}
    for name, folder in pruned.items():
        row: dict = {"pruned": spawn({**base, "name": f"{name}-0", "student": str(folder), "eval_only": True}, work)}
        for loss in args.losses:
            runs = {}
            for seed in args.seeds:
                n = long if seed == args.seeds[0] else short
                cfg = {**base_cfg, **LOSSES[loss], "steps": n, "seed": seed}
                runs[str(seed)] = spawn({**base, "name": f"{name}-{loss}-s{seed}", "student": str(folder),
                                         "teacher": teacher, "config": cfg, "eval_at": steps,
                                         "tasks": base["tasks"] if seed == args.seeds[0] else None}, work)
            row[loss] = runs
        res[name] = row
    if "wanda-60" in pruned and args.offline:  # offline top-k against the in-memory teacher, same tokens
        folder = pruned["wanda-60"]
        cfg = {**base_cfg, **LOSSES["kd"], "steps": short, "seed": args.seeds[0], "top_k": args.top_k}
        res["topk_in_memory"] = spawn({**base, "name": "wanda-60-kd-topk-memory", "student": str(folder),
                                       "teacher": teacher, "config": cfg, "eval_at": [short]}, work)
        cache = work / "teacher-cache"
        pre = {**cfg, "offline_teacher": str(cache)}  # the teacher's pass alone, then the run with the folder only
        spawn({**base, "name": "wanda-60-precompute", "student": str(folder), "teacher": teacher,
               "config": {**pre, "steps": short}, "eval_at": [short], "precompute_only": True}, work)
        res["topk_offline"] = spawn({**base, "name": "wanda-60-kd-topk-offline", "student": str(folder),
                                     "offline": str(cache), "config": cfg, "eval_at": [short]}, work)
    if "wanda-60" in pruned and args.lora:
        cfg = {**base_cfg, **LOSSES["kd"], "steps": short, "seed": args.seeds[0], "lora": True, "lr": args.lora_lr}
        res["lora"] = spawn({**base, "name": "wanda-60-kd-lora", "student": str(pruned["wanda-60"]),
                             "teacher": teacher, "config": cfg, "eval_at": [short]}, work)
    return res


def precompute_only(spec: dict) -> dict:
    """The offline teacher's pass: the dense model alone, over the windows the run will draw."""
    from llmprune.checkpoint.format import read_config
    from llmprune.checkpoint.load import load_model
    from llmprune.loading.models import load_tokenizer
    from llmprune.recovery import RecoverConfig, precompute_teacher, training_windows

    cfg = RecoverConfig(**spec["config"])
    meta = read_config(Path(spec["student"])).get("llmprune") or {}
    tok = load_tokenizer(spec["student"])
    windows, _ = training_windows(cfg, tok, meta.get("calibration"), (meta.get("config") or {}).get("calib"))
    teacher, _, _ = load_model(spec.get("teacher"), dtype="float32")
    B = cfg.batch_size
    batches = [windows[[(i * B + j) % len(windows) for j in range(B)]] for i in range(cfg.steps)]
    _peak_reset()
    t0 = time.perf_counter()
    precompute_teacher(teacher, batches, cfg.offline_teacher, top_k=cfg.top_k or 64, teacher_name="dense")
    return {"name": spec["name"], "seconds": time.perf_counter() - t0, "peak_rss_bytes": _peak_rss()}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _gap_closed(dense: float, pruned: float, after: float) -> float:
    return (pruned - after) / (pruned - dense) if pruned != dense else float("nan")


def write(out: dict, args) -> None:
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(out, indent=1) + "\n")
    res, steps = out["results"], sorted(args.steps)
    gap_at = sorted({steps[0], steps[-1]})
    dense = res["dense"]["ppl"]["0"]
    lines = [f"# Recovery by distillation after pruning ({out['date']})", "",
             f"`{out['command']}`", "", f"- machine: {out['machine']}", f"- protocol: {out['protocol']}", "",
             f"Dense WikiText-2 perplexity: {dense:.2f}.", "",
             "| model | loss | " + " | ".join(f"ppl @{s}" for s in [0, *steps]) + " | "
             + " | ".join(f"gap closed @{s}" for s in gap_at)
             + f" | @{steps[0]} over seeds (mean ± sd) | s/step | peak MB |",
             "|---|---|" + "---:|" * (len(steps) + len(gap_at) + 4)]
    for name, row in res.items():
        if name in ("dense", "topk_in_memory", "topk_offline", "lora"):
            continue
        p0 = row["pruned"]["ppl"]["0"]
        for loss in args.losses:
            runs = row.get(loss) or {}
            first = runs.get(str(args.seeds[0]))
            if first is None:
                continue
            pts = [p0, *[first["ppl"].get(str(s)) for s in steps]]
            seeds = [r["ppl"].get(str(steps[0])) for r in runs.values() if r["ppl"].get(str(steps[0])) is not None]
            spread = (f"{statistics.mean(seeds):.2f} ± {statistics.stdev(seeds):.2f}" if len(seeds) > 1
                      else f"{seeds[0]:.2f}" if seeds else "")
            peak = first.get("peak_cuda_bytes") or first.get("peak_rss_bytes") or 0
            lines.append(f"| {name} | {loss} | " + " | ".join(f"{v:.2f}" if v is not None else "" for v in pts)
                         + " | " + " | ".join(f"{_gap_closed(dense, p0, pts[1 + steps.index(s)]):.0%}" for s in gap_at)
                         + " | "
                         f"{spread} | {first['seconds_per_step']:.2f} | {peak / 2**20:.0f} |")
    if "topk_offline" in res:
        a, b = res["topk_in_memory"], res["topk_offline"]
        s = str(steps[0])
        lines += ["", f"Offline top-{args.top_k} teacher against the in-memory one (Wanda 60 %, KD, {s} steps): "
                  f"perplexity {b['ppl'][s]:.2f} vs {a['ppl'][s]:.2f} ({b['ppl'][s] / a['ppl'][s] - 1:+.1%}); peak "
                  f"memory {(b['peak_rss_bytes'] or 0) / 2**20:.0f} MB vs {(a['peak_rss_bytes'] or 0) / 2**20:.0f} MB "
                  f"({(b['peak_rss_bytes'] or 0) / max(a['peak_rss_bytes'] or 1, 1):.2f}x)."]
    if "lora" in res:
        lo = res["lora"]["lora"]
        lines += ["", f"LoRA (KD, Wanda 60 %): merged perplexity {lo['merged_ppl']:.3f}, unmerged adapter "
                  f"{lo['unmerged_ppl']:.3f} ({lo['merged_ppl'] / lo['unmerged_ppl'] - 1:+.2%}); sparsity "
                  f"{res['lora']['sparsity']['before']} -> {res['lora']['sparsity']['after']}, "
                  f"{lo['merge'].get('dropped_fraction', 0):.1%} of the adapters' squared update dropped."]
    tasks = {k: v for k, v in res.items() if isinstance(v, dict) and "pruned" in v and v["pruned"].get("tasks")}
    if tasks:
        lines += ["", "Zero-shot tasks (accuracy) before and after the longest run:", ""]
        for name, row in tasks.items():
            for loss in args.losses:
                after = ((row.get(loss) or {}).get(str(args.seeds[0])) or {}).get("tasks") or {}
                lines.append(f"- {name}, {loss}: " + ", ".join(
                    f"{k} {row['pruned']['tasks'][k]:.3f} -> {after.get(k, float('nan')):.3f}"
                    for k in row["pruned"]["tasks"]))
    Path(args.output + ".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}.md and .json")


def smoke_setup(work: Path) -> tuple[str, list[str], dict]:
    """A tiny random Llama with a byte tokenizer and a text file: the script's paths, in seconds."""
    import random

    import torch
    from compare_trees import byte_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model_dir = work / "tiny-dense"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    text = work / "text.txt"
    text.write_text(" ".join(rng.choice(["sparse", "dense", "teacher", "student", "mask", "layer", "loss", "step"])
                             for _ in range(20000)))
    extra = ["--calib", str(text), "--nsamples", "4", "--seqlen", "64"]
    return str(model_dir), extra, {"calib": str(text), "ppl": str(text)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="the offline data folder (../shared/data)")
    ap.add_argument("--work", help="folder for the pruned models and the teacher cache (default: a temporary one)")
    ap.add_argument("--models", type=lambda s: s.split(","), default=list(PRUNED))
    ap.add_argument("--losses", type=lambda s: s.split(","), default=list(LOSSES))
    ap.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[25, 100],
                    help="evaluation points; the first seed runs to the last, the other seeds to the first")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--tasks", default="piqa,arc_easy", help="zero-shot tasks before and after ('' for none)")
    ap.add_argument("--limit", type=float, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 1 step per run: checks the script")
    ap.add_argument("--output", default=str(HERE / "results" / "recovery_distill"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child: one run
        spec = json.loads(Path(args.one).read_text())
        out = precompute_only(spec) if spec.get("precompute_only") else run_one(spec)
        Path(args.result).write_text(json.dumps(out))
        return 0

    from bench_prune import machine

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-recovery-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    data = {"data_dir": args.data_dir} if args.data_dir else {}
    if args.smoke:
        teacher, extra, src = smoke_setup(work)
        args.steps, args.seeds, args.ppl_seqlen, args.ppl_windows, args.tasks = [1], [0], 64, 2, ""
        args.threads = args.threads or 1
        args.output = str(work / "recovery_distill")
        PRUNED["wanda-60"] = ["--method", "wanda", "--sparsity", "0.6"]
        PRUNED["structured-25"] = ["--remove-layers", "1"]  # a structured student without its second layer
        base_cfg = {"calib": src["calib"], "batch_size": 2, "seqlen": 32, "lr": args.lr, "device": args.device,
                    "max_grad_norm": 1.0, "save_every": 0, "eval_every": 0}
        ppl = src["ppl"]
    else:
        if not args.data_dir:
            ap.error("--data-dir is required (or --smoke)")
        teacher, extra = None, ["--calib", "c4", "--nsamples", "32", "--seqlen", "512", "--seed", "0",
                                "--data-dir", args.data_dir]
        base_cfg = {"calib": "c4", "batch_size": args.batch_size, "seqlen": args.seqlen, "lr": args.lr,
                    "device": args.device, "max_grad_norm": 1.0, "save_every": 0, "eval_every": 0, **data}
        ppl = "wikitext2"
    base = {"ppl": ppl, "ppl_seqlen": args.ppl_seqlen, "ppl_windows": args.ppl_windows, "threads": args.threads,
            "tasks": [t for t in args.tasks.split(",") if t], "limit": args.limit, **data}
    t0 = time.perf_counter()
    pruned = prune_all(args, work, teacher, extra)
    results = grid(args, work, pruned, teacher, base, base_cfg)
    out = {"command": "python eval/bench_recovery_distill.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "date": datetime.date.today().isoformat(), "seconds": time.perf_counter() - t0,
           "protocol": (f"{base_cfg['batch_size']} x {base_cfg['seqlen']} {Path(base_cfg['calib']).name} tokens per "
                        f"step, lr {args.lr} (constant, AdamW, clip 1.0), {Path(ppl).name} ppl at seqlen "
                        f"{args.ppl_seqlen} over {args.ppl_windows} windows" + (" (--smoke: a tiny random model)"
                                                                                 if args.smoke else "")),
           "settings": vars(args) | {"pruned": {k: PRUNED[k] for k in pruned}}, "results": results}
    write(out, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
