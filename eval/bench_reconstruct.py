"""Benchmark: weight reconstruction (ADMM / conjugate gradients on the mask), ALPS, EoRA compensation.

Protocol (issue 15, that of eval/results/prune.md): the embedded SmolLM2-135M-Instruct in float32;
calibration 32 windows x 512 tokens from the local C4 slice, seed 0 (`@seedN`: seed N); perplexity on WikiText-2 raw
test, seqlen 2048, first 16 windows (dense 20.60). Every prune is a separate `llmprune prune`
process, timed end to end (load, calibrate, prune, save), its peak memory the process's own VmHWM
(see eval/bench_sparsity.py). The perplexity of each output is computed afterwards; a checkpoint
with an EoRA adapter is loaded through `peft` (`PeftModel.from_pretrained(base, folder)`), which
also checks that the saved adapter loads, and its base alone is scored too. The report's per-module
relative output errors (before and after the reconstruction, with and without the correction) are
kept in the JSON. ``--timing-only`` re-measures wall time and memory of configs already in the
results (no perplexity), for a re-run on an otherwise idle machine.

    python eval/bench_reconstruct.py --data-dir ../shared/data \
        [--configs sparsegpt:0.5+admm alps:0.7 sparsegpt:2:4+eora64 ...] [--timing-only]

A config is ``method:S`` or ``method:N:M``, followed by any of ``+admm`` (``--reconstruct admm``),
``+admmN`` (with ``--admm-iters N`` ADMM iterations before the conjugate gradients), ``+eoraR``
(``--compensate eora --rank R``), ``+owl`` and ``+field=value`` (any config field, given as
``--field value``: ``+admm_damp=0.1``). ``--seeds 0 1 2`` runs each config once per calibration seed
(rows of seeds other than 0 are named ``config@seedN``) and ``--results eval/results/protocols``
writes elsewhere (with ``--title``). Rows of configs not re-run are kept. The plain
pruners' rows (no reconstruction, no adapter) are taken from eval/results/sparsity.json and
prune.json where they were measured on the same protocol (marked), unless re-run here.
Writes eval/results/reconstruct.md and eval/results/reconstruct.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_prune import machine, run_measured  # noqa: E402
from bench_sparsity import HWM_WRAPPER  # noqa: E402

LEVELS = ["0.5", "0.6", "0.7", "2:4"]
DEFAULT_CONFIGS = [
    "sparsegpt:0.5+admm", "sparsegpt:2:4+admm", "alps:0.7", "sparsegpt:2:4+eora64", "sparsegpt:0.7+admm",
    "alps:0.5", "alps:2:4", "wanda:0.5+admm", "wanda:2:4+admm", "sparsegpt:0.5+eora64", "sparsegpt:2:4+eora32",
    "sparsegpt:0.6+admm", "alps:0.6", "wanda:0.7+admm", "wanda:0.6+admm", "sparsegpt:0.5+eora32",
    "alps:2:4+eora64", "wanda:2:4+eora64",
]
# llm-compressor 0.14 SparseGPT on this protocol, as given in issue 15 (not re-measured here)
PEER = {"0.5": 42.07, "0.6": 92, "0.7": 256.7, "2:4": 79.35}


def parse(spec: str) -> tuple[str, list[str]]:
    """``sparsegpt:2:4+admm+eora64`` -> (base ``sparsegpt:2:4``, CLI flags)."""
    base, *extras = spec.split("+")
    method, level = base.split(":", 1)
    flags = ["--method", method]
    flags += ["--pattern", level] if ":" in level else ["--sparsity", level]
    for x in extras:
        if m := re.fullmatch(r"admm(\d*)", x):
            flags += ["--reconstruct", "admm"] + (["--admm-iters", m.group(1)] if m.group(1) else [])
        elif m := re.fullmatch(r"eora(\d+)", x):
            flags += ["--compensate", "eora", "--rank", m.group(1)]
        elif x == "owl":
            flags += ["--allocation", "owl"]
        elif m := re.fullmatch(r"([a-z][a-z0-9_]*)=(.+)", x):
            flags += ["--" + m.group(1).replace("_", "-"), m.group(2)]
        else:
            raise SystemExit(f"unknown config part {x!r} in {spec!r}; use +admm, +admmN, +eoraR, +owl or "
                             "+field=value")
    return base, flags


def perplexities(folder: Path, data_dir: str, seqlen: int, windows: int, base_ppl: bool = False) -> dict:
    """WikiText-2 perplexity of the checkpoint; with an adapter, of base + adapter (through peft), and with
    ``base_ppl`` of the base alone too (its weights are those of the same run without the adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.evaluation import perplexity, wikitext2_test_text

    text = wikitext2_test_text(data_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = {}
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base, folder).eval()
        out["ppl"] = perplexity(adapted, tok, text, seqlen=seqlen, max_windows=windows).to_dict()["ppl"]
        if base_ppl:
            base = adapted.unload()  # the sparse base again (the LoRA layers removed, not merged)
            out["base_ppl"] = perplexity(base, tok, text, seqlen=seqlen, max_windows=windows).to_dict()["ppl"]
    else:
        out["ppl"] = perplexity(base, tok, text, seqlen=seqlen, max_windows=windows).to_dict()["ppl"]
    return out


def layer_errors(report: dict) -> dict:
    """Size-weighted mean relative output errors of the report's modules: the engine's sample error, and
    before/after the reconstruction and the correction where they ran."""
    mods = [m for layer in report["layers"] for m in layer["modules"]]
    size = [m["shape"][0] * m["shape"][1] for m in mods]
    total = sum(size)

    def mean(get):
        vals = [(get(m), w) for m, w in zip(mods, size) if get(m) is not None]
        return sum(v * w for v, w in vals) / sum(w for _, w in vals) if vals else None

    return {
        "sample_error": sum((m["error"] or 0) * w for m, w in zip(mods, size)) / total,
        "reconstruct_before": mean(lambda m: (m.get("reconstruct") or {}).get("error_before")),
        "reconstruct_after": mean(lambda m: (m.get("reconstruct") or {}).get("error_after")),
        "compensate_before": mean(lambda m: (m.get("compensate") or {}).get("error_before")),
        "compensate_after": mean(lambda m: (m.get("compensate") or {}).get("error_after")),
        "per_kind": _per_kind(mods),
    }


def _per_kind(mods: list[dict]) -> dict:
    kinds: dict[str, list[dict]] = {}
    for m in mods:
        kinds.setdefault(re.sub(r".*\.\d+\.", "", m["name"]), []).append(m)
    out = {}
    for kind, ms in kinds.items():
        row = {"error": sum(m["error"] or 0 for m in ms) / len(ms)}
        if ms[0].get("reconstruct"):
            row["before"] = sum(m["reconstruct"]["error_before"] for m in ms) / len(ms)
            row["after"] = sum(m["reconstruct"]["error_after"] for m in ms) / len(ms)
        out[kind] = row
    return out


def earlier_rows() -> dict[str, dict]:
    """The plain pruners' rows measured on this protocol by the other benchmarks (seed 0)."""
    rows = {}
    for name, key in (("sparsity.json", "config"), ("prune.json", None)):
        path = HERE / "results" / name
        if not path.is_file():
            continue
        state = json.loads(path.read_text())
        for r in state.get("results", []):
            if key == "config" and r.get("seed", 0) == 0 and "+" not in r["config"]:
                rows.setdefault(r["config"], {"config": r["config"], "ppl": r["ppl"], "wall_s": r.get("wall_s"),
                                              "peak_rss_mb": r.get("peak_rss_mb"), "source": name})
            elif key is None and r.get("tool") == "llmprune" and "@" not in r.get("config", "@"):
                method, _, pattern = r["config"].partition(":")  # e.g. sparsegpt:unstructured, wanda:2:4
                cfg = f"{method}:{'0.5' if pattern == 'unstructured' else pattern}"
                rows.setdefault(cfg, {"config": cfg, "ppl": r.get("ppl"), "wall_s": r.get("wall_s"),
                                      "peak_rss_mb": r.get("peak_rss_mb"), "source": name})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="calibration seeds; each config runs once per seed (rows of seed N > 0: config@seedN)")
    ap.add_argument("--title", default="Weight reconstruction (ADMM / CG on the mask), ALPS and EoRA compensation")
    ap.add_argument("--workdir", default="/tmp/llmprune-bench-reconstruct")
    ap.add_argument("--results", default=str(HERE / "results" / "reconstruct"))
    ap.add_argument("--base-ppl", action="store_true",
                    help="for EoRA rows, also score the sparse base without its adapter (one more perplexity run)")
    ap.add_argument("--timing-only", action="store_true",
                    help="re-measure wall time and peak memory of configs already in the results (no perplexity)")
    ap.add_argument("--alone", action="store_true",
                    help="the machine is otherwise idle: mark this run's wall times and memory as comparable "
                    "(the load average after each cell is recorded beside them)")
    args = ap.parse_args()

    from llmprune.loading.models import embedded_model_path

    embedded_model_path()  # converted once, outside the timed runs
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = Path(args.results)
    state = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    rows = {r["config"]: r for r in state.get("results", [])}
    commands = state.get("commands", [])
    commands.append("python eval/bench_reconstruct.py " + " ".join(sys.argv[1:]))
    for spec, seed in [(c, s) for s in args.seeds for c in args.configs]:
        _, flags = parse(spec)
        spec = spec if seed == 0 else f"{spec}@seed{seed}"
        folder = work / re.sub(r"[^\w.=-]", "_", spec)
        hwm = work / "hwm.txt"
        cmd = [sys.executable, "-c", HWM_WRAPPER, "prune", *flags, "--calib", "c4", "--data-dir", args.data_dir,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(seed), "--dtype", "float32",
               "--device", "cpu", "--output", str(folder), "--overwrite", "--quiet"]
        meas = run_measured(cmd, {**env, "LLMPRUNE_BENCH_HWM": str(hwm)})
        if meas["rc"] != 0:
            print(meas["output"], file=sys.stderr)
            raise SystemExit(f"{spec} failed with exit code {meas['rc']}")
        meas["peak_rss_mb"] = int(hwm.read_text()) / 1024
        report = json.loads((folder / "llmprune_report.json").read_text())
        comp = report.get("compensation") or {}
        timing = {"wall_s": meas["wall_s"], "peak_rss_mb": meas["peak_rss_mb"], "seconds": report["seconds"],
                  "sparsity": report["measured_sparsity"], "date": datetime.date.today().isoformat(),
                  "adapter_params": comp.get("adapter_params"), "adapter_fraction": comp.get("adapter_fraction"),
                  "loadavg_after": os.getloadavg()[0]}
        if args.alone:
            timing["timed_alone"] = True
        if args.timing_only:
            if spec not in rows:
                raise SystemExit(f"{spec} has no perplexity in the results yet; run it without --timing-only first")
            rows[spec].update(timing, timed_alone=True)
        else:
            ppl = perplexities(folder, args.data_dir, args.ppl_seqlen, args.ppl_windows, args.base_ppl)
            rows[spec] = {"config": spec, "seed": seed, **ppl, **timing, "errors": layer_errors(report),
                          "masks_sha256": report.get("masks_sha256")}
        shutil.rmtree(folder, ignore_errors=True)
        r = rows[spec]
        print(f"{spec:26s} ppl {r['ppl']:9.2f}  wall {meas['wall_s']:6.1f}s  RSS {meas['peak_rss_mb']:5.0f} MB  "
              f"sparsity {report['measured_sparsity']:.4f}", flush=True)
        state.update(commands=commands, results=list(rows.values()))
        write(out, state, args)
    return 0


