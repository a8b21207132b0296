"""The CUDA path end to end, for a machine with a GPU (issue 30 item 3): run it when one is lent.

No part of llmprune's CUDA path had run on a GPU when this was written; this script is the one to run
first on one. In under 10 minutes on one GPU it runs, on ``--device cuda``:

- every pruner (magnitude, Wanda, SparseGPT, RIA, ALPS) on the embedded SmolLM2-135M, 50 %, with a small
  C4 calibration (16 x 512 tokens);
- every step around a pruner (DSnoT, OWL, ADMM reconstruction, EoRA);
- SparseGPT 2:4 on a synthetic wider model built from a config (Llama-3.2-1B widths: hidden 2048,
  intermediate 8192, 32 heads, 8 KV heads; 2 layers) with random-token calibration;
- a streamed run (``low_memory``: layers read from the shards and written once pruned);
- activation sparsity (TEAL 50 %, its held-out measurement on WikiText-2) and a greedy decode with it;
- ``prune`` with an evaluation after it (WikiText-2 perplexity on a few windows, on the pruning device);
- the CLI under ``torchrun --nproc-per-node 1``.

Each check is timed, with the GPU's peak allocated memory, and the outcome (sparsity, perplexity,
tokens/s) or the error's first line; a failing check does not stop the others.

    python eval/gpu_check.py --data-dir /work/shared/data            # on the GPU machine
    python eval/gpu_check.py --device cpu --smoke --out /tmp/gpu_check  # the same checks on tiny models, CPU

writes eval/results/gpu_check.md (a table: check, status, seconds, peak GPU memory, notes) and
eval/results/gpu_check.json; exits 1 when a check failed, 2 without CUDA (``--device cuda``) or when
``--device cpu`` is asked without ``--smoke`` (the full-size checks on a CPU take far longer and prove
nothing about CUDA). ``--smoke`` swaps in tiny models, a byte tokenizer and a short text written on the
spot, so it runs in seconds without the data folder; tests/test_cuda_ready.py runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
log = logging.getLogger("gpu_check")

PRUNERS = ("magnitude", "wanda", "sparsegpt", "ria", "alps")
STEPS = {"dsnot": {"method": "wanda", "refine": "dsnot"}, "owl": {"method": "wanda", "allocation": "owl"},
         "admm": {"method": "sparsegpt", "reconstruct": "admm"}, "eora": {"method": "sparsegpt", "compensate": "eora"}}
WIDE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
            num_hidden_layers=2, vocab_size=32000, max_position_embeddings=2048)  # Llama-3.2-1B widths
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=272, max_position_embeddings=256)
TEXT = " ".join(f"Line {i}: the {w} fox jumps over the lazy dog by river {i % 5}." for i, w in
                enumerate(["quick", "brown", "red", "sly"] * 40))
LAUNCHER = "import sys\nfrom llmprune.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@dataclass
class Setup:
    """What every check shares: the device, the sizes (full or smoke), the data and a scratch folder."""

    device: torch.device
    smoke: bool
    data_dir: str
    work: Path
    _source: Path | None = field(default=None, repr=False)

    @property
    def calib(self) -> dict:
        if self.smoke:
            return {"calib": str(self.text_file), "nsamples": 4, "seqlen": 32}
        return {"calib": "c4", "nsamples": 16, "seqlen": 512, "data_dir": self.data_dir}

    @property
    def text_file(self) -> Path:
        path = self.work / "text.txt"
        if not path.exists():
            path.write_text(TEXT)
        return path

    @property
    def held_out(self) -> str:
        return str(self.text_file) if self.smoke else "wikitext2"

    def eval_settings(self) -> dict:
        if self.smoke:
            return {"ppl": [str(self.text_file)], "seqlen": 32, "max_windows": 2}
        return {"ppl": ["wikitext2"], "seqlen": 2048, "max_windows": 4, "data_dir": self.data_dir}

    def model(self):
        """The embedded model (or, smoke, a tiny Llama) in float32 with its tokenizer, on the CPU."""
        if self.smoke:
            from compare_trees import byte_tokenizer
            from transformers import AutoModelForCausalLM, LlamaConfig

            torch.manual_seed(0)
            cfg = LlamaConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, **TINY)
            return AutoModelForCausalLM.from_config(cfg), byte_tokenizer()
        from llmprune import load_model

        model, tok, _ = load_model(None, dtype="float32")
        return model, tok

    def source(self) -> Path:
        """The model saved as a checkpoint folder (for the streamed and the CLI runs), once."""
        if self._source is None:
            model, tok = self.model()
            self._source = self.work / "source"
            model.save_pretrained(self._source)
            tok.save_pretrained(self._source)
        return self._source


def _sparsity_note(report) -> str:
    return f"weight sparsity {report.sparsity:.4f}"


def check_method(s: Setup, **settings) -> str:
    import llmprune

    model, tok = s.model()
    report = llmprune.prune(model, tok, sparsity=0.5, device=str(s.device), progress=False, **s.calib, **settings)
    note = _sparsity_note(report)
    if report.adapters:
        note += f", {len(report.adapters)} low-rank adapters"
    return note


def check_wide(s: Setup) -> str:
    import llmprune
    from transformers import AutoModelForCausalLM, LlamaConfig

    sizes = dict(WIDE)
    if s.smoke:
        sizes.update(hidden_size=128, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                     vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**sizes))
    n, L = (4, 32) if s.smoke else (16, 512)
    ids = torch.randint(3, sizes["vocab_size"], (n, L), generator=torch.Generator().manual_seed(0))  # [n, L]
    report = llmprune.prune(model, None, method="sparsegpt", pattern="2:4", calibration=ids, nsamples=n, seqlen=L,
                            device=str(s.device), progress=False)
    return f"hidden {sizes['hidden_size']}, intermediate {sizes['intermediate_size']}: {_sparsity_note(report)}"


def check_streaming(s: Setup) -> str:
    from llmprune.config import PruneConfig
    from llmprune.pipeline import prune_checkpoint

    config = PruneConfig.build({"model": str(s.source()), "method": "sparsegpt", "sparsity": 0.5, "low_memory": True,
                                "device": str(s.device), **s.calib})
    report = prune_checkpoint(config, s.work / "streamed", overwrite=True, progress=False)
    return f"streamed: {_sparsity_note(report)}"


def check_activation(s: Setup) -> str:
    import llmprune

    model, tok = s.model()
    report = llmprune.prune(model, tok, method="none", activation="teal", activation_sparsity=0.5,
                            activation_holdout=s.held_out, activation_holdout_windows=2, device=str(s.device),
                            progress=False, **s.calib)
    measured = (report.activation.holdout or {}).get("weighted")
    model.to(s.device)
    prompt = tok("The quick brown fox", return_tensors="pt").input_ids.to(s.device)  # [1, p]
    new = 8 if s.smoke else 32
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    tps = new / (time.perf_counter() - t)
    return (f"held-out activation sparsity {measured:.4f}; decode {out.shape[1] - prompt.shape[1]} tokens "
            f"at {tps:.1f} tokens/s")


def check_evaluation(s: Setup) -> str:
    from llmprune.config import PruneConfig
    from llmprune.pipeline import prune_checkpoint

    config = PruneConfig.build({"model": str(s.source()), "method": "wanda", "sparsity": 0.5,
                                "device": str(s.device), "eval": s.eval_settings(), **s.calib})
    report = prune_checkpoint(config, s.work / "evaluated", overwrite=True, progress=False)
    ppl = {k: round(v, 4) for k, v in report.evaluation.metrics.items() if k.endswith("/ppl")}
    return f"prune --eval: {ppl}, evaluation {report.seconds.get('eval', 0):.1f} s"


def check_torchrun(s: Setup) -> str:
    launcher = s.work / "launch_llmprune.py"
    launcher.write_text(LAUNCHER)
    out = s.work / "torchrun-out"
    calib = s.calib
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(launcher),
           "prune", str(s.source()), "--method", "wanda", "--sparsity", "0.5", "--calib", calib["calib"],
           "--nsamples", str(calib["nsamples"]), "--seqlen", str(calib["seqlen"]), "--device", str(s.device),
           "--output", str(out), "--overwrite", "-q"]
    if "data_dir" in calib:
        cmd += ["--data-dir", calib["data_dir"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun exited {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    return f"torchrun --nproc-per-node 1: exit 0, method {meta.get('method')} (peak memory: its own process)"


def checks() -> list[tuple[str, Callable[[Setup], str]]]:
    out = [(f"pruner {m}", lambda s, m=m: check_method(s, method=m)) for m in PRUNERS]
    out += [(f"step {name}", lambda s, kw=kw: check_method(s, **kw)) for name, kw in STEPS.items()]
    out += [("wide model (SparseGPT 2:4)", check_wide), ("streaming (low_memory)", check_streaming),
            ("activation sparsity + decode", check_activation), ("prune --eval", check_evaluation),
            ("torchrun, 1 process", check_torchrun)]
    return out


def run_checks(s: Setup, only: list[str] | None = None, skip: list[str] | None = None) -> list[dict]:
    rows = []
    for name, fn in checks():
        if (only and not any(o in name for o in only)) or (skip and any(k in name for k in skip)):
            continue
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(s.device)
        t0 = time.perf_counter()
        try:
            status, note = "ok", fn(s)
        except Exception as e:  # a failing check is recorded, and the others still run
            log.error("%s failed:\n%s", name, traceback.format_exc())
            status, note = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None
        rows.append({"check": name, "status": status, "seconds": round(seconds, 2),
                     "peak_gpu_gib": None if peak is None else round(peak, 3), "notes": note})
        log.info("%s: %s (%.1f s) %s", name, status, seconds, note)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# CUDA path check", "", f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- device: {meta['device_name']}; torch {meta['torch']}, CUDA {meta['cuda']}",
             f"- mode: {'smoke (tiny models, CPU-sized)' if meta['smoke'] else 'full (embedded model, C4 16 x 512)'}",
             "", "| check | status | seconds | peak GPU memory (GiB) | notes |", "|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']:.1f} | {peak} | {r['notes']} |")
    ok = sum(r["status"] == "ok" for r in rows)
    lines += ["", f"{ok} of {len(rows)} checks passed in {sum(r['seconds'] for r in rows):.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --smoke")
    ap.add_argument("--smoke", action="store_true", help="tiny models, a byte tokenizer and a short text: seconds")
    ap.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_check"), help="results path without suffix")
    ap.add_argument("--only", nargs="*", help="run only the checks whose name contains one of these")
    ap.add_argument("--skip", nargs="*", help="leave out the checks whose name contains one of these")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: error: --device {args.device} but CUDA is not available here (torch {torch.__version__}); "
              "run it on a machine with a GPU, or `--device cpu --smoke` for the same checks on tiny models",
              file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.smoke:
        print("gpu_check: error: --device cpu runs the checks only with --smoke (tiny models); the full-size "
              "checks are for a GPU", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"gpu_check: error: device {args.device!r}; choose cuda, cuda:N or cpu (with --smoke)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))  # compare_trees.byte_tokenizer for --smoke
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        rows = run_checks(Setup(device, args.smoke, args.data_dir, Path(work)), args.only, args.skip)
    meta = {"command": "python eval/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "cuda": torch.version.cuda, "smoke": args.smoke, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "checks": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
