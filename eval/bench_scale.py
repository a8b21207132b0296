"""Benchmark: every method's cost per decoder layer at Llama-3-8B and Llama-3-70B widths (issue 30, item 1).

What is measured. One Llama decoder layer built from a config at the widths users prune (8b: hidden 4096,
MLP 14336, 32 heads / 8 KV heads; 70b: 8192, 28672, 64 / 8; head_dim 128, RMSNorm, RoPE θ 500000,
SiLU-gated MLP), with the embedded SmolLM2-135M-Instruct's tokenizer (vocabulary 49,152), saved as a
safetensors checkpoint folder under ``--work``. Each method then prunes that folder exactly as a user
would: one ``llmprune prune FOLDER ...`` process per method (float32, CPU, calibration from the local C4
slice, seed 0), so the peak memory is the method's own. Per method: the wall time of the whole process,
the layer's time (the report's stage seconds: observe + prune + activation calibration + depth choice,
per decoder layer), and the process's peak resident memory (its VmHWM at exit; polled from /proc while
it runs, so a run stopped at ``--timeout`` still has its peak so far). Then the projection to the whole
model: the report's calibration seconds + layers (32 at 8B, 80 at 70B) x the layer's time. The
calibration forward of a real model is inside that product: the sequential engine runs each layer's
forward on the calibration tokens as it prunes it; the embedding lookup is negligible. Loading and
saving a real checkpoint (16/140 GB in 16 bits) are not in the projection.

The weights. The config's initialisation (normal, std 0.02, RMSNorm weights 1) is an i.i.d. matrix
with no scale of its own, so each projection's rows are rescaled to realistic norms: the per-row L2
norms of the same projection in the embedded model's middle decoder layer (layer 15), resampled by
quantile to the new number of rows (a seeded shuffle places them). With inputs whose per-channel RMS
profile is also the embedded model's (below), each projection's outputs then have the embedded model's
per-element magnitudes, which keeps the attention logits and the SiLU gate in a trained model's regime
instead of the near-linear regime of a 0.02 initialisation. A per-matrix std read from real Llama-3
checkpoints would need those checkpoints, which this machine cannot reach; for the costs measured
here the weights' scale matters only to the iterative methods (ALPS, ADMM, DSnoT, OBS search) through
the mask's convergence, while the inputs' statistics set the Hessians' conditioning.

The calibration inputs. A single layer has no trained embeddings and no preceding layers, and the
pipeline's calibration is token ids, so realistic layer inputs come from the embedding table: row v is
the embedded model's own embedding of token v, lifted to the width by a fixed random isometry
(576 -> H, orthonormal columns), mixed half and half (in energy) with a heavy-tailed residual (Student-t,
ν = 4) that fills the other H - 576 directions, and multiplied channel by channel by the per-channel
RMS profile of the inputs of the embedded model's middle-layer attention projections on C4 (resampled
by quantile to H channels: a few outlier channels tens of times the median, as in trained LLMs). The
normal C4 calibration then yields real token sequences (real token frequencies and repetitions) whose
layer inputs have the outlier channels and heavy tails the methods are sensitive to; the MLP's inputs
(after attention mixes the context) and down_proj's (after the gated activation) follow from the layer
itself. Why this rather than lifted hidden states of the embedded model: those cannot enter through the
normal pipeline (it calibrates on token ids) without a per-token average, which loses their context
too, and the point is to prune the folder exactly as a user would. Limit, stated in the table: the
attention projections' inputs take at most one value per distinct token (C4: about 4,300 distinct
tokens in 16 x 1024, about 6,800 in 32 x 1024), so their Hessian has at most that rank (full at 8B's
4096, not at 70B's 8192; the damping makes it invertible as for any rank-deficient Hessian); the MLP's
inputs depend on the context and are full rank with enough tokens. 16 x 1024 tokens at 8B and
32 x 1024 at 70B exceed down_proj's input width (14336, 28672).

    python eval/bench_scale.py --data-dir ../shared/data --width 8b [--methods sparsegpt ria-2:4 ...] \\
        [--timeout 1800] [--work /tmp/llmprune-bench-scale]
    python eval/bench_scale.py --data-dir ../shared/data --width 70b --nsamples 32 --timeout 3600
    python eval/bench_scale.py --data-dir ../shared/data --smoke        # tiny widths, a few seconds a method

Memory: SparseGPT 2:4 at 8B peaked at 8.7 GB (issue 30); at 70B the layer (3.4 GB), its embeddings and head
(3.2 GB), the MLP's Hessians (28672² floats: 3.3 GB each) and the chunks' activations held in lockstep may
not fit a 24 GB machine: ``--extra --low-memory`` streams the layer and replays the chunks (recorded in the
rows and compared only with rows of the same flags).

Finished rows of the results JSON are reused (same width, method, nsamples, seqlen and extra flags), so
the table can be filled in pieces; ``--rerun`` measures them again. A row that timed out is measured
again when ``--timeout`` is larger than the one it ran under. Writes eval/results/scale.md and
eval/results/scale.json (both widths in one table each); ``--smoke`` writes to the work folder
(``scale-smoke.md/json``) unless ``--out`` says otherwise, never over the real tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_prune import machine  # noqa: E402
from bench_sparsity import HWM_WRAPPER  # noqa: E402  (the CLI, then its VmHWM to $LLMPRUNE_BENCH_HWM)

# name: hidden, intermediate, heads, kv heads, head_dim, decoder layers of the real model, nsamples, seqlen
WIDTHS = {
    "8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "layers": 32,
           "nsamples": 16, "seqlen": 1024, "real": "Llama-3-8B"},
    "70b": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "head_dim": 128, "layers": 80,
            "nsamples": 32, "seqlen": 1024, "real": "Llama-3-70B"},
    "smoke": {"hidden": 256, "intermediate": 704, "heads": 8, "kv_heads": 2, "head_dim": 32, "layers": 32,
              "nsamples": 4, "seqlen": 128, "real": "tiny widths (a check of the script, not a measurement)"},
}

# name: (the SparseGPT row it is compared with, the CLI flags, decoder layers of the built model).
# Structured removal of whole layers needs a second layer to keep; its time is per layer of that model.
SGPT, SGPT24 = "sparsegpt", "sparsegpt-2:4"
METHODS: dict[str, tuple[str, list[str], int]] = {
    "magnitude": (SGPT, ["--method", "magnitude", "--sparsity", "0.5"], 1),
    "wanda": (SGPT, ["--method", "wanda", "--sparsity", "0.5"], 1),
    "sparsegpt": (SGPT, ["--method", "sparsegpt", "--sparsity", "0.5"], 1),
    "sparsegpt-2:4": (SGPT24, ["--method", "sparsegpt", "--pattern", "2:4"], 1),
    "ria-2:4": (SGPT24, ["--method", "ria", "--pattern", "2:4"], 1),
    "ria-2:4-nopermute": (SGPT24, ["--method", "ria", "--pattern", "2:4", "--no-ria-permute"], 1),
    "alps": (SGPT, ["--method", "alps", "--sparsity", "0.5"], 1),
    "alps-2:4": (SGPT24, ["--method", "alps", "--pattern", "2:4"], 1),
    "wanda+dsnot": (SGPT, ["--method", "wanda", "--sparsity", "0.5", "--refine", "dsnot"], 1),
    "wanda+owl": (SGPT, ["--method", "wanda", "--sparsity", "0.5", "--allocation", "owl"], 1),
    "sparsegpt+admm": (SGPT, ["--method", "sparsegpt", "--sparsity", "0.5", "--reconstruct", "admm"], 1),
    "sparsegpt+admm20": (SGPT, ["--method", "sparsegpt", "--sparsity", "0.5", "--reconstruct", "admm",
                                "--admm-iters", "20"], 1),
    "sparsegpt+eora64": (SGPT, ["--method", "sparsegpt", "--sparsity", "0.5", "--compensate", "eora",
                                "--rank", "64"], 1),
    "teal": (SGPT, ["--activation", "teal", "--activation-sparsity", "0.5"], 1),
    "channels-search": (SGPT, ["--remove-channels", "0.25", "--structure", "search"], 1),
    "channels-activation": (SGPT, ["--remove-channels", "0.25", "--structure", "activation"], 1),
    "channels-flap": (SGPT, ["--remove-channels", "0.25", "--structure", "flap"], 1),
    "layers": (SGPT, ["--remove-layers", "1"], 2),
}
NOTES = {
    "wanda+dsnot": "DSnoT's default `--dsnot-skip` refines attention only, as the reference",
    "wanda+owl": "the observe pass's time is in the layer's time",
    "sparsegpt+admm20": "`--admm-iters 20` before the conjugate gradients",
    "teal": "activation thresholds only (weights dense); layer time: the calibration pass; the whole run "
            "also measures the held-out sparsity on 4 WikiText-2 windows",
    "layers": "block influence over a 2-layer model, 1 removed; layer time: the choice's pass / 2",
}
OTHERS_MAX = 0.1  # share of the machine's CPU time other processes may take before a row is marked as shared
# Stages of the report's ``seconds`` that scale with the number of decoder layers.
LAYER_STAGES = ("observe", "prune", "depth", "experts")

PUBLISHED = [
    "SparseGPT (Frantar & Alistarh 2023): OPT-175B (96 layers, hidden 12288) pruned in about 4 h on one "
    "A100 80 GB, about 150 s per layer.",
    "Wanda (Sun et al. 2023): LLaMA-7B's pruning metric in seconds on a GPU (the whole model, forward "
    "passes aside).",
]


# ---------------------------------------------------------------------------------------------- the model


def _quantile_resample(values, n: int, gen):
    """``n`` values with the distribution of ``values`` (their quantiles, linearly interpolated), shuffled."""
    import numpy as np
    import torch

    src = np.sort(values.double().numpy())
    out = np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, len(src)), src)  # [n]
    perm = torch.randperm(n, generator=gen)
    return torch.from_numpy(out).float()[perm]


def embedded_statistics(data_dir: str, middle: int = 15, windows: int = 4, seqlen: int = 512) -> dict:
    """The embedded model's middle layer: row norms of each projection, the per-channel RMS of its attention
    projections' inputs on C4, and its embedding table."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.loading.models import embedded_model_path

    src = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    docs = [json.loads(line)["text"] for line in
            (Path(data_dir) / "c4" / "c4_validation_2k.jsonl").read_text().splitlines()[:64]]
    ids = tok("\n\n".join(docs), return_tensors="pt").input_ids[:, : windows * seqlen].view(windows, seqlen)
    seen = {}
    attn = model.model.layers[middle].self_attn
    hook = attn.q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    hook.remove()
    X = seen["x"]  # [windows * seqlen, 576]
    profile = X.pow(2).mean(0).sqrt()  # [576]
    norms = {}
    with safe_open(src / "model.safetensors", "pt") as f:
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            norms[name] = f.get_tensor(f"model.layers.{middle}.{name}.weight").norm(dim=1)  # [out]
    embed = model.model.embed_tokens.weight.detach().clone()  # [V, 576]
    return {"profile": profile, "row_norms": norms, "embed": embed, "tokenizer": tok, "middle": middle,
            "tokens": windows * seqlen}


