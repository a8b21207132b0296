#!/usr/bin/env python3
"""Evaluation benchmark: perplexity (value and speed) and zero-shot task accuracy of a model.

    python eval/bench_eval.py --data-dir ../shared/data                  # everything below
    python eval/bench_eval.py --data-dir ../shared/data --skip-tasks     # perplexity only

1. Perplexity: ``llmprune eval --ppl wikitext2 --seqlen 2048 --max-windows 16`` (in-process API)
   against a plain ``model(x).logits`` loop over the same windows (batch 1, no loss at all),
   alternated ``--repeats`` times; the reference value 20.6015 comes from an independent script.
2. Tasks: ``llmprune.evaluate`` on every offline task of eval/tasks/ (zero-shot; the limit per task
   from ``--limits``, ``full`` for the whole split), with the time each took.
3. Agreement with lm-eval's own CLI: for each task, ``lm_eval --model hf --include_path eval/tasks``
   in a subprocess and ``llmprune.evaluate`` in-process on the same model folder with the same
   ``--cli-limit`` and batch size; the metrics must be equal.

Results: eval/results/eval.md and eval/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "lambada_openai"]
DEFAULT_LIMITS = "piqa=full,arc_easy=1000,arc_challenge=full,hellaswag=500,winogrande=full,boolq=500," \
                 "openbookqa=full,lambada_openai=1000"


def plain_loop_seconds(model, windows) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for w in windows:
            model(w.unsqueeze(0)).logits  # noqa: B018 - the work being timed
    return time.perf_counter() - t0


def bench_ppl(args, model, tok) -> dict:
    import llmprune
    from llmprune.evaluation import load_text, tokenize_once

    ids = tokenize_once(tok, load_text("wikitext2", args.data_dir).text)
    windows = ids[: 16 * 2048].reshape(16, 2048)
    ours, plain, value = [], [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = llmprune.evaluate(model, tok, ppl=["wikitext2"], seqlen=2048, max_windows=16, data_dir=args.data_dir,
                              progress=False)
        ours.append(time.perf_counter() - t0)
        value = r
        plain.append(plain_loop_seconds(model, windows))
        print(f"ppl {r.metrics['wikitext2/ppl']:.4f}: llmprune {ours[-1]:.1f}s, plain loop {plain[-1]:.1f}s", flush=True)
    return {"ppl": value.metrics["wikitext2/ppl"], "protocol": value.perplexity["wikitext2"],
            "seconds_llmprune": ours, "seconds_plain_loop": plain}


def parse_limits(spec: str) -> dict[str, int | None]:
    out = {}
    for item in spec.split(","):
        name, _, lim = item.partition("=")
        out[name.strip()] = None if lim.strip() in ("", "full") else int(lim)
    return out


def bench_tasks(args, model, tok, tasks: list[str], results: dict) -> dict:
    """Each task in turn; the results file is rewritten after each one, so a long run keeps what it measured."""
    import llmprune

    limits = parse_limits(args.limits)
    out = results.setdefault("tasks", {})
    for task in tasks:
        limit = limits.get(task)
        r = llmprune.evaluate(model, tok, tasks=[task], limit=limit, batch_size=str(args.batch_size),
                              data_dir=args.data_dir, progress=False)
        out[task] = {"metrics": r.metrics, "stderr": r.stderr, "protocol": r.tasks[task],
                     "seconds": r.seconds[task]}
        print(task, {k: round(v, 4) for k, v in r.metrics.items()}, f"{r.seconds[task]:.0f}s", flush=True)
        write_results(args, results)
    return out


def cli_agreement(args, model, tok, model_dir: str, tasks: list[str]) -> dict:
    import llmprune

    out = {}
    for task in tasks:
        r = llmprune.evaluate(model, tok, tasks=[task], limit=args.cli_limit, batch_size=str(args.batch_size),
                              data_dir=args.data_dir, progress=False)
        with_dir = {**os.environ, "LLMPRUNE_DATA_DIR": str(Path(args.data_dir).resolve())}
        cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
               f"pretrained={model_dir},dtype=float32", "--tasks", task, "--include_path", str(HERE / "tasks"),
               "--limit", str(args.cli_limit), "--batch_size", str(args.batch_size), "--device", "cpu"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=with_dir, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"lm_eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        cli = parse_lm_eval_table(proc.stdout, task)
        ours = {k.split("/", 1)[1]: v for k, v in r.metrics.items()}
        equal = all(abs(ours[m] - v) < 5e-5 for m, v in cli.items()) and set(cli) == set(ours)
        out[task] = {"limit": args.cli_limit, "llmprune": ours, "lm_eval_cli": cli, "equal": equal,
                     "cli_seconds": time.perf_counter() - t0, "command": " ".join(cmd)}
        print(task, "in-process", ours, "lm_eval CLI", cli, "equal" if equal else "DIFFERENT", flush=True)
    return out


def parse_lm_eval_table(stdout: str, task: str) -> dict[str, float]:
    """Metrics of ``task`` from lm_eval's printed table ``|Tasks|Version|Filter|n-shot|Metric| |Value| |Stderr|``
    (values rounded to 4 decimals; a blank task cell continues the row above)."""
    metrics, current = {}, None
    for line in stdout.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[0] == "Tasks" or (cells[0] and set(cells[0]) <= set("-:")):
            continue
        current = cells[0] or current
        if current == task:
            try:
                metrics[cells[4]] = float(cells[6])
            except ValueError:
                pass
    if not metrics:
        raise RuntimeError(f"no metrics for {task} in lm_eval's output:\n{stdout[-2000:]}")
    return metrics


def write_results(args, results: dict) -> None:
    path = Path(args.results)
    command = f"python eval/bench_eval.py {' '.join(sys.argv[1:])}"
    commands = [c for c in results.get("commands", []) if c and c != command] + [command]
    results["commands"] = commands
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Evaluation benchmark: perplexity and zero-shot task accuracy",
        "",
        *(f"- command: `{c}`" for c in commands),
        f"- machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), Linux",
        f"- date: {time.strftime('%Y-%m-%d')}",
        f"- versions: {results['versions']}",
        "- model: the embedded SmolLM2-135M-Instruct, float32, CPU",
        "",
    ]
    if "ppl" in results:
        p = results["ppl"]
        lines += [
            "## WikiText-2 perplexity",
            "",
            "Protocol: raw test split joined with \"\\n\\n\", tokenized once, non-overlapping windows of 2048 "
            f"tokens, first 16 windows ({p['protocol']['tokens']} scored tokens).",
            "",
            "| | perplexity | seconds (each repeat) |",
            "|---|---|---|",
            f"| `llmprune eval --ppl wikitext2 --seqlen 2048 --max-windows 16` | {p['ppl']:.4f} | "
            + ", ".join(f"{s:.1f}" for s in p["seconds_llmprune"]) + " |",
            "| plain `model(x).logits` loop over the same windows (no loss) | - | "
            + ", ".join(f"{s:.1f}" for s in p["seconds_plain_loop"]) + " |",
            "| independent script (../shared/data/README.md) | 20.6015 | - |",
            "",
        ]
    if "tasks" in results:
        lines += [
            "## Zero-shot task accuracy (offline configs of eval/tasks/)",
            "",
            f"In-process `llmprune.evaluate`, batch size {args.batch_size}. `docs` is the number scored: the whole "
            "split unless the command's --limits caps it; `seconds` over `docs` gives the time a full split would take.",
            "",
            "| task | docs (of split) | acc | acc_norm | other | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for task, t in results["tasks"].items():
            m, s = t["metrics"], t["stderr"]

            def cell(key: str, m=m, s=s, task=task) -> str:
                k = f"{task}/{key}"
                return f"{m[k]:.4f} ± {s.get(k, float('nan')):.4f}" if k in m else "-"

            other = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items()
                              if k.split("/", 1)[1] not in ("acc", "acc_norm"))
            p = t["protocol"]
            lines.append(f"| {task} | {p['docs']} ({p['docs_total']}) | {cell('acc')} | {cell('acc_norm')} | "
                         f"{other or '-'} | {t['seconds']:.0f} |")
        limited = {task: t["seconds"] * t["protocol"]["docs_total"] / t["protocol"]["docs"] / 60
                   for task, t in results["tasks"].items() if t["protocol"]["docs"] < t["protocol"]["docs_total"]}
        if limited:
            lines += ["", "Limited splits, and the time their full split would take at the rate measured here: "
                      + ", ".join(f"{task} {m:.0f} min" for task, m in limited.items()) + "."]
        lines.append("")
    if "cli" in results:
        cli_limit = next(iter(results["cli"].values()))["limit"]  # of the run that measured this section
        lines += [
            "## Same numbers as lm-eval's own CLI",
            "",
            f"`lm_eval --model hf --model_args pretrained=MODEL,dtype=float32 --tasks TASK --include_path eval/tasks "
            f"--limit {cli_limit} --batch_size {args.batch_size} --device cpu` in a subprocess against "
            "`llmprune.evaluate` in-process on the same model, limit and batch size (the CLI prints 4 decimals).",
            "",
            "| task | docs | llmprune (in-process) | lm_eval CLI | equal |",
            "|---|---|---|---|---|",
        ]
        for task, c in results["cli"].items():
            fmt = lambda d: ", ".join(f"{k} {v:.4f}" for k, v in sorted(d.items()))  # noqa: E731
            lines.append(f"| {task} | {c['limit']} | {fmt(c['llmprune'])} | {fmt(c['lm_eval_cli'])} | "
                         f"{'yes' if c['equal'] else 'NO'} |")
        lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {path.with_suffix('.md')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--limits", default=DEFAULT_LIMITS, help="task=N|full,... (default: %(default)s)")
    ap.add_argument("--cli-limit", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-tasks", action="store_true")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--results", default=str(HERE / "results" / "eval"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the sections of an existing results file that this run skips (e.g. re-time the "
                         "perplexity alone with --skip-tasks --skip-cli --merge)")
    args = ap.parse_args()

    from llmprune.evaluation.results import eval_versions
    from llmprune import load_model
    from llmprune.loading.models import embedded_model_path

    model, tok, _ = load_model(None, dtype="float32")
    results: dict = {"versions": eval_versions()}
    previous = Path(args.results).with_suffix(".json")
    if args.merge and previous.is_file():
        results = {**json.loads(previous.read_text()), **results}
        if "commands" not in results:  # files written before commands were recorded: take them from the table
            md = previous.with_suffix(".md").read_text() if previous.with_suffix(".md").is_file() else ""
            results["commands"] = re.findall(r"^- command: `(.*)`$", md, flags=re.M)
    if not args.skip_ppl:
        results["ppl"] = bench_ppl(args, model, tok)
        write_results(args, results)
    if not args.skip_tasks:
        bench_tasks(args, model, tok, args.tasks, results)
    if not args.skip_cli:
        results["cli"] = cli_agreement(args, model, tok, str(embedded_model_path()), args.tasks)
        write_results(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
