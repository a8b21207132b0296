"""The compressed sparse format: packing, bit-identical round trips (patterns x dtypes x
architectures), llmprune.load, the refusal by plain transformers, save_format and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from torch import nn

import llmprune
from llmprune.checkpoint import LOAD_HOOKS, CompressedFormatError, LoadError, compress, decompress, load
from llmprune.checkpoint.format import (
    COMPRESSED_WEIGHTS, decode, encode, index_bits, pack_bits, pack_indices, unpack_bits, unpack_indices,
)
from llmprune.cli import main
from llmprune.checkpoint.save import save_pruned

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATTERNS = ["unstructured", "2:4", "4:8"]
_INT = {4: torch.int32, 2: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so -0.0 != 0.0 and NaNs compare equal."""
    return t.contiguous().view(_INT[t.element_size()]) if t.is_floating_point() else t


def sparsify(W: torch.Tensor, pattern: str, seed: int = 0) -> torch.Tensor:
    """Zero half of ``W``: at random (unstructured) or the N smallest of every M (N:M)."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "unstructured":
        return W.masked_fill(torch.rand(W.shape, generator=g) < 0.5, 0)
    N, M = map(int, pattern.split(":"))
    groups = W.reshape(-1, M).clone()  # [G, M]
    drop = groups.float().abs().topk(M - N, dim=1, largest=False).indices
    groups.scatter_(1, drop, 0)
    return groups.view(W.shape)


def sparsify_model(model: nn.Module, pattern: str) -> None:
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.copy_(sparsify(p.data, pattern, seed=i))


def write(model: nn.Module, folder: Path, pattern: str) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["llmprune"] = {"method": "magnitude", "pattern": pattern}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(bits(sa[k]), bits(sb[k])), k


# ----------------------------------------------------------------------------------------------
# packing and single tensors
# ----------------------------------------------------------------------------------------------


def test_pack_bits_hand_computed():
    b = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    packed = pack_bits(b)
    assert packed.tolist() == [0b00001101, 0b00000001]  # little-endian bits, padded to whole bytes
    assert torch.equal(unpack_bits(packed, 9), b)


@pytest.mark.parametrize("M", [2, 4, 8, 16])
def test_pack_indices_round_trip(M):
    k = index_bits(M)
    assert k == {2: 1, 4: 2, 8: 3, 16: 4}[M]
    idx = torch.randint(0, M, (37,), generator=torch.Generator().manual_seed(M))
    packed = pack_indices(idx, k)
    assert packed.numel() == (37 * k + 7) // 8
    assert torch.equal(unpack_indices(packed, 37, k), idx)


def test_two_bits_per_kept_value_for_2of4():
    W = sparsify(torch.randn(16, 64), "2:4")
    enc = encode("w", W, (2, 4))
    assert enc.entry["encoding"] == "nm" and enc.entry["index_bits"] == 2
    assert enc.tensors["w.values"].numel() == W.numel() // 2
    assert enc.tensors["w.indices"].numel() * 8 == W.numel() // 2 * 2  # 2 bits per kept value


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_tensor_round_trip_bit_identical(pattern, dtype):
    W = sparsify(torch.randn(24, 64), pattern).to(dtype)
    nm = None if pattern == "unstructured" else tuple(map(int, pattern.split(":")))
    W[:2, :8] = 0  # first groups: fewer than N kept, so N:M holds whatever was there
    W[0, 0], W[0, 2], W[1, 1] = -0.0, 1.0, float("nan")  # a negative zero is kept as a value, a NaN survives
    enc = encode("w", W, nm)
    assert enc.entry["encoding"] == ("bitmask" if nm is None else "nm")
    stored = sum(t.numel() * t.element_size() for t in enc.tensors.values())
    assert stored < W.numel() * W.element_size() * 0.7  # half kept, small masks (bitmask, and signs of zeros)
    out = decode("w", enc.entry, enc.tensors.__getitem__)
    assert out.dtype == dtype and out.shape == W.shape
    assert torch.equal(bits(out), bits(W))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:2"])
def test_nm_decodes_in_chunks_across_byte_boundaries(pattern, monkeypatch):
    """N:M indices are unpacked a chunk of groups at a time; chunk edges fall on bytes of the packed
    indices for every index width (1, 2, 3 bits), and a last partial chunk is decoded too."""
    import llmprune.checkpoint.format as comp

    N, M = map(int, pattern.split(":"))
    W = sparsify(torch.randn(13, 8 * M), pattern, seed=1) if pattern != "1:2" else torch.randn(13, 16)
    if pattern == "1:2":
        W.view(-1, 2)[:, 1] = 0
    W = W.to(torch.bfloat16)
    enc = encode("w", W, (N, M))
    whole = decode("w", enc.entry, enc.tensors.__getitem__)
    monkeypatch.setattr(comp, "NM_CHUNK_GROUPS", 8)  # 104 groups: 13 chunks
    chunked = decode("w", enc.entry, enc.tensors.__getitem__)
    assert torch.equal(bits(chunked), bits(W)) and torch.equal(bits(whole), bits(W))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_negative_zeros_cost_a_mask_only_when_present(pattern):
    W = sparsify(torch.randn(16, 64), pattern).to(torch.bfloat16)
    nm = None if pattern == "unstructured" else tuple(map(int, pattern.split(":")))
    signed = torch.where(W == 0, -torch.sign(torch.randn(W.shape)).to(W.dtype) * 0.0, W)  # both signs of zero
    assert bool((bits(signed) == -(1 << 15)).any())
    enc = encode("w", signed, nm)
    assert enc.entry["negzero"] and "w.negzero" in enc.tensors
    assert torch.equal(bits(decode("w", enc.entry, enc.tensors.__getitem__)), bits(signed))
    assert not encode("w", W, nm).entry["negzero"]  # +0.0 only: no mask stored


def test_pruned_zeros_are_positive(calib_ids):
    """Pruners return W * M (negative weights leave -0.0); the engine stores +0.0, so no sign mask is needed."""
    model = make_tiny_model("llama")
    llmprune.prune(model, None, calibration=calib_ids, method="magnitude", sparsity=0.5, nsamples=6, seqlen=16,
                   device="cpu", progress=False)
    W = model.model.layers[0].mlp.down_proj.weight.detach()
    assert float((W == 0).float().mean()) == 0.5
    assert not bool((bits(W) == -(1 << 31)).any())
    assert not encode("w", W).entry["negzero"]


def test_dense_and_not_nm_tensors_fall_back():
    W = torch.randn(8, 16)
    assert encode("w", W, (2, 4)).entry["encoding"] == "dense"  # nothing to gain
    assert encode("n", torch.ones(16)).entry["encoding"] == "dense"  # 1-D: norms stay as they are
    U = sparsify(torch.randn(8, 16), "unstructured", seed=3)
    assert encode("u", U, (2, 4)).entry["encoding"] == "bitmask"  # declared 2:4, but this one is not


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_folder_round_trip_patterns_dtypes(pattern, dtype, tmp_path):
    model = make_tiny_model("llama").to(dtype)
    sparsify_model(model, pattern)
    dense = write(model, tmp_path / "dense", pattern)
    comp = compress(dense, tmp_path / "comp")
    layout = json.loads((comp / "config.json").read_text())["llmprune"]["compressed"]
    assert layout["encodings"][("bitmask" if pattern == "unstructured" else "nm")] >= 14  # 7 linears x 2 layers (+ head)
    assert not list(comp.glob("model.safetensors")) and (comp / COMPRESSED_WEIGHTS).is_file()
    assert layout["stored_bytes"] < 0.8 * layout["dense_bytes"]

    loaded = load(comp)
    assert_same_weights(model, loaded)
    assert loaded.dtype == dtype and not loaded.training
    back = decompress(comp, tmp_path / "back")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(back, dtype=dtype)
    assert_same_weights(model, plain)
    assert "compressed" not in json.loads((back / "config.json").read_text())["llmprune"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_round_trip(arch, tmp_path, calib_ids):
    model = make_tiny_model(arch).to(torch.bfloat16)
    sparsify_model(model, "2:4")
    dense = write(model, tmp_path / "dense", "2:4")
    comp = compress(dense, tmp_path / "comp")
    loaded = load(comp)
    assert_same_weights(model, loaded)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(dense).eval()  # what transformers makes of the dense folder
    with torch.no_grad():  # buffers (rotary tables, ...) are built alike too: the same logits
        assert torch.equal(loaded(calib_ids).logits, plain(calib_ids).logits)


def test_transformers_refuses_with_a_message(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    model = make_tiny_model("llama")
    sparsify_model(model, "unstructured")
    comp = compress(write(model, tmp_path / "dense", "unstructured"), tmp_path / "comp")
    for fn in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match=r"llmprune\.load\(PATH\).*llmprune decompress"):
            fn(comp)
    with pytest.raises(OSError, match="model.safetensors"):  # the model class directly: no weights it knows
        LlamaForCausalLM.from_pretrained(comp)


def test_tokenizer_loads_from_compressed_folder(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    comp = compress(tiny_llama_dir, tmp_path / "comp", pattern="unstructured")
    assert AutoTokenizer.from_pretrained(comp)("hi").input_ids == AutoTokenizer.from_pretrained(tiny_llama_dir)(
        "hi").input_ids


def test_load_dense_folder_and_dtype_device(tmp_path):
    model = make_tiny_model("qwen2")
    sparsify_model(model, "unstructured")
    dense = write(model, tmp_path / "dense", "unstructured")
    assert_same_weights(model, load(dense))
    comp = compress(dense, tmp_path / "comp")
    half = load(comp, dtype="bfloat16", device="cpu")
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"].bfloat16())


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(LoadError, match="not a folder"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no config.json"):
        load(tmp_path / "empty")
    with pytest.raises(LoadError, match="dtype 'int3'"):
        load(tmp_path / "empty", dtype="int3")
    model = make_tiny_model("llama")
    sparsify_model(model, "unstructured")
    comp = compress(write(model, tmp_path / "dense", "unstructured"), tmp_path / "comp")
    (comp / COMPRESSED_WEIGHTS).unlink()
    with pytest.raises(LoadError, match="incomplete"):
        load(comp)


def test_compress_refusals(tmp_path):
    model = make_tiny_model("llama")
    dense = write(model, tmp_path / "dense", "unstructured")
    comp = compress(dense, tmp_path / "comp")
    with pytest.raises(CompressedFormatError, match="already compressed"):
        compress(comp, tmp_path / "again")
    with pytest.raises(CompressedFormatError, match="not compressed"):
        decompress(dense, tmp_path / "x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        compress(dense, comp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comp", "dense"]  # no temporary folder left


def test_load_hooks_run_with_the_metadata(tmp_path):
    seen = []
    LOAD_HOOKS.append(lambda model, meta, path: seen.append((meta.get("pattern"), path)))
    try:
        model = make_tiny_model("llama")
        sparsify_model(model, "2:4")
        comp = compress(write(model, tmp_path / "dense", "2:4"), tmp_path / "comp")
        m = load(comp)
        load(comp, hooks=False)
    finally:
        LOAD_HOOKS.pop()
    assert seen == [("2:4", comp)]
    assert "compressed" not in m.config.llmprune  # the model in memory is dense: saving it writes dense


# ----------------------------------------------------------------------------------------------
# save_format and the CLI
# ----------------------------------------------------------------------------------------------


def test_save_format_compressed_from_prune(tmp_path, calib_ids):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    report = llmprune.prune(model, None, calibration=calib_ids, method="magnitude", pattern="2:4", nsamples=6,
                            seqlen=16, device="cpu", progress=False, save_format="compressed")
    out = save_pruned(model, None, tmp_path / "out", report)
    assert (out / COMPRESSED_WEIGHTS).is_file() and (out / "README.md").is_file()
    assert_same_weights(model, load(out))
    with pytest.raises(ValueError, match="llmprune decompress"):
        AutoModelForCausalLM.from_pretrained(out)
    assert "llmprune.load" in (out / "README.md").read_text()


def test_cli_compress_decompress(tmp_path, capsys):
    model = make_tiny_model("gpt2")
    sparsify_model(model, "unstructured")
    dense = write(model, tmp_path / "dense", "unstructured")
    assert main(["compress", str(dense), str(tmp_path / "c"), "-q"]) == 0
    assert main(["decompress", str(tmp_path / "c"), str(tmp_path / "d"), "-q"]) == 0
    assert_same_weights(model, load(tmp_path / "d"))
    assert main(["decompress", str(dense), str(tmp_path / "e")]) == 2
    assert "not compressed" in capsys.readouterr().err


def test_compressed_folder_through_load_model(tiny_llama_dir, tmp_path):
    """``llmprune eval`` / ``llmprune prune`` take a compressed folder as MODEL too."""
    from llmprune import load_model

    comp = compress(tiny_llama_dir, tmp_path / "comp", pattern="unstructured")
    model, tok, source = load_model(str(comp))
    assert source == str(comp) and tok("hi").input_ids
    from transformers import AutoModelForCausalLM

    assert_same_weights(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), model)



def test_load_installs_recorded_activation_thresholds(tmp_path, calib_ids):
    """The LOAD_HOOKS entry for issue 11: thresholds in the metadata come back installed, compressed or not."""
    from llmprune.activation.apply import installed

    model = make_tiny_model("llama")
    report = llmprune.prune(model, None, calibration=calib_ids, method="magnitude", sparsity=0.5, activation="teal",
                            activation_sparsity=0.5, nsamples=6, seqlen=16, device="cpu", progress=False,
                            save_format="compressed")
    out = save_pruned(model, None, tmp_path / "out", report)
    loaded = load(out)
    assert installed(loaded) is not None and installed(load(out, hooks=False)) is None
    with torch.no_grad():  # same weights, same thresholds: the same outputs as the model that was saved
        torch.testing.assert_close(loaded(calib_ids).logits, model(calib_ids).logits, atol=1e-5, rtol=0)


def test_sharded_checkpoint_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama").to(torch.bfloat16)
    sparsify_model(model, "2:4")
    model.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    assert len(list((tmp_path / "dense").glob("model-*.safetensors"))) > 1
    comp = compress(tmp_path / "dense", tmp_path / "comp", pattern="2:4")
    assert len(list(comp.glob("model.compressed-*-of-*.safetensors"))) > 1 and not list(comp.glob("model-*"))
    assert_same_weights(model, load(comp))
    back = decompress(comp, tmp_path / "back")
    assert (back / "model.safetensors.index.json").is_file()
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(back))
