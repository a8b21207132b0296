"""Evaluation: perplexity against an independent computation, datasets, caching, the results
schema, comparisons, and the ``llmprune eval`` / ``prune --eval`` commands on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import VOCAB, make_tiny_model

import llmprune
from llmprune.cli import main
from llmprune.config import ConfigError, EvalConfig, PruneConfig
from llmprune.evaluation import (
    DatasetError,
    EvalResults,
    compare_chart,
    compare_table,
    dataset_perplexity,
    load_all,
    load_text,
    perplexity,
    save_all,
    tokenize_once,
)
from llmprune.evaluation.tasks import normalize_metrics

TEXT = " ".join(f"Line {i}: the {w} fox jumps over the lazy dog by the river." for i, w in
                enumerate(["quick", "brown", "red", "sly", "small", "old"] * 6))


def _independent_ppl(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """Textbook perplexity in float64, one window at a time."""
    nll, count = 0.0, 0
    for w in range(windows):
        x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
        with torch.no_grad():
            logits = model(x).logits[0].double()  # [L, V]
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(seqlen - 1):
            nll -= float(logp[t, x[0, t + 1]])
            count += 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (5 * 32 + 7,), generator=torch.Generator().manual_seed(0))  # [T]


@pytest.mark.parametrize("ce_rows", [None, 5], ids=["one-ce-call", "ce-in-row-chunks"])
def test_perplexity_equals_independent_computation(model, ids, ce_rows, monkeypatch):
    if ce_rows is not None:  # cross-entropy over 5-row chunks of the [L, V] logits
        import importlib

        ppl_module = importlib.import_module("llmprune.evaluation.perplexity")  # the package exports a function of that name
        monkeypatch.setattr(ppl_module, "CE_CHUNK_ELEMENTS", ce_rows * model.config.vocab_size)
    r = perplexity(model, input_ids=ids, seqlen=32, max_windows=4, batch_size=2)
    assert r.ppl == pytest.approx(_independent_ppl(model, ids, 32, 4), rel=1e-6)
    assert (r.windows, r.seqlen, r.tokens) == (4, 32, 4 * 31)
    assert r.nll == pytest.approx(math.log(r.ppl))


def test_perplexity_drops_the_tail_and_batches_exactly(model, ids):
    r1 = perplexity(model, input_ids=ids, seqlen=32)
    r3 = perplexity(model, input_ids=ids, seqlen=32, batch_size=3)
    assert r1.windows == 5  # 167 tokens: five windows of 32, the 7-token tail dropped
    assert r3.ppl == pytest.approx(r1.ppl, rel=1e-6)
    assert r1.fingerprint == r3.fingerprint
    assert perplexity(model, input_ids=ids.flip(0), seqlen=32).fingerprint != r1.fingerprint


def test_perplexity_needs_one_window(model, ids):
    with pytest.raises(DatasetError, match="fewer than one window of 512"):
        perplexity(model, input_ids=ids, seqlen=512)


def test_tokenize_once_caches_in_memory_and_on_disk(tmp_path, monkeypatch):
    from conftest import byte_tokenizer

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))
    tok = byte_tokenizer()
    a = tokenize_once(tok, TEXT)
    assert tokenize_once(tok, TEXT) is a
    files = list((tmp_path / "tokens").glob("*.pt"))
    assert len(files) == 1 and torch.equal(torch.load(files[0]), a)
    assert a.tolist() == tok(TEXT).input_ids


def test_text_files_are_datasets(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    txt = tmp_path / "doc.txt"
    txt.write_text(TEXT)
    jl = tmp_path / "doc.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in TEXT.split(". ")))
    r = dataset_perplexity(m, tok, str(txt), seqlen=64, max_windows=3)
    assert r.dataset == "doc.txt" and r.source == "file doc.txt" and r.windows == 3
    ids = torch.tensor(tok(TEXT).input_ids)
    assert r.ppl == pytest.approx(_independent_ppl(m, ids, 64, 3), rel=1e-6)
    assert load_text(str(jl)).text == "\n\n".join(TEXT.split(". "))


def test_unknown_dataset_names_the_choices():
    with pytest.raises(DatasetError, match="choose one of: wikitext2, c4"):
        load_text("wikitext")
    with pytest.raises(DatasetError, match="does not exist"):
        load_text("missing.txt")


def test_wikitext2_from_the_data_dir(shared_data_dir):
    src = load_text("wikitext2", shared_data_dir)
    lines = (shared_data_dir / "wikitext2" / "raw" / "wiki.test.raw").read_text().split("\n")[:-1]
    assert src.text == "\n\n".join(lines) and src.comparable
    assert len(lines) == 4358


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
def test_lm_eval_metrics_are_normalized():
    metrics, stderr = normalize_metrics("piqa", {
        "alias": "piqa", "acc,none": 0.6, "acc_stderr,none": 0.01, "acc_norm,none": 0.62,
        "acc_norm_stderr,none": 0.011, "exact_match,strict-match": 0.3,
    })
    assert metrics == {"piqa/acc": 0.6, "piqa/acc_norm": 0.62, "piqa/exact_match@strict-match": 0.3}
    assert stderr == {"piqa/acc": 0.01, "piqa/acc_norm": 0.011}


def _result(name: str, ppl: float, acc: float, pruning: dict | None = None) -> EvalResults:
    return EvalResults(model=name, metrics={"wikitext2/ppl": ppl, "piqa/acc": acc},
                       stderr={"piqa/acc": 0.01},
                       perplexity={"wikitext2": {"seqlen": 2048, "windows": 16, "tokens": 32752}},
                       tasks={"piqa": {"docs": 1838, "num_fewshot": 0, "source": "offline:eval/tasks"}},
                       pruning=pruning)


def test_results_json_schema_round_trip(tmp_path):
    r = _result("dense", 20.6, 0.65)
    path = r.save(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "llmprune.eval/1"
    assert {"model", "metrics", "stderr", "perplexity", "tasks", "settings", "versions", "created"} <= set(data)
    assert all("/" in k for k in data["metrics"])
    assert "torch" in data["versions"] and "lm_eval" in data["versions"]
    assert EvalResults.load(path) == r
    assert "| wikitext2/ppl | 20.60 |" in r.markdown()


def test_compare_table_deltas_and_chart(tmp_path):
    base = _result("dense", 20.0, 0.70)
    worse = _result("out-wanda", 30.0, 0.60, pruning={"method": "wanda", "pattern": "unstructured",
                                                        "measured_sparsity": 0.5})
    table = compare_table([base, worse])
    assert "out-wanda (wanda unstructured 50%)" in table
    assert "30.00 (+10 ↓)" in table  # higher perplexity is worse
    assert "0.6000 (-0.1 ↓)" in table
    assert "0.8000 (+0.1 ↑)" in compare_table([base, _result("better", 20.0, 0.8)])
    png = compare_chart([base, worse], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    both = save_all([base, worse], tmp_path / "all.json")
    assert [r.model for r in load_all(both)] == ["dense", "out-wanda"]


# ----------------------------------------------------------------------------------------------
# Config, API and CLI
# ----------------------------------------------------------------------------------------------
def test_eval_config_validates_and_splits_lists():
    c = EvalConfig(ppl="wikitext2, c4", tasks="piqa", batch_size="auto", limit=0.1)
    assert c.ppl == ["wikitext2", "c4"] and c.tasks == ["piqa"] and c.task_limit == 0.1
    assert EvalConfig(limit=50).task_limit == 50
    for bad in ({"batch_size": "big"}, {"limit": 2.5}, {"seqlen": 1}, {"metric": "acc"}):
        with pytest.raises(ConfigError):
            EvalConfig.build(bad)
    p = PruneConfig(eval="wikitext2,piqa,notes.txt")
    assert p.eval.ppl == ["wikitext2", "notes.txt"] and p.eval.tasks == ["piqa"]


def test_evaluate_api_on_a_model_in_memory(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    txt = tmp_path / "doc.txt"
    txt.write_text(TEXT)
    r = llmprune.evaluate(m, tok, ppl=[str(txt)], seqlen=4096, max_windows=2, progress=False)
    assert r.settings["seqlen_used"] == 2048  # clipped to the model's context
    with pytest.raises(ValueError, match="nothing to evaluate"):
        llmprune.evaluate(m, tok, progress=False)


def test_cli_eval_and_compare(tiny_llama_dir, tmp_path, capsys):
    txt = tmp_path / "doc.txt"
    txt.write_text(TEXT * 3)
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_llama_dir), "--ppl", str(txt), "--seqlen", "64", "--max-windows", "2",
                 "--device", "cpu", "--output", str(out), "-q"]) == 0
    r = EvalResults.load(out)
    assert r.perplexity["doc"]["windows"] == 2 and r.metrics["doc/ppl"] > 1
    cmp = tmp_path / "cmp.json"
    assert main(["eval", "--compare", str(tiny_llama_dir), str(tiny_llama_dir), "--ppl", str(txt),
                 "--seqlen", "64", "--max-windows", "1", "--device", "cpu", "--output", str(cmp), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "## comparison" in printed and "(+0 )" in printed.replace("(+0)", "(+0 )")
    assert len(load_all(cmp)) == 2 and cmp.with_suffix(".png").is_file()


def test_cli_compare_of_one_pruned_model_is_against_the_model_it_was_pruned_from(tiny_llama_dir, tmp_path,
                                                                                   capsys):
    txt = tmp_path / "doc.txt"
    txt.write_text(TEXT * 3)
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama_dir), "--method", "magnitude", "--device", "cpu", "--output", str(out),
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(out), "--ppl", str(txt), "--seqlen", "64", "--max-windows", "1",
                 "--device", "cpu", "--output", str(tmp_path / "cmp.json"), "-q"]) == 0
    labels = [r.model for r in load_all(tmp_path / "cmp.json")]
    assert labels == [str(tiny_llama_dir), str(out)]  # the dense source first, not the pruned model twice
    (out / "llmprune_report.json").unlink()  # nothing recorded: the dense model must be named
    cfg = json.loads((out / "config.json").read_text())
    cfg["llmprune"]["config"].pop("model", None)
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--compare", str(out), "--ppl", str(txt), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert "records no dense model" in err and "'embedded' names the embedded" in err


@pytest.mark.parametrize("args, message", [
    (["--tasks", "piqaa"], "unknown task 'piqaa' (did you mean: piqa"),
    (["--ppl", "wikitxt"], "unknown perplexity dataset 'wikitxt'"),
    (["other-model", "--ppl", "wikitext2"], "pass --compare"),
    ([], "nothing to evaluate"),
])
def test_cli_eval_errors_exit_2(args, message, tiny_llama_dir, capsys):
    assert main(["eval", str(tiny_llama_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_prune_with_eval_writes_results_into_the_checkpoint(tiny_llama_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 3)
    out = tmp_path / "out"
    assert main(["prune", str(tiny_llama_dir), "--method", "wanda", "--calib", str(calib), "--nsamples", "4",
                 "--seqlen", "32", "--device", "cpu", "--eval", str(calib), "--output", str(out), "-q"]) == 0
    r = EvalResults.load(out / "llmprune_eval.json")
    assert r.pruning["method"] == "wanda" and r.metrics["calib/ppl"] > 1
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    assert meta["eval"] == {"file": "llmprune_eval.json", "metrics": r.metrics}
    assert "calib/ppl" in capsys.readouterr().out


def test_prune_with_unknown_eval_task_fails_before_writing(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_llama_dir), "--method", "magnitude", "--eval", "piqaa",
                 "--output", str(out), "-q"]) == 2
    assert "unknown task 'piqaa'" in capsys.readouterr().err and not out.exists()


def test_prune_eval_takes_the_window_cap_of_eval(tiny_llama_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 6)
    args = ["prune", str(tiny_llama_dir), "--method", "magnitude", "--device", "cpu", "-q"]
    assert main([*args, "--eval", str(calib), "--max-windows", "1", "--output", str(tmp_path / "out")]) == 0
    r = EvalResults.load(tmp_path / "out" / "llmprune_eval.json")
    assert r.perplexity["calib"]["windows"] == 1
    capsys.readouterr()
    assert main([*args, "--max-windows", "1", "--output", str(tmp_path / "no-eval")]) == 2
    assert "--max-windows cap the evaluation after pruning; add --eval" in capsys.readouterr().err
    assert not (tmp_path / "no-eval").exists()
