"""Calibration data: every source, offline, with a byte-level tokenizer built in the test."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from llmprune.calibration import hf as hf_source
from llmprune.calibration import CalibrationError, describe_source, get_calibration, resolve_data_dir

BOS, EOS, PAD = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer():
    """One token per byte, BOS prepended by default (like Llama), a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": BOS, "</s>": EOS, "<pad>": PAD}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return fast


@pytest.fixture(scope="session")
def data_dir(shared_data_dir) -> Path:
    return shared_data_dir


@pytest.fixture
def hub_offline(monkeypatch):
    """The Hub is unreachable: any load raises, as it does on these machines."""

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(hf_source, "load_hub_dataset", unreachable)
    monkeypatch.delenv("LLMPRUNE_DATA_DIR", raising=False)


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _is_subsequence(window: torch.Tensor, stream: list[int]) -> bool:
    """Whether ``window`` occurs contiguously in ``stream`` (token ids as characters, for str.find)."""
    return "".join(map(chr, window.tolist())) in "".join(map(chr, stream))


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


DOCS = [f"document {i}: " + " ".join(f"w{i}x{j}" for j in range(20 + 7 * i)) for i in range(12)]


# ----------------------------------------------------------------------------------------------
# C4 and WikiText-2 from the data dir
# ----------------------------------------------------------------------------------------------


def test_c4_local_shape_dtype_seed(tokenizer, data_dir):
    a = get_calibration("c4", tokenizer, nsamples=4, seqlen=32, seed=0, data_dir=data_dir)
    b = get_calibration("c4", tokenizer, nsamples=4, seqlen=32, seed=0, data_dir=data_dir)
    c = get_calibration("c4", tokenizer, nsamples=4, seqlen=32, seed=1, data_dir=data_dir)
    assert a.shape == (4, 32) and a.dtype == torch.int64 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_c4_local_from_env_tokenizes_lazily(tokenizer, data_dir, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(data_dir))
    calls = []

    class Counting:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, **kwargs):
            calls.append(text)
            return tokenizer(text, **kwargs)

    out = get_calibration("c4", Counting(), nsamples=8, seqlen=16, seed=3)
    assert out.shape == (8, 16)
    assert len(calls) < 100  # one tokenization per drawn document, not all 2,000
    import hashlib

    digest = hashlib.sha256((data_dir / "c4" / "c4_validation_2k.jsonl").read_bytes()).hexdigest()[:16]
    assert describe_source("c4") == f"c4 (local copy c4_validation_2k.jsonl, sha256 {digest})"  # no local path


def test_c4_matches_reference_sampling(tokenizer, tmp_path, monkeypatch):
    """Same draws as Wanda's get_c4 (random.seed; randint doc; randint(0, len - seqlen - 1)) as long as
    no document is drawn twice (we use each document once)."""
    import random

    docs = [f"doc {i} " + "word " * (i % 20) for i in range(500)]  # one in four is longer than seqlen
    docs_dir = tmp_path / "c4"
    docs_dir.mkdir()
    _write_jsonl(docs_dir / "c4_validation_2k.jsonl", [{"text": t} for t in docs])
    nsamples, seqlen = 8, 80

    random.seed(5)
    expected = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = _ids(tokenizer, docs[i], special=True)
            if len(ids) > seqlen:
                break
        s = random.randint(0, len(ids) - seqlen - 1)
        expected.append(ids[s : s + seqlen])

    out = get_calibration("c4", tokenizer, nsamples, seqlen, seed=5, data_dir=tmp_path)
    assert out.tolist() == expected


def test_wikitext2_local_uses_valid_not_test(tokenizer, data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="llmprune.calibration"):
        out = get_calibration("wikitext2", tokenizer, nsamples=3, seqlen=64, seed=0, data_dir=data_dir)
    assert out.shape == (3, 64)
    assert "valid split" in caplog.text and "valid.txt" in caplog.text
    valid = (data_dir / "wikitext2" / "tokenized" / "valid.txt").read_text(encoding="utf-8")
    # a byte window may cut a multi-byte character at its ends
    assert all(tokenizer.decode(w).strip("\ufffd") in valid for w in out)
    assert "valid.txt" in describe_source("wikitext2", data_dir=data_dir)


