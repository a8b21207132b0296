"""Evaluation may change its thread count mid-run (llmprune.runtime.rebalance): its scores must move by
float rounding only. The same check on the embedded model is in eval/results/protocols.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmprune.evaluation import perplexity
from llmprune.runtime.rebalance import Rebalancer
from llmprune.runtime.threads import Observation

from conftest import make_tiny_model


def _nll(model, ids: torch.Tensor, threads: int, registry: Path, forced: bool = False) -> float:
    """Mean NLL over the windows of ``ids`` at ``threads``; ``forced``: a neighbour appears during
    windows 2-4, so the evaluation's own Rebalancer goes 2 -> 1 -> 2 threads mid-run (``registry``: an
    empty run registry, so that llmprune runs elsewhere on the machine do not count)."""
    n, changes = [0], []

    def set_threads(t: int) -> None:
        changes.append(t)
        torch.set_num_threads(t)

    rb = Rebalancer(Observation(affinity=2), threads, interval=0.0, directory=registry, set_threads=set_threads,
                    clock=lambda: float(n[0]), others=lambda: 1.0 if 1 <= n[0] < 4 else 0.0)

    def look(module, args) -> None:  # once per window, as the CLI's global hook does once a second
        rb.check()
        n[0] += 1

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    hook = model.register_forward_pre_hook(look) if forced else None
    try:
        res = perplexity(model, input_ids=ids, seqlen=128, max_windows=7)
    finally:
        if hook is not None:
            hook.remove()
        torch.set_num_threads(before)
    if forced:
        assert changes == [1, 2]  # it did rebalance, down and back up
    return res.nll


def test_evaluation_scores_agree_across_thread_counts_and_a_rebalance(tmp_path, monkeypatch):
    from llmprune.runtime import threads

    monkeypatch.setattr(threads, "_changes", [])  # the rebalancing below is recorded process-wide
    model = make_tiny_model("llama", hidden_size=128, intermediate_size=384)
    ids = torch.randint(3, model.config.vocab_size, (8 * 128,), generator=torch.Generator().manual_seed(0))
    one = _nll(model, ids, 1, tmp_path)
    two = _nll(model, ids, 2, tmp_path)
    moved = _nll(model, ids, 2, tmp_path, forced=True)
    assert two == pytest.approx(one, rel=1e-5) and moved == pytest.approx(one, rel=1e-5)
