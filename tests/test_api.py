"""The stable Python API: every calibration form ``prune`` accepts, and every public name documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, byte_tokenizer, make_tiny_model

import llmprune
from llmprune.calibration import CalibrationError, get_calibration

README = Path(__file__).resolve().parents[1] / "README.md"


def _rows(n: int = 8, L: int = 32) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, L), generator=torch.Generator().manual_seed(3))  # [n, L]


def _masks(calibration, **kw) -> str:
    model = make_tiny_model("llama")
    report = llmprune.prune(model, kw.pop("tokenizer", None), method="wanda", sparsity=0.5, nsamples=8, seqlen=32,
                            calibration=calibration, progress=False, **kw)
    return report.masks_sha256


def test_every_pretokenized_form_gives_the_masks_of_the_tensor():
    datasets = pytest.importorskip("datasets")
    ids = _rows()
    expected = _masks(ids)
    forms = {
        "batches": [ids[:4], ids[4:]],  # an iterable of token batches
        "generator": (b for b in (ids[:3], ids[3:])),
        "dicts": [{"input_ids": ids[:4], "attention_mask": torch.ones(4, 32)}, {"input_ids": ids[4:]}],
        "token lists": ids.tolist(),
        "dataloader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=3),
        "dict dataloader": torch.utils.data.DataLoader([{"input_ids": r} for r in ids], batch_size=2),
        "dataset": datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
    }
    for name, source in forms.items():
        assert _masks(source) == expected, name


def test_a_text_dataset_is_sampled_as_documents(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    datasets = pytest.importorskip("datasets")
    tok = byte_tokenizer()
    docs = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (2 + i % 3) for i in range(20)]
    ds = datasets.Dataset.from_dict({"content": docs, "id": list(range(20))})
    a = get_calibration(ds, tok, nsamples=6, seqlen=64, seed=0, text_field="content")
    b = get_calibration(ds, tok, nsamples=6, seqlen=64, seed=0, text_field="content")
    assert a.shape == (6, 64) and torch.equal(a, b)
    assert tok.decode(a[0]).strip() in " ".join(docs)  # a window of one document
    with pytest.raises(CalibrationError, match="no 'text' or 'messages' field .*choose the text field"):
        get_calibration(ds, tok, nsamples=2, seqlen=16)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        get_calibration(ds, None, nsamples=2, seqlen=16, text_field="content")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    report = llmprune.prune(model, tok, method="wanda", sparsity=0.5, nsamples=4, seqlen=32, calibration=ds,
                            text_field="content", progress=False)
    assert report.calibration["source"].startswith("datasets.Dataset[20 rows, columns content, id]")


def test_text_records_outside_a_dataset_say_what_to_do():
    with pytest.raises(CalibrationError, match="dict without 'input_ids' .*datasets.Dataset"):
        get_calibration([{"text": "hello"}], None, nsamples=1, seqlen=4)


def _as_given(calibration, **kw):
    model = make_tiny_model("llama")
    return llmprune.prune(model, None, method="wanda", sparsity=0.5, calibration=calibration, progress=False, **kw)


def test_pretokenized_calibration_is_used_as_given(caplog):
    """Without nsamples/seqlen, the tokens handed over are the calibration: their own count and length, in every
    form, with a warning that they are fewer than the papers'; explicit settings are kept and validated."""
    datasets = pytest.importorskip("datasets")
    ids = _rows(16, 24)  # [16, 24]: 16 x 24 tokens, fewer than nsamples*seqlen = 128*2048
    with caplog.at_level("WARNING", logger="llmprune.calibration"):
        report = _as_given(ids)
    assert (report.calibration["nsamples"], report.calibration["seqlen"]) == (16, 24)
    assert "16 windows x 24 tokens" in caplog.text and "as given" in caplog.text
    forms = {"token lists": ids.tolist(), "batches": [ids[:5], ids[5:]],
             "dataloader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=3),
             "dataset": datasets.Dataset.from_dict({"input_ids": ids.tolist()})}
    for name, form in forms.items():
        assert _as_given(form).masks_sha256 == report.masks_sha256, name  # the same windows, every form
    ragged = [ids[0, :20].tolist(), ids[1].tolist(), ids[2, :11].tolist()]  # rows at the shortest row's length
    assert (_as_given(ragged).calibration["nsamples"], _as_given(ragged).calibration["seqlen"]) == (3, 11)
    assert _as_given(ids, seqlen=8).calibration["nsamples"] == 16  # an explicit seqlen: a window from every row
    with pytest.raises(CalibrationError, match="fewer than nsamples"):  # explicit settings validate as before
        _as_given(ids, nsamples=128)
    with pytest.raises(CalibrationError, match="outside the model's vocabulary"):
        _as_given(ids + VOCAB)


def test_every_public_name_has_a_docstring_and_is_in_the_readme_api_section():
    text = README.read_text()
    match = re.search(r"^## Python API\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md needs a '## Python API' section"
    section = match.group(1)
    for name in llmprune.__all__:
        value = getattr(llmprune, name)
        if callable(value):
            doc = value.__doc__ or ""
            assert doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"
        assert f"`{name}" in section, f"{name} is not listed in the README's API section"


def test_save_writes_a_checkpoint_that_loads_back_with_its_zeros(tmp_path):
    model, tok = make_tiny_model("llama"), byte_tokenizer()
    report = llmprune.prune(model, tok, method="wanda", sparsity=0.5, nsamples=8, seqlen=32, calibration=_rows(),
                            progress=False)
    out = llmprune.save(model, tok, tmp_path / "out", report)
    cfg = (out / "config.json").read_text()
    assert '"method": "wanda"' in cfg and (out / "llmprune_report.json").is_file() and (out / "README.md").is_file()
    back = llmprune.load(out)
    for (n, p), q in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    # a loaded checkpoint carries its metadata: saved again without a report, compressed on request
    comp = llmprune.save(back, tok, tmp_path / "comp", save_format="compressed")
    assert llmprune.checkpoint.is_compressed(comp)
    again = llmprune.load(comp)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_save_refuses_what_it_cannot_write_and_leaves_nothing(tmp_path):
    model, tok = make_tiny_model("llama"), byte_tokenizer()
    with pytest.raises(ValueError, match="no llmprune metadata: pass report="):
        llmprune.save(model, tok, tmp_path / "a")
    report = llmprune.prune(model, tok, method="magnitude", sparsity=0.5, nsamples=8, seqlen=32,
                            calibration=_rows(), progress=False)
    with pytest.raises(ValueError, match="save_format 'zip' is unknown; choose one of: dense, compressed"):
        llmprune.save(model, tok, tmp_path / "a", report, save_format="zip")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        llmprune.save(model, tok, tmp_path / "a", report)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and (tmp_path / "a" / "keep.txt").read_text() == "mine"
