"""Resume: a run killed (SIGKILL) after a layer continues from its saved progress and writes the checkpoint
of an uninterrupted run, bit for bit; progress of another config or model is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_stream import _save_tiny, _tensors

from llmprune import PruneConfig, prune_checkpoint
from llmprune.engine.residency.resume import (PROGRESS_FILE, ResumeError, describe_partial, leftovers,
                                              partial_folder)

KILLER = """
import os, signal, sys
import llmprune.engine.residency.resume as resume
from llmprune import PruneConfig, prune_checkpoint

kill_after = int(sys.argv[3])
done = resume.Progress.layer_done

def layer_done(self, run, plan, i, *args):
    done(self, run, plan, i, *args)
    if i == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

resume.Progress.layer_done = layer_done
import json
cfg = PruneConfig.build(json.loads(sys.argv[1]))
prune_checkpoint(cfg, sys.argv[2], progress=False)
"""


def _settings(src: Path, **kw) -> dict:
    return {**dict(model=str(src), method="sparsegpt", sparsity=0.5, calib=str(src / "calib.txt"), nsamples=4,
                   seqlen=16, device="cpu"), **kw}


def _config(src: Path, **kw) -> PruneConfig:
    return PruneConfig.build(_settings(src, **kw))


def _kill_after(src: Path, out: Path, layer: int, **kw) -> None:
    """A subprocess pruning into ``out`` that SIGKILLs itself once layer ``layer``'s progress is saved."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    settings = json.dumps(_settings(src, **kw))
    proc = subprocess.run([sys.executable, "-c", KILLER, settings, str(out), str(layer)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.fixture
def src(tmp_path) -> Path:
    path = _save_tiny("llama", tmp_path / "src", num_hidden_layers=4)
    (path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@pytest.mark.parametrize("killed, resumed", [(False, False), (True, True), (True, False)],
                         ids=["in-memory", "streamed", "streamed-then-in-memory"])
def test_killed_run_resumes_to_the_uninterrupted_checkpoint(src, tmp_path, killed, resumed):
    kw = dict(allocation="owl", owl_lambda=0.1)  # an observe pass too, re-run on resume
    ref = prune_checkpoint(_config(src, low_memory=False, **kw), tmp_path / "ref", progress=False)
    out = tmp_path / "out"
    _kill_after(src, out, 1, low_memory=killed, **kw)
    assert not out.exists()  # a dead run never leaves a folder that looks complete
    partial = partial_folder(out)
    assert json.loads((partial / PROGRESS_FILE).read_text())["layers_done"] == 2
    assert not (partial / "config.json").exists()
    with pytest.raises(ResumeError, match="--resume"):  # never discarded silently
        prune_checkpoint(_config(src, low_memory=resumed, **kw), out, progress=False)
    rep = prune_checkpoint(_config(src, low_memory=resumed, **kw), out, progress=False, resume=True)
    a, b = _tensors(tmp_path / "ref"), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [m.mask_sha256 for r in rep.layers for m in r.modules] == \
        [m.mask_sha256 for r in ref.layers for m in r.modules]
    la = json.loads((tmp_path / "ref" / "config.json").read_text())["llmprune"]
    lb = json.loads((out / "config.json").read_text())["llmprune"]
    assert la["masks_sha256"] == lb["masks_sha256"] if "masks_sha256" in la else True
    assert not partial.exists()


def test_resume_refuses_another_config_or_model(src, tmp_path):
    out = tmp_path / "out"
    _kill_after(src, out, 0)
    with pytest.raises(ResumeError, match="the config differs") as e:
        prune_checkpoint(_config(src, sparsity=0.6, seed=3), out, progress=False, resume=True)
    assert "seed 0 then, 3 now" in str(e.value) and "sparsity 0.5 then, 0.6 now" in str(e.value)  # named
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)
    model.save_pretrained(src)
    with pytest.raises(ResumeError, match="the model differs"):
        prune_checkpoint(_config(src), out, progress=False, resume=True)
    assert partial_folder(out).exists()  # still there for a resume with the right settings
    described = describe_partial(out)
    assert "1 pruned layer(s)" in described and "--resume" in described and "--overwrite" in described
    killed = [tmp_path / ".out.offload-abc123", tmp_path / ".out.tmp-def456"]  # what a SIGKILL leaves
    for folder in killed:
        folder.mkdir()
        (folder / "layer.bin").write_bytes(b"x" * 1000)
    assert set(killed) <= set(leftovers(out))  # beside the offload folder the SIGKILLed run itself left
    prune_checkpoint(_config(src), out, progress=False, overwrite=True)  # --overwrite starts again
    assert out.is_dir() and not partial_folder(out).exists()
    assert leftovers(out) == [] and describe_partial(out) is None  # every leftover removed


def test_resume_without_progress_starts_from_the_first_layer(src, tmp_path):
    rep = prune_checkpoint(_config(src), tmp_path / "out", progress=False, resume=True)
    assert len(rep.layers) == 4 and not partial_folder(tmp_path / "out").exists()


TERMINATOR = """
import os, signal, sys
import llmprune.engine.residency.resume as resume
from llmprune.cli import main

done = resume.Progress.layer_done

def layer_done(self, run, plan, i, *args):
    done(self, run, plan, i, *args)
    if i == 0:
        os.kill(os.getpid(), signal.{sig})  # a scheduler's SIGTERM, or Ctrl-C, after the first layer

resume.Progress.layer_done = layer_done
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_leaves_only_the_progress_and_says_so(src, tmp_path, sig, code, word):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["prune", str(src), "--method", "sparsegpt", "--calib", str(src / "calib.txt"), "--nsamples", "4",
            "--seqlen", "16", "--device", "cpu", "--output", str(out), "-q"]
    proc = subprocess.run([sys.executable, "-c", TERMINATOR.replace("{sig}", sig), *args], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == code, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"llmprune: {word}; the progress of 1 pruned layer(s) is kept in") and "MB" in line
    assert "--resume" in line and "--overwrite" in line and "Traceback" not in proc.stderr
    assert leftovers(out) == [] and not out.exists()  # the offload folder removed on the way out
    assert subprocess.run([sys.executable, "-m", "llmprune.cli", *args, "--resume"], env=env, capture_output=True,
                          text=True, timeout=180).returncode == 0
    assert out.is_dir() and not partial_folder(out).exists()


def test_a_full_disk_while_saving_keeps_the_progress_and_says_so(src, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of writing the checkpoint: one line, no half-written output, and --resume after
    freeing space restores every layer and only saves."""
    import errno

    import transformers.modeling_utils as modeling

    from llmprune.cli import main

    real = modeling.safe_save_file

    def full(tensors, filename, *a, **kw):  # save_pretrained writing the output's weights: the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(modeling, "safe_save_file", full)
    out = tmp_path / "out"
    args = ["prune", str(src), "--method", "sparsegpt", "--calib", str(src / "calib.txt"), "--nsamples", "4",
            "--seqlen", "16", "--device", "cpu", "--output", str(out), "-q"]
    assert main(args) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("llmprune: error: no space left on the device") and "--resume" in line
    assert not out.exists() and leftovers(out) == []  # nothing half-written, no scratch folder
    monkeypatch.setattr(modeling, "safe_save_file", real)
    assert main([*args, "--resume"]) == 0 and out.is_dir() and not partial_folder(out).exists()
