"""Checkpoint hygiene and data provenance: files saved with the umask's modes, data sources recorded by
name and sha256 (never a local path), and no C4 perplexity measured on the C4 calibration text."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from conftest import byte_tokenizer, make_tiny_model

import llmprune
from llmprune.api import prune_checkpoint
from llmprune.config import PruneConfig
from llmprune.calibration import LOCAL_DIR_RECORDED, describe_source, get_calibration, portable_settings
from llmprune.evaluation.perplexity import DatasetError, dataset_perplexity, load_text
from llmprune.evaluation.results import EvalResults, compare_table
from llmprune.checkpoint.save import REPORT_FILE, save_pruned

TEXT = " ".join(
    f"Sentence {i} tells of the {w} fox that jumps over the lazy dog near river {i % 7}."
    for i, w in enumerate(["quick", "brown", "red", "sly", "small", "old"] * 8)
)


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------------------------
# Permissions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_get_the_modes_of_a_plain_save_under_the_umask(umask, calib_ids, tmp_path):
    model = make_tiny_model("llama")
    report = llmprune.prune(model, None, calibration=calib_ids, method="wanda", nsamples=6, seqlen=16,
                            device="cpu", progress=False)
    old = os.umask(umask)
    try:
        out = save_pruned(model, byte_tokenizer(), tmp_path / "out", report)
        plain = tmp_path / "plain"  # a fresh folder that save_pretrained creates itself
        model.save_pretrained(plain)
        byte_tokenizer().save_pretrained(plain)
    finally:
        os.umask(old)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert _mode(out) == _mode(plain) == dir_mode
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {"model.safetensors", "config.json", REPORT_FILE} <= {p.name for p in files}
    assert {p.name: _mode(p) for p in files} == {p.name: file_mode for p in files}
    # the files save_pretrained writes with open() have these modes too (safetensors itself writes 0600)
    for p in plain.iterdir():
        if p.suffix != ".safetensors":
            assert _mode(p) == _mode(out / p.name) == file_mode, p.name


# ----------------------------------------------------------------------------------------------
# Metadata: names and fingerprints, no local paths
# ----------------------------------------------------------------------------------------------


def _calib_file(folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXT.split(". ")) + "\n")
    return path


@pytest.mark.parametrize("calib", ["file", "c4"])
def test_checkpoint_records_sources_by_name_and_sha256_never_a_path(calib, tiny_llama_dir, shared_data_dir,
                                                                    tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_dir = os.path.relpath(shared_data_dir)  # as a user types it: relative to where they stand
    calib_path = _calib_file(tmp_path / "my-data")
    source = str(calib_path) if calib == "file" else "c4"
    read = calib_path if calib == "file" else shared_data_dir / "c4" / "c4_validation_2k.jsonl"
    config = PruneConfig.build({
        "model": str(tiny_llama_dir), "method": "wanda", "calib": source, "nsamples": 2, "seqlen": 16,
        "data_dir": data_dir, "device": "cpu",
        "eval": {"ppl": [str(calib_path)], "seqlen": 16, "max_windows": 2},
    })
    out = tmp_path / "out"
    prune_checkpoint(config, out, progress=False)

    texts = {name: (out / name).read_text() for name in ("config.json", REPORT_FILE, "llmprune_eval.json")}
    for name, text in texts.items():
        for local in (str(tmp_path), str(tmp_path.resolve()), data_dir, str(shared_data_dir),
                      str(Path(shared_data_dir).resolve()), "my-data"):
            assert local not in text, (name, local)

    meta = json.loads(texts["config.json"])["llmprune"]
    report = json.loads(texts[REPORT_FILE])
    expected = (f"file calib.jsonl (sha256 {_sha16(read)})" if calib == "file"
                else f"c4 (local copy c4_validation_2k.jsonl, sha256 {_sha16(read)})")
    for cal in (meta["calibration"], report["calibration"]):
        assert cal["source"] == expected and cal["data_sha256"] == _sha16(read)
        assert len(cal["windows_sha256"]) == 16
    for cfg in (meta["config"], report["config"]):
        assert cfg["calib"] == ("calib.jsonl" if calib == "file" else "c4")
        assert cfg["data_dir"] == LOCAL_DIR_RECORDED
        assert cfg["eval"]["ppl"] == ["calib.jsonl"]

    ev = json.loads(texts["llmprune_eval.json"])
    ppl = ev["perplexity"]["calib"]
    assert ppl["source"] == "file calib.jsonl" and ppl["data_sha256"] == _sha16(calib_path)
    # perplexity on the calibration file itself is flagged; on other text it is not
    assert ppl.get("overlaps_calibration", False) is (calib == "file")
    assert ppl["comparable"] is (calib != "file")
    if calib == "file":
        assert "calibration data" in ppl["note"]
        assert "overlaps the calibration data" in EvalResults.from_dict(ev).markdown()


def test_describe_source_names_local_copies_without_paths(shared_data_dir, tmp_path):
    c4 = shared_data_dir / "c4" / "c4_validation_2k.jsonl"
    assert describe_source("c4", shared_data_dir) == f"c4 (local copy c4_validation_2k.jsonl, sha256 {_sha16(c4)})"
    wiki = describe_source("wikitext2", shared_data_dir)
    assert wiki.startswith("wikitext2 (local copy ") and "/" not in wiki
    f = _calib_file(tmp_path / "d")
    assert describe_source(f) == f"file calib.jsonl (sha256 {_sha16(f)})"
    assert describe_source(str(tmp_path / "gone.jsonl")) == "file gone.jsonl"
    assert describe_source("org/name:cfg:train") == "hf: org/name:cfg:train"
    settings = portable_settings({"calib": str(f), "data_dir": "../data", "model": "m",
                                  "eval": {"ppl": ["wikitext2", str(f)], "include_path": [str(tmp_path)],
                                           "data_dir": None}})
    assert settings == {"calib": "calib.jsonl", "data_dir": LOCAL_DIR_RECORDED, "model": "m",
                        "eval": {"ppl": ["wikitext2", "calib.jsonl"], "include_path": [tmp_path.name],
                                 "data_dir": None}}


def test_c4_calibration_windows_unchanged(shared_data_dir):
    """The benchmark's calibration windows (c4 from the data dir) are those of the code before this change."""
    ids = get_calibration("c4", byte_tokenizer(), nsamples=4, seqlen=32, seed=0, data_dir=shared_data_dir)
    assert hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16] == "4e42405713576cd5"


