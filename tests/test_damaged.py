"""Damaged or inconsistent checkpoints on every path (issue 27, item 2): a truncated weights file, a corrupt
header, tensors whose bytes do not fit their header, an index naming a missing shard, an index that is not
JSON, a config.json whose shapes differ from the weights', a missing or broken tokenizer, a config without
weights, a config.json that is not JSON; each through the CLI on every path: prune in memory, streamed,
``--resume`` after a killed run, eval, compress, decompress, push (to a fake Hub). Each ends in one line
``llmprune: error: ...`` naming the file and the fix, exit 2, no traceback, and nothing written: no output,
no scratch folder beside it, the killed run's progress untouched, no request to the Hub. The same path on
the intact copy succeeds, so each refusal is the damage's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import byte_tokenizer
from test_hub import FakeHub, TOKEN
from test_resume import KILLER
from test_stream import _save_tiny

import llmprune
from llmprune import PruneConfig, prune_checkpoint
from llmprune.checkpoint import compress, decompress, push
from llmprune.checkpoint.hub import PushError
from llmprune.checkpoint.load import LoadError, load_model
from llmprune.cli import main
from llmprune.engine.residency.resume import PROGRESS_FILE, leftovers, partial_folder
from llmprune.loading.integrity import CheckpointFileError

REPO = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog. " * 60
PATHS = ("mem", "stream", "resume", "eval", "compress", "decompress", "push")
INDEX = "model.safetensors.index.json"
AGAIN = "copy or download the checkpoint again"
# the settings of every prune here, and of the killed run --resume continues (paths relative to its folder)
SETTINGS = dict(method="magnitude", sparsity=0.5, nsamples=4, seqlen=16, device="cpu")


# ---- the damage: each changes the checkpoint folder ``src`` in place and returns what the message must name ----
def _weights(src: Path) -> Path:
    """The first weights file: ``model.safetensors``, a shard, or the compressed weights."""
    return sorted(src.glob("*.safetensors"))[0]


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n :])


def truncated(src: Path) -> list[str]:
    path = _weights(src)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])  # a copy cut short
    return [str(path), "is truncated"]


def corrupt_header(src: Path) -> list[str]:
    path = _weights(src)
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\x00 overwritten by a bad sector \x00"  # the header's first bytes
    path.write_bytes(bytes(raw))
    return [str(path), "corrupt header"]


def bytes_unlike_header(src: Path) -> list[str]:
    """One tensor's shape doubled in the header: the bytes its offsets give no longer fit it."""
    path = _weights(src)

    def double(header: dict) -> None:
        name = next(k for k, v in sorted(header.items()) if k != "__metadata__" and len(v["shape"]) == 2)
        header[name]["shape"][0] *= 2

    _rewrite_header(path, double)
    return [str(path), "the file is damaged"]


def index_names_missing_shard(src: Path) -> list[str]:
    if (src / INDEX).is_file():
        shard = sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))[-1]
    else:  # compressed: the layout in config.json is its index
        shard = json.loads((src / "config.json").read_text())["llmprune"]["compressed"]["files"][-1]
    (src / shard).unlink()
    return [str(src), shard]


def index_not_json(src: Path) -> list[str]:
    (src / INDEX).write_text('{"metadata": {"total_size": 1}, "weight_map": {')
    return [str(src / INDEX), "is not valid JSON"]


def config_unlike_weights(src: Path) -> list[str]:
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = 32  # was 64: every stored matrix is now the wrong size
    (src / "config.json").write_text(json.dumps(config))
    return [str(src / "config.json"), "does not match the weights"]


def no_tokenizer(src: Path) -> list[str]:
    for path in [*src.glob("tokenizer*"), *src.glob("special_tokens_map.json")]:
        path.unlink()
    return [str(src), "has no tokenizer"]


def broken_tokenizer(src: Path) -> list[str]:
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return [str(src / "tokenizer.json"), "is not valid JSON"]


def no_weights(src: Path) -> list[str]:
    for path in [*src.glob("*.safetensors"), *src.glob(INDEX)]:
        path.unlink()
    return [str(src)]