def build(folder: Path, width: str, layers: int, data_dir: str, seed: int = 0) -> dict:
    """Write a ``layers``-layer Llama at ``width`` with realistic weight norms and embedding statistics."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    w = WIDTHS[width]
    st = embedded_statistics(data_dir, **({"windows": 1, "seqlen": 256} if width == "smoke" else {}))
    tok = st["tokenizer"]
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=w["hidden"], intermediate_size=w["intermediate"],
        num_hidden_layers=layers, num_attention_heads=w["heads"], num_key_value_heads=w["kv_heads"],
        head_dim=w["head_dim"], hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()  # the config's initialisation: normal(0, 0.02), norms 1
    H = w["hidden"]
    with torch.no_grad():
        for layer in model.model.layers:
            for name, small in st["row_norms"].items():
                W = layer.get_submodule(name).weight  # [out, in]
                target = _quantile_resample(small, W.shape[0], gen)  # [out]
                W.mul_((target / W.norm(dim=1)).unsqueeze(1))
        E_small = st["embed"]  # [V, 576]
        d = E_small.shape[1]
        Q = torch.linalg.qr(torch.randn(max(H, d), min(H, d), generator=gen)).Q  # orthonormal columns
        lift = Q.T if H >= d else Q  # [576, H]: an isometry into the wider space (a projection below 576)
        profile = _quantile_resample(st["profile"], H, gen)  # [H]
        profile /= profile.pow(2).mean().sqrt()  # mean square 1: the layer norm fixes the scale anyway
        t = torch.distributions.StudentT(torch.tensor(4.0))
        E = model.model.embed_tokens.weight  # [V, H]
        for r0 in range(0, E.shape[0], 4096):  # in row blocks: the 70B table is 1.6 GB
            rows = E_small[r0 : r0 + 4096] @ lift  # [b, H], the real embedding in a random H-dim frame
            rows /= rows.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
            noise = t.sample((rows.shape[0], H)) / math.sqrt(2.0)  # [b, H], unit variance (t4: variance 2)
            E[r0 : r0 + rows.shape[0]] = (math.sqrt(0.5) * rows + math.sqrt(0.5) * noise) * profile
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    srt = st["profile"].sort().values
    recipe = {"width": width, "layers": layers, "seed": seed, **{k: w[k] for k in
              ("hidden", "intermediate", "heads", "kv_heads", "head_dim")},
              "embedded_middle_layer": st["middle"], "profile_tokens": st["tokens"],
              "profile_max_over_median": round(float(srt[-1] / srt[len(srt) // 2]), 2),
              "layer_weights_gb": round(sum(p.numel() for p in model.model.layers.parameters()) * 4 / 1e9, 3),
              "embeddings_and_head_gb": round((model.model.embed_tokens.weight.numel()
                                               + model.lm_head.weight.numel()) * 4 / 1e9, 3)}
    (folder / "bench_scale.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def ensure_model(work: Path, width: str, layers: int, data_dir: str) -> tuple[Path, dict]:
    """The built checkpoint folder (built once in its own process, so the parent stays small)."""
    folder = work / f"model-{width}-{layers}L"
    stamp = folder / "bench_scale.json"
    if not stamp.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building {folder} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--_build", str(folder), "--width", width, "--_layers",
                        str(layers), "--data-dir", data_dir], check=True)
        print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder, json.loads(stamp.read_text())


# ---------------------------------------------------------------------------------------------- a run


def _hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks (/proc/stat)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]) - idle, sum(vals[:8])


def run_one(cmd: list[str], hwm_file: Path, timeout: float) -> dict:
    """Run ``llmprune`` with ``cmd``'s arguments: wall seconds, peak RSS (GB), its CPU seconds, the share of the
    machine's CPU time other processes took meanwhile, exit code, whether it timed out."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LLMPRUNE_BENCH_HWM": str(hwm_file)}
    hwm_file.unlink(missing_ok=True)
    log = hwm_file.with_suffix(".log")
    tick = os.sysconf("SC_CLK_TCK")
    busy0, total0 = _busy_jiffies()
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", HWM_WRAPPER, *cmd], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        peak_kb, timed_out = 0, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_kb = max(peak_kb, _hwm_kb(proc.pid) or 0)
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    busy1, total1 = _busy_jiffies()
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, (busy1 - busy0) / tick - cpu) / max((total1 - total0) / tick, 1e-9)
    if hwm_file.is_file():
        peak_kb = max(peak_kb, int(hwm_file.read_text()))
    peak_kb = max(peak_kb, usage.ru_maxrss)
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(peak_kb / 2**20, 3), "cpu_s": round(cpu, 1),
            "others_cpu_share": round(others, 3), "rc": proc.returncode, "timed_out": timed_out,
            "tail": log.read_text()[-3000:]}


