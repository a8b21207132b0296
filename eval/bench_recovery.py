"""Benchmark: sparse recovery fine-tuning with masks kept, against the same fine-tuning without the keeper.

Protocol (issue 14, pruning as in eval/results/prune.md): the embedded SmolLM2-135M-Instruct in float32 on
the CPU, pruned with Wanda at 60 % (calibration 32 windows x 512 tokens from the local C4 slice, seed 0);
then fine-tuned on C4 windows drawn with another seed (``--train-seed``, default 1: other windows than the
calibration's) by a plain PyTorch loop: AdamW (betas 0.9/0.999, weight decay ``--weight-decay``), constant
learning rate, causal-LM loss, one window batch per optimizer step. Twice from the same pruned weights,
on the same batches: with ``SparsityKeeper`` (gradients masked before each step, weights re-zeroed after)
and without it. WikiText-2 perplexity (raw test, seqlen 2048, first 16 windows, ``llmprune.evaluate``) and
the sparsity of the pruned weights are measured after pruning and after each fine-tuning.

The keeper's overhead per optimizer step is timed apart, on the embedded model with random gradients in
every parameter: ``optimizer.step()`` alone against ``mask_grads(); optimizer.step(); apply()``,
``--overhead-repeats`` times each, alternating, medians reported.

    python eval/bench_recovery.py --data-dir ../shared/data [--steps 8 --batch-size 4 --seqlen 256 --lr 1e-4]

Writes eval/results/recovery.json and eval/results/recovery.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_prune import machine  # noqa: E402


def perplexity(model, tok, args) -> float:
    import llmprune

    model.eval()
    r = llmprune.evaluate(model, tok, ppl=["wikitext2"], seqlen=args.ppl_seqlen, max_windows=args.ppl_windows,
                          data_dir=args.data_dir, progress=False)
    return r.metrics["wikitext2/ppl"]


def fine_tune(model, batches: torch.Tensor, keeper, args) -> dict:
    """One optimizer step per batch; returns losses and timings (forward+backward, step, keeper)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    losses, t_fb, t_step, t_keep = [], [], [], []
    t0 = time.perf_counter()
    for i, ids in enumerate(batches):  # ids [batch, seqlen]
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t_fb.append(time.perf_counter() - t)
        t = time.perf_counter()
        if keeper is not None:
            keeper.mask_grads()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if keeper is not None:
            keeper.apply()
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t_step.append(t2 - t1)
        t_keep.append((t1 - t) + (t3 - t2))
        losses.append(float(loss.detach()))
        print(f"  step {i + 1}/{len(batches)}: loss {losses[-1]:.4f} ({t_fb[-1]:.1f}s fwd+bwd, {t_step[-1]:.2f}s step, "
              f"{t_keep[-1]:.3f}s keeper)", flush=True)
    model.eval()
    del opt
    return {"losses": losses, "seconds": time.perf_counter() - t0, "forward_backward_s": t_fb, "step_s": t_step,
            "keeper_s": t_keep}


