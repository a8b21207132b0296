"""Benchmark: structured removal on the benchmark protocol: perplexity, parameters, pruning wall time and
peak memory, and the saved model's CPU speed against the dense model.

Protocol (as eval/results/prune.md): the embedded SmolLM2-135M-Instruct in float32; calibration 32 windows x
512 tokens of the local C4 slice, seed 0; perplexity on WikiText-2 raw test, windows of 2048, the first 16.
Every prune is a separate process (``llmprune prune ...``), timed end to end, its peak resident memory from
``wait4``; every output is scored by the same evaluator afterwards. A cell is ``NAME=FLAGS`` (the prune's
flags), e.g. ``search-20=--structure-budget 0.2``; ``sparsegpt`` is run once as the time reference.

Speed (``--speed``): each saved model and the dense model, loaded with plain transformers, alternating
(dense, pruned, dense, pruned, ...) ``--repeats`` times: prefill tokens/s of one 512-token prompt, greedy
decode tokens/s of 64 new tokens at batch 1 and batch 8, with eager attention and with sdpa; the median of
the repeats, and the ratio to the dense model's median in the same run.

    python eval/bench_structured.py --data-dir ../shared/data [--cells NAME=FLAGS ...] [--speed] [--only-speed]

writes eval/results/structured.md and eval/results/structured.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_prune import machine, perplexity_of, run_measured  # noqa: E402

LAYER_SHARE = 1 / 30  # one decoder layer of the embedded model: its share of the decoder's parameters
DEFAULT_CELLS = {
    "sparsegpt-50 (time reference)": "--method sparsegpt --sparsity 0.5",
    **{f"channels search {b}%": f"--structure-budget {b / 100}" for b in (10, 20, 30)},
    **{f"channels activation {b}%": f"--structure activation --structure-budget {b / 100}" for b in (10, 20, 30)},
    **{f"channels flap {b}%": f"--structure flap --structure-budget {b / 100}" for b in (10, 20, 30)},
    **{f"heads+channels search {b}%": f"--remove-heads 3 --structure-budget {b / 100}" for b in (10, 20, 30)},
    **{f"layers block-influence {b}%": f"--remove-layers {round(b / 100 / LAYER_SHARE)}" for b in (10, 20, 30)},
    **{f"layers kl {b}%": f"--remove-layers {round(b / 100 / LAYER_SHARE)} --depth-method kl" for b in (10, 20, 30)},
}


def prune_cell(name: str, flags: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "llmprune.cli", "prune", *shlex.split(flags), "--calib", "c4", "--nsamples",
           str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--data-dir", args.data_dir,
           "--output", str(out), "--overwrite", "--quiet", "--threads", str(args.threads)]
    r = run_measured(cmd)
    row = {"cell": name, "flags": flags, "wall_s": round(r["wall_s"], 1), "peak_rss_mb": round(r["peak_rss_mb"]),
           "rc": r["rc"], "folder": str(out)}
    if r["rc"] != 0:
        row["error"] = r["output"].strip().splitlines()[-1] if r["output"].strip() else "no output"
        return row
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    st = meta.get("structure")
    if st:
        row["decoder_fraction_removed"] = st["decoder_params"]["fraction_removed"]
        row["params"] = st["params"]["after"]
        row["removed"] = {"layers": st["removal"]["layers"], **st["per_layer"]}
    return row


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def speed_once(folder: str, attn: str, prompt_len: int = 512, new_tokens: int = 64) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    out = {}
    with torch.inference_mode():
        ids = torch.randint(100, vocab - 100, (1, prompt_len), generator=g)
        model(ids[:, :16])  # warm-up
        out["prefill_tok_s"] = prompt_len / _timed(lambda: model(ids))
        for b in (1, 8):
            p = torch.randint(100, vocab - 100, (b, 16), generator=g)
            kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=model.config.eos_token_id if model.config.eos_token_id is not None else 0)
            model.generate(p, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=kw["pad_token_id"])
            out[f"decode_b{b}_tok_s"] = b * new_tokens / _timed(lambda p=p, kw=kw: model.generate(p, **kw))
    return out


def measure_speed(folders: dict[str, str], dense: str, repeats: int) -> dict:
    """Median tokens/s per model and attention, dense and pruned alternating, and ratios to dense."""
    res: dict[str, dict] = {}
    for attn in ("eager", "sdpa"):
        runs: dict[str, list[dict]] = {name: [] for name in ["dense", *folders]}
        for _ in range(repeats):
            for name, folder in folders.items():
                runs["dense"].append(speed_once(dense, attn))
                runs[name].append(speed_once(folder, attn))
        med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items() if rs}
        for n, m in med.items():
            res.setdefault(n, {})[attn] = {k: round(v, 1) for k, v in m.items()}
            if n != "dense":
                res[n][attn + "_ratio"] = {k: round(v / med["dense"][k], 3) for k, v in m.items()}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--cells", nargs="+", help="NAME=FLAGS entries (default: the full table)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--speed", nargs="*", help="cells whose saved models are timed against the dense model")
    ap.add_argument("--only-speed", action="store_true", help="time the models of an earlier run, prune nothing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads of every prune, fixed (the thread policy would follow the machine's load, "
                    "and a prune's masks follow its thread count)")
    ap.add_argument("--workdir", default="/tmp/llmprune-structured")
    ap.add_argument("--results", default=str(HERE / "results" / "structured"))
    args = ap.parse_args()
    cells = dict(c.split("=", 1) for c in args.cells) if args.cells else DEFAULT_CELLS
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path_json = Path(args.results + ".json")
    earlier = json.loads(path_json.read_text()) if path_json.exists() else {}
    rows = {r["cell"]: r for r in earlier.get("rows", [])}
    if not args.only_speed:
        for name, flags in cells.items():
            print(f"== {name}: {flags}", flush=True)
            out = work / name.replace(" ", "_").replace("%", "pct").replace("(", "").replace(")", "")
            row = prune_cell(name, flags, args, out)
            if row["rc"] == 0:
                row["ppl"] = round(perplexity_of(out, args.data_dir, args.ppl_seqlen, args.ppl_windows)["ppl"], 2)
            rows[name] = row
            print(json.dumps(row), flush=True)
            _write(args, rows, earlier.get("speed"))
        dense = work / "dense"
        if not (dense / "config.json").exists():
            import llmprune

            m, t, _ = llmprune.load_model(None)
            m.save_pretrained(dense)
            t.save_pretrained(dense)
        rows["dense"] = {"cell": "dense", "flags": "", "rc": 0, "folder": str(dense),
                         "ppl": round(perplexity_of(dense, args.data_dir, args.ppl_seqlen, args.ppl_windows)["ppl"], 2),
                         "decoder_fraction_removed": 0.0}
    speed = earlier.get("speed")
    if args.speed:
        folders = {n: rows[n]["folder"] for n in args.speed if rows.get(n, {}).get("rc") == 0}
        speed = measure_speed(folders, str(work / "dense"), args.repeats)
    _write(args, rows, speed)
    return 0


def _write(args, rows: dict, speed: dict | None) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = {"date": now, "machine": machine(), "command": " ".join(sys.argv), "rows": list(rows.values()),
            "speed": speed}
    Path(args.results + ".json").write_text(json.dumps(data, indent=1) + "\n")
    ref = next((r for r in rows.values() if r["cell"].startswith("sparsegpt")), None)
    lines = ["# Structured removal on the benchmark protocol", "",
             f"- command: `python eval/bench_structured.py {' '.join(sys.argv[1:])}`",
             f"- machine: {machine()}; date: {now}",
             f"- protocol: embedded SmolLM2-135M-Instruct, float32; calibration C4 {args.nsamples} x {args.seqlen} "
             f"tokens, seed {args.seed}; perplexity WikiText-2 test, seqlen {args.ppl_seqlen}, first "
             f"{args.ppl_windows} windows; each prune a separate process (wall = load + calibrate + prune + save)"
             f"{f', --threads {args.threads}' if getattr(args, 'threads', None) else ''}",
             "", "| cell | removed | decoder params removed | WikiText-2 ppl | prune wall s | x SparseGPT | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        rem = r.get("removed") or {}
        what = ", ".join(f"{k} {v if k != 'layers' else len(v)}" for k, v in rem.items() if v) or "-"
        ratio = f"{r['wall_s'] / ref['wall_s']:.2f}" if ref and r.get("wall_s") and ref.get("wall_s") else "-"
        frac = r.get("decoder_fraction_removed")
        lines.append(f"| {r['cell']} | {what} | {'-' if frac is None else f'{frac:.1%}'} | "
                     f"{r.get('ppl', r.get('error', '-'))} | {r.get('wall_s', '-')} | {ratio} | {r.get('peak_rss_mb', '-')} |")
    if speed:
        lines += ["", "## CPU speed of the saved models against the dense model (same run, alternating)", "",
                  "| model | attention | prefill 512 tok/s | decode b1 tok/s | decode b8 tok/s | prefill x | decode b1 x | decode b8 x |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, per in speed.items():
            for attn in ("eager", "sdpa"):
                m = per.get(attn)
                if not m:
                    continue
                ratio = per.get(attn + "_ratio", {})
                lines.append(f"| {name} | {attn} | {m['prefill_tok_s']} | {m['decode_b1_tok_s']} | "
                             f"{m['decode_b8_tok_s']} | {ratio.get('prefill_tok_s', 1.0)} | "
                             f"{ratio.get('decode_b1_tok_s', 1.0)} | {ratio.get('decode_b8_tok_s', 1.0)} |")
    Path(args.results + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