def layer_seconds(report: dict, n_layers: int) -> float:
    """The report's seconds that scale with the decoder layers, per layer of the built model."""
    secs = report.get("seconds") or {}
    total = sum(secs.get(k, 0.0) for k in LAYER_STAGES)
    if report.get("activation"):
        total += report["activation"].get("seconds") or 0.0
    return total / n_layers


def measure(name: str, args: argparse.Namespace, work: Path, timeout: float) -> dict:
    _, flags, layers = METHODS[name]
    folder, recipe = ensure_model(work, args.width, layers, args.data_dir)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["prune", str(folder), *flags, "--calib", "c4", "--data-dir", args.data_dir, "--nsamples",
           str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0", "--dtype", "float32", "--device", "cpu",
           "--output", str(out), "--overwrite", "--quiet", *args.extra]
    meas = run_one(cmd, work / "hwm", timeout)
    row = {"width": args.width, "method": name, "flags": flags, "command": "llmprune " + " ".join(cmd),
           "nsamples": args.nsamples, "seqlen": args.seqlen, "extra": args.extra, "timeout_s": timeout,
           "model_layers": layers, "date": datetime.date.today().isoformat(),
           **{k: v for k, v in meas.items() if k != "tail"}, "model": recipe}
    rep_file = out / "llmprune_report.json"
    if meas["rc"] == 0 and rep_file.is_file():
        rep = json.loads(rep_file.read_text())
        row.update(seconds=rep.get("seconds"), layer_s=round(layer_seconds(rep, layers), 3),
                   engine_layer_s=[round(layer["seconds"], 3) for layer in rep.get("layers", [])],
                   measured_sparsity=rep.get("measured_sparsity"), execution=rep.get("execution"))
    elif not meas["timed_out"]:
        row["error"] = meas["tail"][-1500:]
    shutil.rmtree(out, ignore_errors=True)
    return row


