"""The CUDA path's device handling, checked on the CPU (issue 30 item 3): no GPU has been lent to this
project, so each fix is exercised here with the meta device, monkeypatched ``torch.cuda`` answers, or by
asserting where tensors are sent. ``eval/gpu_check.py`` runs the same path on a real GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

import llmprune
import llmprune.activation.result as result_mod
import llmprune.pipeline as pipeline
from llmprune.activation.result import measure_holdout
from llmprune.config import PruneConfig
from llmprune.engine.capture import whole_model_on
from llmprune.engine.passes import SequentialRun
from llmprune.evaluation.results import EvalResults
from llmprune.runtime.precision import full_float32

REPO = Path(__file__).resolve().parents[1]


def _legacy() -> tuple[bool, bool, str]:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.fixture
def tf32_on():
    """The process as a user who turned TF32 on (legacy flags) left it; the test's own state comes back."""
    before = _legacy()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]


# ---- TF32 off for the pruning math -------------------------------------------------------------
def test_full_float32_turns_tf32_off_inside_and_restores_after(tf32_on):
    with full_float32():
        assert _legacy() == (False, False, "highest")
    assert _legacy() == (True, True, "high")
    with pytest.raises(KeyError), full_float32():
        assert _legacy() == (False, False, "highest")
        raise KeyError("a failure inside")
    assert _legacy() == (True, True, "high")


def test_full_float32_with_the_new_precision_api():
    """A process that set TF32 by the new ``fp32_precision`` attributes cannot read the legacy flags (reading
    raises): the block then sets and restores the new attributes. Run apart: the new API changes the
    process for good (its legacy flags stay unreadable)."""
    code = (
        "import torch\nfrom llmprune.runtime.precision import full_float32, _new_api\n"
        "if not _new_api():\n    print('skip'); raise SystemExit\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "state = lambda: [getattr(h, a) for h, a in _new_api()]\nbefore = state()\n"
        "with full_float32():\n    assert set(state()) == {'ieee'}, state()\n"
        "assert state() == before, (state(), before)\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "skip":
        pytest.skip("this PyTorch has no fp32_precision attributes")
    assert out.stdout.strip() == "ok"


def test_the_prune_and_observe_passes_run_without_tf32(tf32_on, calib_ids):
    model = make_tiny_model("llama")
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(_legacy()))
    run = SequentialRun(model, calib_ids, device="cpu", progress=False)
    run.observe(frozenset({"sq"}), lambda i, mods: None)
    llmprune.prune(model, None, method="wanda", sparsity=0.5, calibration=calib_ids, nsamples=calib_ids.shape[0],
                   seqlen=calib_ids.shape[1], device="cpu", progress=False)
    assert seen and set(seen) == {(False, False, "highest")}
    assert _legacy() == (True, True, "high")


# ---- held-out activation sparsity, layer by layer on the run's device ----------------------------
def test_holdout_is_measured_layer_by_layer_on_the_run_device(calib_ids, monkeypatch):
    """Each layer visits ``run.device`` and goes home (a GPU run keeps the model on the CPU), the windows'
    embeddings are captured on it, and the sparsity equals a whole-model forward's exactly."""
    model = make_tiny_model("llama")
    n, L = calib_ids.shape
    report = llmprune.prune(model, None, calibration=calib_ids, nsamples=n, seqlen=L, device="cpu", progress=False,
                            activation="teal", activation_sparsity=0.5, activation_holdout=None)
    handle = report.activation_handle
    held = torch.randint(3, 128, (3, L), generator=torch.Generator().manual_seed(5))  # [3, L]
    with torch.no_grad(), handle.measure(), handle.applied(1.0):
        for row in held:
            model(input_ids=row[None], use_cache=False)
    whole = handle.sparsity()

    run = SequentialRun(model, calib_ids, device="cpu", progress=False)
    captured, moves = [], []
    real_capture = result_mod.capture_layer_inputs
    monkeypatch.setattr(result_mod, "capture_layer_inputs",
                        lambda m, layers, chunks, device: captured.append(device) or real_capture(m, layers, chunks,
                                                                                                   device))
    for i, layer in enumerate(run.layers):
        real_to = layer.to
        monkeypatch.setattr(layer, "to", lambda d, i=i, real_to=real_to: moves.append((i, d)) or real_to(d),
                            raising=False)
    got = measure_holdout(run, handle, held, {"source": "random"})
    assert captured == [run.device]
    assert moves == [(i, d) for i in range(len(run.layers)) for d in (run.device, torch.device("cpu"))]
    assert got["tensors"] == whole["tensors"] and got["weighted"] == whole["weighted"]
    assert got["tokens"] == held.numel() and got["source"] == "random"
    assert all(p.device.type == "cpu" for p in model.parameters())


