"""Streaming (--low-memory): decoder layers read from the shards when reached and written once pruned
give the checkpoint of the in-memory path, tensor for tensor, on every architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCH_CONFIGS, ARCHS, byte_tokenizer
from safetensors import safe_open

from llmprune import PruneConfig, prune_checkpoint
from llmprune.loading.shards import INDEX_FILE, ShardIndex, StreamingError
from llmprune.pipeline.streaming import should_stream

TIMINGS = ("seconds", "low_memory")


def _save_tiny(arch: str, path, **overrides):
    """A tiny ``arch`` checkpoint with the byte tokenizer (259 ids: the vocabulary is widened to 272)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = ARCH_CONFIGS[arch]
    config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": 272, "bos_token_id": 0, "eos_token_id": 1,
                                                "pad_token_id": 2, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.name.startswith("model")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = f.get_tensor(k)
    return out


def _strip(block: dict) -> dict:
    block = {k: v for k, v in block.items() if k not in TIMINGS}
    if isinstance(block.get("config"), dict):
        block["config"] = {k: v for k, v in block["config"].items() if k not in TIMINGS}
    return block


def _run(src, out, low_memory, **kw):
    cfg = PruneConfig.build(dict(model=str(src), method="sparsegpt", sparsity=0.5, calib=str(src / "calib.txt"),
                                 nsamples=4, seqlen=16, device="cpu", low_memory=low_memory, **kw))
    return prune_checkpoint(cfg, out, progress=False)


