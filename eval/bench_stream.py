"""Benchmark: peak memory of streaming (--low-memory) against the in-memory path (issue 12).

1. The embedded SmolLM2-135M-Instruct pruned with SparseGPT 50 % (float32, calibration 32 x 512 tokens of
   the local C4 slice, seed 0), once in memory (``--no-low-memory``) and once streamed (``--low-memory``),
   each a separate ``llmprune prune`` process; the two checkpoints are compared tensor by tensor.
2. A random Llama of small width and 200 decoder layers saved to disk (sharded), pruned streamed under an
   address-space cap (``prlimit --as``) smaller than its weights; the in-memory path under the same cap
   for contrast.

3. Wall time of 1 and 2 processes (``torchrun``, gloo) on the embedded model as in 1., the time rank 0
   spent in collectives, and how many mask entries the two checkpoints share.

Peak resident memory is each child's own high-water mark (VmHWM of /proc/self/status at exit).

    python eval/bench_stream.py --data-dir ../shared/data [--parts embedded,deep,dist] [--work DIR]
    python eval/bench_stream.py --report      # stream.md / stream.json from the parts' results

Each part writes eval/results/stream-<part>.json; the report merges them into eval/results/stream.md and
eval/results/stream.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# runs the CLI, then writes the process's peak resident memory (VmHWM, kB) to $LLMPRUNE_BENCH_HWM
HWM_WRAPPER = """
import os, runpy, sys
sys.argv = ["llmprune", *sys.argv[1:]]
try:
    runpy.run_module("llmprune.cli", run_name="__main__")
finally:
    st = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith(("VmHWM:", "VmPeak:"))}
    open(os.environ["LLMPRUNE_BENCH_HWM"], "w").write(st["VmHWM"] + " " + st["VmPeak"])
"""

MAKE_DEEP = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from llmprune.loading.models import embedded_model_path
out, layers = sys.argv[1], int(sys.argv[2])
src = embedded_model_path()
tok = AutoTokenizer.from_pretrained(src)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=2048)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.save_pretrained(out, max_shard_size="200MB")
tok.save_pretrained(out)
"""


def run(cmd: list[str], hwm_file: Path, prefix: list[str] | None = None) -> dict:
    """Run the CLI with ``cmd``'s arguments (under ``prefix``, e.g. prlimit); wall seconds, VmHWM, exit code."""
    env = {**os.environ, "LLMPRUNE_BENCH_HWM": str(hwm_file)}
    hwm_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*(prefix or []), sys.executable, "-c", HWM_WRAPPER, *cmd], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    hwm = vm = None
    if hwm_file.exists():  # kB: resident high-water mark, and the peak of the address space (what --as caps)
        hwm, vm = (int(x) / 1024 for x in hwm_file.read_text().split())
    return {"wall_s": round(wall, 1), "peak_mb": round(hwm, 1) if hwm else None,
            "vm_peak_mb": round(vm, 1) if vm else None, "rc": proc.returncode, "tail": proc.stdout[-1500:]}


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    import torch
    from safetensors import safe_open

    def load(folder: Path) -> dict:
        out = {}
        for shard in sorted(folder.glob("model*.safetensors")):
            with safe_open(shard, "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    ta, tb = load(a), load(b)
    return sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), len(ta)


def weights_bytes(folder: Path) -> int:
    from llmprune.loading.shards import ShardIndex

    return ShardIndex(folder).nbytes()


def mask_agreement(a: Path, b: Path) -> float:
    """Fraction of the decoder weights whose zero/non-zero state is the same in both checkpoints."""
    from safetensors import safe_open

    same = total = 0
    for shard in sorted(a.glob("model*.safetensors")):
        with safe_open(shard, "pt") as fa, safe_open(b / shard.name, "pt") as fb:
            for k in fa.keys():
                if ".layers." in k and k.endswith("weight") and "norm" not in k:
                    ma, mb = fa.get_tensor(k) == 0, fb.get_tensor(k) == 0
                    same += int((ma == mb).sum())
                    total += ma.numel()
    return same / max(total, 1)


