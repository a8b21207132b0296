"""Integration tests on the embedded SmolLM2-135M-Instruct with small calibration."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    from llmprune import load_model

    model, tok, _ = load_model(None)
    return model, tok


def _decoder_linear_sparsity(model) -> float:
    zeros = total = 0
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                zeros += int((m.weight == 0).sum())
                total += m.weight.numel()
    return zeros / total


def test_embedded_model_is_the_expected_llama(embedded):
    model, tok = embedded
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert model.dtype == torch.float32
    assert tok("Hello").input_ids


def test_wanda_on_embedded_model_keeps_it_usable(embedded, shared_data_dir):
    import copy

    from llmprune import prune
    from llmprune.evaluation import perplexity, wikitext2_test_text

    model, tok = embedded
    text = wikitext2_test_text(shared_data_dir)[:20000]
    dense = perplexity(model, tok, text, seqlen=256, max_windows=2).ppl
    pruned = copy.deepcopy(model)
    report = prune(pruned, tok, method="wanda", calib="c4", data_dir=str(shared_data_dir), nsamples=4,
                   seqlen=128, device="cpu", progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)
    assert _decoder_linear_sparsity(pruned) == pytest.approx(0.5, abs=1e-6)
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight)
    ppl = perplexity(pruned, tok, text, seqlen=256, max_windows=2).ppl
    # 50 % Wanda on a 135M model costs perplexity, but far from destroying the model
    assert dense < ppl < 4 * dense, (dense, ppl)


def test_main_job_command_small(tmp_path, shared_data_dir, capsys):
    """The README's main job, with small calibration: prune the embedded model and load the result."""
    from transformers import AutoModelForCausalLM

    from llmprune.cli import main

    out = tmp_path / "out"
    rc = main(["prune", "--data-dir", str(shared_data_dir), "--nsamples", "4", "--seqlen", "64",
               "--output", str(out), "--quiet"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "sparsegpt unstructured, measured sparsity 0.5000" in summary
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["llmprune"]["method"] == "sparsegpt" and cfg["llmprune"]["measured_sparsity"] == pytest.approx(0.5)
    assert cfg["llmprune"]["calibration"]["nsamples"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert _decoder_linear_sparsity(model) == pytest.approx(0.5, abs=1e-6)
    assert not list(tmp_path.glob(".out*")), "temporary folders left behind"
