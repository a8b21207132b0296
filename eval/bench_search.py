"""Benchmark: the search allocation (EvoPress, ``--allocation search``) against uniform and OWL.

Protocol (eval/results/prune.md): the embedded SmolLM2-135M-Instruct in float32 on the CPU; calibration
32 x 512 C4 tokens, seed 0 (and 1, 2 with ``--seeds``); perplexity on WikiText-2 raw test, seqlen 2048, first
16 windows. Every prune is its own ``llmprune prune`` process, timed end to end, peak memory its VmHWM.

Configs as in eval/bench_sparsity.py (``sparsegpt:0.7``, ``sparsegpt:0.7+owl``, ``alps:0.7+owl`` ...) plus
``+search`` (the search from the uniform start, the paper's) and ``+searchowl`` (from OWL's allocation); the
search's own settings (generations, offspring, stages) come from ``--search-flags`` and are written in the table.
The search builds its database in the run's work folder, so each run pays for it (the time a first search costs).

    python eval/bench_search.py --data-dir ../shared/data --configs sparsegpt:0.7 sparsegpt:0.7+owl \
        sparsegpt:0.7+searchowl --search-flags "--search-generations 20 ..." [--seeds 0 1 2]

writes eval/results/search.md and eval/results/search.json (rows of earlier runs are kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_prune import machine, perplexity_of, run_measured  # noqa: E402
from bench_sparsity import HWM_WRAPPER, parse  # noqa: E402


def flags_of(spec: str, search_flags: list[str], folder: Path) -> list[str]:
    """CLI flags of a config: ``+search``/``+searchowl`` parts are ours, the rest bench_sparsity's."""
    parts = spec.split("+")
    ours = [p for p in parts[1:] if p in ("search", "searchowl")]
    _, flags = parse("+".join([parts[0], *[p for p in parts[1:] if p not in ours]]))
    if ours:
        flags += ["--allocation", "search", "--search-dir", str(folder) + ".db", *search_flags]
        if ours[0] == "searchowl":
            flags += ["--search-start", "owl"]
    return flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--search-flags", default="", help="flags of every search run, e.g. '--search-generations 20'")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--workdir", default="/tmp/llmprune-bench-search")
    ap.add_argument("--results", default=str(HERE / "results" / "search"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads of every prune, fixed (the thread policy would follow the machine's load, "
                    "and a prune's masks follow its thread count)")
    ap.add_argument("--alone", action="store_true", help="nothing else ran on the machine: times are comparable")
    args = ap.parse_args()

    from llmprune.loading.models import embedded_model_path

    embedded_model_path()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = Path(args.results)
    state = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    rows = {(r["config"], r["seed"], r.get("search_flags", "")): r for r in state.get("results", [])}
    commands = state.get("commands", [])
    commands.append("python eval/bench_search.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    search_flags = shlex.split(args.search_flags)
    for spec in args.configs:
        for seed in args.seeds:
            folder = work / f"{spec.replace(':', '_').replace('+', '-')}-s{seed}"
            shutil.rmtree(str(folder) + ".db", ignore_errors=True)  # every run builds its database
            hwm = work / "hwm.txt"
            cmd = [sys.executable, "-c", HWM_WRAPPER, "prune", *flags_of(spec, search_flags, folder), "--calib", "c4",
                   "--data-dir", args.data_dir, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--seed", str(seed), "--dtype", "float32", "--device", "cpu", "--output", str(folder),
                   "--overwrite", "--quiet", "--threads", str(args.threads)]
            meas = run_measured(cmd, {**env, "LLMPRUNE_BENCH_HWM": str(hwm)})
            if meas["rc"] != 0:
                print(meas["output"], file=sys.stderr)
                raise SystemExit(f"{spec} (seed {seed}) failed with exit code {meas['rc']}")
            report = json.loads((folder / "llmprune_report.json").read_text())
            ppl = perplexity_of(folder, args.data_dir, args.ppl_seqlen, args.ppl_windows)["ppl"]
            is_search = "+search" in spec
            row = {"config": spec, "seed": seed, "ppl": ppl, "wall_s": meas["wall_s"],
                   "peak_rss_mb": int(hwm.read_text()) / 1024, "seconds": report["seconds"],
                   "sparsity": report["measured_sparsity"], "date": datetime.date.today().isoformat(),
                   "timed_alone": args.alone, "threads": args.threads, "search_flags": args.search_flags if is_search else "",
                   "search": ({k: v for k, v in report["search"].items() if k != "levels"}
                              if is_search else None)}
            rows[(spec, seed, row["search_flags"])] = row
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(str(folder) + ".db", ignore_errors=True)
            print(f"{spec:28s} seed {seed}  ppl {ppl:9.2f}  wall {meas['wall_s']:6.1f}s", flush=True)
            state.update(commands=commands, results=list(rows.values()))
            write(out, state, args)
    return 0


def write(out: Path, state: dict, args: argparse.Namespace) -> None:
    import importlib.metadata as md

    by: dict[tuple[str, str], list[dict]] = {}
    for r in state["results"]:
        by.setdefault((r["config"], r.get("search_flags", "")), []).append(r)
    flags = list(dict.fromkeys(r.get("search_flags", "") for r in state["results"] if r.get("search_flags")))  # A, B, ... in order of first run
    lines = [
        "# Search allocation (EvoPress) against uniform and OWL",
        "",
        *[f"- command: `{c}`" for c in state["commands"]],
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- versions: torch {md.version('torch')}, transformers {md.version('transformers')}",
        f"- protocol: embedded SmolLM2-135M-Instruct, float32, CPU; calibration {args.nsamples} x {args.seqlen} "
        f"tokens from the local C4 slice; perplexity on WikiText-2 raw test, seqlen {args.ppl_seqlen}, first "
        f"{args.ppl_windows} windows (dense 20.60). Wall time of the whole `llmprune prune` process, a search run "
        "included its database (built anew in every run), its search and the final prune; ratio = that wall time "
        "over the same method's uniform run, same seed. Fitness: mean KL of the final logits from the dense "
        "model's on the fitness windows (all of them), as the search measured it with its variants. Torch threads: "
        "fixed by `--threads` where a row of search.json has `threads`; the others ran under the thread policy "
        "(fewer threads when the machine was busy as the run started).",
        *[f"- search settings {chr(65 + i)}: `{f}`" for i, f in enumerate(flags)],
        "",
        "| config | settings | seeds | WikiText-2 ppl | spread | wall (s) | × uniform | database / search / prune (s) "
        "| fitness KL: search / uniform / OWL | chosen | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    uniform = {(r["config"], r["seed"]): r["wall_s"] for r in state["results"] if "+" not in r["config"]}
    for (config, f), rs in sorted(by.items()):
        ppls = [r["ppl"] for r in rs]
        spread = f"{min(ppls):.2f}-{max(ppls):.2f}" if len(ppls) > 1 else "-"
        wall = statistics.fmean(r["wall_s"] for r in rs)
        base = config.split("+")[0]
        ratios = [r["wall_s"] / uniform[(base, r["seed"])] for r in rs if (base, r["seed"]) in uniform]
        ratio = f"{statistics.fmean(ratios):.1f}" if ratios else "-"
        s = [r["search"] for r in rs if r.get("search")]
        if s:
            sec = " / ".join(f"{statistics.fmean(x['seconds'][k] for x in s):.0f}" for k in ("database", "search"))
            sec += f" / {statistics.fmean(r['seconds']['prune'] for r in rs):.0f}"
            kl = " / ".join(f"{statistics.fmean(x['fitness_kl'][k] for x in s):.4f}" for k in ("search", "uniform", "owl"))
            chosen = ",".join(x["chosen"] for x in s)
        else:
            sec = f"- / - / {statistics.fmean(r['seconds']['prune'] for r in rs):.0f}"
            kl = chosen = "-"
        alone = "" if all(r.get("timed_alone") for r in rs) else " ⁽*⁾"
        label = chr(65 + flags.index(f)) if f else "-"
        lines.append(f"| {config} | {label} | {','.join(str(r['seed']) for r in rs)} | {statistics.fmean(ppls):.2f} "
                     f"| {spread} | {wall:.0f}{alone} | {ratio} | {sec} | {kl} | {chosen} "
                     f"| {statistics.fmean(r['peak_rss_mb'] for r in rs):.0f}{alone} |")
    lines += ["", "⁽*⁾ other jobs shared the 2 cores: perplexity valid, time and memory not comparable."]
    md_path = out.with_suffix(".md")
    if md_path.is_file():  # keep the hand-written notes below the table
        old = md_path.read_text()
        at = old.find("\n## ")
        if at >= 0:
            lines += ["", old[at + 1:].rstrip("\n")]
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(state, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
