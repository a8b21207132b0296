"""Keeping masks while fine-tuning: plain loops, the Trainer callback, PEFT merges, wrapped models, and
the Python API's independence between calls."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, TokenRows, make_tiny_model

import llmprune
from llmprune.recovery.keeper import SparsityError, SparsityKeeper, merge_and_keep_sparsity, pack_keep, unpack_pruned

TESTS = Path(__file__).resolve().parent


def _pruned(arch: str = "llama", pattern: str | None = None, sparsity: float = 0.5, seed: int = 0):
    model = make_tiny_model(arch, seed=seed)
    ids = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(seed))  # [n, L]
    settings = {"pattern": pattern} if pattern else {"sparsity": sparsity}
    report = llmprune.prune(model, None, method="wanda", calibration=ids, nsamples=8, seqlen=32, progress=False,
                            **settings)
    return model, report


def _batch(seed: int = 5, n: int = 4, L: int = 32) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, L), generator=torch.Generator().manual_seed(seed))  # [n, L]


def _zero_patterns(keeper: SparsityKeeper) -> dict[str, bytes]:
    return {m.name: bytes(pack_keep(m.param).numpy()) for m in keeper._masks}


def _train(model, keeper: SparsityKeeper | None, steps: int, accumulate: int = 1, lr: float = 3e-3):
    """AdamW with weight decay on a fixed batch; returns the losses."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    ids = _batch()
    losses = []
    for _ in range(steps):
        for k in range(accumulate):
            chunk = ids[k::accumulate]
            loss = model(input_ids=chunk, labels=chunk).loss / accumulate
            loss.backward()
        losses.append(float(loss.detach()) * accumulate)
        if keeper is not None:
            keeper.step(opt)  # mask_grads, step, apply
        else:
            opt.step()
        opt.zero_grad()
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# Masks: capture and storage
# ----------------------------------------------------------------------------------------------


def test_masks_are_packed_bits_that_hash_like_the_report():
    model, report = _pruned()
    keeper = SparsityKeeper.from_report(model, report)
    assert len(keeper) == len(report.modules) == 14
    for m in keeper._masks:
        assert m.bits.dtype == torch.uint8 and m.bits.numel() == (m.numel + 7) // 8  # one bit per weight
        assert torch.equal(unpack_pruned(m.bits, m.param.shape), m.param == 0)
        assert bytes(m.bits.numpy()) == np.packbits((m.param != 0).numpy().reshape(-1)).tobytes()
    assert keeper.nbytes == sum((m.numel + 7) // 8 for m in keeper._masks)
    assert keeper.mask_sparsity == pytest.approx(report.sparsity) == pytest.approx(0.5)
    assert SparsityKeeper.from_model(model).names == keeper.names
    odd = torch.randn(7, 5)  # 35 weights: the last byte is padded
    odd[odd.abs() < 0.6] = 0
    assert torch.equal(unpack_pruned(pack_keep(odd), odd.shape), odd == 0)


def test_from_report_refuses_a_model_whose_zeros_differ():
    model, report = _pruned()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1e-3)  # every zero revived
    with pytest.raises(SparsityError, match=r"differ from the report.s masks \(first: model.layers.1.mlp.down_proj\)"):
        SparsityKeeper.from_report(model, report)


def test_from_model_refuses_a_dense_model():
    with pytest.raises(ValueError, match="no exact zeros in its 14 target weights: nothing to keep. Prune"):
        SparsityKeeper.from_model(make_tiny_model("llama"))


# ----------------------------------------------------------------------------------------------
# Plain PyTorch loops
# ----------------------------------------------------------------------------------------------


def test_adamw_with_weight_decay_keeps_the_zero_pattern_bit_for_bit_and_the_loss_drops():
    model, _ = _pruned()
    keeper = SparsityKeeper.from_model(model)
    before = _zero_patterns(keeper)
    weights = {m.name: m.param.detach().clone() for m in keeper._masks}
    losses = _train(model, keeper, steps=12)
    assert _zero_patterns(keeper) == before
    keeper.check()
    assert keeper.sparsity() == keeper.mask_sparsity == pytest.approx(0.5)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(not torch.equal(weights[m.name], m.param) for m in keeper._masks)  # the kept weights did train

    control, _ = _pruned()  # the same run without the keeper revives the pruned weights
    control_keeper = SparsityKeeper.from_model(control)
    _train(control, None, steps=2)
    assert control_keeper.sparsity() < 0.01
    with pytest.raises(SparsityError, match="pruned weight.s. are non-zero"):
        control_keeper.check()


