"""The model card: front matter parses, its numbers are the checkpoint's, and nothing local leaks."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_tiny_model

import llmprune
from llmprune.checkpoint.card import CARD_FILE, EMBEDDED_BASE, build_card, read_front_matter, write_card
from llmprune.evaluation.results import EvalResults, save_all
from llmprune.report import EVAL_FILE
from llmprune.checkpoint.save import REPORT_FILE, save_pruned


@pytest.fixture
def checkpoint(tmp_path, calib_ids):
    model = make_tiny_model("llama")
    report = llmprune.prune(model, None, calibration=calib_ids, method="wanda", pattern="2:4", nsamples=6,
                            seqlen=16, device="cpu", progress=False)
    report.evaluation = EvalResults(model="pruned", metrics={"wikitext2/ppl": 123.456789, "piqa/acc": 0.5123},
                                    pruning=report.metadata())
    return save_pruned(model, None, tmp_path / "out", report)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_written_on_save_and_parses(checkpoint):
    text = (checkpoint / CARD_FILE).read_text()
    meta = front_matter(text)
    assert meta == read_front_matter(checkpoint / CARD_FILE)  # huggingface_hub reads the same
    assert meta["library_name"] == "transformers"
    assert {"pruned", "sparse", "llmprune", "wanda", "2of4-sparsity"} <= set(meta["tags"])
    assert "base_model" not in meta  # pruned in memory: no Hub id known, and no guess
    cfg = json.loads((checkpoint / "config.json").read_text())["llmprune"]
    assert f"| measured sparsity (pruned weights) | {cfg['measured_sparsity']:.4g} |" in text
    assert f"| seed | {cfg['seed']} |" in text
    assert "AutoModelForCausalLM.from_pretrained" in text


def test_model_index_numbers_equal_results(checkpoint):
    meta = front_matter((checkpoint / CARD_FILE).read_text())
    results = json.loads((checkpoint / EVAL_FILE).read_text())["metrics"]
    entries = meta["model-index"][0]["results"]
    got = {m["name"]: m["value"] for e in entries for m in e["metrics"]}
    assert got == results  # every number, exactly
    types = {m["name"]: (m["type"], e["dataset"]["type"]) for e in entries for m in e["metrics"]}
    assert types["wikitext2/ppl"] == ("perplexity", "wikitext")


def test_embedded_base_model_licence_and_no_local_path(checkpoint):
    report = json.loads((checkpoint / REPORT_FILE).read_text())
    report["model"] = "embedded:/home/someone/.cache/llmprune/smollm2-135m-instruct-f32"
    (checkpoint / REPORT_FILE).write_text(json.dumps(report))
    text = str(build_card(checkpoint, repo_id="me/tiny-2of4"))
    meta = front_matter(text)
    assert meta["base_model"] == EMBEDDED_BASE and meta["license"] == "apache-2.0"
    assert "/home/someone" not in text and 'from_pretrained("me/tiny-2of4")' in text
    report["model"] = "/data/models/my-llama"  # a local folder: named, never its path
    (checkpoint / REPORT_FILE).write_text(json.dumps(report))
    text = str(build_card(checkpoint))
    assert "base_model" not in front_matter(text) and "/data/models" not in text and "my-llama" in text


def test_dense_beside_pruned_when_both_measured(checkpoint):
    pruned = EvalResults.load(checkpoint / EVAL_FILE)
    dense = EvalResults(model="dense", metrics={"wikitext2/ppl": 50.0, "piqa/acc": 0.6})
    save_all([dense, pruned], checkpoint / EVAL_FILE)
    text = (write_card(checkpoint)).read_text()
    assert "| metric | dense | pruned |" in text and "| wikitext2/ppl | 50 | 123.5 |" in text
    got = {m["name"]: m["value"] for e in front_matter(text)["model-index"][0]["results"] for m in e["metrics"]}
    assert got == pruned.metrics  # model-index holds the pruned model's numbers


def test_compressed_card_says_how_to_load(checkpoint, tmp_path):
    comp = llmprune.compress(checkpoint, tmp_path / "comp")
    text = (comp / CARD_FILE).read_text()  # compress rewrote the card: it must not say plain transformers
    assert "llmprune.load(" in text and "llmprune decompress" in text
    assert "llmprune-compressed" in front_matter(text)["tags"] and "AutoModelForCausalLM" not in text
    back = llmprune.decompress(comp, tmp_path / "back")
    assert "AutoModelForCausalLM.from_pretrained" in (back / CARD_FILE).read_text()


def test_card_never_holds_a_token(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_card_secret_123")
    assert "hf_card_secret_123" not in str(build_card(checkpoint, repo_id="me/x"))


def test_no_eval_no_model_index(tmp_path, calib_ids):
    model = make_tiny_model("llama")
    report = llmprune.prune(model, None, calibration=calib_ids, method="magnitude", sparsity=0.5, nsamples=6,
                            seqlen=16, device="cpu", progress=False)
    out = save_pruned(model, None, tmp_path / "out", report)
    meta = front_matter((out / CARD_FILE).read_text())
    assert "model-index" not in meta and "magnitude" in meta["tags"]
