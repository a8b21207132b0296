"""How much the calibration chunk size changes the masks (issue 30 item 3).

``batch_size`` unset means 2,048 tokens per layer-forward chunk on the CPU and 32,768 on a GPU
(``llmprune/engine/lockstep.py``). The chunks set the summation order of the statistics (``XᵀX``,
row norms), so the same settings on the two devices differ by float rounding. This script prunes the
embedded model on the CPU twice per method, with the CPU's chunking and with the GPU's (``batch_size``
set to what the GPU default gives), and counts the mask entries that differ, per model and in the
first layer (before any difference can be carried forward by the sequential order), with the
perplexity of both on a few WikiText-2 windows.

    python eval/chunk_masks.py --data-dir /work/shared/data [--methods wanda sparsegpt] [--windows 4]

writes eval/results/chunk_masks.md and eval/results/chunk_masks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NSAMPLES, SEQLEN = 32, 512  # the pruning benchmark's calibration (eval/bench_prune.py)


def masks(model) -> dict[str, torch.Tensor]:
    """Every decoder-layer Linear weight's zero mask."""
    return {n: (m.weight == 0) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def run(method: str, batch_size: int, data_dir: str, windows: int) -> tuple[dict[str, torch.Tensor], float, float]:
    import llmprune
    from llmprune import load_model

    model, tok, _ = load_model(None, dtype="float32")
    t0 = time.perf_counter()
    llmprune.prune(model, tok, method=method, sparsity=0.5, calib="c4", nsamples=NSAMPLES, seqlen=SEQLEN,
                   data_dir=data_dir, batch_size=batch_size, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    ev = llmprune.evaluate(model, tok, ppl=["wikitext2"], seqlen=2048, max_windows=windows, data_dir=data_dir,
                           progress=False)
    return masks(model), ev.metrics["wikitext2/ppl"], seconds


def main() -> None:
    from llmprune.engine.lockstep import CPU_CHUNK_TOKENS, GPU_CHUNK_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", "../shared/data"))
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--windows", type=int, default=4, help="WikiText-2 windows of 2048 tokens for perplexity")
    ap.add_argument("--out", default=str(HERE / "results" / "chunk_masks"))
    args = ap.parse_args()
    cpu_bs = max(1, CPU_CHUNK_TOKENS // SEQLEN)
    gpu_bs = max(1, GPU_CHUNK_TOKENS // SEQLEN)
    rows = []
    for method in args.methods:
        (a, ppl_a, s_a), (b, ppl_b, s_b) = (run(method, bs, args.data_dir, args.windows) for bs in (cpu_bs, gpu_bs))
        total = sum(m.numel() for m in a.values())
        differ = sum(int((a[n] != b[n]).sum()) for n in a)
        first = [n for n in a if ".layers.0." in n]
        first_total = sum(a[n].numel() for n in first)
        first_differ = sum(int((a[n] != b[n]).sum()) for n in first)
        rows.append({"method": method, "cpu_batch_size": cpu_bs, "gpu_batch_size": gpu_bs, "entries": total,
                     "differ": differ, "fraction": differ / total, "layer0_fraction": first_differ / first_total,
                     "ppl_cpu_chunks": ppl_a, "ppl_gpu_chunks": ppl_b, "seconds": [s_a, s_b]})
        print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "threads": torch.get_num_threads(),
            "protocol": f"embedded SmolLM2-135M-Instruct, float32, CPU; 50 % unstructured; calibration {NSAMPLES} x "
                        f"{SEQLEN} C4 tokens, seed 0; chunks of {cpu_bs} windows ({CPU_CHUNK_TOKENS} tokens, the CPU "
                        f"default) against {gpu_bs} ({GPU_CHUNK_TOKENS} tokens, the GPU default: here one chunk); "
                        f"perplexity on the first {args.windows} WikiText-2 test windows of 2048 tokens",
            "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["# Mask differences from the calibration chunk size", "",
             f"- command: `python eval/chunk_masks.py --data-dir DATA --methods {' '.join(args.methods)} "
             f"--windows {args.windows}`", f"- date: {meta['date']}; {meta['machine']}, torch {meta['torch']}",
             f"- protocol: {meta['protocol']}", "",
             "| method | mask entries differing | in layer 0 | ppl, CPU chunks | ppl, GPU chunks |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['differ']:,} of {r['entries']:,} ({100 * r['fraction']:.4f} %) | "
                     f"{100 * r['layer0_fraction']:.4f} % | {r['ppl_cpu_chunks']:.4f} | {r['ppl_gpu_chunks']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
