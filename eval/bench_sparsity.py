"""Benchmark: high sparsity that holds up — each pruner alone, + DSnoT, + OWL, + OWL + DSnoT.

Protocol (issue 9, that of eval/results/prune.md): the embedded SmolLM2-135M-Instruct in float32;
calibration 32 windows x 512 tokens from the local C4 slice, seed 0; perplexity on WikiText-2 raw
test, seqlen 2048, first 16 windows. Every prune is a separate `llmprune prune` process, timed end
to end (load, calibrate, observe, prune, save); its peak resident memory is the process's own
high-water mark (VmHWM of /proc/self/status at exit: wait4()'s ru_maxrss of a child forked from
this process, which holds a model for the perplexities, would start from this process's size).
The perplexity of each output is computed afterwards by the same evaluator, then the output is
deleted. ``--timing-only`` re-measures wall time and memory of configs already in the results
(no perplexity), for runs on an otherwise idle machine.

    python eval/bench_sparsity.py --data-dir ../shared/data \
        [--configs wanda:0.7 wanda:0.7+owl+dsnot ria:2:4 ...] [--seeds 0 1 2]

A config is ``method:S`` (unstructured at sparsity S) or ``method:N:M``, followed by any of
``+dsnot`` (refine), ``+dsnotall`` (DSnoT on every target, not attention only), ``+owl``
(allocation), ``+owl25`` (OWL with λ = 0.25, which lets 2:4 layers move to 1:4 or 3:4), ``+owlL``
(OWL with λ = L, e.g. ``+owl0.15``), ``+dsnotref``/``+dsnotrefall`` (DSnoT with the reference's
non-monotone stopping rule) and
``+nopermute`` (RIA N:M without channel permutation) and ``+admm`` (weight reconstruction on the final
mask). Rows of configs not re-run are kept from the existing results (marked). Also times
one dense forward of the calibration batch, the yardstick of the observe-only pass (OWL).
Writes eval/results/sparsity.md and eval/results/sparsity.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_prune import machine, perplexity_of, run_measured  # noqa: E402

# runs the CLI, then writes the process's peak resident memory (VmHWM, kB) to $LLMPRUNE_BENCH_HWM
HWM_WRAPPER = """
import os, runpy, sys
sys.argv = ["llmprune", *sys.argv[1:]]
try:
    runpy.run_module("llmprune.cli", run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    open(os.environ["LLMPRUNE_BENCH_HWM"], "w").write(hwm)
"""

METHODS = ["magnitude", "wanda", "sparsegpt", "ria"]
LEVELS = ["0.5", "0.6", "0.7", "2:4"]
VARIANTS = ["", "+dsnot", "+owl", "+owl+dsnot"]
DEFAULT_CONFIGS = [f"{m}:{lv}{v}" for m in METHODS for lv in LEVELS for v in VARIANTS]
# llm-compressor 0.14 oneshot on this protocol, as given in issue 9 (not re-measured here)
PEER = {"sparsegpt:0.5": 42.07, "sparsegpt:0.6": 92, "sparsegpt:0.7": 256.7, "sparsegpt:2:4": 79.35,
        "wanda:0.5": 45.78, "wanda:0.6": 121, "wanda:0.7": 1260.6, "wanda:2:4": 167.31}


def parse(spec: str) -> tuple[str, list[str]]:
    """``wanda:0.7+owl+dsnot`` -> (base ``wanda:0.7``, CLI flags)."""
    base, *extras = spec.split("+")
    method, level = base.split(":", 1)
    flags = ["--method", method]
    flags += ["--pattern", level] if ":" in level else ["--sparsity", level]
    for x in extras:
        if x == "dsnot":
            flags += ["--refine", "dsnot"]
        elif x == "owl":
            flags += ["--allocation", "owl"]
        elif x == "dsnotall":  # DSnoT on every target, not attention only
            flags += ["--refine", "dsnot", "--dsnot-skip", ""]
        elif x == "dsnotref":  # DSnoT with the reference's stopping rule: swaps may overshoot (non-monotone)
            flags += ["--refine", "dsnot", "--no-dsnot-monotone"]
        elif x == "dsnotrefall":
            flags += ["--refine", "dsnot", "--no-dsnot-monotone", "--dsnot-skip", ""]
        elif x == "owl25":  # OWL with lambda 0.25: with 2:4, each layer's N in {1, 2, 3}
            flags += ["--allocation", "owl", "--owl-lambda", "0.25"]
        elif x.startswith("owl") and x[3:].replace(".", "", 1).isdigit():  # +owl0.15: OWL with lambda 0.15
            flags += ["--allocation", "owl", "--owl-lambda", x[3:]]
        elif x == "nopermute":
            flags += ["--no-ria-permute"]
        elif x == "admm":  # weight reconstruction on the final mask (issue 15's step)
            flags += ["--reconstruct", "admm"]
        else:
            raise SystemExit(f"unknown config part {x!r} in {spec!r}; use +dsnot, +dsnotall, +dsnotref, +dsnotrefall, +owl, +owl25, "
                             "+owlL, +nopermute or +admm")
    return base, flags


def calibration_forward_seconds(data_dir: str, nsamples: int, seqlen: int, seed: int) -> float:
    """One dense forward of the calibration batch through the model (the observe pass's yardstick)."""
    import torch

    from llmprune.calibration import get_calibration
    from llmprune import load_model

    model, tok, _ = load_model(None, dtype="float32")
    ids = get_calibration("c4", tok, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir)
    with torch.no_grad():
        model(ids[:2], use_cache=False)  # warm-up
        t0 = time.perf_counter()
        for chunk in ids.split(4):
            model(chunk, use_cache=False)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--workdir", default="/tmp/llmprune-bench-sparsity")
    ap.add_argument("--results", default=str(HERE / "results" / "sparsity"))
    ap.add_argument("--timing-only", action="store_true",
                    help="re-measure wall time and peak memory of configs already in the results (no perplexity)")
    ap.add_argument("--alone", action="store_true",
                    help="the machine runs nothing else during this run: mark its times and peaks as comparable")
    args = ap.parse_args()

    from llmprune.loading.models import embedded_model_path

    embedded_model_path()  # converted once, outside the timed runs
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = Path(args.results)
    state = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    rows = {(r["config"], r["seed"]): r for r in state.get("results", [])}
    commands = state.get("commands", [])
    commands.append("python eval/bench_sparsity.py " + " ".join(sys.argv[1:]))
    if not args.timing_only or "calibration_forward_s" not in state:
        state["calibration_forward_s"] = calibration_forward_seconds(args.data_dir, args.nsamples, args.seqlen, 0)
        print(f"calibration forward {state['calibration_forward_s']:.1f}s", flush=True)
    for spec in args.configs:
        _, flags = parse(spec)
        for seed in args.seeds:
            folder = work / f"{spec.replace(':', '_').replace('+', '-')}-s{seed}"
            hwm = work / "hwm.txt"
            cmd = [sys.executable, "-c", HWM_WRAPPER, "prune", *flags, "--calib", "c4",
                   "--data-dir", args.data_dir, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--seed", str(seed), "--dtype", "float32", "--device", "cpu", "--output", str(folder),
                   "--overwrite", "--quiet"]
            meas = run_measured(cmd, {**env, "LLMPRUNE_BENCH_HWM": str(hwm)})
            if meas["rc"] == 0:
                meas["peak_rss_mb"] = int(hwm.read_text()) / 1024
            if meas["rc"] != 0:
                print(meas["output"], file=sys.stderr)
                raise SystemExit(f"{spec} (seed {seed}) failed with exit code {meas['rc']}")
            report = json.loads((folder / "llmprune_report.json").read_text())
            timing = {"wall_s": meas["wall_s"], "peak_rss_mb": meas["peak_rss_mb"], "seconds": report["seconds"],
                      "sparsity": report["measured_sparsity"], "date": datetime.date.today().isoformat(),
                      "loadavg_after": os.getloadavg()[0]}
            if args.alone:
                timing["timed_alone"] = True
            if args.timing_only:
                if (spec, seed) not in rows:
                    raise SystemExit(f"{spec} (seed {seed}) has no perplexity in the results yet; run it without "
                                     "--timing-only first")
                rows[(spec, seed)].update(timing, timed_alone=True)
                ppl = rows[(spec, seed)]["ppl"]
            else:
                ppl = perplexity_of(folder, args.data_dir, args.ppl_seqlen, args.ppl_windows)["ppl"]
                rows[(spec, seed)] = {"config": spec, "seed": seed, "ppl": ppl, **timing}
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{spec:28s} seed {seed}  ppl {ppl:9.2f}  wall {meas['wall_s']:6.1f}s  "
                  f"RSS {meas['peak_rss_mb']:5.0f} MB  sparsity {report['measured_sparsity']:.4f}", flush=True)
            state.update(commands=commands, results=list(rows.values()))
            write(out, state, args)
    return 0


def write(out: Path, state: dict, args: argparse.Namespace) -> None:
    import importlib.metadata as md

    rows = state["results"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    lines = [
        "# High sparsity: each pruner alone, + DSnoT, + OWL, + OWL + DSnoT",
        "",
        *[f"- command: `{c}`" for c in state["commands"]],
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- versions: torch {md.version('torch')}, transformers {md.version('transformers')}",
        f"- protocol: embedded SmolLM2-135M-Instruct, float32, CPU; calibration {args.nsamples} x {args.seqlen} "
        f"tokens from the local C4 slice; perplexity on WikiText-2 raw test, seqlen {args.ppl_seqlen}, first "
        f"{args.ppl_windows} windows (dense 20.60). Wall time and peak RSS of the whole `llmprune prune` "
        "process (load, calibrate, observe, prune, save); peak memory as the process's own VmHWM; the observe and prune "
        "columns are the report's own timings. Peer: llm-compressor 0.14 on this protocol, as given in "
        "issue 9 (not re-measured in this run).",
        f"- one dense forward of the calibration batch through the model: {state['calibration_forward_s']:.1f} s "
        "(the yardstick of the observe-only pass)",
        "",
        "| config | seeds | WikiText-2 ppl | spread | measured sparsity | wall (s) | observe (s) | prune (s) "
        "| peak RSS (MB) | peer ppl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {c: i for i, c in enumerate(DEFAULT_CONFIGS)}
    for config in sorted(by, key=lambda c: order.get(c, len(order))):
        rs = by[config]
        ppls = [r["ppl"] for r in rs]
        mean = statistics.fmean(ppls)
        spread = f"{min(ppls):.2f}-{max(ppls):.2f}" if len(ppls) > 1 else "-"
        obs = [r["seconds"]["observe"] for r in rs if r["seconds"].get("observe") is not None]
        obs_s = f"{statistics.fmean(obs):.1f}" if obs else "-"

        def avg(key, rs=rs):
            return statistics.fmean(r[key] for r in rs)

        prune_s = statistics.fmean(r["seconds"]["prune"] for r in rs)
        alone = "" if all(r.get("timed_alone") for r in rs) else " ⁽*⁾"
        lines.append(
            f"| {config} | {','.join(str(r['seed']) for r in rs)} | {mean:.2f} | {spread} | {avg('sparsity'):.4f} "
            f"| {avg('wall_s'):.1f}{alone} | {obs_s} | {prune_s:.1f} | {avg('peak_rss_mb'):.0f}{alone} "
            f"| {PEER.get(config, '-')} |"
        )
    lines += ["", "⁽*⁾ not re-timed alone: measured while other jobs shared the 2 cores (perplexity valid, time "
              "and memory not comparable)."]
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path = out.with_suffix(".md")
    if md_path.is_file():  # keep the hand-written notes below the table
        old = md_path.read_text()
        at = old.find("\n## ")
        if at >= 0:
            lines += ["", old[at + 1:].rstrip("\n")]
    md_path.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(state, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
