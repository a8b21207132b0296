#!/usr/bin/env python3
"""Peer benchmark: prune a model with llm-compressor's one-shot SparseGPT / Wanda.

This script is NOT part of llmprune and does not import it. It runs in a separate
virtual environment that has llm-compressor installed (llm-compressor pins its own
transformers range, which differs from the one llmprune uses), e.g.:

    python3 -m venv /tmp/lcvenv
    /tmp/lcvenv/bin/pip install torch==2.13.0          # CPU build first
    echo "torch==2.13.0" > /tmp/lc-constraints.txt
    /tmp/lcvenv/bin/pip install -c /tmp/lc-constraints.txt llmcompressor==0.14.0.1 gguf

and is run as:

    /tmp/lcvenv/bin/python eval/peer_llmcompressor.py --model /tmp/smollm2-f32 \
        --method sparsegpt --sparsity 0.5 [--pattern 2:4] --data-dir /work/shared/data \
        --nsamples 32 --seqlen 512 --seed 0 --output /tmp/out-peer [--ppl]

    /tmp/lcvenv/bin/python eval/peer_llmcompressor.py --model /tmp/smollm2-f32 \
        --dense-only --data-dir /work/shared/data

--model must be a plain (unquantized) float safetensors folder with its tokenizer.

Protocol (as in the SparseGPT / Wanda reference code):
  * calibration: `nsamples` random windows of `seqlen` tokens from
    <data-dir>/c4/c4_validation_2k.jsonl, drawn with random.Random(seed): pick a
    random document whose token length is > seqlen, then a random window start;
  * pruning: llm-compressor `oneshot()` with SparseGPTModifier or
    WandaPruningModifier (library defaults for everything not set here), pruning
    the Linear layers inside the decoder layers only (lm_head / embeddings kept),
    model kept in float32 on CPU;
  * the pruned model is saved with transformers' own save_pretrained (a plain
    dense safetensors checkpoint, no compressed-tensors format) + tokenizer;
  * --ppl: WikiText-2 raw test perplexity: the lines of wiki.test.raw joined with
    "\\n\\n" (--wikitext-join hf: the exact HF dataset rows instead), tokenized
    once with default special tokens, non-overlapping windows of 2048 tokens,
    first 16 windows, nll summed over all scored tokens / number of scored tokens.

Prints one JSON line (prefixed by nothing) on stdout as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_T_START = time.perf_counter()

import torch  # noqa: E402 - imported after _T_START: its import is part of the timed run


def peak_rss_mb() -> float:
    # Linux: ru_maxrss is in kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- data


def load_c4_docs(data_dir: str) -> list[str]:
    path = os.path.join(data_dir, "c4", "c4_validation_2k.jsonl")
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                docs.append(json.loads(line)["text"])
    return docs


def sample_calibration(tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int):
    """SparseGPT/Wanda `get_c4`: random doc with > seqlen tokens, random window."""
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            ids = tokenizer(docs[i], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[0, start : start + seqlen].tolist())
    return windows


def wikitext2_test_text(data_dir: str, join: str = "lines") -> str:
    """WikiText-2 raw test text to score.

    join="lines" (default, the protocol behind llmprune's reference numbers, dense
    SmolLM2-135M = 20.60): "\\n\\n".join(wiki.test.raw split into lines without
    line ends).
    join="hf": the exact papers' text "\\n\\n".join(load_dataset("wikitext",
    "wikitext-2-raw-v1", split="test")["text"]): each HF row is "" or "<line>\\n",
    and the raw file writes the empty rows as " \\n" (see wikitext2/SOURCE.txt), so
    the rows are rebuilt from the file exactly (dense SmolLM2-135M = 20.71).
    """
    path = os.path.join(data_dir, "wikitext2", "raw", "wiki.test.raw")
    with open(path, encoding="utf-8", newline="") as f:
        raw = f.read()
    if join == "lines":
        return "\n\n".join(raw.splitlines())
    rows = ["" if line == " \n" else line for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


@torch.no_grad()
def wikitext2_ppl(model, tokenizer, data_dir: str, seqlen: int = 2048, max_windows: int = 16,
                  join: str = "lines") -> dict:
    text = wikitext2_test_text(data_dir, join)
    ids = tokenizer(text, return_tensors="pt").input_ids
    nwin = min(ids.shape[1] // seqlen, max_windows)
    nll_sum = 0.0
    ntok = 0
    model.eval()
    for w in range(nwin):
        batch = ids[:, w * seqlen : (w + 1) * seqlen]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        shift_labels = batch[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, reduction="sum")
        nll_sum += loss.item()
        ntok += shift_labels.numel()
    return {
        "ppl": math.exp(nll_sum / ntok),
        "ppl_windows": nwin,
        "ppl_tokens": ntok,
        "ppl_total_tokens": int(ids.shape[1]),
    }


# ----------------------------------------------------------------------- sparsity


def decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError("cannot find decoder layers at model.model.layers")
    return layers


def measure_sparsity(model, pattern: str | None) -> dict:
    zeros = 0
    total = 0
    per_kind: dict[str, list[int]] = {}
    nm_ok = True
    n, m = (int(x) for x in pattern.split(":")) if pattern else (0, 0)
    for layer in decoder_layers(model):
        for name, mod in layer.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            w = mod.weight.detach()
            z = int((w == 0).sum())
            zeros += z
            total += w.numel()
            kind = name.rsplit(".", 1)[-1]
            acc = per_kind.setdefault(kind, [0, 0])
            acc[0] += z
            acc[1] += w.numel()
            if n and w.shape[1] % m == 0:
                groups = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
                if bool((groups < n).any()):
                    nm_ok = False
    out = {
        "sparsity": zeros / total if total else 0.0,
        "sparsity_by_proj": {k: round(v[0] / v[1], 6) for k, v in sorted(per_kind.items())},
        "pruned_params_total": total,
    }
    emb = model.get_input_embeddings()
    out["embed_sparsity"] = float((emb.weight == 0).float().mean())
    head = model.get_output_embeddings()
    if head is not None:
        out["lm_head_sparsity"] = float((head.weight == 0).float().mean())
    if n:
        out["nm_pattern_ok"] = nm_ok
    return out


# ---------------------------------------------------------------------------- main


def versions() -> dict:
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import llmcompressor

        v["llmcompressor"] = getattr(llmcompressor, "__version__", None)
        if v["llmcompressor"] is None:
            from importlib.metadata import version

            v["llmcompressor"] = version("llmcompressor")
    except Exception:  # pragma: no cover - dense-only without llmcompressor
        v["llmcompressor"] = None
    try:
        from importlib.metadata import version

        v["compressed_tensors"] = version("compressed-tensors")
    except Exception:
        pass
    return v


def build_modifier(method: str, sparsity: float, pattern: str | None, layer_cls: str):
    mask_structure = pattern if pattern else "0:0"
    # `targets` of llm-compressor's sparsity modifiers name the *containers*
    # (here: every decoder layer); every Linear inside them is pruned.
    kwargs = dict(
        sparsity=sparsity,
        mask_structure=mask_structure,
        targets=[layer_cls],
        ignore=["re:.*lm_head"],
    )
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(**kwargs)
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(**kwargs)
    raise ValueError(method)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="float safetensors folder (model + tokenizer)")
    ap.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (default: unstructured)")
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="folder for the pruned model")
    ap.add_argument("--ppl", action="store_true", help="WikiText-2 perplexity after timing")
    ap.add_argument("--dense-only", action="store_true",
                    help="skip pruning; load the model and measure its perplexity")
    ap.add_argument("--ppl-seqlen", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--wikitext-join", choices=["hf", "lines"], default="lines",
                    help="lines (default): file lines joined by \\n\\n (llmprune reference, "
                         "dense 20.60); hf: exact HF dataset rows joined by \\n\\n (20.71)")
    args = ap.parse_args(argv)

    if args.pattern:
        n, m = (int(x) for x in args.pattern.split(":"))
        if n and abs(n / m - args.sparsity) > 1e-9:
            print(f"note: N:M {args.pattern} implies sparsity {n / m}", file=sys.stderr)
    if not args.dense_only and not args.output:
        ap.error("--output is required unless --dense-only")

    torch.manual_seed(args.seed)
    random.seed(args.seed)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_import = time.perf_counter() - _T_START
    t0 = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.to("cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter() - t0

    result: dict = {
        "tool": "llmcompressor",
        "model": args.model,
        "method": "dense" if args.dense_only else args.method,
        "sparsity_target": 0.0 if args.dense_only else args.sparsity,
        "pattern": None if args.dense_only else (args.pattern or "unstructured"),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }

    if not args.dense_only:
        from datasets import Dataset
        from llmcompressor import oneshot

        t1 = time.perf_counter()
        docs = load_c4_docs(args.data_dir)
        windows = sample_calibration(tokenizer, docs, args.nsamples, args.seqlen, args.seed)
        del docs
        ds = Dataset.from_dict(
            {
                "input_ids": windows,
                "attention_mask": [[1] * len(w) for w in windows],
            }
        )
        t_data = time.perf_counter() - t1

        layer_cls = type(decoder_layers(model)[0]).__name__
        modifier = build_modifier(args.method, args.sparsity, args.pattern, layer_cls)

        t2 = time.perf_counter()
        model = oneshot(
            model=model,
            processor=tokenizer,
            dataset=ds,
            recipe=[modifier],
            num_calibration_samples=args.nsamples,
            max_seq_length=args.seqlen,
            output_dir=None,  # we save ourselves, as a plain checkpoint
        )
        t_prune = time.perf_counter() - t2

        t3 = time.perf_counter()
        os.makedirs(args.output, exist_ok=True)
        # oneshot replaces model.save_pretrained with a compressed-tensors wrapper;
        # call transformers' own method for a plain dense safetensors checkpoint.
        type(model).save_pretrained(model, args.output)
        tokenizer.save_pretrained(args.output)
        t_save = time.perf_counter() - t3

        result.update(
            {
                "modifier": type(modifier).__name__,
                "modifier_args": {
                    k: v
                    for k, v in modifier.model_dump().items()
                    if k in ("sparsity", "mask_structure", "targets", "ignore",
                             "block_size", "dampening_frac", "sparsity_profile")
                },
                "time_calib_data_s": round(t_data, 2),
                "time_oneshot_s": round(t_prune, 2),
                "time_save_s": round(t_save, 2),
            }
        )

    wall = time.perf_counter() - t0
    result.update(
        {
            "wall_s": round(wall, 2),
            "time_load_s": round(t_load, 2),
            "time_import_s": round(t_import, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    )
    result.update(measure_sparsity(model, None if args.dense_only else args.pattern))
    result["sparsity"] = round(result["sparsity"], 6)

    if args.ppl or args.dense_only:
        t4 = time.perf_counter()
        result.update(
            wikitext2_ppl(model, tokenizer, args.data_dir, args.ppl_seqlen, args.ppl_windows,
                          args.wikitext_join)
        )
        result["ppl"] = round(result["ppl"], 4)
        result["wikitext_join"] = args.wikitext_join
        result["time_ppl_s"] = round(time.perf_counter() - t4, 2)
        result["peak_rss_mb_after_ppl"] = round(peak_rss_mb(), 1)

    result["versions"] = versions()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
