"""Pushing to the Hub against a local HTTP server on 127.0.0.1 that answers the endpoints
huggingface_hub's client calls (repo create, branch, preupload, commit): what arrives, the commit,
where the token goes, and what a failure leaves behind."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest
from conftest import make_tiny_model

import llmprune
from llmprune.checkpoint.hub import PushError, push
from llmprune.checkpoint.save import save_pruned

TOKEN = "hf_test_SECRET_token_0123456789"
REPO = Path(__file__).resolve().parents[1]


class FakeHub:
    """Records every request; ``fail`` = HTTP status to answer every request with (None: succeed)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail: int | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                hub.requests.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
                base = f"http://127.0.0.1:{self.server.server_port}"
                status, out = 200, {}
                if hub.fail is not None:
                    status, out = hub.fail, {"error": "simulated failure"}
                elif self.path.startswith("/api/repos/create"):
                    name = json.loads(body)
                    out = {"url": f"{base}/{name['organization']}/{name['name']}", "name": name["name"]}
                elif "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    out = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                     for f in files]}
                elif "/commit/" in self.path:
                    pr = "create_pr=1" in self.path
                    out = {"commitUrl": f"{base}/o/n/commit/{'a' * 40}", "commitOid": "a" * 40,
                           "pullRequestUrl": f"{base}/o/n/discussions/1" if pr else None}
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def commits(self) -> list[dict]:
        return [r for r in self.requests if "/commit/" in r["path"]]

    def committed(self) -> tuple[dict, dict[str, bytes]]:
        """(header, {path: content}) of the last commit (NDJSON: a header line, then one line per file)."""
        lines = [json.loads(x) for x in self.commits()[-1]["body"].decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
        return header, files


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    server.thread.start()
    # huggingface_hub reads HF_ENDPOINT once, at import, into constants.ENDPOINT; HfApi() takes it from there
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # CI runs with HF_HUB_OFFLINE=1 (nothing may reach the real Hub); this fake Hub is on 127.0.0.1
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    report = llmprune.prune(model, None, calibration=ids, method="magnitude", pattern="2:4", nsamples=6,
                            seqlen=16, device="cpu", progress=False)
    return save_pruned(model, None, tmp_path_factory.mktemp("ck") / "out", report)


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()[:4096])
            for p in sorted(folder.rglob("*"))}


def test_push_files_commit_and_token(hub, checkpoint, caplog):
    caplog.set_level(logging.DEBUG)
    before = snapshot(checkpoint)
    r = push(checkpoint, "o/n", commit_message="first sparse upload", private=True)
    header, files = hub.committed()
    assert header["summary"] == "first sparse upload"
    local = {p.name for p in checkpoint.iterdir()}
    assert set(files) == local | {"README.md"} and set(r.files) == set(files)
    for name in local - {"README.md"}:
        assert files[name] == (checkpoint / name).read_bytes(), name  # every byte arrives
    card = files["README.md"].decode()
    assert 'from_pretrained("o/n")' in card  # the card names the repo it lands in
    create = next(q for q in hub.requests if q["path"].startswith("/api/repos/create"))
    assert json.loads(create["body"]) == {"name": "n", "organization": "o", "type": "model", "visibility": "private"}
    assert len(hub.commits()) == 1  # one commit
    for q in hub.requests:  # the token only ever travels as the Authorization header
        if "/api/repos/create" in q["path"] or "/preupload/" in q["path"] or "/commit/" in q["path"]:
            assert q["headers"].get("authorization") == f"Bearer {TOKEN}", q["path"]
        assert q["headers"].get("authorization") in (None, f"Bearer {TOKEN}"), q["path"]
        others = {k: v for k, v in q["headers"].items() if k != "authorization"}
        assert TOKEN not in json.dumps(others) and TOKEN.encode() not in q["body"] and TOKEN not in q["path"]
    assert TOKEN not in caplog.text and TOKEN not in card and TOKEN not in repr(r)
    assert snapshot(checkpoint) == before  # the local folder is only read


def test_push_revision_and_pr(hub, checkpoint):
    push(checkpoint, "o/n", revision="sparse-v2")
    assert any(q["path"] == "/api/models/o/n/branch/sparse-v2" for q in hub.requests)
    assert hub.commits()[-1]["path"].startswith("/api/models/o/n/commit/sparse-v2")
    r = push(checkpoint, "o/n", create_pr=True)
    assert "create_pr=1" in hub.commits()[-1]["path"] and r.pr_url.endswith("/discussions/1")
    push(checkpoint, "o/n")  # pushing again is safe
    assert len(hub.commits()) == 3


