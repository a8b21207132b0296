"""Activation sparsity on the embedded model: perplexity, reached sparsity and CPU decode speed.

Protocol (issue 11): embedded SmolLM2-135M-Instruct in float32; thresholds calibrated on 32 x 512 C4
tokens from the data dir (seed 0); perplexity on WikiText-2 raw test by two protocols (issue 27,
``llmprune.evaluation.perplexity``): 'all' (llmprune's: seqlen 2048, first 16 windows, every position
thresholded, every token scored; dense 20.60) and 'teal' (TEAL's utils/eval_ppl.py: the first 16
windows of 2048 + 512 tokens every 512 tokens, the last half of each window thresholded, its last 512
tokens scored), with the activation sparsity the thresholds reach on those windows (held-out text);
greedy decode tokens/s of the dense model against the sparse decode path (``sparse_decode=True``).

    LLMPRUNE_DATA_DIR=../shared/data python eval/bench_activation.py --cells teal-uniform-50,teal-greedy-50
    python eval/bench_activation.py --decode-only          # re-time decode from the saved thresholds

Cells are ``CRITERION-ALLOCATION-PERCENT`` (``teal-uniform-50``) or ``sparsegpt50+teal-uniform-40``,
with ``@sN`` for calibration seed N (``wina-uniform-50@s1``); criterion ``wina`` is WINA as its official
code (a threshold per reader, norms on k_proj/gate_proj), ``winastacked`` llmprune's earlier layout.
``--reeval`` scores saved cells by a protocol they lack, from their stored thresholds. Results accumulate in ``eval/results/activation.json`` (a cell run again replaces its entry) and
``eval/results/activation.md`` is rewritten from it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "activation.json"
DEFAULT_CELLS = [f"{c}-{a}-{p}" for p in (50, 40, 25) for c in ("teal", "wina", "cats") for a in ("uniform", "greedy")]
GREEDY_STEP = 0.05  # coarser than the default 0.025: half the layer forwards on this 2-core machine
log = logging.getLogger("bench_activation")


PROTOCOLS = ("all", "teal")
TEAL_WINDOWS: int | None = None  # windows of TEAL's protocol (--teal-windows; default: --windows)


def parse_cell(cell: str) -> dict:
    method = None
    seed = 0
    if "@s" in cell:
        cell, seed_text = cell.split("@s")
        seed = int(seed_text)
    if "+" in cell:
        head, cell = cell.split("+", 1)
        method = {"method": head.rstrip("0123456789"), "sparsity": int(head[len(head.rstrip("0123456789")):]) / 100}
    crit, alloc, pct = cell.split("-")
    wina = {"activation_wina": "stacked"} if crit == "winastacked" else {}
    return {"activation": "wina" if crit == "winastacked" else crit, **wina, "activation_allocation": alloc,
            "activation_sparsity": int(pct) / 100, "seed": seed,
            **({"activation_greedy_step": GREEDY_STEP} if alloc == "greedy" else {}), **(method or {})}


NOTES = "## Notes\n"


def load_results(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"cells": {}, "decode": {}}


def save_results(res: dict, path: Path = RESULTS) -> None:
    """Write ``res`` to ``path`` (JSON) and its table beside it (``.md``), merged with what is there now:
    several processes may fill one file, each writing its own cells."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = load_results(path)
    merged = {**now, **{k: v for k, v in res.items() if k != "cells"},
              "cells": {**now.get("cells", {}), **res.get("cells", {})}}
    if not res.get("decode") and now.get("decode"):
        merged["decode"] = now["decode"]
    path.write_text(json.dumps(merged, indent=1) + "\n")
    md = path.with_suffix(".md")
    old = md.read_text() if md.is_file() else ""
    # hand-written notes (what the numbers mean, what is missing) survive a rerun of some cells
    notes = old[old.index(NOTES):] if NOTES in old else ""
    md.write_text(markdown(merged) + ("\n" + notes if notes else ""))


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"


