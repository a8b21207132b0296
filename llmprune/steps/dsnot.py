"""DSnoT: Dynamic Sparse No Training (Zhang et al., ICLR 2024, "Dynamic Sparse No Training:
Training-Free Fine-tuning for Sparse LLMs", https://arxiv.org/abs/2310.08915; reference code
https://github.com/zyxxmu/DSnoT, ``lib/prune.py::prune_DSnoT``).

A refinement after any pruner: each output row ``i`` swaps pruned and kept weights, one pair at a
time, to drive its *expected* reconstruction error toward zero, with no weight update. With ``Ŵ``
the pruned weight and ``μ_j = E[x_j]``, ``σ²_j = Var[x_j]`` over the calibration tokens:

- error ``ε_i = Σ_j (W_ij − Ŵ_ij) μ_j`` (the reference's ``reconstruction_error``);
- growing: among the weights the initial mask pruned, revive
  ``g = argmax_r sign(ε_i) · W_ir μ_r / σ_r^(2p)`` over those with ``sign(W_ir μ_r) = sign(ε_i)``
  (reviving ``r`` lowers ``ε_i`` by ``W_ir μ_r``; a low variance makes the estimate reliable;
  ``p`` = ``dsnot_var_power``, the reference's ``--pow_of_var_regrowing``, 1);
- pruning, unstructured: among the weights the initial mask kept with ``sign(Ŵ_ir μ_r) = −sign(ε_i)``,
  prune the one with the lowest Wanda score ``|Ŵ_ir| · ‖X_r‖₂`` (pruning ``r`` adds ``Ŵ_ir μ_r``);
  N:M: the initially kept weight of ``g``'s group of M with the lowest Wanda score (no sign
  condition), so the group keeps N;
- a swap ``ε_i ← ε_i − W_ig μ_g + Ŵ_ip μ_p`` is made while ``|ε_i| > δ`` (``dsnot_threshold``), only
  if it lowers ``|ε_i|`` and, with ``dsnot_same_sign``, keeps the sign ``ε_i`` had before the first
  swap; the first swap a row refuses ends that row, as do ``T`` swaps (``dsnot_cycles``, the reference's
  ``--max_cycle_time``, 50). Every row keeps its number of kept weights; every N:M group its N.

Candidates on each side are consumed best first, as the reference's pointers into its sorted lists
are; a weight revived is never pruned again and a weight pruned by a swap is never revived.

Vectorised over rows, and over swaps: each step takes the next 8 candidate pairs of every active
row, their running error (a cumulative sum), and makes the leading swaps the sequential rule would
accept, stopping at a refusal (or, without the sign check, after a swap that flips the sign of
``ε_i``: the next swaps come from the other side). Candidate lists hold the 8 best, are computed by
``topk`` and refilled for the rows that use them up; for N:M a group met twice in one step waits
for the next. The result is the sequential algorithm's; a module costs two (N:M: one) ``topk(8)`` over
``[out, in]`` and a handful of small steps.

The growing weight takes its dense value ``W_ig``; every other kept weight keeps the pruner's
value ``Ŵ_ij``. After SparseGPT (whose kept weights were updated by OBS) ``ε_i`` therefore includes
the updates' own expected error, and pruning ``p`` adds ``Ŵ_ip μ_p`` with the updated value. The
reference never meets that case: its ``--initial_method sparsegpt`` only ranks weights by
SparseGPT's saliency ``w² / [H⁻¹]_jj²`` computed once, with no OBS update, so kept weights equal
``W`` there as after magnitude or Wanda, and the two rules coincide.

Which modules: the engine decides. The reference refines only the attention projections by
default (``--skip_layer mlp``: ``mlp.*`` keep the initial mask; OPT's ``fc1``/``fc2`` likewise).

Deviations from the reference code:

- The error and threshold are per token: ``μ_j`` is the mean over all calibration tokens. The
  reference's ``sum_metric_row`` is the sum over a 2048-token sequence averaged over sequences
  (``2048 · μ_j``) and its ``--update_threshold 0.1`` is compared with that sum; the default
  ``dsnot_threshold`` is ``0.1 / 2048`` so the two agree at the reference's sequence length and
  the result no longer depends on ``seqlen``.
- With ``dsnot_monotone`` (the default) no swap may increase ``|ε_i|``: a swap with
  ``|ε_after| ≥ |ε_i|`` is refused (ending the row). ``dsnot_monotone=False`` keeps the reference's
  rule: a row swaps while ``|ε_i| > δ`` (and, with the sign check, keeps its sign), overshooting allowed.
  In the reference ``--without_same_sign`` is ``type=bool, default=True``, so the unstructured
  branch never checks the sign (any value given on the command line parses as True) and accepts an
  overshooting swap (``ε = 0.5 → −2.6``); its N:M branch always checks the sign, but its pruning
  candidate (the group's lowest score) may have either sign, so ``|ε|`` can grow there too
  (``ε = 1 → 1.3``). ``dsnot_same_sign=None`` follows the reference (off unstructured, on for N:M).
- Candidates of the wrong sign are never used: when a row has no pruned weight left whose
  ``W μ`` has the sign of ``ε_i`` (or, unstructured, no kept weight of the opposite sign) the row
  stops. The reference's pointers then walk on into weights of the other sign or into kept weights
  (its growing list is sorted over the whole row with kept weights at 0; its pruning list continues
  with the opposite-sign weights, highest Wanda score first). Weights with ``W μ = 0`` are no
  candidates either (the reference's ``return_reorder_indice`` mishandles them).
- The pruning score is Wanda's ``|Ŵ| · ‖X‖₂`` for every initial method and both patterns. The
  reference uses Wanda's score unstructured, but for N:M the initial method's own metric
  (``|W|`` for magnitude, the SparseGPT saliency for sparsegpt); this step does not know which
  pruner ran. For Wanda initial masks the two agree.
- ``σ²_j`` is the population variance over all tokens; the reference averages the per-sequence
  variances (leaving out the spread of the sequence means). It only orders growing candidates.
  It is floored at ``1e-10 · max_j σ²_j`` (and the smallest normal float), so a constant input
  gets a large but finite score (the reference divides by zero).
- N:M keeps N of every M (this package's convention; the reference's ``prune_n`` counts pruned
  weights, the same for 2:4 and 4:8). A result with a channel permutation (RIA's ``perm``) keeps its
  groups: swaps stay within groups of the permuted order.
- The reference's ``--pow_of_var_pruning`` is parsed but never used; there is no such option here.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from pydantic import Field, field_validator

from ..masks import apply_mask_
from ..pruners.base import PruneResult
from ..registry import register_refiner
from ..settings import Settings, check_regex
from ..stats import InputStats
from .base import Refiner

log = logging.getLogger(__name__)

_LIST = 8  # candidates per row and side fetched at a time
_REFERENCE_SEQLEN = 2048  # tokens per calibration sequence in the reference (``get_loaders(seqlen=2048)``)


DEFAULT_SKIP = r"mlp|\.fc\d|experts|moe"  # the reference's --skip_layer mlp (OPT's fc1/fc2, MoE experts)


class DSnoTOptions(Settings):
    """DSnoT's options, fields of :class:`llmprune.PruneConfig`."""

    dsnot_cycles: int = Field(
        50, ge=0, description="DSnoT: at most this many grow-and-prune swaps per output row (the reference's "
        "max_cycle_time).",
    )
    dsnot_threshold: float = Field(
        0.1 / _REFERENCE_SEQLEN, ge=0, description="DSnoT: stop a row once |Σ_j (W - Ŵ)_ij E[x_j]| is at most this, "
        "per token (the reference's update_threshold 0.1 on sums over 2048-token sequences, made independent of "
        "seqlen).",
    )
    dsnot_var_power: float = Field(
        1.0, ge=0, description="DSnoT: the growing score is W·E[x] / Var[x]^p; 0 disables the variance term.",
    )
    dsnot_same_sign: bool | None = Field(
        None, description="DSnoT: refuse a swap that flips the sign of the row's error; unset: as the reference "
        "(off for unstructured, on for N:M).",
    )
    dsnot_monotone: bool = Field(
        True, description="DSnoT: refuse a swap that does not lower |error| (ending the row); false: as the "
        "reference, keep swapping while |error| is above the threshold, overshooting allowed.",
    )
    dsnot_skip: str | None = Field(
        DEFAULT_SKIP, description="DSnoT: regex on full module names left unrefined (the reference "
        "refines attention only: --skip_layer mlp); '' refines every target.",
    )

    @field_validator("dsnot_skip")
    @classmethod
    def _check_dsnot_skip(cls, v: str | None) -> str | None:
        return check_regex(v)