@pytest.mark.parametrize("status,why", [(500, "server error"), (401, "authentication"), (404, "not found")])
def test_failed_push_says_why_and_leaves_folder(hub, checkpoint, status, why):
    before = snapshot(checkpoint)
    hub.fail = status
    with pytest.raises(PushError, match=why) as e:
        push(checkpoint, "o/n")
    assert TOKEN not in str(e.value) and "local checkpoint is unchanged" in str(e.value)
    assert snapshot(checkpoint) == before
    assert not list(checkpoint.parent.glob(".*"))  # nothing left beside it either


def test_network_failure(monkeypatch, checkpoint):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(PushError, match="network") as e:
        push(checkpoint, "o/n", token=TOKEN)
    assert TOKEN not in str(e.value)


def test_refuses_incomplete_or_foreign_folders(hub, checkpoint, tmp_path):
    (tmp_path / "plain").mkdir()
    make_tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(PushError, match="hf upload"):
        push(tmp_path / "plain", "o/n")
    import shutil

    broken = Path(shutil.copytree(checkpoint, tmp_path / "broken"))
    (broken / "model.safetensors").unlink()
    with pytest.raises(PushError, match="incomplete"):
        push(broken, "o/n")
    with pytest.raises(PushError, match="OWNER/NAME"):
        push(checkpoint, "not-a-repo-id")
    assert hub.requests == []  # refused before any request


def test_push_compressed_and_in_memory_model(hub, checkpoint, tmp_path):
    comp = llmprune.compress(checkpoint, tmp_path / "comp")
    push(comp, "o/c")
    _, files = hub.committed()
    assert "model.compressed.safetensors" in files and "llmprune.load(" in files["README.md"].decode()
    model = llmprune.load(comp)
    push(model, "o/m", commit_message="from memory")
    header, files = hub.committed()
    assert header["summary"] == "from memory" and "model.safetensors" in files


def test_pushed_adapter_names_the_repo_as_its_base(hub, checkpoint, tmp_path):
    """An EoRA adapter pushed beside its sparse base must point at the repo, not at the dense source model:
    transformers (with peft) and AutoPeftModel load a Hub repo's base from base_model_name_or_path."""
    import shutil

    folder = tmp_path / "with-adapter"
    shutil.copytree(checkpoint, folder)
    cfg = {"peft_type": "LORA", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 8}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    push(folder, "o/eora")
    _, files = hub.committed()
    sent = json.loads(files["adapter_config.json"])
    assert sent == {**cfg, "base_model_name_or_path": "o/eora"}
    assert json.loads((folder / "adapter_config.json").read_text()) == cfg  # the local folder is only read
    comp = llmprune.compress(folder, tmp_path / "comp")  # a copy names itself too
    assert json.loads((comp / "adapter_config.json").read_text())["base_model_name_or_path"] == str(comp.resolve())
    dense = llmprune.decompress(comp, tmp_path / "dense")
    assert json.loads((dense / "adapter_config.json").read_text())["base_model_name_or_path"] == str(dense.resolve())


def test_cli_push_reads_hf_endpoint_and_token_from_environment(hub, checkpoint):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = subprocess.run([sys.executable, "-m", "llmprune.cli", "push", str(checkpoint), "o/cli", "-m", "via cli"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pushed" in out.stdout and TOKEN not in out.stdout + out.stderr
    assert hub.committed()[0]["summary"] == "via cli"
    hub.fail = 500
    out = subprocess.run([sys.executable, "-m", "llmprune.cli", "push", str(checkpoint), "o/cli"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "server error" in out.stderr and TOKEN not in out.stderr


def test_cli_prune_save_format_and_push_to_hub(hub, tiny_llama_dir, tmp_path):
    from llmprune.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(80)))
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), "--method", "magnitude", "--pattern", "2:4", "--calib", str(calib),
               "--nsamples", "4", "--seqlen", "16", "--device", "cpu", "--save-format", "compressed",
               "--output", str(out), "--push-to-hub", "o/pruned", "--private", "--quiet"])
    assert rc == 0
    header, files = hub.committed()
    assert "model.compressed.safetensors" in files and "tokenizer.json" in files
    assert header["summary"] == "Upload magnitude 2:4 checkpoint with llmprune"
    assert files["llmprune_report.json"] == (out / "llmprune_report.json").read_bytes()
