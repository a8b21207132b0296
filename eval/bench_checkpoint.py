"""Checkpoint size, load time and load peak memory: dense vs llmprune's compressed format.

Reproduce (one command; writes eval/results/checkpoint.md and checkpoint.json):

    LLMPRUNE_DATA_DIR=/work/shared/data python eval/bench_checkpoint.py --work /tmp/bench-ckpt

Protocol: the embedded SmolLM2-135M-Instruct is pruned in bfloat16 with ``--method magnitude``
(the format does not depend on the method) at 50 % unstructured and at 2:4, saved dense, then
compressed with ``llmprune compress``. Size: all weight files (``*.safetensors``) in the folder.
Load: ``llmprune.load(folder)`` in a fresh ``python`` subprocess per measurement (the import of
torch/transformers excluded from the timing), ``--repeats`` times each, interleaved, median
reported; peak memory: the child's own ``VmHWM`` from ``/proc/self/status`` read right after the
load, minus its ``VmRSS`` before the load (the interpreter and libraries), so it is what loading
added. Existing pruned folders under ``--work`` are reused (``--fresh`` prunes again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import torch, transformers, llmprune
from llmprune.checkpoint import load
torch.set_num_threads(int(sys.argv[2]))
before = status("VmRSS")
t, c = time.perf_counter(), time.process_time()
model = load(sys.argv[1])
seconds, cpu = time.perf_counter() - t, time.process_time() - c
hwm = status("VmHWM")
with torch.no_grad():  # read every weight once: a dense load maps the file lazily, so this is where its reads happen
    for p in model.parameters():
        p.sum()
print(json.dumps({"seconds": seconds, "cpu": cpu, "hwm": hwm, "before": before,
                  "touched_seconds": time.perf_counter() - t, "touched_hwm": status("VmHWM"),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def sparse_part(folder: Path) -> tuple[int, int, int]:
    """(dense bytes, stored bytes) of the tensors stored sparse, and the bytes of those stored dense."""
    from safetensors import safe_open

    layout = json.loads((folder / "config.json").read_text())["llmprune"]["compressed"]
    sizes: dict[str, int] = {}
    for file in layout["files"]:
        with safe_open(str(folder / file), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                sizes[key] = n * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}[t.get_dtype()]
    dense = stored = kept_dense = 0
    for name, e in layout["tensors"].items():
        if e["encoding"] == "dense":
            kept_dense += sizes[name]
            continue
        n = 1
        for d in e["shape"]:
            n *= d
        dense += n * {"bfloat16": 2, "float16": 2, "float32": 4}[e["dtype"]]
        stored += sum(v for k, v in sizes.items() if k.startswith(name + ".") and k[len(name) + 1:] in
                      ("values", "bitmask", "indices", "negzero"))
    return dense, stored, kept_dense


def measure(folder: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(threads)], check=True, cwd=REPO,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(rows: list[dict], args: argparse.Namespace) -> str:
    """Write the table (markdown) and the raw numbers (JSON) for the cases measured so far."""
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    cmd = " ".join(["python", "eval/bench_checkpoint.py", *sys.argv[1:]])
    lines = [
        "# Checkpoint size and loading: dense vs compressed", "",
        f"Command: `{cmd}`  ", f"Machine: {machine}, load average {os.getloadavg()[0]:.1f} at the end  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Protocol: embedded SmolLM2-135M-Instruct, bfloat16, pruned with `--method {args.method}` (the format does "
        "not depend on the method); size = all `*.safetensors` in the folder; load = `llmprune.load(folder)` in a "
        f"fresh subprocess, median of {args.repeats}, dense and compressed interleaved (wall time, and the child's CPU "
        "time, which contention distorts less); peak = the child's VmHWM "
        "after loading minus its VmRSS before (imports excluded). A dense load maps the safetensors file and reads "
        "pages only when a weight is first used, so the last four columns also time reading every weight once "
        "(`p.sum()` over all parameters) after the load, with the peak after that. Targets: size <= 60 % of dense, load time <= 1.5x, "
        "peak <= 1.2x.", "",
        "| case | dense MB | compressed MB | size ratio | pruned matrices only | stored as they are MB | "
        "load dense s | load compressed s | time ratio | CPU dense / compressed s | CPU ratio | "
        "peak dense MB | peak compressed MB | peak ratio | VmHWM dense / compressed MB | "
        "load + read all s: dense / compressed | ratio | peak after read all MB: dense / compressed | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dense_bytes'] / 1e6:.1f} | {r['compressed_bytes'] / 1e6:.1f} | "
                     f"{r['size_ratio']:.3f} | {r['sparse_tensors_ratio']:.4f} | {r['dense_tensors_bytes'] / 1e6:.1f} | "
                     f"{r['load_dense_s']:.2f} | {r['load_compressed_s']:.2f} | "
                     f"{r['load_ratio']:.2f} | {r['cpu_dense_s']:.2f} / {r['cpu_compressed_s']:.2f} | "
                     f"{r['cpu_ratio']:.2f} | {r['peak_dense'] / 1e6:.0f} | {r['peak_compressed'] / 1e6:.0f} | "
                     f"{r['peak_ratio']:.2f} | {r['hwm_dense'] / 1e6:.0f} / {r['hwm_compressed'] / 1e6:.0f} | "
                     f"{r['touched_dense_s']:.2f} / {r['touched_compressed_s']:.2f} | {r['touched_time_ratio']:.2f} | "
                     f"{r['touched_peak_dense'] / 1e6:.0f} / {r['touched_peak_compressed'] / 1e6:.0f} | "
                     f"{r['touched_peak_ratio']:.2f} |")
    out = Path(args.output)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "machine": machine, "rows": rows}, indent=2) + "\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench-ckpt", help="Folder for the checkpoints.")
    ap.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each loading child")
    ap.add_argument("--fresh", action="store_true", help="Prune again even if the folders exist.")
    ap.add_argument("--output", default=str(REPO / "eval" / "results" / "checkpoint.md"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = {"50% unstructured": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"]}
    rows = []
    for label, flags in cases.items():
        tag = "unstructured" if "unstructured" in label else "2of4"
        dense, comp = work / f"{tag}-dense", work / f"{tag}-compressed"
        if args.fresh or not (dense / "config.json").is_file():
            run([sys.executable, "-m", "llmprune.cli", "prune", "--data-dir", args.data_dir, "--nsamples", "32",
                 "--seqlen", "512", "--dtype", "bfloat16", "--method", args.method, *flags, "--output", str(dense),
                 "--overwrite", "--quiet"])
        if args.fresh or not (comp / "config.json").is_file():
            run([sys.executable, "-m", "llmprune.cli", "compress", str(dense), str(comp), "--overwrite", "--quiet"])
        loads = {"dense": [], "compressed": []}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            for kind, folder in (("dense", dense), ("compressed", comp)):
                loads[kind].append(measure(folder, args.threads))
        med = {k: {"seconds": statistics.median(x["seconds"] for x in v),
                   "cpu": statistics.median(x["cpu"] for x in v),
                   "touched_seconds": statistics.median(x["touched_seconds"] for x in v),
                   "touched_peak": statistics.median(x["touched_hwm"] - x["before"] for x in v),
                   "peak": statistics.median(x["hwm"] - x["before"] for x in v),
                   "hwm": statistics.median(x["hwm"] for x in v)} for k, v in loads.items()}
        size_d, size_c = weights_bytes(dense), weights_bytes(comp)
        sp_dense, sp_stored, as_is = sparse_part(comp)
        rows.append({"case": label, "dense_bytes": size_d, "compressed_bytes": size_c, "size_ratio": size_c / size_d,
                     "sparse_tensors_ratio": sp_stored / sp_dense, "dense_tensors_bytes": as_is,
                     "load_dense_s": med["dense"]["seconds"], "load_compressed_s": med["compressed"]["seconds"],
                     "load_ratio": med["compressed"]["seconds"] / med["dense"]["seconds"],
                     "cpu_dense_s": med["dense"]["cpu"], "cpu_compressed_s": med["compressed"]["cpu"],
                     "cpu_ratio": med["compressed"]["cpu"] / med["dense"]["cpu"],
                     "peak_dense": med["dense"]["peak"], "peak_compressed": med["compressed"]["peak"],
                     "peak_ratio": med["compressed"]["peak"] / med["dense"]["peak"],
                     "hwm_dense": med["dense"]["hwm"], "hwm_compressed": med["compressed"]["hwm"],
                     "touched_dense_s": med["dense"]["touched_seconds"],
                     "touched_compressed_s": med["compressed"]["touched_seconds"],
                     "touched_time_ratio": med["compressed"]["touched_seconds"] / med["dense"]["touched_seconds"],
                     "touched_peak_dense": med["dense"]["touched_peak"],
                     "touched_peak_compressed": med["compressed"]["touched_peak"],
                     "touched_peak_ratio": med["compressed"]["touched_peak"] / med["dense"]["touched_peak"],
                     "raw": loads})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "raw"}), flush=True)
        table = render(rows, args)  # after each case, so an interrupted run keeps what it measured
    print(table)


if __name__ == "__main__":
    main()