def run_cell(cell: str, data_dir: str, windows: int) -> dict:
    import llmprune
    from llmprune import load_model

    model, tok, _ = load_model(None, dtype="float32")
    settings = parse_cell(cell)
    t0 = time.perf_counter()
    report = llmprune.prune(model, tok, calib="c4", nsamples=32, seqlen=512, data_dir=data_dir,
                            activation_holdout=None, progress=False, **settings)
    t_prune = time.perf_counter() - t0
    t1 = time.perf_counter()
    ev = llmprune.evaluate(model, tok, ppl=["wikitext2"], seqlen=2048, max_windows=windows, data_dir=data_dir,
                           progress=False)
    meta = report.metadata()["activation"]
    out = {
        "settings": settings, "ppl": ev.metrics["wikitext2/ppl"],
        "wikitext2_sparsity": ev.metrics["wikitext2/activation_sparsity"],
        "wikitext2_entries": ev.perplexity["wikitext2"]["activation_sparsity"]["entries"],
        "calibration_sparsity": meta["calibration_sparsity"], "weight_sparsity": report.sparsity,
        "seconds_prune": t_prune, "seconds_eval": time.perf_counter() - t1, "activation": meta,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out.update(teal_protocol(model, tok, data_dir, TEAL_WINDOWS or windows))
    return out


def teal_protocol(model, tok, data_dir: str, windows: int) -> dict:
    """Perplexity by TEAL's protocol (see the module docstring) and the sparsity reached on its windows."""
    from llmprune.activation import installed
    from llmprune.evaluation.perplexity import dataset_perplexity

    handle = installed(model)
    t = time.perf_counter()
    with handle.measure() if handle is not None else contextlib.nullcontext():
        r = dataset_perplexity(model, tok, "wikitext2", seqlen=2048, max_windows=windows, data_dir=data_dir,
                               activation_protocol="teal")
    got = handle.sparsity()["weighted"] if handle is not None else None
    return {"ppl_teal": r.ppl, "wikitext2_sparsity_teal": got, "teal_windows": r.windows, "teal_tokens": r.tokens,
            "seconds_eval_teal": time.perf_counter() - t}


def reeval(name: str, cell: dict, data_dir: str, windows: int) -> dict:
    """Score a saved cell by TEAL's protocol from its stored thresholds (weights: dense cells only)."""
    from llmprune import load_model
    from llmprune.activation import apply_activation_sparsity

    if cell.get("weight_sparsity", 0.0):
        raise ValueError(f"{name}: weight-pruned cells need their pruned weights; rerun the cell instead")
    model, tok, _ = load_model(None, dtype="float32")
    with apply_activation_sparsity(model, cell["activation"]):
        return {**cell, **teal_protocol(model, tok, data_dir, TEAL_WINDOWS or windows),
                "date_teal": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_dense(data_dir: str, windows: int) -> dict:
    import llmprune
    from llmprune import load_model

    model, tok, _ = load_model(None, dtype="float32")
    ev = llmprune.evaluate(model, tok, ppl=["wikitext2"], seqlen=2048, max_windows=windows, data_dir=data_dir,
                           progress=False)
    return {"ppl": ev.metrics["wikitext2/ppl"], **teal_protocol(model, tok, data_dir, TEAL_WINDOWS or windows),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_dense_teal(data_dir: str, windows: int) -> dict:
    """The dense model by TEAL's protocol only (its reference)."""
    from llmprune import load_model

    model, tok, _ = load_model(None, dtype="float32")
    return {**teal_protocol(model, tok, data_dir, TEAL_WINDOWS or windows),
            "date_teal": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def quick_thresholds(model, tok, pct: int, data_dir: str, windows: int) -> tuple[dict, str]:
    """Teal-uniform thresholds at ``pct`` % from ``windows`` x 512 C4 tokens (for decode timing only)."""
    import llmprune

    report = llmprune.prune(model, tok, calib="c4", nsamples=windows, seqlen=512, seed=0, data_dir=data_dir,
                            activation="teal", activation_sparsity=pct / 100, activation_holdout=None,
                            progress=False)
    report.activation_handle.remove()
    return report.metadata()["activation"], f"timing-only calibration on {windows} x 512 C4 tokens"


def decode(res: dict, data_dir: str, new_tokens: int, repeats: int, decode_calib: int = 4,
           attention: str = "eager") -> dict:
    """Greedy decode tokens/s: dense model, then each teal-uniform level's thresholds on the sparse path,
    all with the same attention implementation (eager: what ``llmprune.load(sparse_decode=True)`` picks
    on the CPU, and the faster one for the dense model too)."""
    from llmprune.activation import apply_activation_sparsity
    from llmprune.evaluation.perplexity import load_text, tokenize_once
    from llmprune import load_model

    model, tok, _ = load_model(None, dtype="float32")
    model.set_attn_implementation(attention)
    ids = tokenize_once(tok, load_text("wikitext2", data_dir).text)[:64][None]  # [1, 64] prompt

    def once() -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

    once()  # warm-up
    out = {"new_tokens": new_tokens, "prompt": int(ids.shape[1]), "repeats": repeats,
           "threads": torch.get_num_threads(), "machine": machine(), "attention": attention,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "levels": {}}
    for pct in (0, 25, 40, 50):
        cell = res["cells"].get(f"teal-uniform-{max(pct, 25)}")
        source = f"teal-uniform-{pct} cell (32 x 512 C4)"
        if pct == 0:  # every input survives: what the transposed layout alone gains
            if cell is None:
                continue
            thresholds = copy.deepcopy(cell["activation"])
            for t in thresholds["thresholds"].values():
                t["threshold"] = 0.0
            source = "every threshold 0 (no input dropped)"
        elif cell is None:  # thresholds for timing only, from a small calibration (decode speed depends on the level)
            thresholds, source = quick_thresholds(model, tok, pct, data_dir, decode_calib)
        else:
            thresholds = cell["activation"]
        with apply_activation_sparsity(model, thresholds):
            _, ref_tokens = once()  # the thresholded dense path's tokens
        # dense and sparse runs alternate, so that a drift of the machine's speed hits both alike
        dense_s, sparse_s, tokens = [], [], None
        for _ in range(repeats):
            dense_s.append(once()[0])
            with apply_activation_sparsity(model, thresholds, sparse_decode=True):
                sec, tokens = once()
            sparse_s.append(sec)
        dense_tps, tps = new_tokens / min(dense_s), new_tokens / min(sparse_s)
        diff = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        out["levels"][str(pct)] = {"tokens_per_s": tps, "dense_tokens_per_s": dense_tps, "ratio": tps / dense_tps,
                                   "same_tokens": tokens == ref_tokens, "first_different_token": diff,
                                   "thresholds": source, "dense_seconds": dense_s, "sparse_seconds": sparse_s}
        log.info("decode at %d %%: %.2f tok/s (dense %.2f), x%.2f, same tokens %s", pct, tps, dense_tps,
                 tps / dense_tps, tokens == ref_tokens)
    return out


def markdown(res: dict) -> str:
    dense = res.get("dense", {}).get("ppl")
    ref = dense or 20.6015  # eval/results/eval.md, same protocol, when not re-measured
    dense_teal = res.get("dense", {}).get("ppl_teal")
    lines = [
        "# Activation sparsity (issue 11)",
        "",
        "Command: `LLMPRUNE_DATA_DIR=../shared/data nice -n 10 python eval/bench_activation.py --cells ...` "
        "(`--decode-only` re-times decode). Protocol: embedded SmolLM2-135M-Instruct, float32; thresholds "
        "calibrated on 32 x 512 C4 tokens (data dir, seed 0) after any weight pruning of the same run; WikiText-2 "
        "raw test, two perplexity protocols (issue 27): 'ours' seqlen 2048, first 16 windows, every position "
        "thresholded and scored; 'TEAL' as TEAL's utils/eval_ppl.py: the first 16 windows of 2048 + 512 tokens "
        "every 512 tokens, the last half of each window thresholded, its last 512 tokens scored (its dense "
        "reference differs: other tokens, longer context). 'WikiText-2 sparsity' is what the thresholds reach "
        "on the 'ours' windows (held-out text), weighted by the weights each thresholded tensor feeds (cats: "
        "the gated MLP activation only). wina: as its official code (a threshold per reader, column norms on "
        "k_proj and gate_proj only); winastacked: llmprune's earlier layout (one threshold per input, stacked "
        "norms). '@sN': calibration seed N (default 0).",
        f"Machine: {res.get('decode', {}).get('machine') or machine()}"
        + (f"; {res['machine_note']}" if res.get("machine_note") else "") + ".",
        "",
        (f"Dense perplexity: {dense:.2f} (ours)" if dense else "Dense perplexity: not re-measured here; 20.60 in "
         "eval/results/eval.md (same protocol); ratios below use it")
        + (f", {dense_teal:.2f} (TEAL protocol)" if dense_teal else ""),
        "",
        "| config | weight sparsity | activation target | ppl (ours) | x dense | ppl (TEAL protocol) | x dense "
        "| WikiText-2 sparsity | calibration sparsity | prune+calib (s) | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in res["cells"].items():
        s = c["settings"]
        ratio = f"{c['ppl'] / ref:.3f}"
        teal = c.get("ppl_teal")
        same = teal and c.get("teal_windows") == res.get("dense", {}).get("teal_windows")
        teal_cols = (f"{teal:.2f} ({c['teal_windows']} w) | {teal / dense_teal:.3f}" if same else
                     f"{teal:.2f} ({c['teal_windows']} w) | -" if teal else "- | -")
        lines.append(f"| {name} | {c.get('weight_sparsity', 0.0):.2f} | {s['activation_sparsity']:.2f} | "
                     f"{c['ppl']:.2f} | {ratio} | {teal_cols} | "
                     f"{c['wikitext2_sparsity']:.4f} | {c['calibration_sparsity']:.4f} | {c['seconds_prune']:.0f} | "
                     f"{c['date']} |")
    d = res.get("decode") or {}
    if d.get("levels"):
        lines += ["", f"Greedy decode ({d['new_tokens']} new tokens after a {d['prompt']}-token WikiText-2 prompt, "
                      f"batch 1, {d['threads']} threads, {d.get('attention', 'sdpa')} attention; {d['date']}): "
                      f"for each level the dense model and the sparse decode path run in turn, "
                      f"{d.get('repeats', 3)} times each, best of each.", "",
                  "| teal uniform | tokens/s dense | tokens/s (sparse decode) | ratio | same tokens as "
                  "dense-with-thresholds | thresholds |",
                  "|---|---|---|---|---|---|"]
        for pct, lv in d["levels"].items():
            same = str(lv["same_tokens"]) if lv.get("first_different_token") is None \
                else f"from token {lv['first_different_token'] + 1} of {d['new_tokens']} on, no"
            dense_tps = lv.get("dense_tokens_per_s", d.get("dense_tokens_per_s", float("nan")))
            lines.append(f"| {pct} % | {dense_tps:.2f} | {lv['tokens_per_s']:.2f} | {lv['ratio']:.2f}x | {same} | "
                         f"{lv.get('thresholds', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS), help="comma-separated cells (see above)")
    ap.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", str(HERE.parent.parent / "shared/data")))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON results file (the .md table goes beside it)")
    ap.add_argument("--dense", action="store_true", help="also measure the dense perplexity")
    ap.add_argument("--reeval", default="", help="comma-separated saved cells to score by TEAL's protocol")
    ap.add_argument("--teal-windows", type=int, default=None, help="windows of TEAL's protocol (default --windows)")
    ap.add_argument("--dense-teal", action="store_true", help="also score the dense model by TEAL's protocol")
    ap.add_argument("--decode", action="store_true", help="also time decode after the cells")
    ap.add_argument("--decode-only", action="store_true", help="only time decode, from the saved thresholds")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="eager", help="attention implementation for decode timing")
    ap.add_argument("--decode-calib", type=int, default=4,
                    help="windows of a timing-only calibration for levels whose teal-uniform cell is missing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = load_results(args.results)
    global TEAL_WINDOWS
    TEAL_WINDOWS = args.teal_windows
    if not args.decode_only:
        if args.dense_teal:
            res = load_results(args.results)
            res["dense"] = {**res.get("dense", {}), **run_dense_teal(args.data_dir, args.windows)}
            save_results(res, args.results)
        if args.dense:
            res["dense"] = run_dense(args.data_dir, args.windows)
            save_results(res, args.results)
        for cell in filter(None, args.reeval.split(",")):
            log.info("re-evaluating %s by TEAL's protocol", cell)
            res = load_results(args.results)
            res["cells"][cell] = reeval(cell, res["cells"][cell], args.data_dir, args.windows)
            log.info("cell %s: ppl (TEAL protocol) %.3f", cell, res["cells"][cell]["ppl_teal"])
            save_results(res, args.results)
        for cell in filter(None, args.cells.split(",")):
            log.info("cell %s", cell)
            res = load_results(args.results)
            res["cells"][cell] = run_cell(cell, args.data_dir, args.windows)
            log.info("cell %s: ppl %.3f, WikiText-2 sparsity %.4f", cell, res["cells"][cell]["ppl"],
                     res["cells"][cell]["wikitext2_sparsity"])
            save_results(res, args.results)
    if args.decode or args.decode_only:
        res["decode"] = decode(res, args.data_dir, args.new_tokens, args.repeats, args.decode_calib,
                               args.attention)
        save_results(res, args.results)


if __name__ == "__main__":
    main()
