"""Distillation losses for recovery after pruning: logit KD, SquareHead per-layer loss and the LM loss, mixed.

* **Logit distillation** (Hinton et al. 2015, https://arxiv.org/abs/1503.02531): the forward KL
  ``KL(p_t ‖ p_s)`` of the teacher's and the student's next-token distributions at temperature ``T``,
  ``p = softmax(z / T)``, scaled by ``T²`` so its gradients keep their size as ``T`` changes; averaged over
  the token positions. With ``top_k`` (a teacher stored offline keeps only its ``k`` largest logits) see
  :func:`topk_kd_loss` for exactly what is computed.
* **SquareHead** (Kurtić et al. 2023, "Sparse Fine-tuning for Inference Acceleration of Large Language
  Models", https://arxiv.org/abs/2310.06927, eq. 2): for each decoder layer ``l``,
  ``MSE(f_l^s, f_l^t) / Var(f_l^t)``, the mean squared error of the student's layer output against the
  teacher's, normalised by the variance of the teacher's output (over every element of the batch), so that
  layers whose outputs differ in scale by orders of magnitude weigh alike. Deviation: the paper sums over
  the layers; we average, so the weight of the term does not grow with the depth of the model.
* **LM loss**: next-token cross-entropy on the data (labels = the input ids, shifted).

:class:`DistillLoss` mixes them, ``kd_weight · KD + squarehead_weight · SquareHead + lm_weight · LM``, as a
``torch.nn.Module`` usable in any loop. Every term is computed in float32 whatever the models' dtype.

Layer mapping (structured students, :func:`layer_map`): a student that lost whole decoder layers records
them in ``config.json["llmprune"]["structure"]["removal"]["layers"]`` (original indices); student layer
``p`` is compared with teacher layer ``kept[p]``, ``kept`` being the original indices not removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.targets import find_decoder_layers, unwrap_model

__all__ = ["DistillLoss", "LayerOutputs", "TeacherOutput", "kd_loss", "layer_map", "lm_loss", "removed_layers",
           "squarehead_loss", "topk_kd_loss"]

IGNORE_INDEX = -100  # labels that take no part in the LM loss (padding), as in transformers


@dataclass
class TeacherOutput:
    """What the teacher gives for one batch ``[B, L]``: its full ``logits [B, L, V]``, or its ``top_k``
    logits (``topk_values [B, L, k]`` float, ``topk_ids [B, L, k]`` int64), and, for SquareHead, the outputs
    of the teacher layers the student's layers map to, in the student's layer order (``hidden[p] [B, L, H]``
    is the output of teacher layer ``kept[p]``)."""

    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    hidden: list[torch.Tensor] | None = None


@dataclass
class LossParts:
    """The mixed loss (differentiable) and each term as a float, for logs and the progress bar."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def _positions(mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """``mask [B, L]`` (1 = a real token) as a bool tensor, or None when every position counts."""
    if mask is None:
        return None
    return mask.to(torch.bool).reshape(shape[:2])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T² · mean over positions of KL(p_t ‖ p_s)``, ``p = softmax(logits / T)`` over the full vocabulary.

    ``student_logits``, ``teacher_logits``: ``[B, L, V]``; ``mask [B, L]``: positions that count (None: all).
    Zero when the logits are equal."""
    T = temperature
    log_ps = F.log_softmax(student_logits.float() / T, dim=-1)  # [B, L, V]
    log_pt = F.log_softmax(teacher_logits.float() / T, dim=-1)  # [B, L, V]
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [B, L]
    return _mean(kl, _positions(mask, kl.shape)) * T * T