@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "opt", "gemma2"])
def test_every_layout_keeps_its_zeros(arch):
    """GPT-2's transposed Conv1D, Mixtral's fused 3-D expert weights, OPT, Gemma-2."""
    model, report = _pruned(arch)
    keeper = SparsityKeeper.from_report(model, report)
    assert keeper.names == SparsityKeeper.from_model(model).names
    before = _zero_patterns(keeper)
    losses = _train(model, keeper, steps=4)
    assert _zero_patterns(keeper) == before and losses[-1] < losses[0]
    keeper.check()


def test_nm_pattern_holds_after_training_with_gradient_accumulation():
    model, report = _pruned(pattern="2:4")
    keeper = SparsityKeeper.from_model(model)
    losses = _train(model, keeper, steps=6, accumulate=2)
    assert losses[-1] < losses[0]
    for name, keep in keeper.masks():
        W = dict(model.named_parameters())[name + ".weight"]
        groups = (W != 0).reshape(W.shape[0], -1, 4).sum(-1)  # [out, in / 4]
        assert torch.equal(groups, torch.full_like(groups, 2)), name  # exactly 2 of every 4 inputs
        assert torch.equal(keep, W != 0)


def test_bf16_weights():
    model, _ = _pruned()
    model.to(torch.bfloat16)  # moved after pruning, before the capture
    keeper = SparsityKeeper.from_model(model)
    before = _zero_patterns(keeper)
    _train(model, keeper, steps=3)
    assert _zero_patterns(keeper) == before
    assert keeper.sparsity() == pytest.approx(0.5)


def test_mask_survives_nan_at_pruned_positions_and_non_contiguous_grads():
    model, _ = _pruned()
    keeper = SparsityKeeper.from_model(model)
    W = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        W[W == 0] = float("nan")
    W.grad = torch.ones(W.shape[1], W.shape[0]).T  # non-contiguous: the torch path
    keeper.mask_grads()
    keeper.apply()
    assert torch.equal(W.grad == 0, W == 0) and torch.isfinite(W).all()
    keeper.check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_follow_the_weights_to_the_device():
    model, _ = _pruned()
    keeper = SparsityKeeper.from_model(model)  # captured on the CPU
    before = _zero_patterns(keeper)
    model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    ids = _batch().cuda()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        keeper.step(opt)
        opt.zero_grad()
    assert all(m.bits.device.type == "cuda" for m in keeper._masks)
    model.cpu()
    assert _zero_patterns(keeper) == before


# ----------------------------------------------------------------------------------------------
# transformers.Trainer
# ----------------------------------------------------------------------------------------------


def test_trainer_callback_with_gradient_accumulation(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = _pruned()
    keeper = SparsityKeeper.from_model(model)
    before = _zero_patterns(keeper)
    weights = {m.name: m.param.detach().clone() for m in keeper._masks}
    calls = {"pre": 0, "post": 0}
    pre, post = keeper.on_pre_optimizer_step, keeper.on_optimizer_step

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    keeper.on_pre_optimizer_step = counted("pre", pre)
    keeper.on_optimizer_step = counted("post", post)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=3e-3, weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenRows(_batch(n=16)), callbacks=[keeper])
    trainer.train()
    assert calls == {"pre": 4, "post": 4}  # once per optimizer step, not per micro-batch
    assert _zero_patterns(keeper) == before
    assert keeper.sparsity() == pytest.approx(0.5)
    assert all(not torch.equal(weights[m.name], m.param) for m in keeper._masks)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4


def test_trainer_refuses_a_keeper_of_another_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = _pruned()
    other, _ = _pruned(seed=1)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenRows(_batch(n=4)),
                      callbacks=[SparsityKeeper.from_model(other)])
    with pytest.raises(SparsityError, match="not parameters of the model being trained"):
        trainer.train()


# ----------------------------------------------------------------------------------------------
# Wrapped models
# ----------------------------------------------------------------------------------------------


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    import torch.distributed as dist

    model, _ = _pruned()
    plain_names = SparsityKeeper.from_model(model).names
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        keeper = SparsityKeeper.from_model(ddp)
        assert keeper.names == plain_names  # no "module." prefix
        assert llmprune.unwrap_model(ddp) is model
        before = _zero_patterns(keeper)
        ddp.train()
        opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.1)
        ids = _batch()
        for _ in range(3):
            ddp(input_ids=ids, labels=ids).loss.backward()  # DDP all-reduces the gradients here
            keeper.step(opt)
            opt.zero_grad()
        assert _zero_patterns(keeper) == before
    finally:
        dist.destroy_process_group()