def part_embedded(args, work: Path, hwm: Path) -> dict:
    common = ["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--data-dir", args.data_dir, "--nsamples",
              "32", "--seqlen", "512", "--dtype", "float32", "--device", "cpu", "--quiet"]
    res: dict = {}
    for mode in ("no-low-memory", "low-memory", "low-memory-lockstep"):
        flags = ["--low-memory", "--execution", "lockstep"] if mode == "low-memory-lockstep" else [f"--{mode}"]
        res[mode] = run([*common, *flags, "--output", str(work / mode)], hwm)
        print(mode, {k: v for k, v in res[mode].items() if k != "tail"}, flush=True)
    res["same_tensors"], res["tensors"] = same_tensors(work / "no-low-memory", work / "low-memory")
    if args.peer_python:  # llm-compressor's oneshot on the same model, calibration and settings, in this run
        from bench_prune import run_measured

        from llmprune.loading.models import embedded_model_path

        cmd = [args.peer_python, str(HERE / "peer_llmcompressor.py"), "--model", str(embedded_model_path()),
               "--method", "sparsegpt", "--sparsity", "0.5", "--data-dir", args.data_dir, "--nsamples", "32",
               "--seqlen", "512", "--seed", "0", "--output", str(work / "peer")]
        m = run_measured(cmd, {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        res["llm-compressor"] = {"wall_s": round(m["wall_s"], 1), "peak_mb": round(m["peak_rss_mb"], 1), "rc": m["rc"],
                                 "tail": m["output"][-1500:]}
        print("llm-compressor", {k: v for k, v in res["llm-compressor"].items() if k != "tail"}, flush=True)
    return res


def part_deep(args, work: Path, hwm: Path) -> dict:
    deep = work / "deep"
    subprocess.run([sys.executable, "-c", MAKE_DEEP, str(deep), str(args.layers)], check=True)
    cap = int(args.cap_gb * 2**30)
    res: dict = {"layers": args.layers, "weights_mb": round(weights_bytes(deep) / 2**20, 1), "cap": cap,
                 "cap_mb": round(cap / 2**20, 1)}
    cmd = ["prune", str(deep), "--method", "sparsegpt", "--sparsity", "0.5", "--data-dir", args.data_dir,
           "--nsamples", "8", "--seqlen", "128", "--device", "cpu", "--quiet"]
    prefix = ["prlimit", f"--as={cap}"]
    for mode in ("low-memory", "no-low-memory", "auto"):
        flag = [] if mode == "auto" else [f"--{mode}"]
        res[mode] = run([*cmd, *flag, "--output", str(work / f"deep-{mode}")], hwm, prefix)
        print("deep", mode, {k: v for k, v in res[mode].items() if k != "tail"}, flush=True)
    if res["auto"]["rc"] == 0 and res["low-memory"]["rc"] == 0:
        res["auto_same_as_streamed"] = same_tensors(work / "deep-low-memory", work / "deep-auto")[0]
    return res


def part_dist(args, work: Path, hwm: Path) -> dict:
    """The embedded model, SparseGPT 50 %, in 1 and 2 processes (torchrun, gloo); rank 0's figures."""
    common = ["--method", "sparsegpt", "--sparsity", "0.5", "--data-dir", args.data_dir, "--nsamples", "32",
              "--seqlen", "512", "--dtype", "float32", "--device", "cpu", "--quiet"]
    res: dict = {}
    for n in (1, 2):
        out = work / f"dist-{n}"
        cmd = ["torchrun", "--standalone", f"--nproc-per-node={n}", "-m", "llmprune.cli", "prune", *common,
               "--output", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // n)}  # the 2 cores split between the ranks
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        rep = json.loads((out / "llmprune_report.json").read_text()) if proc.returncode == 0 else {}
        secs = rep.get("seconds", {})
        res[n] = {"wall_s": round(wall, 1), "rc": proc.returncode, "prune_s": round(secs.get("prune", 0), 1),
                  "communication_s": round(secs.get("communication", 0.0), 1), "tail": proc.stdout[-1500:]}
        print("dist", n, {k: v for k, v in res[n].items() if k != "tail"}, flush=True)
    if res[1]["rc"] == 0 and res[2]["rc"] == 0:
        res["mask_agreement"] = mask_agreement(work / "dist-1", work / "dist-2")
    return res


def report() -> None:
    import torch
    import transformers

    results = {p: json.loads((HERE / "results" / f"stream-{p}.json").read_text())
               for p in ("embedded", "deep", "dist") if (HERE / "results" / f"stream-{p}.json").is_file()}
    meta = {"command": "python eval/bench_stream.py --data-dir ../shared/data --parts embedded|deep|dist; "
                       "python eval/bench_stream.py --report",
            "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM "
            f"(load average {os.getloadavg()[0]:.1f} at the report)",
            "date": datetime.date.today().isoformat(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    lines = [
        "# Streaming and several processes: memory and time (issue 12)", "",
        f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
        f"- date: {meta['date']}", f"- versions: {meta['versions']}",
        "- protocol: each run a separate `llmprune prune` process; peak = the child's own VmHWM at exit "
        "(/proc/self/status); peak address space = its VmPeak; wall = whole process (load, calibrate, prune, "
        "save). Parts run one after another on an otherwise idle machine unless the notes say otherwise.", "",
    ]
    if "embedded" in results:
        e = results["embedded"]
        lines += ["## Embedded SmolLM2-135M-Instruct, SparseGPT 50 %, float32, 32 x 512 C4 tokens, seed 0", "",
                  "| path | wall (s) | peak RSS (MB) | exit |", "|---|---|---|---|",
                  *[f"| {m} | {e[m]['wall_s']} | {e[m]['peak_mb']} | {e[m]['rc']} |"
                    for m in ("no-low-memory", "low-memory", "low-memory-lockstep", "llm-compressor") if m in e], "",
                  "low-memory: streamed, chunks replayed (the default of a streamed run); low-memory-lockstep: "
                  "streamed with `--execution lockstep`.", "",
                  *([f"Streamed peak / llm-compressor's: {e['low-memory']['peak_mb'] / e['llm-compressor']['peak_mb']:.2f}x "
                     f"(in memory: {e['no-low-memory']['peak_mb'] / e['llm-compressor']['peak_mb']:.2f}x)", ""]
                    if "llm-compressor" in e and e["llm-compressor"]["rc"] == 0 else []),
                  f"Same checkpoint: {e['same_tensors']} ({e['tensors']} tensors compared with `torch.equal`).", ""]
    if "deep" in results:
        d = results["deep"]
        lines += [f"## Random Llama, {d['layers']} layers (hidden 512, MLP 2048), {d['weights_mb']} MB of float32 "
                  f"weights, under `prlimit --as={d['cap']}` ({d['cap_mb']} MB of address space)", "",
                  "SparseGPT 50 %, 8 x 128 C4 tokens.", "",
                  "| path | wall (s) | peak RSS (MB) | peak address space (MB) | exit |", "|---|---|---|---|---|",
                  *[f"| {m} | {d[m]['wall_s']} | {d[m]['peak_mb']} | {d[m].get('vm_peak_mb', '-')} | {d[m]['rc']} |"
                    for m in ("low-memory", "no-low-memory", "auto")], ""]
        if "auto_same_as_streamed" in d:
            lines.append(f"The automatic choice streamed and wrote the same tensors: {d['auto_same_as_streamed']}.")
            lines.append("")
    if "dist" in results:
        r = results["dist"]
        lines += ["## Embedded model, SparseGPT 50 %, 1 and 2 processes (`torchrun`, gloo, 2 cores split)", "",
                  "| processes | wall (s) | prune (s) | in collectives (s, rank 0) | exit |", "|---|---|---|---|---|",
                  *[f"| {n} | {r[str(n)]['wall_s']} | {r[str(n)]['prune_s']} | {r[str(n)]['communication_s']} | "
                    f"{r[str(n)]['rc']} |" for n in (1, 2)], ""]
        if "mask_agreement" in r:
            lines.append(f"Masks of the 2-process checkpoint equal to the 1-process one's: {100 * r['mask_agreement']:.4f} % "
                         "of decoder weights (summation order of the all-reduced statistics).")
            lines.append("")
    md = HERE / "results" / "stream.md"
    old = md.read_text() if md.is_file() else ""
    notes = old[old.index("## Notes\n"):] if "## Notes\n" in old else ""  # written by hand: kept
    md.write_text("\n".join(lines) + "\n" + notes)
    (HERE / "results" / "stream.json").write_text(json.dumps({**results, "meta": meta}, indent=2) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--work", default="/tmp/bench12-work")
    ap.add_argument("--parts", default="embedded,deep,dist")
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--cap-gb", type=float, default=2.5, help="address-space cap of the deep model's runs")
    ap.add_argument("--report", action="store_true", help="only write stream.md/json from the parts' results")
    ap.add_argument("--peer-python", help="python of a venv with llmcompressor: its oneshot beside the embedded part")
    args = ap.parse_args()
    if args.report:
        report()
        return 0
    parts = {"embedded": part_embedded, "deep": part_deep, "dist": part_dist}
    for name in args.parts.split(","):
        work = Path(args.work) / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        res = parts[name](args, work, work / "hwm")
        (HERE / "results" / f"stream-{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
