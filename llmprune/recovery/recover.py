"""Recovery after pruning: the student trained against the dense teacher, its masks kept, saved like ``prune``.

:func:`recover` is the loop on models in memory; :func:`recover_checkpoint` is ``llmprune recover``: it
loads the pruned checkpoint and the teacher, runs :func:`recover` and saves the result atomically (a
temporary folder renamed into place), with a ``recovery`` entry in ``config.json``'s ``llmprune`` block.

The loop: AdamW with a linear warmup then a constant, linear or cosine schedule, the loss of
:class:`~.distill.DistillLoss`, the gradients of pruned weights masked before clipping and the step and the
weights re-zeroed after it (:class:`~.keeper.SparsityKeeper`: masks and N:M groups stay exact), optional
gradient checkpointing, bf16 autocast on CUDA only (the CPU trains in the model's dtype). With ``lora``, a
PEFT LoRA adapter is trained on the frozen student and merged at the end with the merge that keeps the
zeros (:meth:`~.keeper.SparsityKeeper.merge`).

Its settings and result are in :mod:`.options`; the training windows, held apart from the calibration, in
:mod:`.data`; the progress saved for ``--resume`` (a resumed run ends with the same weights as an
uninterrupted one) in :mod:`.progress`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import describe_source, portable_source
from ..checkpoint.folder import check_output
from ..checkpoint.format import read_config
from ..checkpoint.load import load_model
from ..checkpoint.save import save
from ..engine.capture import resolve_device
from ..engine.targets import find_decoder_layers, unwrap_model
from ..errors import ConfigError
from ..evaluation.perplexity import dataset_perplexity
from ..loading.models import load_tokenizer
from .data import training_windows
from .distill import LayerOutputs, TeacherOutput, layer_map, removed_layers
from .keeper import SparsityKeeper
from .options import RecoverConfig, RecoverResult
from .progress import PROGRESS_FILE, describe_progress, load_progress, progress_folder, run_fingerprint, save_progress
from .teacher import InMemoryTeacher, OfflineTeacher, precompute_teacher, teacher_layers

log = logging.getLogger(__name__)

__all__ = ["recover", "recover_checkpoint"]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _training(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    """Train mode, no KV cache, optional gradient checkpointing; all restored as found when the block ends."""
    inner = unwrap_model(model)
    was_training = inner.training
    grads = {id(p): p.requires_grad for p in inner.parameters()}
    config = getattr(inner, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None and use_cache is not None:
        config.use_cache = False
    if checkpointing:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.train()
    try:
        yield
    finally:
        if checkpointing:
            inner.gradient_checkpointing_disable()
        inner.train(was_training)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        for p in inner.parameters():
            if id(p) in grads:
                p.requires_grad_(grads[id(p)])


def _sparsity_keeper(model: nn.Module) -> SparsityKeeper | None:
    try:
        return SparsityKeeper.from_model(model)
    except ValueError:  # a dense student (structured removal, or not pruned): nothing to keep
        log.info("the student has no exact zeros in its target weights: no masks to keep")
        return None


def _wrap_lora(model: nn.Module, config: RecoverConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError("--lora needs PEFT: pip install peft") from e
    torch.manual_seed(config.seed)  # the adapters' initialisation
    targets = config.lora_targets or "all-linear"
    return get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                            target_modules=targets))


def _describe_teacher(teacher: Any) -> str | None:
    if teacher is None:
        return None
    if isinstance(teacher, OfflineTeacher):
        return teacher.manifest.get("teacher") or "offline"
    model = teacher.model if isinstance(teacher, InMemoryTeacher) else teacher
    return portable_source(str(getattr(getattr(unwrap_model(model), "config", None), "name_or_path", "") or "")) or None


def recover(student: nn.Module, teacher: nn.Module | InMemoryTeacher | OfflineTeacher | None, tokenizer: Any,
            config: RecoverConfig | None = None, *, windows: torch.Tensor | None = None,
            data: dict[str, Any] | None = None, progress_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
            callback: Callable[[int, dict[str, float]], None] | None = None) -> RecoverResult:
    """Train ``student`` against ``teacher`` with its zeros kept; returns a :class:`RecoverResult` whose
    ``model`` is the recovered student (the same object, or with ``lora`` the merged model).

    Args:
        student: the pruned model (any causal LM the engine finds the decoder layers of); trained in place.
        teacher: the dense model (moved to the student's device), an :class:`InMemoryTeacher`, an
            :class:`OfflineTeacher`, or None when only ``lm_weight`` is set. A model with
            ``config.offline_teacher`` set is run once over the windows into that folder first.
        tokenizer: the student's (and teacher's) tokenizer: draws the windows, and scores the evaluations.
        config: a :class:`RecoverConfig` (defaults: KD at T=1 on 100 steps of 4 x 256 C4 tokens).
        windows: the training windows ``[n, seqlen]`` (token ids); None: drawn by :func:`training_windows`,
            held apart from the calibration the student's metadata records. Step ``i`` takes rows
            ``i*B .. i*B+B-1`` (mod ``n``).
        data: what ``windows`` are, for the metadata (:func:`training_windows`' description).
        progress_dir: where to save the progress every ``config.save_every`` steps; None: nowhere.
        resume: continue from the progress in ``progress_dir`` (a run of the same settings, data and model).
        progress: a progress bar with the loss, tokens/s and the ETA.
        callback: called after each optimizer step with ``(step, losses)`` (1-based step).
    """
    from tqdm.auto import tqdm

    config = config if config is not None else RecoverConfig()
    distill = config.loss()
    if distill.needs_teacher and teacher is None:
        raise ConfigError("kd_weight or squarehead_weight is set but no teacher was given; pass the dense model, or "
                          "set kd_weight=0 and squarehead_weight=0 with lm_weight > 0")
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    meta = getattr(getattr(unwrap_model(student), "config", None), "llmprune", None)
    meta = meta if isinstance(meta, dict) else {}
    if windows is None:
        windows, data = training_windows(config, tokenizer, meta.get("calibration"),
                                         (meta.get("config") or {}).get("calib"))
    else:
        windows = windows.to(torch.long).reshape(-1, windows.shape[-1])
        data = dict(data) if data is not None else {
            "source": describe_source(windows), "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
            "held_apart": "given by the caller"}
    data["windows_sha256"] = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    B, n = config.batch_size, windows.shape[0]
    batches = [windows[[(i * B + j) % n for j in range(B)]] for i in range(config.steps)]  # [B, L] each

    # the layer mapping (SquareHead) and the teacher
    n_student = len(find_decoder_layers(unwrap_model(student))[1])
    kept = None
    if distill.needs_hidden:
        if isinstance(teacher, OfflineTeacher):
            kept = teacher.layers
            if kept is None or len(kept) != n_student:
                raise ConfigError(f"the offline teacher {str(teacher.folder)!r} holds no layer outputs for this "
                                  f"student's {n_student} layers; compute it with squarehead_weight > 0")
        else:
            model_t = teacher.model if isinstance(teacher, InMemoryTeacher) else teacher
            kept = layer_map(teacher_layers(model_t), n_student, removed_layers(student))
    teacher_name = _describe_teacher(teacher)
    if isinstance(teacher, nn.Module):
        if config.offline_teacher is not None:
            teacher = precompute_teacher(teacher, batches, config.offline_teacher, top_k=config.top_k or 64,
                                         layers=kept, dtype=config.offline_dtype, teacher_name=teacher_name,
                                         progress=progress)
        else:
            teacher.to(device)
            teacher = InMemoryTeacher(teacher, top_k=config.top_k, layers=kept)
    elif isinstance(teacher, InMemoryTeacher) and kept is not None and teacher.layers is None:
        teacher = InMemoryTeacher(teacher.model, teacher.top_k, kept)

    student.to(device)
    keeper = _sparsity_keeper(student)
    sparsity_before = keeper.sparsity() if keeper is not None else None
    model = _wrap_lora(student, config) if config.lora else student
    params = [p for p in model.parameters() if p.requires_grad]
    if not config.lora:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    folder = Path(progress_dir).expanduser() if progress_dir is not None else None
    fingerprint = run_fingerprint(config, windows, model)
    start, history, evals, resumed = 0, [], [], None
    if folder is not None and resume:
        loaded = load_progress(folder, model, optimizer, fingerprint)
        if loaded is not None:
            start, history, evals = loaded
            resumed = start
            log.info("resuming from step %d of %d (%s)", start, config.steps, folder)
        else:
            log.info("no progress to resume in %s: starting at step 0", folder)

    def evaluate(step: int) -> None:
        r = dataset_perplexity(model, tokenizer, config.eval_ppl, seqlen=config.eval_seqlen,
                               max_windows=config.eval_windows, data_dir=config.data_dir, device=device)
        evals.append({"step": step, "ppl": round(r.ppl, 4)})
        log.info("step %d: %s perplexity %.3f", step, r.dataset, r.ppl)

    autocast = device.type == "cuda" and config.autocast
    capture = LayerOutputs(model, None) if distill.needs_hidden else None
    tokens_per_step = B * windows.shape[1]
    bar = tqdm(total=config.steps, initial=start, desc="recover", unit="step", disable=not progress)
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_loop = time.perf_counter()
    try:
        with _training(model, config.gradient_checkpointing):
            if config.eval_every and start == 0:
                evaluate(0)
            for step in range(start, config.steps):
                ids = batches[step].to(device)  # [B, L]
                for g in optimizer.param_groups:
                    g["lr"] = config.lr_at(step)
                target: TeacherOutput | None = teacher(ids, device=device) if distill.needs_teacher else None
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    if capture is not None:
                        with capture.recording() as hidden:
                            logits = model(input_ids=ids, use_cache=False).logits  # [B, L, V]
                    else:
                        hidden, logits = None, model(input_ids=ids, use_cache=False).logits  # [B, L, V]
                out = distill(logits, target, ids, student_hidden=hidden)
                out.loss.backward()
                del logits, hidden, target
                if keeper is not None:
                    keeper.mask_grads()  # before clipping: the norm of the masked gradient
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if keeper is not None:
                    keeper.apply()
                optimizer.zero_grad(set_to_none=True)
                history.append({**{k: round(v, 6) for k, v in out.parts.items()}, "lr": config.lr_at(step)})
                done = step + 1
                if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    evaluate(done)
                if folder is not None and config.save_every and done % config.save_every == 0 and done < config.steps:
                    save_progress(folder, done, model, optimizer, fingerprint, history, evals)
                elapsed = time.perf_counter() - t_loop
                bar.set_postfix(loss=f"{out.parts['loss']:.4f}",
                                tok_s=f"{(done - start) * tokens_per_step / max(elapsed, 1e-9):.0f}")
                bar.update(1)
                if callback is not None:
                    callback(done, out.parts)
    finally:
        bar.close()
        if capture is not None:
            capture.remove()
    loop_s = time.perf_counter() - t_loop
    merge = None
    if config.lora:
        if keeper is not None:
            report = keeper.merge(model, warn=False)
            merge = {"update_norm": report.update_norm, "dropped_norm": report.dropped_norm,
                     "dropped_fraction": report.dropped_fraction, "modules": len(report.modules)}
            model = report.model
        else:
            model = model.merge_and_unload()
            merge = {"modules": "all (dense student)"}
        model = unwrap_model(model)
    if keeper is not None:
        keeper.check()
    sparsity = ({"before": round(sparsity_before, 6), "after": round(keeper.sparsity(), 6),
                 "mask": round(keeper.mask_sparsity, 6), "revived": sum(keeper.revived().values())}
                if keeper is not None else {"before": None, "after": None, "note": "dense student: no masks"})
    ran = config.steps - start
    return RecoverResult(
        model=model, steps=config.steps, tokens=config.steps * tokens_per_step, history=history, evals=evals,
        seconds=time.perf_counter() - t0, seconds_per_step=loop_s / max(ran, 1), sparsity=sparsity, data=data,
        teacher=teacher_name, config=config.model_dump(), merge=merge,
        peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        resumed_from=resumed)


# ---------------------------------------------------------------------------------------------
# llmprune recover: from a pruned checkpoint to a recovered one
# ---------------------------------------------------------------------------------------------
def recover_checkpoint(pruned: str | Path, output: str | Path, config: RecoverConfig | None = None, *,
                       teacher: str | None = None, overwrite: bool = False, resume: bool = False,
                       progress: bool = True) -> RecoverResult:
    """``llmprune recover``: load the pruned checkpoint ``pruned``, recover it against ``teacher`` (a Hub id
    or folder; None: the embedded default) and save it to ``output`` like ``prune`` saves (a temporary folder
    renamed into place; ``config.json``'s ``llmprune`` block gets a ``recovery`` entry, the model card says
    it was distilled). With ``config.offline_teacher``, the teacher runs first over every window into that
    folder and is freed before the student loads: one model in memory at a time.

    The progress is saved every ``config.save_every`` steps to ``.<output>.recover`` beside ``output`` and
    removed once ``output`` is written; ``resume`` continues from it."""
    config = config if config is not None else RecoverConfig()
    check_output(output, overwrite)
    folder = progress_folder(output)
    if folder.exists() and not resume:
        if not overwrite and (folder / PROGRESS_FILE).is_file():
            raise ConfigError(f"{describe_progress(output)}")
        shutil.rmtree(folder, ignore_errors=True)
    pruned_dir = Path(pruned).expanduser()
    meta = (read_config(pruned_dir).get("llmprune") or {}) if (pruned_dir / "config.json").is_file() else {}
    if not meta:
        log.warning("%s records no llmprune metadata: the training windows are held apart from no calibration", pruned)
    dtype = config.dtype
    t: Any = None
    tokenizer = load_tokenizer(pruned_dir)
    windows, data = training_windows(config, tokenizer, meta.get("calibration"), (meta.get("config") or {}).get("calib"))
    if config.needs_teacher and config.offline_teacher is not None:
        # the teacher alone first: its outputs to disk, then freed before the student loads
        t_model, _, _ = load_model(teacher, dtype=dtype)
        kept = None
        if config.squarehead_weight > 0:
            n_student = int(read_config(pruned_dir).get("num_hidden_layers") or 0)
            removed = [int(i) for i in (((meta.get("structure") or {}).get("removal") or {}).get("layers") or ())]
            kept = layer_map(teacher_layers(t_model), n_student, removed)
        B = config.batch_size
        batches = [windows[[(i * B + j) % len(windows) for j in range(B)]] for i in range(config.steps)]
        t_model.to(resolve_device(config.device))
        t = precompute_teacher(t_model, batches, config.offline_teacher, top_k=config.top_k or 64, layers=kept,
                               dtype=config.offline_dtype, teacher_name=teacher or "embedded", progress=progress)
        del t_model
    student, tokenizer, _ = load_model(str(pruned_dir), dtype=dtype)
    if t is None and config.needs_teacher:
        t, _, _ = load_model(teacher, dtype=dtype)
    if t is not None and not isinstance(t, OfflineTeacher):
        t.config.name_or_path = teacher or "embedded"
    result = recover(student, t, tokenizer, config, windows=windows, data=data, progress_dir=folder, resume=resume,
                     progress=progress)
    if isinstance(t, OfflineTeacher) or t is None:
        result.teacher = teacher or ("embedded" if t is not None else None)
    model = result.model
    block = dict(getattr(model.config, "llmprune", None) or meta)
    block.setdefault("method", "none")  # save() writes an llmprune block only
    block["recovery"] = result.metadata()
    model.config.llmprune = block
    save_format = (meta.get("config") or {}).get("save_format") or "dense"
    save(model, tokenizer, output, save_format=save_format, overwrite=overwrite)
    shutil.rmtree(folder, ignore_errors=True)
    return result
