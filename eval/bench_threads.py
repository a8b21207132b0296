"""Benchmark (issue 16): wall time of `llmprune eval` and `llmprune prune` alone and two side by side,
with the thread policy (`--threads auto`) and with torch's own defaults (`--threads torch`).

Protocol: the embedded SmolLM2-135M-Instruct. Eval: ARC-Challenge offline, 20 documents, batch 1
(`--tasks arc_challenge --limit 20 --batch-size 1`). Prune: SparseGPT 50 % unstructured, 32 windows
x 512 tokens of the local C4 slice (the benchmark protocol of eval/bench_prune.py). Every run is a
separate process timed end to end; lone runs are repeated (median of --repeats, default 3); a pair
is two runs started at the same moment, each timed on its own. Only valid on an otherwise idle
machine: the script records the load average and runnable tasks before it starts.

    python eval/bench_threads.py --data-dir /work/shared/data            # full, ~25 min on 2 cores
    python eval/bench_threads.py --data-dir /work/shared/data --quick    # smoke test, tiny settings

writes eval/results/threads.md and eval/results/threads.json (--quick: *_quick.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = {"policy": "auto", "torch defaults": "torch"}
TARGETS = {"eval": 1.3, "prune": 2.3}  # issue 16: a side-by-side run at most this many times the lone run


def commands(kind: str, data_dir: str, quick: bool, out: Path) -> list[str]:
    """The llmprune command line of one run of ``kind`` (eval or prune)."""
    base = [sys.executable, "-m", "llmprune.cli"]
    if kind == "eval":
        return [*base, "eval", "--tasks", "arc_challenge", "--limit", "2" if quick else "20", "--batch-size", "1",
                "--data-dir", data_dir, "--quiet", "--output", str(out / "eval.json")]
    return [*base, "prune", "--method", "sparsegpt", "--sparsity", "0.5", "--data-dir", data_dir,
            "--nsamples", "2" if quick else "32", "--seqlen", "64" if quick else "512", "--quiet",
            "--output", str(out / "model"), "--overwrite"]


def start(cmd: list[str], threads: str) -> tuple[subprocess.Popen, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                             "LLMPRUNE_THREADS")}
    err = tempfile.TemporaryFile(mode="w+")  # not a pipe: the child is reaped with os.wait4 for its CPU time
    proc = subprocess.Popen([*cmd, "--threads", threads], env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    proc._bench_err = err  # type: ignore[attr-defined]
    return proc, time.perf_counter()


def finish(proc: subprocess.Popen, t0: float) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of one run."""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc._bench_err  # type: ignore[attr-defined]
    err.seek(0)
    text = err.read()
    err.close()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed (exit {proc.returncode}): {' '.join(map(str, proc.args))}\n{text[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime


def lone(kind: str, threads: str, args: argparse.Namespace, work: Path) -> list[tuple[float, float]]:
    times = []
    for i in range(args.repeats):
        out = work / f"{kind}-{threads}-lone-{i}"
        out.mkdir(parents=True, exist_ok=True)
        times.append(finish(*start(commands(kind, args.data_dir, args.quick, out), threads)))
    return times


def pair(kind: str, threads: str, args: argparse.Namespace, work: Path) -> list[tuple[float, float]]:
    runs = []
    for i in range(2):
        out = work / f"{kind}-{threads}-pair-{i}"
        out.mkdir(parents=True, exist_ok=True)
        runs.append(start(commands(kind, args.data_dir, args.quick, out), threads))
    return [finish(p, t0) for p, t0 in runs]


def machine_state() -> dict:
    from llmprune.runtime.threads import cgroup_quota, runnable_tasks

    return {"cores": len(os.sched_getaffinity(0)), "quota": cgroup_quota(), "load1": round(os.getloadavg()[0], 2),
            "runnable_others": runnable_tasks()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def omp_runtime() -> str:
    import torch

    info = torch.__config__.parallel_info()
    return "OpenMP (" + ("Intel libiomp5" if "Intel(R) OpenMP" in info else "GNU libgomp") + ")"


def measure(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="llmprune-bench-threads-", dir=args.workdir))
    before = machine_state()
    rows = []
    for kind in args.kinds:
        for label, threads in POLICIES.items():
            alone_runs = lone(kind, threads, args, work)
            both_runs = pair(kind, threads, args, work)
            alone, both = [w for w, _ in alone_runs], [w for w, _ in both_runs]
            med = statistics.median(alone)
            cpu = statistics.median(c for _, c in alone_runs)
            cores = len(os.sched_getaffinity(0))
            rows.append({"kind": kind, "policy": label, "threads": threads, "lone": alone, "lone_median": med,
                         "lone_cpu": [c for _, c in alone_runs], "lone_cpu_median": cpu,
                         "pair": both, "pair_cpu": [c for _, c in both_runs], "ratio": [b / med for b in both],
                         # two runs need twice the lone CPU time on `cores` cores: no pair can beat this
                         "floor": max(1.0, 2 * cpu / cores / med)})
            print(f"{kind:5s} {label:15s} lone {med:6.1f} s  pair {both[0]:6.1f} / {both[1]:6.1f} s  "
                  f"({max(both) / med:.2f}x)", flush=True)
    return {"rows": rows, "before": before, "after": machine_state(), "machine": machine(), "runtime": omp_runtime(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "eval/bench_threads.py", *sys.argv[1:]]), "quick": args.quick,
            "repeats": args.repeats}


def markdown(res: dict) -> str:
    lines = [
        "# Threads on a shared machine (issue 16)", "",
        f"Command: `{res['command']}`  ", f"Date: {res['date']}  ", f"Machine: {res['machine']}; {res['runtime']}  ",
        f"Before: {res['before']}; after: {res['after']}", "",
        "Protocol: the embedded SmolLM2-135M-Instruct. eval: `--tasks arc_challenge --limit 20 --batch-size 1` "
        "(offline data dir); prune: SparseGPT 50 %, `--nsamples 32 --seqlen 512` (C4 slice). Each run is a "
        f"separate process timed end to end; lone: median of {res['repeats']} runs; pair: two runs started "
        "together, each timed. `policy` = `--threads auto`; `torch defaults` = `--threads torch`.",
        *(["", "**--quick smoke run: tiny settings, numbers are not the benchmark.**"] if res["quick"] else []), "",
        "| command | threads | lone (s), median | lone runs (s) | lone CPU (s), median | pair (s) | pair CPU (s) "
        "| pair / lone | floor | target |",
        "|---|---|---:|---|---:|---|---|---:|---:|---|",
    ]
    for r in res["rows"]:
        worst = max(r["ratio"])
        target = TARGETS[r["kind"]]
        verdict = f"<= {target}x " + ("met" if worst <= target else "missed") if r["threads"] == "auto" else ""
        cpu = f"{r['lone_cpu_median']:.1f}" if "lone_cpu_median" in r else "-"
        pair_cpu = ", ".join(f"{t:.1f}" for t in r["pair_cpu"]) if "pair_cpu" in r else "-"
        floor = f"{r['floor']:.2f}x" if "floor" in r else "-"
        lines.append(f"| {r['kind']} | {r['policy']} | {r['lone_median']:.1f} | "
                     f"{', '.join(f'{t:.1f}' for t in r['lone'])} | {cpu} | {', '.join(f'{t:.1f}' for t in r['pair'])} "
                     f"| {pair_cpu} | {worst:.2f}x | {floor} | {verdict} |")
    by = {(r["kind"], r["threads"]): r for r in res["rows"]}
    notes = []
    for kind in TARGETS:
        if (kind, "auto") in by and (kind, "torch") in by:
            a, t = by[(kind, "auto")]["lone_median"], by[(kind, "torch")]["lone_median"]
            notes.append(f"- lone {kind}: policy {a:.1f} s vs torch defaults {t:.1f} s ({a / t:.2f}x)")
    notes.append("- floor: 2 x the lone run's CPU time / the cores / the lone wall time, the least a pair can take "
                 "when both runs do the lone run's work (CPU time = user + system of the child, spinning included)")
    return "\n".join([*lines, "", *notes, ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR"), required="LLMPRUNE_DATA_DIR" not in
                    os.environ, help="the offline data dir (calibration slice and eval/tasks documents)")
    ap.add_argument("--kinds", nargs="+", choices=["eval", "prune"], default=["eval", "prune"])
    ap.add_argument("--repeats", type=int, default=None, help="lone runs per setting (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script end to end")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--results", default=None, help="path stem of the outputs (default eval/results/threads)")
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: give at least 1")
    res = measure(args)
    stem = Path(args.results) if args.results else HERE / "results" / ("threads_quick" if args.quick else "threads")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