def test_wikitext2_never_calibrates_on_test_split(tokenizer, tmp_path, hub_offline):
    (tmp_path / "wikitext2" / "tokenized").mkdir(parents=True)
    (tmp_path / "wikitext2" / "tokenized" / "test.txt").write_text("test split text " * 100)
    with pytest.raises(CalibrationError, match="Hub could not be reached"):
        get_calibration("wikitext2", tokenizer, nsamples=2, seqlen=16, data_dir=tmp_path)


def test_hub_unreachable_without_data_dir(tokenizer, tmp_path, hub_offline):
    for source in ("c4", "wikitext2"):
        with pytest.raises(CalibrationError) as err:
            get_calibration(source, tokenizer, nsamples=2, seqlen=16, data_dir=tmp_path)  # empty folder
        msg = str(err.value)
        assert "Hub could not be reached" in msg and "--data-dir" in msg and "LLMPRUNE_DATA_DIR" in msg
        assert str(tmp_path) in msg
    with pytest.raises(CalibrationError, match="--data-dir"):
        get_calibration("c4", tokenizer, nsamples=2, seqlen=16)  # no data dir at all


def test_c4_from_hub_loader(tokenizer, monkeypatch):
    import datasets

    seen = {}

    def fake_hub(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(hf_source, "load_hub_dataset", fake_hub)
    monkeypatch.delenv("LLMPRUNE_DATA_DIR", raising=False)
    out = get_calibration("c4", tokenizer, nsamples=2, seqlen=20)
    assert out.shape == (2, 20)
    assert seen["args"] == ("allenai/c4",)
    assert seen["kwargs"] == {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}


# ----------------------------------------------------------------------------------------------
# Local files and HF datasets
# ----------------------------------------------------------------------------------------------


def test_txt_stream_has_no_bos(tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(DOCS), encoding="utf-8")
    out = get_calibration(str(path), tokenizer, nsamples=5, seqlen=24, seed=0)
    assert out.shape == (5, 24)
    stream = _ids(tokenizer, path.read_text(encoding="utf-8"))
    assert all(_is_subsequence(w, stream) for w in out)
    assert BOS not in out.tolist()[0] and (out != BOS).all()


def test_too_short_text_names_source_and_count(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"short\.txt has only 4 tokens, fewer than seqlen=16"):
        get_calibration(str(path), tokenizer, nsamples=1, seqlen=16)


@pytest.mark.parametrize("fmt", ["jsonl", "json_list", "json_data", "parquet"])
def test_record_files(tokenizer, tmp_path, fmt):
    records = [{"text": t, "id": i} for i, t in enumerate(DOCS)]
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "calib.jsonl", records)
    elif fmt == "json_list":
        path = tmp_path / "calib.json"
        path.write_text(json.dumps(records))
    elif fmt == "json_data":
        path = tmp_path / "calib.json"
        path.write_text(json.dumps({"data": records}))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        path = tmp_path / "calib.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    out = get_calibration(path, tokenizer, nsamples=4, seqlen=30, seed=2)
    assert out.shape == (4, 30)
    tokenized = [_ids(tokenizer, t, special=True) for t in DOCS]
    assert all(any(_is_subsequence(w, doc) for doc in tokenized) for w in out)


def test_text_field_and_missing_field(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "calib.jsonl", [{"body": t} for t in DOCS])
    assert get_calibration(path, tokenizer, 2, 16, text_field="body").shape == (2, 16)
    with pytest.raises(CalibrationError, match=r"no 'text' or 'messages' field \(fields: body\).*--text-field"):
        get_calibration(path, tokenizer, 2, 16)


def test_document_window_at_offset_zero_starts_with_bos(tokenizer, tmp_path):
    # seqlen bytes + BOS = seqlen + 1 tokens: the only window starts at 0, on BOS.
    path = _write_jsonl(tmp_path / "one.jsonl", [{"text": "a" * 10}])
    out = get_calibration(path, tokenizer, nsamples=1, seqlen=10)
    assert out[0, 0].item() == BOS and out[0, 1:].tolist() == _ids(tokenizer, "a" * 9)