def overhead(model, keeper, repeats: int) -> dict:
    """Median time of a plain AdamW step against the same step with the keeper around it."""
    model.train()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    opt.step()  # the moments allocated outside the timings
    plain, kept, mask_grads, apply = [], [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        keeper.mask_grads()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        keeper.apply()
        t3 = time.perf_counter()
        kept.append(t3 - t)
        mask_grads.append(t1 - t)
        apply.append(t3 - t2)
    model.zero_grad(set_to_none=True)
    med = statistics.median
    return {"repeats": repeats, "plain_step_s": med(plain), "kept_step_s": med(kept),
            "mask_grads_s": med(mask_grads), "apply_s": med(apply),
            "overhead_s": med(mask_grads) + med(apply),
            "overhead_ratio": (med(mask_grads) + med(apply)) / med(plain)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--method", default="wanda", help="pruner (the masks' size, not their choice, sets the overhead)")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps of each fine-tuning")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per step")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per training window")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--overhead-repeats", type=int, default=5)
    ap.add_argument("--overhead-only", action="store_true", help="only time the keeper's overhead (quick)")
    ap.add_argument("--output", default=str(HERE / "results" / "recovery"))
    args = ap.parse_args()

    import llmprune
    from llmprune.calibration import get_calibration
    from llmprune import load_model

    out: dict = {"command": "python eval/bench_recovery.py " + " ".join(sys.argv[1:]), "machine": machine(),
                 "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
                 "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
                 "settings": {k: v for k, v in vars(args).items() if k not in ("data_dir", "output")}}
    model, tok, _ = load_model(None, dtype="float32")
    t = time.perf_counter()
    report = llmprune.prune(model, tok, method=args.method, sparsity=args.sparsity, calib="c4", nsamples=args.nsamples,
                            seqlen=args.calib_seqlen, seed=0, data_dir=args.data_dir, progress=False)
    out["prune_s"] = time.perf_counter() - t
    keeper = llmprune.SparsityKeeper.from_report(model, report)
    out["keeper"] = {"weights": len(keeper), "mask_bytes": keeper.nbytes,
                     "kept_weights_bytes_fp32": 4 * sum(m.numel for m in keeper._masks)}
    print(f"pruned in {out['prune_s']:.0f}s; {keeper}", flush=True)
    out["overhead"] = overhead(model, keeper, args.overhead_repeats)
    print("overhead:", out["overhead"], flush=True)
    if args.overhead_only:
        write(out, args)
        return 0

    out["pruned"] = {"ppl": perplexity(model, tok, args), "sparsity": keeper.sparsity()}
    print("pruned:", out["pruned"], flush=True)
    n = args.steps * args.batch_size
    windows = get_calibration("c4", tok, nsamples=n, seqlen=args.seqlen, seed=args.train_seed, data_dir=args.data_dir)
    batches = windows.view(args.steps, args.batch_size, args.seqlen)  # [steps, batch, seqlen]
    out["tokens"] = int(windows.numel())
    pruned_state = copy.deepcopy(model.state_dict())

    for name, use in (("with_keeper", True), ("without_keeper", False)):
        model.load_state_dict(pruned_state)
        print(f"fine-tuning {name.replace('_', ' ')}", flush=True)
        run = fine_tune(model, batches, keeper if use else None, args)
        run["ppl"] = perplexity(model, tok, args)
        run["sparsity"] = keeper.sparsity()  # zeros among the pruned weights, whoever kept them
        run["revived"] = sum(keeper.revived().values())
        out[name] = run
        print(f"{name}: ppl {run['ppl']:.2f}, sparsity {run['sparsity']:.4f}, {run['seconds']:.0f}s", flush=True)
    write(out, args)
    return 0


def write(out: dict, args) -> None:
    out.setdefault("loadavg", [round(x, 1) for x in os.getloadavg()])
    path = Path(args.output)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    o, s = out["overhead"], out["settings"]
    lines = [
        "# Sparse recovery fine-tuning: masks kept, and what the keeper costs",
        "",
        f"- command: `{out['command']}`",
        f"- machine: {out['machine']}, {out['threads']} torch threads; **shared** with other jobs while this ran "
        "(load average above the core count), so the times are upper bounds",
        f"- date: {out['date']}",
        f"- versions: {out['versions']}",
        f"- protocol: embedded SmolLM2-135M-Instruct, float32, CPU. {s['method']} {s['sparsity']:.0%}"
        + (f" (calibration {s['nsamples']} x {s['calib_seqlen']} C4 tokens, seed 0, as in eval/results/prune.md)"
           if s["method"] != "magnitude" else "") + ". "
        + (f"Fine-tuning: {s['steps']} AdamW steps (lr {s['lr']:g} constant, weight decay {s['weight_decay']:g}), "
           f"{s['batch_size']} windows x {s['seqlen']} tokens of the local C4 slice per step (seed "
           f"{s['train_seed']}: other windows than the calibration's), from the same pruned weights and on the same "
           "batches with and without `SparsityKeeper`. Perplexity: WikiText-2 raw test, seqlen "
           f"{s['ppl_seqlen']}, first {s['ppl_windows']} windows (`llmprune.evaluate`). Sparsity: exact zeros among "
           f"the weights {s['method']} pruned (every Linear of the decoder layers)." if "pruned" in out else
           "Only the keeper's overhead was measured (`--overhead-only`): it depends on the masks' sizes, not on "
           "which weights they keep."),
        f"- load average at the end: {out['loadavg']}" if "loadavg" in out else "",
        "",
    ]
    if "pruned" in out:
        a, b = out["with_keeper"], out["without_keeper"]
        lines += [
            f"Fine-tuning: {s['steps']} steps, {out['tokens']:,} tokens; wall time on this CPU "
            f"{a['seconds']:.0f} s with the keeper, {b['seconds']:.0f} s without "
            f"(forward+backward median {statistics.median(a['forward_backward_s']):.1f} s per step).",
            "",
            "| model | WikiText-2 ppl | sparsity of the pruned weights | pruned weights non-zero | loss first -> last step |",
            "|---|---|---|---|---|",
            "| dense (eval/results/prune.md) | 20.60 | - | - | - |",
            f"| {s['method']} {s['sparsity']:.0%} | {out['pruned']['ppl']:.2f} | {out['pruned']['sparsity']:.4f} | 0 | - |",
            f"| + fine-tuned with SparsityKeeper | {a['ppl']:.2f} | {a['sparsity']:.4f} | {a['revived']:,} | "
            f"{a['losses'][0]:.3f} -> {a['losses'][-1]:.3f} |",
            f"| + fine-tuned without it | {b['ppl']:.2f} | {b['sparsity']:.4f} | {b['revived']:,} | "
            f"{b['losses'][0]:.3f} -> {b['losses'][-1]:.3f} |",
            "",
        ]
    lines += [
        f"Keeper overhead per optimizer step (median of {o['repeats']}, random gradients in every parameter, "
        f"{out['keeper']['weights']} masked weights, masks {out['keeper']['mask_bytes'] / 2**20:.1f} MB = 1/32 of "
        f"their {out['keeper']['kept_weights_bytes_fp32'] / 2**20:.0f} MB in float32):",
        "",
        "| | seconds |",
        "|---|---|",
        f"| AdamW step alone | {o['plain_step_s']:.3f} |",
        f"| mask_grads + AdamW step + apply | {o['kept_step_s']:.3f} |",
        f"| of which mask_grads / apply | {o['mask_grads_s']:.3f} / {o['apply_s']:.3f} |",
        f"| overhead | {o['overhead_s']:.3f} ({o['overhead_ratio']:.1%} of the step) |",
        "",
    ]
    if "pruned" in out:
        fb = statistics.median(out["with_keeper"]["forward_backward_s"])
        lines += [f"Against a whole training step (forward+backward {fb:.1f} s + step), the overhead is "
                  f"{o['overhead_s'] / (fb + o['plain_step_s']):.2%}.", ""]
    path.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