@register_refiner
class DSnoT(Refiner):
    name = "dsnot"
    needs = frozenset({"sq", "sum"})  # ‖X_j‖ (Wanda score, variance) and E[x_j]
    options = tuple(DSnoTOptions.model_fields)

    def __init__(self, dsnot_cycles: int = 50, dsnot_threshold: float = 0.1 / _REFERENCE_SEQLEN,
                 dsnot_var_power: float = 1.0, dsnot_same_sign: bool | None = None,
                 dsnot_monotone: bool = True, dsnot_skip: str | None = DEFAULT_SKIP):
        if isinstance(dsnot_cycles, bool) or not isinstance(dsnot_cycles, int) or dsnot_cycles < 0:
            raise ValueError(f"dsnot_cycles must be an integer >= 0 (swaps per row), got {dsnot_cycles!r}")
        if not dsnot_threshold >= 0:
            raise ValueError(f"dsnot_threshold must be >= 0 (per-token error), got {dsnot_threshold!r}")
        if not dsnot_var_power >= 0:
            raise ValueError(f"dsnot_var_power must be >= 0 (0 disables the variance term), got {dsnot_var_power!r}")
        self.cycles = dsnot_cycles
        self.threshold = float(dsnot_threshold)
        self.var_power = float(dsnot_var_power)
        self.same_sign = dsnot_same_sign
        self.monotone = bool(dsnot_monotone)
        self.skip = re.compile(dsnot_skip) if dsnot_skip else None

    def applies(self, name: str) -> bool:
        """Whether module ``name`` is refined: the reference skips the MLP (``--skip_layer mlp``)."""
        return self.skip is None or not self.skip.search(name)

    def refine(self, W: torch.Tensor, result: PruneResult, stats: InputStats, sparsity: float,
               nm: tuple[int, int] | None = None) -> PruneResult:
        out, cols = W.shape
        if nm is not None and cols % nm[1]:
            raise ValueError(f"an {nm[0]}:{nm[1]} pattern needs the input dimension to be a multiple of "
                             f"{nm[1]}, got {cols}; exclude this module or use an unstructured pattern")
        W = W.float()
        M0 = result.M  # [out, in] bool, the pruner's mask (True = kept)
        M = M0.clone(memory_format=torch.contiguous_format)  # [out, in] the mask being refined
        W_hat = result.W.float().clone(memory_format=torch.contiguous_format)  # [out, in]
        if self.cycles == 0 or out == 0 or cols == 0:
            return dataclasses.replace(result, W=apply_mask_(W_hat, M), M=M)
        dev = W.device
        mu = stats.mean.to(dev)  # [in]  E[x_j]
        x_norm = stats.col_sq_norms.to(dev).sqrt()  # [in]  ‖X_j‖₂
        c_grow = mu  # [in]  growing score W_ij · c_j = W_ij μ_j / σ_j^2p
        if self.var_power:
            var = stats.var.to(dev)  # [in]
            floor = (var.max() * 1e-10).clamp_min(torch.finfo(var.dtype).tiny)  # constant inputs: large, finite
            c_grow = mu / var.clamp_min(floor).pow(self.var_power)
        c_prune = x_norm * mu.sign()  # [in]  |Ŵ_ij c_j| = Wanda score, sign(Ŵ_ij c_j) = sign(Ŵ_ij μ_j)
        same_sign = self.same_sign if self.same_sign is not None else nm is not None
        eps = W @ mu - W_hat @ mu  # [out]  ε_i
        act = torch.nonzero(eps.abs() > self.threshold).squeeze(1)  # [a] rows still swapping
        K = min(_LIST, self.cycles, cols)
        lists = _Candidates(K, W, W_hat, M, M0, mu, c_grow, c_prune, prune_lists=nm is None)
        lists.fill(act * 2 + (eps[act] > 0), fresh=act.numel() == out)
        steps = torch.arange(K, device=dev)  # [K]
        swaps = torch.zeros(out, dtype=torch.long, device=dev)  # [out] swaps made per row
        if nm is not None:
            m = nm[1]
            order = getattr(result, "perm", None)  # [in] permuted position -> input index (RIA)
            order = torch.arange(cols, device=dev) if order is None else order.to(dev)
            pos = torch.argsort(order)  # [in] input index -> position in the grouped order
            offsets = torch.arange(m, device=dev)  # [m]

        grown_r, grown_c = [], []
        while act.numel():
            # The next K swaps of every active row at once: the reference's cycles, one per swap,
            # taken here up to the first it would refuse (or, without the sign check, up to the first
            # that flips the sign of ε: the next ones come from the other side's lists).
            e = eps[act]  # [a]
            rs = act * 2 + (e > 0)  # [a] row and side (1: lower ε by reviving a weight with W μ > 0)
            idx, val = lists.window(rs)  # [a, K, 2] (growing, pruning) candidates, their changes of ε
            g, dg = idx[..., 0], val[..., 0]  # [a, K]
            if nm is None:
                p, dp = idx[..., 1], val[..., 1]  # [a, K]
            else:
                group = order[(pos[g] // m * m).unsqueeze(-1) + offsets]  # [a, K, m] inputs of g's group
                r3 = act[:, None, None]  # [a, 1, 1]
                S = W_hat[r3, group].abs() * x_norm[group]  # [a, K, m] Wanda scores
                S.masked_fill_(~(M[r3, group] & M0[r3, group]), float("inf"))  # initially kept, not yet pruned
                best = S.min(-1)  # [a, K]
                p = group.gather(-1, best.indices.unsqueeze(-1)).squeeze(-1)  # [a, K]
                dp = W_hat[act[:, None], p] * mu[p]  # [a, K]
                # a group met earlier in the window has changed: its swaps wait for the next window
                first = group[..., 0]  # [a, K]
                again = (first.unsqueeze(2) == first.unsqueeze(1)).tril_(-1).any(2)  # [a, K]
                dp.masked_fill_(best.values.isinf() | again, float("nan"))
            after = e.unsqueeze(1) + (dp - dg).cumsum(1)  # [a, K] ε after each swap; NaN from a missing one on
            before = torch.cat((e.unsqueeze(1), after[:, :-1]), 1)  # [a, K]
            ok = (before.abs() > self.threshold) & ~after.isnan()  # [a, K] a swap exists, error above δ
            ok &= before * e.unsqueeze(1) > 0  # still on this side
            if self.monotone:
                ok &= after.abs() < before.abs()
            if same_sign:
                ok &= after * e.unsqueeze(1) > 0
            ok &= swaps[act].unsqueeze(1) + steps < self.cycles
            n = ok.cumprod(1).sum(1)  # [a] swaps made: the leading accepted ones
            take = steps < n.unsqueeze(1)  # [a, K]
            r, g, p = act.unsqueeze(1).expand_as(take)[take], g[take], p[take]  # [s]
            M[r, g] = True
            M[r, p] = False
            grown_r.append(r)
            grown_c.append(g)
            lists.ptr[rs] += n
            swaps[act] += n
            e = torch.where(n > 0, after.gather(1, (n - 1).clamp_min(0).unsqueeze(1)).squeeze(1), e)  # [a]
            eps[act] = e
            # rows that refused their first swap stop; the others retry (a refusal is met again, a
            # used-up list is refilled, a flipped sign takes the other side)
            act = act[(n > 0) & (e.abs() > self.threshold)]

        if grown_r:
            r, g = torch.cat(grown_r), torch.cat(grown_c)  # [swaps]
            W_hat[r, g] = W[r, g]  # revived weights take their dense value
            log.debug("DSnoT: %d swaps in %d of %d rows", r.numel(), int((swaps > 0).sum()), out)
        return dataclasses.replace(result, W=apply_mask_(W_hat, M), M=M)


class _Candidates:
    """Per row and side (0: ε < 0, 1: ε > 0), the next ``K`` growing and (unstructured) pruning
    candidates, best first, with their changes of ``ε`` (``W_ig μ_g`` removed, ``Ŵ_ip μ_p`` added).
    NaN marks a missing candidate; entry ``K`` is always missing.

    The lists are short because most rows stop after a few swaps; a row that uses its lists up gets
    them recomputed from the current mask, so they never repeat a weight already swapped. A side a
    row has not needed yet starts used up, so it is computed on first use.
    """

    def __init__(self, K: int, W: torch.Tensor, W_hat: torch.Tensor, M: torch.Tensor, M0: torch.Tensor,
                 mu: torch.Tensor, c_grow: torch.Tensor, c_prune: torch.Tensor, prune_lists: bool):
        out, dev = W.shape[0], W.device
        self.K, self.W, self.W_hat, self.M, self.M0, self.mu = K, W, W_hat, M, M0, mu
        self.c_grow, self.c_prune, self.prune_lists = c_grow, c_prune, prune_lists  # [in], [in]
        self.idx = torch.zeros(out * 2, K + 1, 2, dtype=torch.long, device=dev)  # [out·2, K+1, 2]
        self.val = torch.full((out * 2, K + 1, 2), float("nan"), device=dev)  # [out·2, K+1, 2]
        self.val[:, K - 1] = 0  # a "full" list ...
        self.ptr = torch.full((out * 2,), K, dtype=torch.long, device=dev)  # [out·2] ... used up: fill on use
        self.steps = torch.arange(K, device=dev)  # [K]

    def window(self, rs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``K`` entries ``[a, K, 2]`` (indices, changes of ε) of rows-and-sides ``rs = 2·row + side``,
        missing past the end of a list."""
        K = self.K
        more = (self.ptr[rs] >= K) & ~self.val[rs, K - 1].isnan().any(1)  # full lists used up: more may exist
        if bool(more.any()):
            self.fill(rs[more])
        at = (self.ptr[rs].unsqueeze(1) + self.steps).clamp_max_(K)  # [a, K]
        return self.idx[rs.unsqueeze(1), at], self.val[rs.unsqueeze(1), at]

    def fill(self, rs: torch.Tensor, fresh: bool = False) -> None:
        """Recompute the lists of rows-and-sides ``rs [r]`` (``fresh``: every row, before any swap)."""
        if rs.numel() == 0:
            return
        rows = rs // 2  # [r]
        sgn = (rs % 2 * 2 - 1).to(self.W.dtype).unsqueeze(1)  # [r, 1]  sign(ε_i)
        if fresh:
            W, W_hat, grown_or_kept, kept = self.W, self.W_hat, self.M0, self.M0  # [out, in]
        else:
            M, M0 = self.M[rows], self.M0[rows]  # [r, in]
            W, W_hat, grown_or_kept, kept = self.W[rows], self.W_hat[rows], M | M0, M & M0
        K, nan = self.K, float("nan")
        # growing: initially pruned, not yet revived, W μ of the sign of ε; highest score first.
        # Masks enter as 0/1 factors (branch-free: several times faster than masked_fill on the CPU;
        # via uint8, as bool converts slowly).
        G = W * self.c_grow  # [r, in]
        G.mul_(sgn).mul_((~grown_or_kept).view(torch.uint8).to(G.dtype))
        top = G.topk(K, 1)  # [r, K]; entries <= 0 are no candidates
        self.idx[rs, :K, 0] = top.indices
        self.val[rs, :K, 0] = (W.gather(1, top.indices) * self.mu[top.indices]).masked_fill_(top.values <= 0, nan)
        if self.prune_lists:
            # pruning: initially kept, not yet pruned, Ŵ μ of the sign opposite to ε; lowest Wanda
            # score P first, as the highest 1 / (P − tiny): P <= 0 (no candidate) maps below 0
            P = W_hat * self.c_prune  # [r, in]
            P.mul_(-sgn).mul_(kept.view(torch.uint8).to(P.dtype)).sub_(torch.finfo(P.dtype).tiny).reciprocal_()
            top = P.topk(K, 1)  # [r, K]
            self.idx[rs, :K, 1] = top.indices
            self.val[rs, :K, 1] = (W_hat.gather(1, top.indices) * self.mu[top.indices]).masked_fill_(
                top.values <= 0, nan)
        else:
            self.val[rs, :K, 1] = 0
        self.ptr[rs] = 0
