"""Benchmark: quality, wall time and peak memory of `llmprune prune`, optionally beside llm-compressor.

Protocol (issue 2): the embedded SmolLM2-135M-Instruct in float32; calibration 32 windows x 512
tokens from the local C4 slice, seed 0; perplexity on WikiText-2 raw test, seqlen 2048, first 16
windows. Every prune run is a separate process, timed end to end (load, calibrate, prune, save)
and its peak resident memory read from the kernel (``wait4`` rusage, i.e. ru_maxrss). The
perplexity of every output is computed afterwards by the same evaluator.

    python eval/bench_prune.py --data-dir ../shared/data \
        [--peer-python /tmp/lcvenv/bin/python] [--configs sparsegpt:unstructured wanda:2:4 ...]

writes eval/results/prune.md (a markdown table with the command, machine, date and protocol)
and eval/results/prune.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = [
    "magnitude:unstructured", "magnitude:2:4",
    "wanda:unstructured", "wanda:2:4",
    "sparsegpt:unstructured", "sparsegpt:2:4",
    "sparsegpt:unstructured@self",
]
# llm-compressor 0.14 oneshot on this protocol, from the issue (for reference beside our own run)
PEER_REFERENCE = {"sparsegpt:unstructured": 42.07, "sparsegpt:2:4": 79.35, "wanda:unstructured": 45.78,
                  "wanda:2:4": 167.31}


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS (MB) of the process and its exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out_lines.append(line)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss_mb": rusage.ru_maxrss / 1024, "rc": proc.returncode,
            "output": "".join(out_lines[-40:])}


def perplexity_of(folder: Path, data_dir: str, seqlen: int, windows: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.evaluation import perplexity, wikitext2_test_text

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    res = perplexity(model, tok, wikitext2_test_text(data_dir), seqlen=seqlen, max_windows=windows)
    return res.to_dict()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                    help="method:pattern[@calib] entries (calib defaults to c4), e.g. sparsegpt:2:4 wanda:unstructured@self")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--peer-python", help="python of a venv with llmcompressor (runs eval/peer_llmcompressor.py)")
    ap.add_argument("--peer-configs", nargs="+", default=["sparsegpt:unstructured"])
    ap.add_argument("--workdir", default="/tmp/llmprune-bench")
    ap.add_argument("--results", default=str(HERE / "results" / "prune"))
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--keep-earlier", action="store_true",
                    help="keep the rows of the existing results file for configs this run does not measure "
                         "(marked as from an earlier run; never used for the ratios)")
    args = ap.parse_args()

    from llmprune.loading.models import embedded_model_path

    dense = embedded_model_path()  # converted once, outside the timed runs
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []

    def record(tool: str, spec: str, folder: Path, meas: dict) -> None:
        row = {"tool": tool, "config": spec, **{k: v for k, v in meas.items() if k != "output"}}
        if meas["rc"] != 0:
            print(meas["output"], file=sys.stderr)
            raise SystemExit(f"{tool} {spec} failed with exit code {meas['rc']}")
        rows.append((row, folder))
        print(f"{tool:13s} {spec:24s} wall {meas['wall_s']:7.1f}s  peak RSS {meas['peak_rss_mb']:7.0f} MB", flush=True)

    for spec in args.configs:
        spec_mp, _, calib = spec.partition("@")
        method, pattern = spec_mp.split(":", 1)
        calib = calib or "c4"
        folder = work / f"llmprune-{method}-{pattern.replace(':', 'of')}-{calib}"
        cmd = [sys.executable, "-m", "llmprune.cli", "prune", "--method", method, "--pattern", pattern,
               "--calib", calib, "--data-dir", args.data_dir, "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--dtype", "float32",
               "--device", "cpu", "--output", str(folder), "--overwrite", "--quiet"]
        record("llmprune", spec, folder, run_measured(cmd, env))

    if args.peer_python:
        for spec in args.peer_configs:
            method, pattern = spec.split(":", 1)
            folder = work / f"peer-{method}-{pattern.replace(':', 'of')}"
            cmd = [args.peer_python, str(HERE / "peer_llmcompressor.py"), "--model", str(dense),
                   "--method", method, "--data-dir", args.data_dir, "--nsamples", str(args.nsamples),
                   "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--output", str(folder)]
            cmd += ["--sparsity", "0.5"] if pattern == "unstructured" else ["--pattern", pattern]
            record("llm-compressor", spec, folder, run_measured(cmd, env))

    results = []
    if not args.skip_ppl:
        dense_ppl = perplexity_of(dense, args.data_dir, args.ppl_seqlen, args.ppl_windows)
        results.append({"tool": "dense", "config": "-", "ppl": dense_ppl["ppl"]})
        print(f"dense ppl {dense_ppl['ppl']:.2f}", flush=True)
    for row, folder in rows:
        if not args.skip_ppl:
            row["ppl"] = perplexity_of(folder, args.data_dir, args.ppl_seqlen, args.ppl_windows)["ppl"]
            print(f"{row['tool']:13s} {row['config']:24s} ppl {row['ppl']:.2f}", flush=True)
        results.append(row)

    earlier = Path(args.results).with_suffix(".json")
    if args.keep_earlier and earlier.is_file():
        measured = {(r["tool"], r["config"]) for r in results}
        for r in json.loads(earlier.read_text())["results"]:
            if (r["tool"], r["config"]) not in measured:
                results.append({**r, "earlier_run": r.get("earlier_run", True)})
    write_results(args, results)
    return 0


def write_results(args: argparse.Namespace, results: list[dict]) -> None:
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "transformers") if _has(p)}
    cmd = "python eval/bench_prune.py " + " ".join(sys.argv[1:])
    peer = {r["config"]: r for r in results if r["tool"] == "llm-compressor"}
    lines = [
        "# Pruning benchmark: quality, time, memory",
        "",
        f"- command: `{cmd}`",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- versions: {versions}",
        f"- protocol: embedded SmolLM2-135M-Instruct, float32, CPU; calibration {args.nsamples} x {args.seqlen} "
        f"tokens from the local C4 slice (`@self`: text sampled by the model itself), seed {args.seed}; perplexity on WikiText-2 raw test, seqlen "
        f"{args.ppl_seqlen}, first {args.ppl_windows} windows. Wall time and peak RSS are of the whole "
        "process (load, calibrate, prune, save), measured with wait4().",
        "",
        "| tool | method:pattern | WikiText-2 ppl | wall (s) | peak RSS (MB) | llm-compressor ppl (issue) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        ref = PEER_REFERENCE.get(r["config"], "-") if r["tool"] == "llmprune" else "-"  # @self has none
        config = f"{r['config']} (earlier run)" if r.get("earlier_run") else r["config"]
        lines.append(f"| {r['tool']} | {config} | {ppl} | {wall} | {rss} | {ref} |")
    if peer:
        lines += ["", "Ratios against llm-compressor in this same run:", ""]
        for r in results:
            if r["tool"] == "llmprune" and "wall_s" in r and not r.get("earlier_run"):
                base = peer.get("sparsegpt:unstructured")
                if base:
                    lines.append(
                        f"- {r['config']}: wall {r['wall_s'] / base['wall_s']:.2f}x, peak RSS "
                        f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x of llm-compressor sparsegpt:unstructured"
                    )
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "results": results}, indent=2) + "\n")
    print("\n".join(lines))


def _has(pkg: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(pkg)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