def config_not_json(src: Path) -> list[str]:
    (src / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return [str(src / "config.json"), "is not valid JSON"]


# case -> (damage, the fix its message names)
CASES = {
    "truncated": (truncated, AGAIN),
    "corrupt header": (corrupt_header, AGAIN),
    "bytes unlike header": (bytes_unlike_header, AGAIN),
    "index names missing shard": (index_names_missing_shard, "copy or download"),
    "index not json": (index_not_json, AGAIN),
    "config unlike weights": (config_unlike_weights, "restore the config.json"),
    "no tokenizer": (no_tokenizer, "copy the tokenizer files"),
    "broken tokenizer": (broken_tokenizer, AGAIN),
    "no weights": (no_weights, "copy the weight files"),
    "config not json": (config_not_json, AGAIN),
}
# where a path words the fix its own way (push: the checkpoint is llmprune's own output, written again)
FIX = {("no weights", "compress"): "copy its weight files", ("no weights", "decompress"): "copy or download it again",
       ("no weights", "push"): "write the checkpoint again", ("index names missing shard", "push"):
       "write the checkpoint again", ("config not json", "push"): "write it again"}
SHARDED = ("index names missing shard", "index not json")  # need a checkpoint with an index
SKIP = {
    ("index not json", "decompress"): "a compressed checkpoint has no index file: its layout lives in config.json "
                                      "(the 'config not json' case)",
    **{("no tokenizer", p): f"a checkpoint need not carry a tokenizer (saved without one); {p} passes on the files "
                            "there are" for p in ("compress", "decompress", "push")},
}


# ---- the inputs --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Intact inputs of every path: dense checkpoints (one file, and shards with an index), pruned ones (what
    push takes), compressed ones (what decompress takes), and a folder where a streamed run of ``src`` into
    ``out`` was killed (SIGKILL) after its first layer, its progress kept for --resume."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("damaged")
    (root / "calib.txt").write_text(TEXT)
    dense = _save_tiny("llama", root / "dense")
    sharded = root / "dense-sharded"
    AutoModelForCausalLM.from_pretrained(dense).save_pretrained(sharded, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(sharded)
    assert (sharded / INDEX).is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    settings = {**SETTINGS, "calib": str(root / "calib.txt")}
    prune_checkpoint(PruneConfig.build({**settings, "model": str(dense)}), root / "pruned", progress=False)
    prune_checkpoint(PruneConfig.build({**settings, "model": str(sharded), "low_memory": True}),
                     root / "pruned-sharded", progress=False)  # a streamed run writes shards and an index
    compress(root / "pruned", root / "compressed")
    compress(root / "pruned-sharded", root / "compressed-sharded")
    killed = root / "killed"
    killed.mkdir()
    shutil.copytree(sharded, killed / "src")
    (killed / "calib.txt").write_text(TEXT)
    run = json.dumps({**SETTINGS, "model": "src", "calib": "calib.txt", "low_memory": True})
    proc = subprocess.run([sys.executable, "-c", KILLER, run, "out", "0"], cwd=killed, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (partial_folder(killed / "out") / PROGRESS_FILE).is_file()
    return {"root": root, "dense": dense, "dense-sharded": sharded, "pruned": root / "pruned",
            "pruned-sharded": root / "pruned-sharded", "compressed": root / "compressed",
            "compressed-sharded": root / "compressed-sharded", "killed": killed}


def _setup(path: str, sharded: bool, bases: dict[str, Path], tmp_path: Path, monkeypatch) -> tuple[Path, Path, list]:
    """``(work, src, argv)``: a copy of the input ``path`` takes, in ``work``, and its command line."""
    work = tmp_path / "work"
    calib = str(bases["root"] / "calib.txt")
    prune = ["--method", SETTINGS["method"], "--sparsity", str(SETTINGS["sparsity"]), "--nsamples", "4",
             "--seqlen", "16", "--device", "cpu", "-q"]
    if path == "resume":  # the killed run's folder: the same relative paths, so its config and model match
        shutil.copytree(bases["killed"], work)
        monkeypatch.chdir(work)
        return work, Path("src"), ["prune", "src", "--output", "out", "--resume", "--calib", "calib.txt", *prune]
    base = {"decompress": "compressed", "push": "pruned"}.get(path, "dense") + ("-sharded" if sharded else "")
    work.mkdir()
    src = Path(shutil.copytree(bases[base], work / "src"))
    out = str(work / "out")
    argv = {"mem": ["prune", str(src), "--output", out, "--calib", calib, *prune],
            "stream": ["prune", str(src), "--output", out, "--calib", calib, "--low-memory", *prune],
            "eval": ["eval", str(src), "--ppl", calib, "--device", "cpu", "-q"],
            "compress": ["compress", str(src), out, "-q"],
            "decompress": ["decompress", str(src), out, "-q"],
            "push": ["push", str(src), "o/n", "-q"]}[path]
    return work, src, argv


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub push talks to: a local server (tests/test_hub.py), with a token; nothing reaches the real Hub."""
    import huggingface_hub.constants

    server = FakeHub()
    server.thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.server.shutdown()
    server.server.server_close()


def _params():
    for case in CASES:
        for path in PATHS:
            reason = SKIP.get((case, path))
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            yield pytest.param(case, path, marks=marks, id=f"{case.replace(' ', '-')}-{path}")


# ---- the tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, path", list(_params()))
def test_damaged_input_one_line_exit_2_nothing_written(case, path, bases, tmp_path, monkeypatch, capsys, request):
    hub = request.getfixturevalue("fake_hub") if path == "push" else None
    work, src, argv = _setup(path, case in SHARDED, bases, tmp_path, monkeypatch)
    damage, fix = CASES[case]
    expected = [*damage(src), FIX.get((case, path), fix)]
    before = _snapshot(work)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), err
    assert "Traceback" not in err + out
    for text in expected:  # the file, what is wrong with it, the fix
        assert text in lines[0], (text, lines[0])
    assert _snapshot(work) == before  # nothing written, nothing removed (the killed run's progress stays)
    output = work / "out"
    assert not output.exists() and leftovers(output) == []
    if hub is not None:
        assert hub.requests == []  # refused before any request


@pytest.mark.parametrize("path", PATHS)
def test_intact_input_passes(path, bases, tmp_path, monkeypatch, capsys, request):
    """The same command on the intact copy succeeds: the refusals above are the damage's."""
    hub = request.getfixturevalue("fake_hub") if path == "push" else None
    work, _, argv = _setup(path, path == "resume", bases, tmp_path, monkeypatch)
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err
    if path in ("mem", "stream", "resume", "compress", "decompress"):
        assert (work / "out" / "config.json").is_file()
    if path == "resume":
        assert not partial_folder(work / "out").exists()  # continued from the progress, then removed it
    if hub is not None:
        assert len(hub.commits()) == 1


# the Python API: each entry point raises its typed error with the same message (truncated model.safetensors)
API = {
    "prune_checkpoint": ("dense", CheckpointFileError, lambda src, out, calib: prune_checkpoint(
        PruneConfig.build({**SETTINGS, "model": str(src), "calib": calib}), out, progress=False)),
    "prune_checkpoint streamed": ("dense", CheckpointFileError, lambda src, out, calib: prune_checkpoint(
        PruneConfig.build({**SETTINGS, "model": str(src), "calib": calib, "low_memory": True}), out, progress=False)),
    "load_model": ("dense", CheckpointFileError, lambda src, out, calib: load_model(str(src))),
    "llmprune.load": ("dense", LoadError, lambda src, out, calib: llmprune.load(src)),
    "compress": ("dense", CheckpointFileError, lambda src, out, calib: compress(src, out)),
    "decompress": ("compressed", CheckpointFileError, lambda src, out, calib: decompress(src, out)),
    "push": ("pruned", PushError, lambda src, out, calib: push(src, "o/n")),
}


@pytest.mark.parametrize("entry", list(API))
def test_python_api_raises_the_typed_error(entry, bases, tmp_path, request):
    hub = request.getfixturevalue("fake_hub") if entry == "push" else None
    base, error, call = API[entry]
    src = Path(shutil.copytree(bases[base], tmp_path / "src"))
    damaged, _ = truncated(src)
    before = _snapshot(tmp_path)
    with pytest.raises(error, match=re.escape(repr(damaged)) + " is truncated"):
        call(src, tmp_path / "out", str(bases["root"] / "calib.txt"))
    assert _snapshot(tmp_path) == before and leftovers(tmp_path / "out") == []
    if hub is not None:
        assert hub.requests == []