def test_accelerate_prepared_and_compiled_models_are_unwrapped():
    from accelerate import Accelerator

    model, _ = _pruned()
    names = SparsityKeeper.from_model(model).names
    prepared = Accelerator(cpu=True).prepare_model(model)
    assert SparsityKeeper.from_model(prepared).names == names
    compiled = torch.compile(model)  # not run: unwrapping only reads _orig_mod
    assert llmprune.unwrap_model(compiled) is model


# ----------------------------------------------------------------------------------------------
# PEFT / LoRA
# ----------------------------------------------------------------------------------------------


def _lora(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def test_lora_training_on_a_sparse_base_and_merge_keeps_the_mask():
    model, _ = _pruned()
    keeper = SparsityKeeper.from_model(model)  # captured before the adapters are added
    before = _zero_patterns(keeper)
    dense = {m.name: m.param.detach().clone() for m in keeper._masks}
    peft_model = _lora(model)
    assert SparsityKeeper.from_model(peft_model).names == keeper.names  # lora_A/B (B starts at 0) never masked
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = _batch()
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        keeper.step(opt)
        opt.zero_grad()
    assert _zero_patterns(keeper) == before  # the base is frozen; the adapters trained
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = q.get_delta_weight("default").detach().clone()  # [out, in]
    assert delta.abs().sum() > 0

    with pytest.warns(UserWarning, match=r"the adapters' update had .* of its squared norm .* on pruned positions, which was dropped"):
        report = keeper.merge(peft_model)
    merged = report.model
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert _zero_patterns(keeper) == before
    W = merged.model.layers[0].self_attn.q_proj.weight
    kept = W != 0
    torch.testing.assert_close(W[kept], (dense["model.layers.0.self_attn.q_proj"] + delta)[kept])
    assert len(report.modules) == 3 * 2 and 0.2 < report.dropped_fraction < 0.8  # ~half of a dense update
    assert report.sparsity == pytest.approx(0.5)


def test_merge_and_keep_sparsity_without_a_keeper_against_plain_merge():
    model, _ = _pruned()
    peft_model = _lora(model)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained-looking adapter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_and_keep_sparsity(peft_model)
    assert any("on pruned positions, which was dropped" in str(w.message) for w in caught)
    assert SparsityKeeper.from_model(merged).mask_sparsity == pytest.approx(0.5)

    control, _ = _pruned()
    dense = _lora(control)
    for name, p in dense.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    plain = dense.merge_and_unload()  # what PEFT does alone: merged modules become dense
    assert (plain.model.layers[0].self_attn.q_proj.weight == 0).float().mean() < 0.01


# ----------------------------------------------------------------------------------------------
# The Python API: two calls in one process equal two processes
# ----------------------------------------------------------------------------------------------

_CALLS = [
    {"arch": "llama", "seed": 0, "method": "sparsegpt", "pattern": "2:4"},
    {"arch": "llama", "seed": 1, "method": "wanda", "sparsity": 0.6, "allocation": "owl", "owl_lambda": 0.1},
]

def _run(call: dict) -> dict[str, str]:
    """Prune a tiny model as ``call`` says; hashes of the weights and of the report's masks."""
    import hashlib

    call = dict(call)
    model = make_tiny_model(call.pop("arch"), seed=call["seed"])
    ids = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(call["seed"]))  # [n, L]
    report = llmprune.prune(model, None, calibration=ids, nsamples=8, seqlen=32, progress=False, **call)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return {"weights": h.hexdigest(), "masks": report.masks_sha256}


_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_training import _run
print(json.dumps(_run(json.loads(sys.argv[1]))))
"""


def test_two_prune_calls_in_one_process_equal_two_processes():
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT.format(tests=str(TESTS)), json.dumps(c)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in _CALLS]  # each call alone in a fresh process, side by side
    together = [_run(c) for c in _CALLS]  # both calls, one after the other, in this process
    alone = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        alone.append(json.loads(out.strip().splitlines()[-1]))
    assert together == alone
    assert alone[0]["weights"] != alone[1]["weights"]


def test_prune_leaves_global_random_state_and_threads_alone():
    import random

    model = make_tiny_model("llama")  # seeds the global RNG itself: built before the state is taken
    ids = _batch(n=8)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), torch.get_num_threads())
    llmprune.prune(model, None, method="sparsegpt", sparsity=0.5, calibration=ids, nsamples=8, seqlen=32,
                   progress=False)
    assert torch.equal(torch.get_rng_state(), state[0])
    assert random.getstate() == state[1]
    assert np.array_equal(np.random.get_state()[1], state[2])
    assert torch.get_num_threads() == state[3]