@pytest.fixture
def calib_text():
    return "The quick brown fox jumps over the lazy dog. " * 40


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mixtral"])
def test_streaming_writes_the_in_memory_checkpoint(arch, tmp_path, calib_text):
    src = _save_tiny(arch, tmp_path / "src")
    (src / "calib.txt").write_text(calib_text)
    _run(src, tmp_path / "mem", False)
    _run(src, tmp_path / "stream", True)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    pruned = [k for k in b if ".0." in k and b[k].dim() == 2 and "norm" not in k and "embed" not in k]
    assert pruned and any((b[k] == 0).float().mean() >= 0.45 for k in pruned)  # the layers were pruned
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    index = json.loads((tmp_path / "stream" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    for k, shard in index["weight_map"].items():
        with safe_open(tmp_path / "stream" / shard, "pt") as f:
            assert k in f.keys()
    ca = json.loads((tmp_path / "mem" / "config.json").read_text())
    cb = json.loads((tmp_path / "stream" / "config.json").read_text())
    la, lb = _strip(ca.pop("llmprune")), _strip(cb.pop("llmprune"))
    assert ca == cb and la == lb
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "mem" / name).exists() == (tmp_path / "stream" / name).exists()
        if (tmp_path / "mem" / name).exists():
            assert (tmp_path / "mem" / name).read_text() == (tmp_path / "stream" / name).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging and temp folders removed


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_pages_of_the_spilled_hidden_states_leave_memory_and_keep_their_data(tmp_path):
    """A streamed run's hidden states live in a shared file mapping; a chunk done with leaves the resident
    set (its data stays in the file); a chunk outside that buffer (a resumed run's) is left alone."""
    import os

    from llmprune.engine.passes import SequentialRun

    path = tmp_path / "hidden.bin"
    path.touch()
    buffer = torch.from_file(str(path), shared=True, size=4 * 2**23, dtype=torch.float32).view(4, -1)  # 4 x 32 MB
    os.unlink(path)
    buffer.copy_(torch.randn(buffer.shape))
    want = buffer.clone()
    run = SequentialRun.__new__(SequentialRun)
    run._spill_ptr = buffer.untyped_storage().data_ptr()
    hidden = list(buffer.split(1))
    elsewhere = torch.randn(1, 2**20)
    hidden.append(elsewhere)
    before = _resident_mb()
    run._done_with(hidden, 1)
    assert before - _resident_mb() > 28  # one 32 MB chunk dropped
    run._done_with(hidden)
    assert before - _resident_mb() > 4 * 28
    assert torch.equal(buffer, want) and torch.equal(hidden[-1], elsewhere)  # read back from the file
    run._spill_ptr = None  # no spilled buffer: nothing is touched
    run._done_with(hidden)
    assert torch.equal(buffer, want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streaming_casts_as_the_in_memory_path(arch, tmp_path, calib_text, monkeypatch):
    """A float32 checkpoint pruned in bfloat16: the layers and the parts outside them (copied to the output
    in blocks of rows, here 3 rows at a time) are cast alike."""
    import llmprune.loading.shards as stream

    src = _save_tiny(arch, tmp_path / "src")
    (src / "calib.txt").write_text(calib_text)
    monkeypatch.setattr(stream, "ROW_BLOCK_BYTES", 3 * 4 * ARCH_CONFIGS[arch][1].get("hidden_size", 64))
    _run(src, tmp_path / "mem", False, dtype="bfloat16")
    _run(src, tmp_path / "stream", True, dtype="bfloat16")
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b) and {t.dtype for t in b.values() if t.is_floating_point()} == {torch.bfloat16}
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_rows_are_the_rows_of_the_tensor(tmp_path, monkeypatch, dtype):
    from safetensors.torch import save_file

    import llmprune.loading.shards as stream

    t = torch.randn(1000, 7).to(dtype)
    save_file({"w": t, "b": torch.arange(5)}, tmp_path / "model.safetensors")
    index = ShardIndex(tmp_path)
    monkeypatch.setattr(stream, "ROW_BLOCK_BYTES", 7 * dtype.itemsize * 64)  # blocks of 64 rows
    for rows in ([0], [999], list(range(1000)), [3, 4, 5, 63, 64, 65, 500, 998, 999], list(range(1, 1000, 97))):
        got = index.get_rows("w", rows)
        assert got.dtype == dtype and torch.equal(got, t[rows]), rows
    assert index.dtype_of("w") == dtype and index.dtype_of("b") == torch.int64


@pytest.mark.parametrize("arch", ["llama", "opt"])  # an untied head; a tied one and learned positions
def test_a_capture_reads_only_the_embedding_rows_it_looks_up(arch, tmp_path, calib_text, monkeypatch):
    import llmprune.pipeline.streaming as stream

    src = _save_tiny(arch, tmp_path / "src")
    (src / "calib.txt").write_text(calib_text)
    models, captured = [], []
    real_build, real_set_aside = stream.build_skeleton, stream.ShardStream.set_aside

    def build(folder, config, **kw):
        model, index = real_build(folder, config, **kw)
        models.append(model)
        return model, index

    def set_aside(self, model, layers):
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        captured.append((emb.weight.device.type, emb.weight.shape[0], emb.padding_idx, head.weight.device.type))
        real_set_aside(self, model, layers)

    monkeypatch.setattr(stream, "build_skeleton", build)
    monkeypatch.setattr(stream.ShardStream, "set_aside", set_aside)
    _run(src, tmp_path / "stream", True)
    rows = len(set(calib_text.encode()))
    assert captured[0] == ("meta", 272, 2, "meta")  # the skeleton: nothing read; padding index: pad_token_id
    device, n, padding_idx, head = captured[1]  # when the capture ends
    assert (device, padding_idx, head) == ("cpu", None, "meta") and n <= rows < 272
    emb = models[0].get_input_embeddings()
    # after the writing: the whole vocabulary's shape again, never read whole (copied to the output block by
    # block), the lookup hook gone
    assert emb.weight.shape[0] == 272 and emb.weight.device.type == "meta" and not emb._forward_pre_hooks
    assert emb.padding_idx == 2
    _run(src, tmp_path / "mem", False)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_with_an_observe_pass_and_sharded_input(tmp_path, calib_text, monkeypatch, caplog):
    """OWL reads every dense layer first (fetch / observed), and the input may itself be sharded. The
    tensors outside the layers (tied embeddings and head) are set aside while layers run and read again
    for each capture and for the writing; chunks are replayed when streamed, in lockstep in memory."""
    from transformers import AutoModelForCausalLM

    src = _save_tiny("llama", tmp_path / "src", num_hidden_layers=4, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(src, max_shard_size="100KB")
    assert (src / INDEX_FILE).is_file()
    (src / "calib.txt").write_text(calib_text)
    kw = dict(allocation="owl", owl_lambda=0.1, batch_size=2)  # 2 chunks
    ra = _run(src, tmp_path / "mem", False, **kw)
    import llmprune.pipeline.streaming as stream

    resident = []  # decoder layers holding real weights whenever one is read: never more than that one
    real_acquire = stream.ShardStream.acquire

    def acquire(self, index, layer):
        from llmprune.engine import find_decoder_layers

        real_acquire(self, index, layer)
        _, layers = find_decoder_layers(layer_owner[0])
        resident.append(sum(any(p.device.type != "meta" for p in lay.parameters()) for lay in layers))
        embeddings.append(layer_owner[0].get_input_embeddings().weight.device.type)

    embeddings = []
    layer_owner = []
    real_build = stream.build_skeleton

    def build(folder, config, **kw):
        model, index = real_build(folder, config, **kw)
        layer_owner.append(model)
        return model, index

    captured = []  # rows of the input embedding when each capture ends, and its head then
    real_set_aside = stream.ShardStream.set_aside

    def set_aside(self, model, layers):
        emb = model.get_input_embeddings().weight
        captured.append((emb.device.type, emb.shape[0], model.get_output_embeddings().weight.device.type))
        real_set_aside(self, model, layers)

    monkeypatch.setattr(stream.ShardStream, "acquire", acquire)
    monkeypatch.setattr(stream.ShardStream, "fetch", acquire)
    monkeypatch.setattr(stream.ShardStream, "set_aside", set_aside)
    monkeypatch.setattr(stream, "build_skeleton", build)
    import logging

    with caplog.at_level(logging.INFO, logger="llmprune"):
        rb = _run(src, tmp_path / "stream", True, **kw)
    assert "spilled to a file: a streamed run holds one chunk at a time" in caplog.text  # and dropped chunk by chunk
    assert resident == [1] * 8  # 4 layers observed, then 4 pruned, one at a time
    assert embeddings == ["meta"] * 8  # set aside while the layers run
    # never read whole before the writing: on the meta device from the skeleton, then for each capture (observe,
    # prune) only the rows of the calibration's tokens, the tied head left on the meta device
    rows = len(set(calib_text.encode()))
    assert captured[0] == ("meta", 272, "meta") and len(captured) == 3
    assert all(c == ("cpu", c[1], "meta") and c[1] <= rows < 272 for c in captured[1:]), captured
    model = layer_owner[0]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied again
    assert model.get_input_embeddings().weight.device.type == "meta"  # copied to the output, never read whole
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert ra.layer_targets == rb.layer_targets and len({t for t, _ in rb.layer_targets}) > 1
    assert (ra.execution, rb.execution) == ("lockstep", "replay")


def test_converted_layouts_are_refused_with_the_fix(tmp_path, calib_text):
    src = _save_tiny("mixtral", tmp_path / "src")
    (src / "calib.txt").write_text(calib_text)
    with pytest.raises(StreamingError, match="without --low-memory"):
        _run(src, tmp_path / "out", True)
    assert not (tmp_path / "out").exists()


def test_auto_streams_only_when_the_weights_do_not_fit(tmp_path, monkeypatch, caplog):
    import llmprune.pipeline.streaming as stream

    src = _save_tiny("llama", tmp_path / "src")
    weights = ShardIndex(src).nbytes()
    cfg = PruneConfig.build(dict(model=str(src), dtype="float32"))
    monkeypatch.setattr(stream, "available_memory", lambda: 100 * weights)
    assert not should_stream(cfg)
    monkeypatch.setattr(stream, "available_memory", lambda: weights)
    with caplog.at_level("INFO", logger="llmprune.pipeline.streaming"):
        assert should_stream(cfg)
    assert "do not fit" in caplog.text
    assert not should_stream(PruneConfig.build(dict(model=str(src), low_memory=False)))
    assert should_stream(PruneConfig.build(dict(model=str(src), low_memory=True)))


def test_streaming_refuses_what_needs_the_whole_model(tmp_path):
    from llmprune.config import ConfigError

    src = _save_tiny("llama", tmp_path / "src")
    cfg = PruneConfig.build(dict(model=str(src), low_memory=True, calib="self"))
    with pytest.raises(ConfigError, match="--no-low-memory"):
        prune_checkpoint(cfg, tmp_path / "out", progress=False)


def test_cli_low_memory(tmp_path, calib_text, monkeypatch):
    import llmprune.pipeline.streaming
    from llmprune import cli
    from llmprune.cli import main

    calls: list[str] = []
    monkeypatch.setattr(llmprune.pipeline.streaming, "STREAM_HOOKS", [])
    monkeypatch.setattr(cli, "_heap_for_streaming", lambda: calls.append("heap"))  # the CLI's process setting
    src = _save_tiny("qwen2", tmp_path / "src")
    (src / "calib.txt").write_text(calib_text)
    rc = main(["prune", str(src), "--method", "wanda", "--sparsity", "0.5", "--calib", str(src / "calib.txt"),
               "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--low-memory", "--output",
               str(tmp_path / "out"), "--quiet"])
    assert rc in (0, None) and calls == ["heap"]  # registered by the CLI, run once the run streams
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 3  # the rest, then one shard per decoder layer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (model.model.layers[1].mlp.up_proj.weight == 0).float().mean() == 0.5
