"""Saving a pruned checkpoint (round trip, metadata, atomic replace) and the CLI end to end on a
tiny Llama saved with an offline byte-level tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, make_tiny_model
from torch import nn

import llmprune
from llmprune.cli.parser import build_parser
from llmprune.cli import main
from llmprune.config import PruneConfig
from llmprune.checkpoint.folder import REPORT_FILE, OutputExistsError
from llmprune.checkpoint.save import save_pruned

REPO = Path(__file__).resolve().parents[1]
TEXT = " ".join(
    f"Sentence {i} tells of the {w} fox that jumps over the lazy dog near river {i % 7}."
    for i, w in enumerate(["quick", "brown", "red", "sly", "small", "old"] * 8)
)




@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir


@pytest.fixture
def calib_txt(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def _decoder_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


def _zeros(W: torch.Tensor) -> float:
    return float((W == 0).float().mean())


# ----------------------------------------------------------------------------------------------
# save_pruned
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def pruned(calib_ids):
    model = make_tiny_model("llama")
    report = llmprune.prune(model, None, calibration=calib_ids, method="wanda", nsamples=6, seqlen=16,
                            device="cpu", progress=False)
    return model, report


def test_save_reload_same_logits(pruned, calib_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model, report = pruned
    out = tmp_path / "parent" / "out"  # the parent is created too
    assert save_pruned(model, None, out, report) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary folder left beside it

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(calib_ids).logits, model(calib_ids).logits, atol=1e-6, rtol=0)
    for name, W in _decoder_linears(reloaded).items():
        assert _zeros(W) == 0.5, name  # exact zeros survive the round trip

    meta = json.loads((out / "config.json").read_text())["llmprune"]
    assert meta["method"] == "wanda" and meta["pattern"] == "unstructured"
    assert meta["target_sparsity"] == 0.5
    assert meta["measured_sparsity"] == pytest.approx(0.5)
    assert set(meta["module_sparsity"]) == {m.name for m in report.modules}
    assert set(meta["module_sparsity"].values()) == {0.5}
    assert meta["calibration"]["nsamples"] == 6 and meta["calibration"]["seqlen"] == 16
    assert {"torch", "transformers", "python"} <= set(meta["versions"])

    rep = json.loads((out / REPORT_FILE).read_text())
    assert rep["measured_sparsity"] == pytest.approx(0.5)
    assert rep["pruned_params"] == report.pruned_params
    assert sum(len(layer["modules"]) for layer in rep["layers"]) == len(report.modules)


def test_save_writes_the_tokenizer(pruned, tmp_path):
    from transformers import AutoTokenizer

    model, report = pruned
    out = save_pruned(model, byte_tokenizer(), tmp_path / "out", report)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("abc", add_special_tokens=False)["input_ids"] == byte_tokenizer()("abc", add_special_tokens=False)["input_ids"]


def test_existing_output_needs_overwrite(pruned, tmp_path):
    model, report = pruned
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match=r"not empty; pass --overwrite"):
        save_pruned(model, None, out, report)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    save_pruned(model, None, out, report, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file() and (out / REPORT_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither .tmp- nor .old- left


def test_empty_existing_output_is_fine_and_file_is_not(pruned, tmp_path):
    model, report = pruned
    (tmp_path / "empty").mkdir()
    save_pruned(model, None, tmp_path / "empty", report)
    assert (tmp_path / "empty" / "config.json").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        save_pruned(model, None, tmp_path / "afile", report, overwrite=True)
    assert (tmp_path / "afile").read_text() == "x"


def test_failed_save_leaves_nothing(pruned, tmp_path, monkeypatch):
    model, report = pruned

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, None, tmp_path / "out", report)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_prunes_end_to_end(model_dir, calib_txt, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    rc = main(["prune", str(model_dir), "--method", "wanda", "--calib", str(calib_txt), "--nsamples", "4",
               "--seqlen", "16", "--output", str(out), "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "measured sparsity 0.5000" in stdout and f"saved to {out}" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "pruned"]  # no temporary folders left

    model = AutoModelForCausalLM.from_pretrained(out)
    linears = _decoder_linears(model)
    assert len(linears) == 2 * 7
    for name, W in linears.items():
        assert _zeros(W) == 0.5, name
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    assert meta["method"] == "wanda" and meta["pattern"] == "unstructured"
    assert meta["calibration"]["nsamples"] == 4 and meta["calibration"]["seqlen"] == 16
    assert "calib.txt" in meta["calibration"]["source"]
    rep = json.loads((out / REPORT_FILE).read_text())
    assert {"load", "calibration", "prune", "save", "total"} <= set(rep["seconds"])
    assert (out / "tokenizer.json").is_file()


def test_cli_recipe_with_overrides(model_dir, calib_txt, tmp_path):
    out = tmp_path / "pruned"
    rc = main(["prune", str(model_dir), "--recipe", str(REPO / "recipes" / "wanda-2of4.yaml"), "--nsamples", "4",
               "--seqlen", "16", "--calib", str(calib_txt), "--output", str(out), "--quiet"])
    assert rc == 0
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    assert meta["method"] == "wanda" and meta["pattern"] == "2:4"
    assert meta["config"]["nsamples"] == 4 and meta["config"]["seqlen"] == 16  # flags beat the recipe
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    W = weights["model.layers.0.mlp.down_proj.weight"]  # [64, 128]
    assert torch.all((W != 0).reshape(64, 32, 4).sum(-1) == 2)


def test_cli_help_lists_every_flag():
    res = subprocess.run([sys.executable, "-m", "llmprune.cli", "prune", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    flags = {"--recipe", "--output", "--overwrite", "--quiet"}
    flags |= {"--" + name.replace("_", "-") for name in PruneConfig.model_fields if name != "model"}
    for flag in sorted(flags):
        assert flag in res.stdout, flag
    assert "llmprune prune" in res.stdout  # the examples


@pytest.mark.parametrize("command", ["prune", "eval", "recover"])
def test_every_help_formats(command, capsys):
    # argparse formats help strings with %: a description's "0.5 % of" must come out escaped
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0
    if command == "prune":
        assert "0.004 % of" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "sparsity = 1.5"),
        (["--pattern", "2-4"], "pattern = '2-4'"),
        (["--sparsity", "0.7", "--pattern", "2:4"], "contradicts pattern 2:4"),
        (["--targets", "mlp.(gate"], "not a valid regular expression"),
    ],
)
def test_cli_bad_config_exits_2_before_writing(args, message, model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(model_dir), *args, "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmprune: error:") and message in err
    assert not out.exists()


def test_cli_unknown_method_exits_2_naming_the_choices(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(model_dir), "--method", "wandaa", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'wandaa'; choose one of: alps, magnitude, ria, sparsegpt, wanda" in err
    assert not out.exists()


def test_cli_existing_output_exits_2_and_keeps_it(model_dir, calib_txt, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    rc = main(["prune", str(model_dir), "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "16",
               "--output", str(out), "--quiet"])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_missing_model_folder_exits_2(tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(["prune", str(tmp_path / "no-such-model"), "--output", str(out), "--quiet"])
    assert rc == 2
    assert str(tmp_path / "no-such-model") in capsys.readouterr().err
    assert not out.exists()


def test_cli_output_with_tilde(model_dir, calib_txt, tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    rc = main(["prune", str(model_dir), "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "16",
               "--output", "~/pruned", "--quiet"])
    assert rc == 0
    rep = json.loads((home / "pruned" / REPORT_FILE).read_text())
    assert "total" in rep["seconds"]
    assert list(cwd.iterdir()) == []
