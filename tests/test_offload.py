"""The disk offloader: layers written out and mapped back, the parts outside the layers set aside,
and the heap trimmed only when fragmentation has grown the resident set."""

from __future__ import annotations

import torch
from torch import nn

import llmprune.engine.residency.offload as offload
from llmprune.engine import find_decoder_layers
from llmprune.engine.residency.offload import DiskOffloader


class _FakeLibc:
    def __init__(self):
        self.trims = 0
        self.paged_out = 0

    def malloc_trim(self, pad):
        self.trims += 1
        return 1

    def madvise(self, addr, length, advice):
        self.paged_out += 1
        return 0


def test_release_maps_layers_back_from_disk_with_the_same_values(tmp_path):
    layer = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    off = DiskOffloader(tmp_path)
    off.acquire(0, layer)
    layer[0].weight.data.mul_(2)  # pruning writes the acquired copy
    off.release(0, layer)
    assert torch.equal(layer[0].weight, 2 * before["0.weight"])
    assert torch.equal(layer[1].bias, before["1.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.0.bias.bin", "0.0.weight.bin", "0.1.bias.bin",
                                                           "0.1.weight.bin"]
    assert off.bytes == sum(v.numel() * 4 for v in before.values())


def test_heap_is_trimmed_only_when_the_resident_set_grows(tmp_path, monkeypatch):
    rss = iter([100, 104, 106, 103, 200])  # after the layers 0..4; the first is the reference
    monkeypatch.setattr(offload, "_resident_bytes", lambda: next(rss))
    off = DiskOffloader(tmp_path)
    off._libc = fake = _FakeLibc()
    for i in range(5):
        layer = nn.Linear(4, 4)
        off.acquire(i, layer)
        off.release(i, layer)
    assert fake.trims == off.trims == 2  # 106 and 200 exceed 1.05 x 100
    assert offload.TRIM_GROWTH == 1.05


def test_set_aside_pages_out_only_what_lies_outside_the_layers(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    _, layers = find_decoder_layers(model)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [p for p in model.parameters() if id(p) not in inside]  # embeddings, final norm (head tied)
    values = [p.detach().clone() for p in outside]
    off = DiskOffloader(tmp_path)
    seen = []
    off._page_out = lambda t: seen.append(t.data_ptr())
    off.set_aside(model, list(layers))
    assert sorted(seen) == sorted(p.data_ptr() for p in outside)
    off._libc = fake = _FakeLibc()
    off.set_aside(model, list(layers))
    assert fake.trims == 1  # and what loading and capturing freed goes back
    real = DiskOffloader(tmp_path)
    real.set_aside(model, list(layers))  # advisory: the values are re-read from the file when used
    assert all(torch.equal(p, v) for p, v in zip(outside, values))


def test_observed_layers_are_paged_out_without_copies_or_files(tmp_path):
    layer = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8))
    ptrs = [p.data_ptr() for p in layer.parameters()]
    off = DiskOffloader(tmp_path)
    off._libc = fake = _FakeLibc()
    off.observed(0, layer)
    assert fake.paged_out == 4  # every parameter's pages handed back
    assert [p.data_ptr() for p in layer.parameters()] == ptrs and not list(tmp_path.iterdir()) and off.bytes == 0