def topk_kd_loss(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_ids: torch.Tensor,
                 temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation from the teacher's ``k`` largest logits only, at each position::

        q_j       = softmax(topk_values / T)_j                    j = 1..k (the teacher renormalised over its top k)
        log s_j   = log_softmax(student_logits / T)[topk_ids_j]  (the student's log-probability over the FULL
                                                                 vocabulary, gathered at the teacher's ids)
        loss      = T² · mean over positions of Σ_j q_j (log q_j − log s_j)

    That is the cross-entropy of the student against the truncated, renormalised teacher, minus that
    teacher's entropy. It is ≥ 0, and it is *not* zero when the student equals the teacher: it is then
    ``−log`` of the teacher's probability mass on its top k (times ``T²``), a constant with no gradient
    pressure but towards putting the mass on those k tokens in the teacher's proportions. With
    ``k = V`` it is exactly :func:`kd_loss`.

    ``student_logits [B, L, V]``, ``topk_values [B, L, k]``, ``topk_ids [B, L, k]`` (int64), ``mask [B, L]``.
    """
    T = temperature
    log_q = F.log_softmax(topk_values.float() / T, dim=-1)  # [B, L, k]
    log_ps = F.log_softmax(student_logits.float() / T, dim=-1)  # [B, L, V]
    log_s = log_ps.gather(-1, topk_ids.long())  # [B, L, k]
    kl = (log_q.exp() * (log_q - log_s)).sum(-1)  # [B, L]
    return _mean(kl, _positions(mask, kl.shape)) * T * T


def squarehead_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """SquareHead: ``mean over layers l of MSE(f_l^s, f_l^t) / Var(f_l^t)``.

    ``student_hidden[l]``, ``teacher_hidden[l]``: ``[B, L, H]``, the outputs of corresponding decoder layers.
    MSE and Var run over every element of the batch (the positions in ``mask [B, L]`` only, when given);
    Var is the population variance of the teacher's output."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"SquareHead needs one teacher layer output per student layer; got {len(student_hidden)} "
                         f"student and {len(teacher_hidden)} teacher outputs")
    if not student_hidden:
        raise ValueError("SquareHead needs the layer outputs; none were given")
    terms = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        hs, ht = hs.float(), ht.float()  # [B, L, H]
        pos = _positions(mask, hs.shape)
        if pos is not None:
            hs, ht = hs[pos], ht[pos]  # [n, H]
        var = ht.var(unbiased=False).clamp_min(torch.finfo(torch.float32).tiny)  # a constant layer: no division by 0
        terms.append(F.mse_loss(hs, ht) / var)
    return torch.stack(terms).mean()


def lm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at position ``i`` against ``labels[i + 1]``; labels equal to -100
    are ignored (``student_logits [B, L, V]``, ``labels [B, L]``)."""
    logits = student_logits[:, :-1].float().flatten(0, 1)  # [B(L-1), V]
    target = labels[:, 1:].flatten().long()  # [B(L-1)]
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def _mean(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if pos is None else x[pos].mean()


class DistillLoss(nn.Module):
    """``kd_weight · KD + squarehead_weight · SquareHead + lm_weight · LM`` (see the module docstring).

    ``forward(student_logits, teacher, input_ids, student_hidden=None, attention_mask=None, labels=None)``
    returns a :class:`LossParts`: ``.loss`` to call ``backward`` on, ``.parts`` each term as a float. The KD
    term uses the teacher's top-k logits when it gives them (:func:`topk_kd_loss`), its full logits
    otherwise (:func:`kd_loss`); ``top_k`` set here truncates full logits too, so an in-memory teacher
    computes exactly what an offline one with the same ``k`` does."""

    def __init__(self, kd_weight: float = 1.0, squarehead_weight: float = 0.0, lm_weight: float = 0.0,
                 temperature: float = 1.0, top_k: int | None = None):
        super().__init__()
        for name, w in (("kd_weight", kd_weight), ("squarehead_weight", squarehead_weight), ("lm_weight", lm_weight)):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        if kd_weight == squarehead_weight == lm_weight == 0:
            raise ValueError("every loss weight is 0; set kd_weight, squarehead_weight or lm_weight above 0")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for the full vocabulary), got {top_k}")
        self.kd_weight, self.squarehead_weight, self.lm_weight = kd_weight, squarehead_weight, lm_weight
        self.temperature, self.top_k = temperature, top_k

    @property
    def needs_hidden(self) -> bool:
        """Whether the layer outputs are needed (SquareHead is on)."""
        return self.squarehead_weight > 0

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.squarehead_weight > 0

    def forward(self, student_logits: torch.Tensor, teacher: TeacherOutput | None, input_ids: torch.Tensor,
                student_hidden: Sequence[torch.Tensor] | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> LossParts:
        total = student_logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        if self.kd_weight > 0:
            kd = self._kd(student_logits, teacher, attention_mask)
            total = total + self.kd_weight * kd
            parts["kd"] = float(kd.detach())
        if self.squarehead_weight > 0:
            if teacher is None or teacher.hidden is None or student_hidden is None:
                raise ValueError("squarehead_weight > 0 needs the student's and the teacher's layer outputs; run the "
                                 "student inside LayerOutputs(...) and give the teacher the layers (layer_map)")
            sq = squarehead_loss(student_hidden, teacher.hidden, attention_mask)
            total = total + self.squarehead_weight * sq
            parts["squarehead"] = float(sq.detach())
        if self.lm_weight > 0:
            if labels is None:
                labels = input_ids if attention_mask is None else input_ids.masked_fill(
                    ~attention_mask.to(torch.bool), IGNORE_INDEX)
            lm = lm_loss(student_logits, labels)
            total = total + self.lm_weight * lm
            parts["lm"] = float(lm.detach())
        parts["loss"] = float(total.detach())
        return LossParts(total, parts)

    def _kd(self, student_logits: torch.Tensor, teacher: TeacherOutput | None,
            mask: torch.Tensor | None) -> torch.Tensor:
        if teacher is None:
            raise ValueError("kd_weight > 0 needs a teacher; pass one, or set kd_weight=0 (LM loss only)")
        if teacher.topk_values is not None:
            values, ids = teacher.topk_values, teacher.topk_ids
            if self.top_k is not None and self.top_k < values.shape[-1]:
                values, ids = values[..., : self.top_k], ids[..., : self.top_k]  # sorted: the first k are the top k
            return topk_kd_loss(student_logits, values, ids, self.temperature, mask)
        if teacher.logits is None:
            raise ValueError("the teacher gave neither logits nor top-k logits")
        if teacher.logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(f"the teacher's vocabulary ({teacher.logits.shape[-1]}) differs from the student's "
                             f"({student_logits.shape[-1]}); distil from a model with the same tokenizer")
        if self.top_k is not None:
            values, ids = teacher.logits.float().topk(self.top_k, dim=-1)  # [B, L, k] each, sorted
            return topk_kd_loss(student_logits, values, ids, self.temperature, mask)
        return kd_loss(student_logits, teacher.logits, self.temperature, mask)


# ---------------------------------------------------------------------------------------------
# Layer outputs and the layer mapping
# ---------------------------------------------------------------------------------------------
def removed_layers(model: nn.Module) -> list[int]:
    """The decoder layers a structured run removed (original indices), as the model's metadata records them
    (``config.llmprune.structure.removal.layers``); empty for a model that kept all its layers."""
    meta = getattr(getattr(unwrap_model(model), "config", None), "llmprune", None)
    structure = meta.get("structure") if isinstance(meta, dict) else None
    return sorted(int(i) for i in ((structure or {}).get("removal") or {}).get("layers", ()))


def layer_map(n_teacher_layers: int, n_student_layers: int, removed: Sequence[int] = ()) -> list[int]:
    """``kept``: student layer ``p`` is compared with teacher layer ``kept[p]``, ``kept`` being the teacher's
    layer indices not in ``removed``. Raises ``ValueError`` when the counts do not agree."""
    bad = [i for i in removed if not 0 <= i < n_teacher_layers]
    if bad:
        raise ValueError(f"removed layer index {bad[0]} is outside the teacher's {n_teacher_layers} layers: the "
                         "teacher is not the model the student was cut from")
    kept = [i for i in range(n_teacher_layers) if i not in set(removed)]
    if len(kept) != n_student_layers:
        raise ValueError(
            f"the student has {n_student_layers} decoder layers, the teacher {n_teacher_layers} less the "
            f"{len(set(removed))} the student's metadata records as removed = {len(kept)}: they cannot be paired "
            "for SquareHead; use the teacher the student was pruned from, or set squarehead_weight=0")
    return kept


class LayerOutputs(contextlib.AbstractContextManager):
    """Collects the outputs of a model's decoder layers during one forward pass (forward hooks on the
    layers ``find_decoder_layers`` finds); ``outputs[p] [B, L, H]`` is the output of ``layers[p]`` of
    ``indices`` (all layers by default), in that order.

    Hooks rather than ``output_hidden_states``: transformers gives the last layer's output after the final
    norm there, which would compare a normed with an unnormed state when the student's last layer maps to
    an inner teacher layer. The hooks record only while :meth:`recording` is on, so gradient checkpointing's
    recomputation in the backward pass does not overwrite what the forward recorded."""

    def __init__(self, model: nn.Module, indices: Sequence[int] | None = None):
        _, layers = find_decoder_layers(unwrap_model(model))
        self.indices = list(range(len(layers))) if indices is None else list(indices)
        self._slot = {idx: p for p, idx in enumerate(self.indices)}
        self.outputs: list[torch.Tensor | None] = [None] * len(self.indices)
        self._on = False
        self._handles = [layers[i].register_forward_hook(self._hook(i)) for i in self.indices]

    def _hook(self, i: int):
        def hook(module, args, out):
            if self._on:
                self.outputs[self._slot[i]] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[torch.Tensor | None]]:
        """Record during the block (one forward pass); yields :attr:`outputs`, filled when the block ends."""
        self.outputs = [None] * len(self.indices)
        self._on = True
        try:
            yield self.outputs
        finally:
            self._on = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc) -> None:
        self.remove()
