"""Without a network: a run that needs the Hub fails at once with one line (no retries, no warnings printed
twice), and a Hub id already in the local cache is read from it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import byte_tokenizer, make_tiny_model

from llmprune.runtime.hub import hub_unreachable

REPO = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there, a connection is refused at once


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LLMPRUNE_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return {k: v for k, v in os.environ.items()}


def test_the_probe_says_why_and_stays_out_of_offline_mode(no_hub, monkeypatch):
    assert "127.0.0.1" in hub_unreachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the caches answer then: nothing to probe
    assert hub_unreachable() is None


@pytest.mark.parametrize("args, message", [
    (["--method", "wanda", "--nsamples", "2", "--seqlen", "16"], "could not load C4 (allenai/c4): the Hub could not be"),
    (["some-org/some-model", "--method", "magnitude"], "the Hub cannot be reached"),
    (["some-org/some-model", "--method", "magnitude", "--low-memory"], "the Hub cannot be reached"),
])
def test_a_run_that_needs_the_hub_fails_at_once_with_one_line(no_hub, tmp_path, args, message):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "llmprune.cli", "prune", *args, "--output", str(tmp_path / "out"),
                          "-q"], capture_output=True, text=True, env={**no_hub, "PYTHONPATH": str(REPO)}, timeout=120)
    assert res.returncode == 2 and time.perf_counter() - t0 < 30  # the Hub client's retries took 30-50 s
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: ") and message in lines[0], res.stderr
    assert "Retrying" not in res.stderr and not (tmp_path / "out").exists()


def test_a_cached_hub_id_is_read_from_the_cache(no_hub, tmp_path):
    """In a fresh process: the Hub libraries read their cache location once, when imported."""
    snapshot = tmp_path / "hub-cache" / "models--some-org--tiny" / "snapshots" / "0123abcd"
    make_tiny_model("llama").save_pretrained(snapshot)
    byte_tokenizer().save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    code = ("from llmprune.loading.models import ModelLoadError, load_pretrained\n"
            "model, tok, source = load_pretrained('some-org/tiny')\n"
            "print('LOADED', source, model.config.model_type)\n"
            "try:\n    load_pretrained('some-org/elsewhere')\nexcept ModelLoadError as e:\n    print('REFUSED', e)\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**no_hub, "PYTHONPATH": str(REPO)}, timeout=120)
    assert "LOADED some-org/tiny llama" in res.stdout, res.stderr[-2000:]
    assert "REFUSED" in res.stdout and "not in the local cache" in res.stdout
    assert "Retrying" not in res.stderr and time.perf_counter() - t0 < 30  # no request at all
