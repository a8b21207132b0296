"""Every causal-LM architecture transformers registers (issue 6), and the hidden-state check of the capture.

One test per ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: the tiny model of
``eval/arch_matrix.py`` is built, replayed, pruned with Wanda 50 %, saved and reloaded in-process
(:func:`arch_matrix.run_one`), and the outcome must be the one ``eval/results/architectures.json``
records: ``works`` still works, ``refused`` is still refused by llmprune with the same error, so a
new refusal or a new acceptance shows up (rerun ``python eval/arch_matrix.py`` after a change that
means it). Types whose recorded run took 2 s or more are marked ``slow`` (``--runslow``). Under
another transformers version than the recorded one, a model type must only not fail inside llmprune.

The toy models below show what the capture's check accepts (each layer receives exactly what the one
before returned, as a tensor or as a tuple's first element, and nothing else it returned but None) and
what it still refuses (hidden states changed between the layers, another output handed on)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import llmprune
from llmprune.engine import UnsupportedModelError, capture_layer_inputs, find_decoder_layers, inference_state

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("arch_matrix", ROOT / "eval" / "arch_matrix.py")
arch_matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arch_matrix)

RESULTS = json.loads((ROOT / "eval" / "results" / "architectures.json").read_text())
RECORDED = {r["model_type"]: r for r in RESULTS["architectures"]}
SAME_VERSION = RESULTS["meta"]["transformers"] == transformers.__version__
SLOW_SECONDS = 2.0


def _params():
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        rec = RECORDED.get(model_type)
        slow = rec is None or rec.get("seconds", 0) >= SLOW_SECONDS
        yield pytest.param(model_type, id=model_type, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("model_type", _params())
def test_architecture(model_type):
    got = arch_matrix.run_one(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    rec = RECORDED.get(model_type)
    where = f"{model_type}: {got['status']} at {got['stage']}: {got.get('reason', '')}\n{got.get('traceback', '')}"
    if rec is None or not SAME_VERSION:  # nothing recorded for this version: llmprune must not be what fails
        assert got["status"] != "fails" or got.get("culprit") == "tiny config", where
        if got["status"] == "skipped":
            pytest.skip(got["reason"])
        return
    if rec["status"] == "skipped":
        assert got["status"] == "skipped", f"{model_type} now builds; rerun eval/arch_matrix.py\n{where}"
        pytest.skip(rec["reason"])
    assert got["status"] == rec["status"], f"recorded {rec['status']}: {rec.get('reason', '')}\nnow {where}"
    if rec["status"] == "refused":  # llmprune's own error, naming the model or module and why
        assert got["reason"] == rec["reason"], where
    if rec["status"] == "works":
        assert got["replay_diff"] == 0.0 and got["max_abs_diff"] == 0.0, where
        assert got["sparsity"] >= arch_matrix.SPARSITY - 0.02, where


def test_every_registered_model_type_is_recorded():
    if not SAME_VERSION:
        pytest.skip(f"recorded with transformers {RESULTS['meta']['transformers']}, not {transformers.__version__}")
    missing = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(RECORDED))
    assert not missing, f"model types not in eval/results/architectures.json: {missing}; rerun eval/arch_matrix.py"


# ---- the capture's hidden-state check on toy models -----------------------------------------------
class _Block(nn.Module):
    """``h + proj(h)``, returned as it is, as ``(h,)``, or as ``(h, extra)`` (``extra``: None or a tensor)."""

    def __init__(self, returns: str):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.returns = returns

    def forward(self, hidden_states, state=None):
        h = hidden_states + self.proj(hidden_states)
        if self.returns == "tensor":
            return h
        if self.returns == "tuple":
            return (h,)
        return h, (None if self.returns == "pair-none" else h.mean(-1))


class _ToyLM(nn.Module):
    """A causal LM of three blocks whose loop is one of the ways transformers' models pass layers on."""

    def __init__(self, loop: str, returns: str = "tuple"):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(128, 16)
        self.layers = nn.ModuleList([_Block(returns) for _ in range(3)])
        self.loop = loop

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        h, state = self.embed(input_ids), None
        for layer in self.layers:
            if self.loop == "first":  # hidden_states = layer_outputs[0]
                h = layer(h)[0]
            elif self.loop == "first-scaled":  # ... and rescaled outside the layers
                h = layer(h)[0] * 0.5
            elif self.loop == "kwargs-first":  # hidden states as a keyword
                h = layer(hidden_states=h)[0]
            else:  # "unpack-state": hidden_states, state = layer(hidden_states, state=state)
                h, state = layer(h, state=state)
        return h


def _replay_equals_forward(model, ids):
    """Every layer's input in the engine's replay equals the one in the model's own forward."""
    _, layers = find_decoder_layers(model)
    real = []
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k: real.append(a[0] if a else k["hidden_states"]), with_kwargs=True) for layer in layers]
    with inference_state(model):
        model(ids)
        for h in handles:
            h.remove()
        hidden, calls = capture_layer_inputs(model, layers, [ids], torch.device("cpu"))
        h = hidden[0]
        for i, layer in enumerate(layers):
            assert torch.equal(h, real[i]), f"layer {i}"
            h = calls[0][i](layer, h)


@pytest.mark.parametrize("loop, returns", [("first", "tuple"), ("kwargs-first", "tuple"), ("first", "pair-none"),
                                           ("unpack-state", "pair-none")])
def test_layers_that_feed_each_other_directly_are_accepted(loop, returns, calib_ids):
    """Tuple outputs taken by their first element, hidden states as a keyword, and a second output that is
    None and handed on (RWKV's ``state`` without a cache): the layers feed each other directly."""
    model = _ToyLM(loop, returns)
    _replay_equals_forward(model, calib_ids)
    report = llmprune.prune(model, None, calibration=calib_ids, method="wanda", device="cpu", progress=False,
                            nsamples=6, seqlen=16)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)


def test_hidden_states_changed_between_tuple_layers_is_refused(calib_ids):
    with pytest.raises(UnsupportedModelError, match="_ToyLM changes the hidden states between decoder layers 0 and 1"):
        llmprune.prune(_ToyLM("first-scaled"), None, calibration=calib_ids, method="wanda", device="cpu",
                       progress=False, nsamples=6, seqlen=16)


def test_another_output_handed_to_the_next_layer_is_refused(calib_ids):
    """``hidden_states, state = layer(hidden_states, state=state)`` with a real state (GLM-DSA's top-k indices)."""
    with pytest.raises(UnsupportedModelError, match=r"_ToyLM hands decoder layer 1 another output of layer 0 "
                                                    r"besides the hidden states \(state\)"):
        llmprune.prune(_ToyLM("unpack-state", "pair-tensor"), None, calibration=calib_ids, method="wanda",
                       device="cpu", progress=False, nsamples=6, seqlen=16)