# ---- evaluation on the pruning device -----------------------------------------------------------
def test_whole_model_on_moves_every_tensor_and_gives_back_the_same_storage():
    model = make_tiny_model("llama")
    params = dict(model.named_parameters())
    bufs = dict(model.named_buffers())
    with whole_model_on(model, torch.device("meta")) as dev:
        assert dev == torch.device("meta")
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert {b.device.type for b in model.buffers()} == {"meta"}
    # the very objects from before, not copies: an offloaded model's mapped pages stay mapped
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is bufs[n] for n, b in model.named_buffers())
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    with whole_model_on(model, torch.device("cpu")) as dev:  # already there: nothing moves
        assert dev == torch.device("cpu")


def test_whole_model_on_a_gpu_too_small_stays_on_the_cpu(monkeypatch, caplog):
    model = make_tiny_model("llama")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (size, 10 * size))  # fits, but not in 80 %
    with caplog.at_level("WARNING"), whole_model_on(model, torch.device("cuda")) as dev:
        assert dev == torch.device("cpu") and next(model.parameters()).device.type == "cpu"
    assert "does not fit" in caplog.text


def test_prune_eval_runs_on_the_pruning_device(tiny_llama_dir, tmp_path, monkeypatch):
    """``prune --eval`` hands the evaluation the model on ``config.device`` (meta standing in for a GPU) and
    saves the pruned weights from their own memory after it."""
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"line {i} of the calibration text." for i in range(200)))
    seen = {}

    def fake_evaluate(model, tokenizer, cfg, **kw):
        seen["device"] = next(model.parameters()).device
        seen["asked"] = asked
        return EvalResults(model=kw.get("model_name") or "m", settings={})

    asked = []
    monkeypatch.setattr(pipeline, "evaluate", fake_evaluate)
    monkeypatch.setattr(pipeline, "resolve_device", lambda d: asked.append(d) or torch.device("meta"))
    config = PruneConfig.build({"model": str(tiny_llama_dir), "method": "magnitude", "sparsity": 0.5,
                                "device": "cpu", "calib": str(calib), "eval": str(calib)})
    out = tmp_path / "out"
    report = pipeline.prune_checkpoint(config, out, progress=False)
    assert seen["device"] == torch.device("meta") and asked == ["cpu"]
    assert report.evaluation is not None
    loaded, _, _ = llmprune.load_model(str(out))
    assert abs(float((loaded.model.layers[0].mlp.down_proj.weight == 0).float().mean()) - 0.5) < 0.01



# ---- eval/gpu_check.py ----------------------------------------------------------------------------
def test_gpu_check_refuses_without_cuda_and_runs_its_smoke_mode_on_the_cpu(tmp_path, monkeypatch, capsys):
    """The script a GPU machine runs: a clear refusal without CUDA, and every check of it on tiny models on
    the CPU (the torchrun check left out here: tests/test_distributed.py launches the CLI under torchrun)."""
    monkeypatch.syspath_prepend(str(REPO / "eval"))
    import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path / "no")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "no")]) == 2
    assert "only with --smoke" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()

    rc = gpu_check.main(["--device", "cpu", "--smoke", "--skip", "torchrun", "--out", str(tmp_path / "smoke")])
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert rc == 0, [r for r in res["checks"] if r["status"] != "ok"]
    names = [r["check"] for r in res["checks"]]
    assert len(names) == len(gpu_check.checks()) - 1
    for word in (*gpu_check.PRUNERS, *gpu_check.STEPS, "wide", "streaming", "decode", "--eval"):
        assert any(word in n for n in names), word
    table = (tmp_path / "smoke.md").read_text()
    assert "| check | status | seconds | peak GPU memory (GiB) | notes |" in table and "| failed |" not in table