# ----------------------------------------------------------------------------------------------
# C4 perplexity never on the C4 calibration text
# ----------------------------------------------------------------------------------------------


def test_offline_c4_perplexity_is_refused_saying_why(shared_data_dir, tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match=r"calibration source of 'c4'.*evaluate wikitext2"):
        load_text("c4", shared_data_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(DatasetError, match="c4 perplexity needs the Hub"):
        dataset_perplexity(model, byte_tokenizer(), "c4", seqlen=16, max_windows=1, data_dir=shared_data_dir)


def test_overlap_with_calibration_is_marked_in_tables():
    def result(model: str, sha: str) -> EvalResults:
        return EvalResults(model=model, metrics={"doc/ppl": 12.0},
                           perplexity={"doc": {"seqlen": 16, "windows": 2, "tokens": 30, "comparable": True,
                                               "data_sha256": "aaaa"}},
                           pruning={"method": "wanda", "pattern": "unstructured", "measured_sparsity": 0.5,
                                    "calibration": {"source": "file doc.jsonl (sha256 ...)", "data_sha256": sha}})

    clean, overlapping = result("clean", "bbbb"), result("overlapping", "aaaa")
    assert "overlaps_calibration" not in clean.to_dict()["perplexity"]["doc"]
    p = overlapping.to_dict()["perplexity"]["doc"]
    assert p["overlaps_calibration"] is True and p["comparable"] is False
    assert "overlaps the calibration data" in overlapping.markdown()
    assert "not comparable" not in compare_table([clean, clean])
    table = compare_table([clean, overlapping])
    assert "| doc/ppl * |" in table and "not comparable" in table


def test_offline_c4_perplexity_is_refused_before_any_pruning(shared_data_dir, monkeypatch):
    from llmprune.config import EvalConfig
    from llmprune.evaluation import DatasetError
    from llmprune.evaluation.evaluate import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match="c4 perplexity needs the Hub.*offline calibration source"):
        preflight(EvalConfig.build({"ppl": ["c4"], "data_dir": str(shared_data_dir)}))
    preflight(EvalConfig.build({"ppl": ["wikitext2"], "data_dir": str(shared_data_dir)}))