def test_chat_records_use_chat_template(tokenizer, tmp_path):
    chats = [
        {"messages": [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "ok " * 9}]}
        for i in range(6)
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", chats)
    out = get_calibration(path, tokenizer, nsamples=3, seqlen=40, seed=1)
    rendered = [_ids(tokenizer, tokenizer.apply_chat_template(c["messages"], tokenize=False)) for c in chats]
    assert all(any(_is_subsequence(w, r) for r in rendered) for w in out)
    assert not any(r[:2] == [BOS, BOS] for r in out.tolist())  # the template's BOS is not doubled


def test_short_documents_fall_back_to_concatenation(tokenizer, tmp_path, caplog):
    path = _write_jsonl(tmp_path / "short.jsonl", [{"text": t} for t in DOCS])
    longest = max(len(_ids(tokenizer, t, special=True)) for t in DOCS)
    with caplog.at_level(logging.WARNING, logger="llmprune.calibration"):
        a = get_calibration(path, tokenizer, nsamples=4, seqlen=longest + 50, seed=0)
    b = get_calibration(path, tokenizer, nsamples=4, seqlen=longest + 50, seed=0)
    assert a.shape == (4, longest + 50) and torch.equal(a, b)
    assert "concatenated" in caplog.text
    assert (a == EOS).any(dim=1).all()  # documents joined by EOS


def test_hf_dataset_spec(tokenizer, monkeypatch):
    import datasets

    seen = {}

    def fake_hub(*args, **kwargs):
        seen.setdefault("calls", []).append((args, kwargs))
        return datasets.Dataset.from_dict({"content": DOCS})

    monkeypatch.setattr(hf_source, "load_hub_dataset", fake_hub)
    out = get_calibration("org/corpus:en:validation", tokenizer, 3, 16, text_field="content")
    assert out.shape == (3, 16)
    get_calibration("org/corpus", tokenizer, 1, 16, text_field="content")
    assert seen["calls"] == [
        (("org/corpus", "en"), {"split": "validation"}),
        (("org/corpus", None), {"split": "train"}),
    ]
    with pytest.raises(CalibrationError, match=r"no 'text' or 'messages' column \(columns: content\)"):
        get_calibration("org/corpus", tokenizer, 1, 16)


def test_hf_dataset_unreachable(tokenizer, hub_offline):
    with pytest.raises(CalibrationError, match=r"could not load HF dataset 'org/corpus:en'.*local \.jsonl/\.parquet"):
        get_calibration("org/corpus:en", tokenizer, 1, 16)


# ----------------------------------------------------------------------------------------------
# Pre-tokenized sources
# ----------------------------------------------------------------------------------------------


def test_pretokenized_tensor_rows():
    ids = torch.arange(4 * 50).reshape(4, 50)  # [n, L]
    out = get_calibration(ids, None, nsamples=3, seqlen=20, seed=0)
    assert out.shape == (3, 20) and out.dtype == torch.int64
    for row, w in zip(ids, out):  # one window per row, contiguous inside it
        start = w[0].item() - row[0].item()
        assert torch.equal(w, row[start : start + 20])
    assert not torch.equal(out, get_calibration(ids, None, nsamples=3, seqlen=20, seed=1))


def test_pretokenized_short_rows_are_concatenated_and_chunked():
    rows = [list(range(i * 10, i * 10 + 10)) for i in range(5)]  # 50 tokens in rows of 10
    out = get_calibration(rows, None, nsamples=2, seqlen=25)
    assert out.tolist() == [list(range(25)), list(range(25, 50))]
    stream = torch.arange(30, dtype=torch.int32)  # 1-D: one stream
    assert get_calibration(stream, None, nsamples=3, seqlen=10).tolist() == stream.reshape(3, 10).tolist()


