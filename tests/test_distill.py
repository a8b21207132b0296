"""Distillation after pruning: the losses against hand computations, the teacher in memory and offline, the
recovery loop (masks and N:M kept, LoRA merged keeping them, resumed = uninterrupted, structured students'
layer mapping), the Trainer integration and ``llmprune recover`` end to end, on tiny random models."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from conftest import VOCAB, TokenRows, make_tiny_model

import llmprune
from llmprune.cli import main
from llmprune.errors import ConfigError
from llmprune.recovery import (
    DistillationTrainer,
    DistillLoss,
    InMemoryTeacher,
    LayerOutputs,
    OfflineTeacher,
    RecoverConfig,
    SparsityKeeper,
    TeacherOutput,
    kd_loss,
    layer_map,
    lm_loss,
    precompute_teacher,
    recover,
    squarehead_loss,
    topk_kd_loss,
    training_windows,
)
from llmprune.recovery.data import HOLDOUT_NGRAM, _ngrams, _touches
from llmprune.recovery.progress import progress_folder

# ----------------------------------------------------------------------------------------------
# The losses, by hand
# ----------------------------------------------------------------------------------------------


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_kd_loss_is_hintons_kl_times_t_squared():
    zs, zt, T = [1.0, 2.0, 0.5], [0.0, 3.0, 1.0], 2.0
    ps, pt = _softmax([v / T for v in zs]), _softmax([v / T for v in zt])
    expected = T * T * sum(t * math.log(t / s) for s, t in zip(ps, pt))
    got = kd_loss(torch.tensor([[zs]]), torch.tensor([[zt]]), temperature=T)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # the mean over positions, masked ones left out
    two = kd_loss(torch.tensor([[zs, zs]]), torch.tensor([[zt, zs]]), temperature=T)
    assert float(two) == pytest.approx(expected / 2, rel=1e-6)
    masked = kd_loss(torch.tensor([[zs, zs]]), torch.tensor([[zt, zs]]), T, mask=torch.tensor([[1, 0]]))
    assert float(masked) == pytest.approx(expected, rel=1e-6)


def test_topk_kd_loss_by_hand_and_with_k_equal_v():
    zs, zt, T = [1.0, 2.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.5], 1.5
    # the teacher's top 2: ids 1 (3.0) and 3 (2.5), renormalised; the student over the full vocabulary
    q = _softmax([3.0 / T, 2.5 / T])
    ps = _softmax([v / T for v in zs])
    expected = T * T * (q[0] * (math.log(q[0]) - math.log(ps[1])) + q[1] * (math.log(q[1]) - math.log(ps[3])))
    values, ids = torch.tensor([[zt]]).topk(2, dim=-1)
    got = topk_kd_loss(torch.tensor([[zs]]), values, ids, temperature=T)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    values, ids = torch.tensor([[zt]]).topk(4, dim=-1)  # k = V: exactly the full KL
    assert float(topk_kd_loss(torch.tensor([[zs]]), values, ids, T)) == pytest.approx(
        float(kd_loss(torch.tensor([[zs]]), torch.tensor([[zt]]), T)), rel=1e-6)
    # student = teacher: -log of the teacher's top-k mass, times T² (the docstring's claim)
    pt = _softmax([v / T for v in zt])
    values, ids = torch.tensor([[zt]]).topk(2, dim=-1)
    assert float(topk_kd_loss(torch.tensor([[zt]]), values, ids, T)) == pytest.approx(
        -T * T * math.log(pt[1] + pt[3]), rel=1e-6)


def test_squarehead_is_mse_over_teacher_variance_averaged_over_layers():
    t1, s1 = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]]), torch.tensor([[[1.0, 2.0], [5.0, 9.0]]])  # [1, 2, 2]
    t2, s2 = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    # layer 1: mse = (0 + 1 + 0 + 4) / 4 = 1.25, var of [1, 3, 5, 7] = 5; layer 2: mse = 1/4, var of [0,0,0,2] = 0.75
    expected = (1.25 / 5 + 0.25 / 0.75) / 2
    assert float(squarehead_loss([s1, s2], [t1, t2])) == pytest.approx(expected, rel=1e-6)
    # the mask keeps positions: only position 0 -> layer 1 mse (0 + 1)/2 over var([1, 3]) = 1
    masked = squarehead_loss([s1], [t1], mask=torch.tensor([[1, 0]]))
    assert float(masked) == pytest.approx(0.5, rel=1e-6)


def test_mixed_loss_weights_and_lm_term_equal_the_models_own():
    model = make_tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert float(lm_loss(out.logits, ids)) == pytest.approx(float(out.loss), rel=1e-5)
    teacher = TeacherOutput(logits=out.logits + torch.randn_like(out.logits))
    mix = DistillLoss(kd_weight=0.5, lm_weight=2.0, temperature=2.0)(out.logits, teacher, ids)
    kd = float(kd_loss(out.logits, teacher.logits, 2.0))
    assert mix.parts["kd"] == pytest.approx(kd, rel=1e-6) and mix.parts["lm"] == pytest.approx(float(out.loss), 1e-5)
    assert float(mix.loss) == pytest.approx(0.5 * kd + 2.0 * float(out.loss), rel=1e-5)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        DistillLoss(kd_weight=0)
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        RecoverConfig.build({"kd_weight": 0})


def test_zero_loss_when_the_student_is_the_teacher():
    student = make_tiny_model("llama")
    teacher = InMemoryTeacher(copy.deepcopy(student), layers=[0, 1])
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with LayerOutputs(student) as cap, cap.recording() as hidden:
        logits = student(input_ids=ids).logits
    out = DistillLoss(kd_weight=1.0, squarehead_weight=1.0, temperature=2.0)(logits, teacher(ids), ids, hidden)
    assert out.parts["kd"] == pytest.approx(0.0, abs=1e-6) and out.parts["squarehead"] == 0.0


def test_layer_outputs_are_the_layers_not_the_final_norm():
    model = make_tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 8))
    with LayerOutputs(model) as cap, cap.recording() as hidden:
        out = model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(hidden[0], out.hidden_states[1])
    assert torch.allclose(model.model.norm(hidden[1]), out.hidden_states[2])  # transformers' last is normed


# ----------------------------------------------------------------------------------------------
# Structured students: the layer mapping
# ----------------------------------------------------------------------------------------------


def test_layer_map_and_a_student_without_its_middle_layer():
    assert layer_map(4, 3, [2]) == [0, 1, 3]
    with pytest.raises(ValueError, match="cannot be paired"):
        layer_map(4, 2, [2])
    teacher = make_tiny_model("llama", num_hidden_layers=3)
    student = copy.deepcopy(teacher)
    del student.model.layers[1]
    student.config.num_hidden_layers = 2
    student.config.layer_types = student.config.layer_types[:2] if getattr(student.config, "layer_types", None) else None
    student.config.llmprune = {"method": "none", "structure": {"removal": {"layers": [1], "per_layer": {}}}}
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    out = recover(student, teacher, None, RecoverConfig(kd_weight=0, squarehead_weight=1.0, steps=1, batch_size=2,
                                                          seqlen=8, lr=1e-9, device="cpu", max_grad_norm=None),
                  windows=ids, progress=False)
    # teacher layer 2 (student layer 1) sees other inputs than the student's layer 1: only layer 0 agrees
    t = InMemoryTeacher(teacher, layers=[0, 2])(ids)
    with LayerOutputs(student) as cap, cap.recording() as hidden:
        student(input_ids=ids)
    assert float(squarehead_loss(hidden[:1], t.hidden[:1])) == pytest.approx(0.0, abs=1e-8)
    assert out.history[0]["squarehead"] > 0
    assert out.history[0]["squarehead"] == pytest.approx(float(squarehead_loss(hidden, t.hidden)), rel=1e-3)


# ----------------------------------------------------------------------------------------------
# The teacher offline and in memory
# ----------------------------------------------------------------------------------------------


def test_offline_teacher_gives_the_in_memory_loss(tmp_path):
    teacher = make_tiny_model("llama", seed=1)
    student = make_tiny_model("llama", seed=2)
    batches = [torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    off = precompute_teacher(teacher, batches, tmp_path / "t", top_k=8, layers=[0, 1])
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "batch-000000.safetensors", "batch-000001.safetensors", "batch-000002.safetensors", "manifest.json"]
    mem = InMemoryTeacher(teacher, top_k=8, layers=[0, 1])
    loss = DistillLoss(kd_weight=1.0, squarehead_weight=0.5, temperature=2.0)
    ids = torch.cat([batches[2][1:], batches[0][:1]])  # rows of two shards, re-batched: found by their tokens
    with LayerOutputs(student) as cap, cap.recording() as hidden:
        logits = student(input_ids=ids).logits
    a, b = off(ids), mem(ids)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_values, b.topk_values)
    la, lb = loss(logits, a, ids, hidden), loss(logits, b, ids, hidden)
    assert la.parts == lb.parts and torch.equal(la.loss, lb.loss)
    # a second precompute of the same batches reuses the folder; other data is refused
    assert precompute_teacher(teacher, batches, tmp_path / "t", top_k=8, layers=[0, 1]).manifest == off.manifest
    with pytest.raises(ValueError, match="holds another precompute"):
        precompute_teacher(teacher, batches[:2], tmp_path / "t", top_k=8, layers=[0, 1])
    with pytest.raises(ValueError, match="not in the offline teacher"):
        off(torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(99)))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _pruned(pattern: str | None = "2:4", seed: int = 0):
    model = make_tiny_model("llama", seed=seed)
    dense = copy.deepcopy(model)
    ids = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(seed))  # [n, L]
    settings = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    llmprune.prune(model, None, method="wanda", calibration=ids, nsamples=8, seqlen=32, progress=False, **settings)
    return model, dense


def _windows(n: int = 8, L: int = 16, seed: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, L), generator=torch.Generator().manual_seed(seed))  # [n, L]


def _nm_ok(W: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    return bool(((W.reshape(W.shape[0], -1, m) != 0).sum(-1) <= n).all())


CFG = dict(steps=3, batch_size=2, seqlen=16, lr=3e-3, device="cpu", kd_weight=1.0, squarehead_weight=0.5,
           lm_weight=0.5, temperature=2.0, warmup_steps=1, schedule="cosine")


def test_recover_keeps_masks_and_nm_groups_exactly_and_the_loss_drops():
    student, dense = _pruned("2:4")
    keeper = SparsityKeeper.from_model(student)
    zeros = {name: ~keep for name, keep in keeper.masks()}
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = RecoverConfig(**{**CFG, "steps": 6})
    r = recover(student, dense, None, cfg, windows=_windows(2), progress=False)  # one batch, 6 times
    assert r.model is student
    for name, keep in keeper.masks():
        assert torch.equal(~keep, zeros[name])
    for m in keeper._masks:
        assert _nm_ok(m.param.detach()), m.name
    assert r.sparsity["before"] == r.sparsity["after"] == pytest.approx(0.5) and r.sparsity["revived"] == 0
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    assert [round(h["lr"], 8) for h in r.history[:2]] == [3e-3, 3e-3]  # warmup 1 step, then cosine from the peak
    assert r.tokens == 6 * 2 * 16 and r.model.training is False


def test_lora_recovery_merges_keeping_the_zeros():
    pytest.importorskip("peft")
    student, dense = _pruned("2:4")
    keeper = SparsityKeeper.from_model(student)
    zeros = {name: ~keep for name, keep in keeper.masks()}
    before = {m.name: m.param.detach().clone() for m in keeper._masks}
    r = recover(student, dense, None, RecoverConfig(**CFG, lora=True, lora_r=4), windows=_windows(), progress=False)
    merged = r.model
    assert not any("lora" in n for n, _ in merged.named_parameters())
    after = SparsityKeeper.from_model(merged)
    for name, keep in after.masks():
        assert torch.equal(~keep, zeros[name]), name
    for m in after._masks:
        assert _nm_ok(m.param.detach()), m.name
    assert any(not torch.equal(before[m.name], m.param) for m in after._masks)  # the adapters were merged
    assert r.merge["modules"] > 0 and 0 < r.merge["dropped_fraction"] < 1


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    cfg = RecoverConfig(**{**CFG, "steps": 5, "save_every": 2})
    windows = _windows(10)
    a, dense = _pruned("2:4")
    ra = recover(a, copy.deepcopy(dense), None, cfg, windows=windows, progress_dir=tmp_path / "a", progress=False)

    b, _ = _pruned("2:4")

    def kill(step, losses):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(b, copy.deepcopy(dense), None, cfg, windows=windows, progress_dir=tmp_path / "b", progress=False,
                callback=kill)
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["step"] == 2
    assert b.training is False  # the model's state was restored on the way out
    c, _ = _pruned("2:4")  # a fresh process: the pruned model loaded again
    rc = recover(c, copy.deepcopy(dense), None, cfg, windows=windows, progress_dir=tmp_path / "b", resume=True,
                 progress=False)
    assert rc.resumed_from == 2 and rc.history == ra.history
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ConfigError, match="belongs to another run"):
        d, _ = _pruned("2:4")
        recover(d, copy.deepcopy(dense), None, RecoverConfig(**{**CFG, "steps": 5, "lr": 1e-4}), windows=windows,
                progress_dir=tmp_path / "b", resume=True, progress=False)


def test_offline_teacher_in_the_loop_equals_the_in_memory_one(tmp_path):
    cfg = dict(CFG, top_k=8)
    a, dense = _pruned(None)
    b = copy.deepcopy(a)
    ra = recover(a, copy.deepcopy(dense), None, RecoverConfig(**cfg), windows=_windows(), progress=False)
    rb = recover(b, copy.deepcopy(dense), None, RecoverConfig(**cfg, offline_teacher=str(tmp_path / "t")),
                 windows=_windows(), progress=False)
    assert ra.history == rb.history
    rc = recover(copy.deepcopy(b), OfflineTeacher(tmp_path / "t"), None, RecoverConfig(**cfg), windows=_windows(),
                 progress=False)  # the folder alone: no teacher model in memory
    assert len(rc.history) == 3


# ----------------------------------------------------------------------------------------------
# Data held apart from the calibration
# ----------------------------------------------------------------------------------------------


def test_training_windows_share_no_run_of_tokens_with_the_calibration(tmp_path):
    from conftest import byte_tokenizer

    tok = byte_tokenizer()
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "weights", "mask", "teacher", "student", "layer"]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    calib = llmprune.calibration.get_calibration(str(path), tok, nsamples=16, seqlen=64, seed=0)
    record = {"source": llmprune.calibration.describe_source(str(path)), "nsamples": 16, "seqlen": 64, "seed": 0,
              "windows_sha256": __import__("hashlib").sha256(calib.numpy().tobytes()).hexdigest()[:16]}
    cfg = RecoverConfig(calib=str(path), steps=10, batch_size=4, seqlen=64, seed=0)
    ids, desc = training_windows(cfg, tok, record, "text.txt")
    assert ids.shape == (40, 64)
    grams = _ngrams(calib, HOLDOUT_NGRAM)
    assert not any(_touches(w, grams, HOLDOUT_NGRAM) for w in ids)
    assert "were dropped" in desc["held_apart"] and desc["seed"] == 1
    other = dict(record, windows_sha256="0" * 16)  # another data copy: held apart by the seed only, and said so
    assert "by seed only" in training_windows(cfg, tok, other, "text.txt")[1]["held_apart"]


# ----------------------------------------------------------------------------------------------
# The Trainer
# ----------------------------------------------------------------------------------------------


def test_distillation_trainer_with_the_keeper_callback(tmp_path):
    from transformers import TrainingArguments

    student, dense = _pruned("2:4")
    keeper = SparsityKeeper.from_model(student)
    zeros = {name: ~keep for name, keep in keeper.masks()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1, dataloader_num_workers=0, disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher=dense, args=args, train_dataset=TokenRows(_windows(8)),
                                  distill=DistillLoss(kd_weight=1.0, squarehead_weight=1.0, lm_weight=0.1),
                                  callbacks=[keeper])
    trainer.train()
    assert set(trainer.last_losses) == {"kd", "squarehead", "lm", "loss"} and trainer.last_losses["kd"] > 0
    for name, keep in keeper.masks():
        assert torch.equal(~keep, zeros[name])
    keeper.check()


# ----------------------------------------------------------------------------------------------
# llmprune recover
# ----------------------------------------------------------------------------------------------


def test_cli_recover_end_to_end(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    rng = random.Random(1)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(rng.choice(["the", "pruned", "model", "keeps", "its", "zeros", "while", "it", "learns"])
                             for _ in range(2000)))
    pruned, out = tmp_path / "pruned", tmp_path / "recovered"
    assert main(["prune", str(tiny_llama_dir), "--method", "wanda", "--pattern", "2:4", "--calib", str(text),
                 "--nsamples", "4", "--seqlen", "32", "--output", str(pruned), "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["recover", str(pruned), "--teacher", str(tiny_llama_dir), "--calib", str(text), "--steps", "2",
               "--batch-size", "2", "--seqlen", "32", "--lr", "1e-3", "--squarehead-weight", "1", "--eval-every", "1",
               "--eval-ppl", str(text), "--eval-seqlen", "64", "--eval-windows", "2", "--output", str(out), "--quiet"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "recovered 2 steps (128 tokens" in stdout and "(0 pruned weights non-zero)" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "pruned", "recovered"]  # no progress left
    meta = json.loads((out / "config.json").read_text())["llmprune"]
    rec = meta["recovery"]
    assert meta["method"] == "wanda" and rec["steps"] == 2 and rec["tokens"] == 128
    assert rec["teacher"] == tiny_llama_dir.name and rec["method"] == "distillation"
    assert [e["step"] for e in rec["evals"]] == [0, 1, 2] and "were dropped" in rec["data"]["held_apart"]
    assert rec["sparsity"]["revived"] == 0 and len(rec["losses"]["per_step"]) == 2
    card = (out / "README.md").read_text()
    assert "distilled from" in card and "distilled" in card.split("---")[1]
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert _nm_ok(mod.weight.detach()), name


def test_cli_recover_errors_are_one_line_exit_2(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "r"
    # a plain (not pruned) checkpoint records no dense model: the teacher must be named
    assert main(["recover", str(tiny_llama_dir), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "records no dense model" in err and "--teacher" in err and len(err.strip().splitlines()) == 1
    assert main(["recover", str(tiny_llama_dir), "--kd-weight", "0", "--output", str(out), "--quiet"]) == 2
    assert "every loss weight is 0" in capsys.readouterr().err
    assert not out.exists() and not progress_folder(out).exists()
