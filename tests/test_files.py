"""Atomic writes (llmprune.runtime.files): a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmprune.runtime.files import (replace_atomic, save_tensors_atomic, torch_save_atomic, write_json_atomic,
                                    write_text_atomic)


def test_each_writer_round_trips_and_leaves_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "a" / "x.json", {"b": 1, "a": [2]}, sort_keys=True)
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"a": [2], "b": 1}
    write_text_atomic(tmp_path / "t.md", "é\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "é\n"
    save_tensors_atomic(tmp_path / "w.safetensors", {"w": torch.arange(6.0).view(2, 3).t()})  # non-contiguous
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.arange(6.0).view(2, 3).t())
    torch_save_atomic(tmp_path / "s.pt", {"step": 3})
    assert torch.load(tmp_path / "s.pt") == {"step": 3}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "progress.json"
    write_json_atomic(path, {"step": 1})

    def fails(tmp):
        tmp.write_text('{"step": ')  # half written, then the process dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomic(path, fails)
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.json"]
