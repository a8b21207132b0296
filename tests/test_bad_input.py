"""Every input a user hands over, made bad: the CLI ends with exit 2, an error naming the value and
the fix, no traceback, and nothing written (issue 10, item 9)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmprune.cli import main

TEXT = "The quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="module")
def inputs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    from conftest import byte_tokenizer
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    bert = root / "bert"
    BertModel(BertConfig(vocab_size=272, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    byte_tokenizer().save_pretrained(bert)
    (root / "noweights").mkdir()
    shutil.copy(tiny_llama_dir / "config.json", root / "noweights" / "config.json")
    (root / "pickled").mkdir()
    shutil.copy(tiny_llama_dir / "config.json", root / "pickled" / "config.json")
    for tok in tiny_llama_dir.glob("tokenizer*"):
        shutil.copy(tok, root / "pickled" / tok.name)
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"")  # refused before it is read
    (root / "noconfig").mkdir()
    (root / "calib.txt").write_text(TEXT)
    (root / "empty.txt").write_text("")
    (root / "nofield.jsonl").write_text(json.dumps({"body": TEXT}) + "\n")
    (root / "broken.jsonl").write_text('{"text": "unterminated\n')
    (root / "a_file").write_text("x")
    (root / "recipe_list.yaml").write_text("- method: wanda\n")
    (root / "recipe_bad.yaml").write_text("method: [\n")
    return {"root": root, "llama": tiny_llama_dir, "bert": bert}


CASES = {
    "missing model folder": (["{root}/missing"], "is not a folder"),
    "folder without config": (["{root}/noconfig"], "has no config.json"),
    "no weights": (["{root}/noweights"], "has a config.json but no weights"),
    "no safetensors weights": (["{root}/pickled"], "has no safetensors weights; pass --allow-pickle"),
    "not a causal LM": (["{bert}"], "is not a causal language model checkpoint"),
    "pattern against widths": (["{llama}", "--pattern", "3:7"], "needs input widths that are multiples of its M"),
    "empty calibration file": (["{llama}", "--calib", "{root}/empty.txt"], "has only 0 tokens"),
    "calibration text field": (["{llama}", "--calib", "{root}/nofield.jsonl"], "choose the text field with --text-field"),
    "broken jsonl": (["{llama}", "--calib", "{root}/broken.jsonl"], "is not valid JSON"),
    "missing calibration file": (["{llama}", "--calib", "{root}/nofile.txt"], "does not exist; check the path"),
    "nsamples 0": (["{llama}", "--nsamples", "0"], "nsamples = 0"),
    "sparsity 1": (["{llama}", "--sparsity", "1.0"], "sparsity 1.0 is out of range"),
    "negative damp": (["{llama}", "--damp", "-0.1"], "damp = -0.1"),
    "bad regex": (["{llama}", "--targets", "("], "is not a valid regular expression"),
    "missing data dir": (["{llama}", "--data-dir", "{root}/nodata"], "does not exist or is not a folder"),
    "layer sparsity length": (["{llama}", "--layer-sparsity", "0.5"], "gives 1 values but the model has 2"),
    "option of another method": (["{llama}", "--method", "wanda", "--blocksize", "64"],
                                 "option 'blocksize' belongs to sparsegpt"),
    "unknown method": (["{llama}", "--method", "wandaa"], "unknown method 'wandaa'; choose one of"),
    "cuda without cuda": (["{llama}", "--device", "cuda"], "CUDA is not available; use --device cpu"),
    "recipe not a mapping": (["{llama}", "--recipe", "{root}/recipe_list.yaml"], "must be a mapping"),
    "recipe not yaml": (["{llama}", "--recipe", "{root}/recipe_bad.yaml"], "is not valid YAML"),
    "missing recipe": (["{llama}", "--recipe", "{root}/none.yaml"], "does not exist"),
    "output is a file": (["{llama}", "--output", "{root}/a_file"], "is a file; give a folder path"),
    "output under a file": (["{llama}", "--output", "{root}/a_file/sub"], "which is a file"),
    "output not creatable": (["{llama}", "--output", "/proc/llmprune-out"], "cannot be created"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_a_message_and_writes_nothing(case, inputs, capsys):
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args, message = CASES[case]
    fmt = {"root": inputs["root"], "llama": inputs["llama"], "bert": inputs["bert"]}
    args = [a.format(**fmt) for a in args]
    out = inputs["root"] / f"out-{case.replace(' ', '-')}"
    if "--output" not in args:
        args += ["--output", str(out)]
    if "--calib" not in args:
        args += ["--calib", str(inputs["root"] / "calib.txt")]
    before = sorted(p.name for p in inputs["root"].iterdir())
    rc = main(["prune", *args, "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--quiet"]
              if "--nsamples" not in args and "--device" not in args else ["prune", *args, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("llmprune: error: ") and message in err, err
    assert sorted(p.name for p in inputs["root"].iterdir()) == before  # nothing written, nothing left behind