def test_pretokenized_dataloader_and_reference_pairs():
    from torch.utils.data import DataLoader

    dataset = [{"input_ids": torch.arange(i, i + 16)} for i in range(6)]
    loader = DataLoader(dataset, batch_size=2)
    out = get_calibration(loader, None, nsamples=4, seqlen=16)
    assert out.tolist() == [list(range(i, i + 16)) for i in range(4)]
    assert describe_source(loader).startswith("DataLoader")

    pairs = [(torch.arange(8).unsqueeze(0) + 100 * k, torch.full((1, 8), -100)) for k in range(3)]  # (inp, tar)
    assert get_calibration(pairs, None, nsamples=3, seqlen=8).tolist() == [
        list(range(100 * k, 100 * k + 8)) for k in range(3)
    ]

    masked = [{"input_ids": torch.tensor([[5, 6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}] * 2
    assert get_calibration(masked, None, nsamples=2, seqlen=3).tolist() == [[5, 6, 7], [5, 6, 7]]
    ragged = {"input_ids": [[5, 6, 7], [8, 9, 0]], "attention_mask": [[1, 1, 1], [1, 1, 0]]}  # tokenizer output
    assert get_calibration([ragged], None, nsamples=1, seqlen=5).tolist() == [[5, 6, 7, 8, 9]]

    def endless():
        k = 0
        while True:
            yield torch.arange(k, k + 10)
            k += 1

    assert get_calibration(endless(), None, nsamples=2, seqlen=10).shape == (2, 10)


def test_pretokenized_errors():
    with pytest.raises(CalibrationError, match=r"has 12 tokens in 2 rows, fewer than nsamples\*seqlen = 2\*8 = 16"):
        get_calibration([[1] * 6, [2] * 6], None, nsamples=2, seqlen=8)
    with pytest.raises(CalibrationError, match="integer token ids"):
        get_calibration(torch.rand(2, 8), None, nsamples=1, seqlen=4)


# ----------------------------------------------------------------------------------------------
# Self-calibration
# ----------------------------------------------------------------------------------------------


def test_self_calibration(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config)
    model.train()
    state = torch.get_rng_state()
    a = get_calibration("self", tokenizer, nsamples=2, seqlen=8, seed=0, model=model)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert model.training  # mode restored
    b = get_calibration("self", tokenizer, nsamples=2, seqlen=8, seed=0, model=model)
    c = get_calibration("self", tokenizer, nsamples=2, seqlen=8, seed=1, model=model)
    assert a.shape == (2, 8) and a.dtype == torch.int64
    assert (a[:, 0] == BOS).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(CalibrationError, match="pass model="):
        get_calibration("self", tokenizer, nsamples=2, seqlen=8)


# ----------------------------------------------------------------------------------------------
# Errors and helpers
# ----------------------------------------------------------------------------------------------


def test_unknown_source_lists_choices(tokenizer):
    with pytest.raises(CalibrationError) as err:
        get_calibration("c5", tokenizer, nsamples=1, seqlen=8)
    assert str(err.value).startswith(
        "unknown calibration source 'c5'; choose one of: c4, wikitext2, self, a .txt/.jsonl/.json/.parquet path, "
        "or an HF dataset 'name[:config][:split]'"
    )


def test_missing_file(tokenizer, tmp_path):
    for source in (str(tmp_path / "nope.jsonl"), "calib.txt", "./data/calib"):
        with pytest.raises(CalibrationError, match="does not exist"):
            get_calibration(source, tokenizer, nsamples=1, seqlen=8)


def test_argument_validation(tokenizer, tmp_path):
    for kwargs in ({"nsamples": 0, "seqlen": 8}, {"nsamples": 1, "seqlen": 0}, {"nsamples": 1.5, "seqlen": 8}):
        with pytest.raises(CalibrationError, match="must be an integer >= 1"):
            get_calibration("c4", tokenizer, **kwargs)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        get_calibration("c4", None, nsamples=1, seqlen=8, data_dir=tmp_path)


def test_resolve_data_dir(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(other))
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(None) == other
    monkeypatch.delenv("LLMPRUNE_DATA_DIR")
    assert resolve_data_dir(None) is None
    with pytest.raises(CalibrationError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")


def test_describe_source(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMPRUNE_DATA_DIR", raising=False)
    assert describe_source(torch.zeros(32, 512, dtype=torch.long)) == "tensor[32x512]"
    assert describe_source("c4").startswith("c4 (hub: allenai/c4")
    assert describe_source(str(tmp_path / "x.jsonl")) == "file x.jsonl"  # a missing file: its name, no path
    assert describe_source("org/corpus:en") == "hf: org/corpus:en"
    assert describe_source([[1, 2], [3]]) == "token lists[2]"
    json.dumps([describe_source(s) for s in ("self", "wikitext2", [1, 2, 3])])