def _level(config: str) -> str:
    return config.split("@")[0].split("+")[0].split(":", 1)[1]


def write(out: Path, state: dict, args: argparse.Namespace) -> None:
    import importlib.metadata as md

    rows = {r["config"]: r for r in state["results"]}
    earlier = {k: v for k, v in earlier_rows().items() if k not in rows and _level(k) in LEVELS
               and k.split(":")[0] in ("sparsegpt", "wanda") and out.name == "reconstruct"}
    lines = [
        f"# {args.title}",
        "",
        *[f"- command: `{c}`" for c in state["commands"]],
        f"- machine: {machine()}; wall times marked ⁽ᵃ⁾ were measured on an otherwise idle machine (`--alone` or "
        "`--timing-only`), the others while other jobs shared the 2 cores (not comparable)",
        f"- date: {datetime.date.today().isoformat()}",
        f"- versions: torch {md.version('torch')}, transformers {md.version('transformers')}",
        f"- protocol: embedded SmolLM2-135M-Instruct, float32, CPU; calibration {args.nsamples} x {args.seqlen} "
        f"tokens from the local C4 slice, seed 0 (`@seedN`: seed N); perplexity on WikiText-2 raw test, seqlen {args.ppl_seqlen}, first "
        f"{args.ppl_windows} windows (dense 20.60). EoRA rows: base + adapter loaded through `peft`; their base "
        "alone in the next column. Wall time and peak memory of the whole `llmprune prune` process; prune (s): the "
        "report's own timing of the pruning pass. Layer error: relative output error ‖(W − Ŵ)X‖/‖WX‖ over every "
        "calibration token, mean over modules weighted by size, before → after the step. Peer: llm-compressor "
        "0.14 SparseGPT as given in issue 15.",
        "",
        "| config | WikiText-2 ppl | base alone | measured sparsity | adapter params (of pruned) | layer error "
        "before → after | wall (s) | prune (s) | peak RSS (MB) | peer SparseGPT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def key(c: str) -> tuple:
        return (LEVELS.index(_level(c)) if _level(c) in LEVELS else 9, c.split(":")[0], c)

    for config in sorted([*rows, *earlier], key=key):
        r = rows.get(config) or earlier[config]
        err = r.get("errors") or {}
        step = ""
        if err.get("reconstruct_before") is not None:
            step = f"{err['reconstruct_before']:.4f} → {err['reconstruct_after']:.4f}"
        elif err.get("compensate_before") is not None:
            step = f"{err['compensate_before']:.4f} → {err['compensate_after']:.4f} (H-norm)"
        adapter = (f"{r['adapter_params']:,} ({r['adapter_fraction']:.2%})" if r.get("adapter_params") else "-")
        wall = f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "-"
        alone = " ⁽ᵃ⁾" if r.get("timed_alone") else ""
        src = f" ⁽{r['source']}⁾" if r.get("source") else ""
        prune_s = f"{r['seconds']['prune']:.1f}" if r.get("seconds") else "-"
        lines.append(
            f"| {config}{src} | {r['ppl']:.2f} | {r['base_ppl']:.2f} | " if r.get("base_ppl") is not None else
            f"| {config}{src} | {r['ppl']:.2f} | - | "
        )
        lines[-1] += (f"{r['sparsity']:.4f} | " if r.get("sparsity") is not None else "- | ")
        lines[-1] += (f"{adapter} | {step or '-'} | {wall}{alone} | {prune_s} | "
                      f"{r['peak_rss_mb']:.0f} | {PEER.get(_level(config), '-')} |" if r.get("peak_rss_mb") else
                      f"{adapter} | {step or '-'} | {wall}{alone} | {prune_s} | - | {PEER.get(_level(config), '-')} |")
    lines += ["", "⁽sparsity.json⁾, ⁽prune.json⁾: measured by eval/bench_sparsity.py / eval/bench_prune.py on the same "
              "protocol (seed 0), not re-run here. ⁽ᵃ⁾ timed alone (`--alone` or `--timing-only`)."]
    notes = state.get("notes")
    if notes:
        lines += ["", *notes]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(state, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