def reusable(row: dict | None, args: argparse.Namespace, timeout: float) -> bool:
    if row is None or args.rerun:
        return False
    if (row.get("nsamples"), row.get("seqlen"), row.get("extra", [])) != (args.nsamples, args.seqlen, args.extra):
        return False
    if row.get("timed_out"):
        return timeout <= row.get("timeout_s", 0)
    return row.get("rc") == 0


# ---------------------------------------------------------------------------------------------- the table


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def markdown(state: dict) -> str:
    lines = [
        "# Cost per decoder layer at Llama-3-8B and Llama-3-70B widths (issue 30)",
        "",
        *[f"- command: `{c}`" for c in state["commands"]],
        f"- machine: {state.get('machine') or machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- versions: {state.get('versions')}",
        "- protocol: one Llama decoder layer built from a config at the width (weights: the config's "
        "initialisation with each projection's row norms resampled from the embedded model's layer 15; "
        "embedding table: the embedded model's embeddings lifted to the width by a fixed isometry plus a "
        "Student-t residual, scaled channel by channel to the RMS profile of the embedded model's "
        "middle-layer attention inputs: see the docstring of eval/bench_scale.py), the embedded model's "
        "tokenizer, saved as safetensors and pruned by `llmprune prune FOLDER` in one process per method, "
        "float32, CPU, C4 calibration, seed 0. Layer (s): the report's observe + prune + activation "
        "calibration + depth seconds per decoder layer. Peak RSS: the process's VmHWM (polled while it "
        "ran). × SparseGPT: against the SparseGPT row of the same pattern in the same table (50 % for "
        "unstructured, structured and activation rows; 2:4 for 2:4 rows). Whole model: the report's "
        "calibration seconds + layers × layer time (loading and saving a real checkpoint not included). "
        f"A row marked ⁽ˡ⁾ ran while other processes took more than {OTHERS_MAX:.0%} of the machine's CPU "
        "time (from /proc/stat less the run's own): its time is not comparable.",
        "- published GPU figures: " + " ".join(PUBLISHED),
        "",
    ]
    for width in ("8b", "70b", "smoke"):
        rows = {r["method"]: r for r in state["rows"].values() if r["width"] == width}
        if not rows:
            continue
        w = WIDTHS[width]
        model = next(iter(rows.values())).get("model", {})
        lines += [
            f"## {w['real']}: hidden {w['hidden']}, MLP {w['intermediate']}, {w['heads']} heads / "
            f"{w['kv_heads']} KV heads, projected to {w['layers']} layers",
            "",
            f"Calibration {rows[next(iter(rows))]['nsamples']} x {rows[next(iter(rows))]['seqlen']} tokens; one "
            f"layer's weights {model.get('layer_weights_gb', '-')} GB, embeddings and head "
            f"{model.get('embeddings_and_head_gb', '-')} GB (float32); input channel profile max/median "
            f"{model.get('profile_max_over_median', '-')}.",
            "",
            "| method | layer (s) | × SparseGPT | whole run (s) | peak RSS (GB) | × SparseGPT | whole model "
            "(projected) | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name in [m for m in METHODS if m in rows]:
            r = rows[name]
            base = rows.get(METHODS[name][0])
            base_ok = base is not None and base.get("rc") == 0 and base.get("layer_s")
            loaded = " ⁽ˡ⁾" if (r.get("others_cpu_share") or 0) > OTHERS_MAX else ""
            notes = [NOTES[name]] if name in NOTES else []
            if r.get("timed_out"):
                layer = f"not finished after {r['timeout_s']:.0f} s"
                ratio = (f"> {r['timeout_s'] / base['wall_s']:.1f} (whole run)" if base_ok else "-")
                proj = "-"
            elif r.get("rc") != 0:
                layer, ratio, proj = "failed", "-", "-"
                notes.append(f"exit {r.get('rc')}: " + (r.get("error") or "").strip().splitlines()[-1][:160]
                             if r.get("error") else f"exit {r.get('rc')}")
            else:
                layer = _fmt(r["layer_s"])
                ratio = f"{r['layer_s'] / base['layer_s']:.2f}" if base_ok else "-"
                proj = _hours((r["seconds"] or {}).get("calibration", 0.0) + w["layers"] * r["layer_s"])
            rss_ratio = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}" if base_ok and r.get("rc") == 0 else "-"
            lines.append(f"| {name}{loaded} | {layer} | {ratio} | {_fmt(r.get('wall_s'))} | "
                         f"{_fmt(r.get('peak_rss_gb'), '.2f')} | {rss_ratio} | {proj} | {'; '.join(notes)} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR"))
    ap.add_argument("--width", choices=list(WIDTHS), default="8b", help="8b, 70b (or smoke: as --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny widths (hidden 256) and 4 x 128 tokens: a check")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of: {', '.join(METHODS)}")
    ap.add_argument("--nsamples", type=int, help="calibration windows (default: 16 at 8b, 32 at 70b)")
    ap.add_argument("--seqlen", type=int, help="tokens per window (default 1024)")
    ap.add_argument("--timeout", type=float, help="seconds per method before it is stopped (default 3600; "
                    "smoke 300)")
    ap.add_argument("--work", default="/tmp/llmprune-bench-scale", help="built models and scratch outputs")
    ap.add_argument("--out", help="results path without suffix (default eval/results/scale; smoke: WORK/scale-smoke)")
    ap.add_argument("--rerun", action="store_true", help="measure the methods again even when the results hold them")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="flags passed to every `llmprune prune` after the others (last on the line), e.g. "
                    "--extra --low-memory")
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    ap.add_argument("--_layers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.data_dir:
        ap.error("--data-dir (or $LLMPRUNE_DATA_DIR) is required: the C4 slice and WikiText-2 are read from it")
    if args._build:
        build(Path(args._build), args.width, args._layers, args.data_dir)
        return 0
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
    if args.smoke:
        args.width = "smoke"
    args.smoke = args.width == "smoke"
    w = WIDTHS[args.width]
    args.nsamples = args.nsamples or w["nsamples"]
    args.seqlen = args.seqlen or w["seqlen"]
    timeout = args.timeout or (300.0 if args.smoke else 3600.0)
    work = Path(args.work) / args.width
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (Path(args.work) / "scale-smoke" if args.smoke else HERE / "results" / "scale")
    state = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    state.setdefault("rows", {})
    state["commands"] = [*state.get("commands", []), "python eval/bench_scale.py " + " ".join(sys.argv[1:])]

    import importlib.metadata as md

    state["machine"] = machine()
    state["versions"] = {p: md.version(p) for p in ("torch", "transformers")}
    # SparseGPT first: every ratio needs it, and its row tells how long the others may take
    order = sorted(args.methods, key=lambda m: (m not in (SGPT, SGPT24), list(METHODS).index(m)))
    for name in order:
        key = f"{args.width}/{name}"
        if reusable(state["rows"].get(key), args, timeout):
            print(f"{name:22s} kept from {state['rows'][key]['date']}", flush=True)
            continue
        row = measure(name, args, work, timeout)
        state["rows"][key] = row
        status = ("timed out" if row["timed_out"] else f"exit {row['rc']}" if row["rc"] else
                  f"layer {row['layer_s']:8.2f}s")
        print(f"{name:22s} {status:18s} wall {row['wall_s']:8.1f}s  peak RSS {row['peak_rss_gb']:6.2f} GB", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(state, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(state) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(state, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(state) + "\n")
    print(markdown(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
