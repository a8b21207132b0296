"""RIA: Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models", https://openreview.net/forum?id=Tr0lPx9woF;
reference code https://github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning,
``lib/prune.py::prune_ria``).

Score ``S_ij = (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^α``: the weight's share of its
output row plus its share of its input column (relative importance, RI), times the norm of input
feature ``j`` over all calibration tokens to the power ``α`` (``ria_alpha``, 0.5 as in the paper).
Unstructured masks compare scores over the whole matrix, as the reference does by default (its
``--per_outneuron`` flag, Wanda's per-row comparison, is an ablation); N:M masks keep the ``N``
highest scores of every group of ``M`` inputs.

Channel permutation (N:M with ``ria_permute``, the paper's Sec. 4): the input channels are reordered
so that the N:M groups keep as much total score as possible, then the mask is chosen on the
permuted order. :func:`channel_permutation` runs the reference's two steps: heuristic channel
allocation (channels sorted by total score, dealt to the groups in a snake order), then
linear-sum-assignment refinement (for each position ``c`` of a group in turn, reassign the
channels at position ``c`` among the groups with ``scipy.optimize.linear_sum_assignment``).

The pruned weight and mask come back in the *original* input order, so the checkpoint stays a plain
model and ``W ⊙ M`` computes the same function as the permuted weight on permuted inputs. The zeros
then are N:M in groups of *permuted* channels: ``W[:, perm]`` (with ``perm`` from
:class:`PermutedResult`) has ``N`` nonzeros at most in every group of ``M`` consecutive columns,
whereas ``W`` itself in general does not. Exploiting that with 2:4 kernels needs the permutation
applied to the weight's columns and to its inputs (or folded into the previous layer's outputs).

Deviations from the reference code:

- ``‖X_j‖₂`` is the norm over all tokens (``sqrt(Σ_t x_tj²)``); the reference divides ``Σ x²`` by the
  number of calibration sequences first. That scales every score of a matrix by the same factor
  and changes no mask and no permutation.
- Unstructured: exactly ``floor(sparsity · numel)`` weights are pruned; the reference prunes every
  score ``<=`` the sorted score at that index, one more (and more on ties).
- A row or column of ``W`` that is all zero gives ``0/0 = NaN`` in the reference; here its relative
  importance is 0.
- Scores are computed in float32 (the engine's weights); the reference computes the RI term in the
  model's float16.
- ``N:M`` keeps ``N`` of every ``M`` (this package's convention); the reference's ``prune_n`` counts
  the pruned weights of a group. The two agree for 2:4 and 4:8.
- The reference runs the permutation only with ``--reallocation`` (heuristic) and ``--lsa``
  (refinement); ``ria_permute`` (default on) runs both, ``ria_lsa_rounds=0`` the heuristic only.
  ``ria_lsa_rounds`` > 1 repeats the refinement sweep (the reference sweeps once).
- Heuristic allocation ranks channels by total score, the reference's default ``--importance_score
  sum``; its ``retained_degree_*`` variants are not implemented. Ties are broken by a stable sort.
- ``ria_lsa_blocks`` is the reference's ``--fast`` (solve the assignment within contiguous blocks of
  channels), with one value for every module where the reference picks 4 (attention), 8
  (up/gate) or 16 (down) by module name. Blocks are whole groups, as even as possible. By default
  (``None``) a module gets the fewest blocks of at most ``LSA_MAX_GROUPS`` (512) groups each: one
  assignment over all channels up to 2,048 inputs at 2:4 (every module of the embedded model, as
  before), blocks beyond. The reference's default is one assignment over all channels, whose cost
  grows like ``G³`` in the ``G = in/M`` groups: SciPy's solver took 0.27 s at ``G`` = 512, 2.5 s at
  1,024 and 44 s at 2,048 on this project's 2-core CPU, so a Llama-3-8B ``down_proj`` (``G`` = 3,584)
  would take minutes per position and a 70B one (7,168) hours. Blocks of 512 groups cost
  ``G/512 × 0.27 s`` per position, linear in the width; on a 1024 × 2048 score matrix the kept score
  (relative to the identity order) was 1.03201 in one block, 1.03156 in 2 and 1.03069 in 8.
- The assignment's score matrix is computed in closed form (``T_g + Σ_i max(v_ir − o_ig, 0)``, see
  :func:`swap_scores`, in float64) instead of sorting every candidate group; the values are the same
  up to rounding (equal-valued optima may then be broken differently).
- If the permutation keeps less total score than the identity order (the reference prints both
  and keeps the permutation), the identity is returned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from pydantic import Field

from ..masks import nm_mask, select_mask
from ..registry import register_pruner
from ..settings import Settings
from ..stats import InputStats
from .base import Pruner, PruneResult

logger = logging.getLogger(__name__)

LSA_MAX_GROUPS = 512  # groups per assignment by default: SciPy's solver is O(G³) (0.27 s at 512, 44 s at 2,048)


@dataclass
class PermutedResult(PruneResult):
    """A result whose N:M pattern holds in a permuted input order.

    ``W`` and ``M`` are in the original input order (``W ⊙ M`` as for any pruner); ``W[:, perm]``
    and ``M[:, perm]`` keep at most/exactly ``N`` of every ``M`` consecutive columns.
    """

    perm: torch.Tensor  # [in] long: permuted position p -> original input index perm[p]


def ria_scores(W: torch.Tensor, x_norm: torch.Tensor, alpha: float) -> torch.Tensor:
    """``S_ij = (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^α``  for ``W [out, in]``, ``x_norm [in]``."""
    W_abs = W.abs()  # [out, in]
    tiny = torch.finfo(W_abs.dtype).tiny  # an all-zero row or column: RI 0 instead of 0/0
    row_sum = W_abs.sum(1, keepdim=True).clamp_min_(tiny)  # [out, 1]  Σ_k |W_ik|
    col_sum = W_abs.sum(0, keepdim=True).clamp_min_(tiny)  # [1, in]   Σ_k |W_kj|
    RI = W_abs / row_sum + W_abs / col_sum  # [out, in]
    return RI * x_norm.pow(alpha).unsqueeze(0)  # [out, in]


def kept_score(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Total score an N:M mask keeps: the ``n`` highest of every group of ``m`` consecutive inputs."""
    out, cols = S.shape
    return S.reshape(out, cols // m, m).topk(n, dim=-1).values.sum()  # []


def heuristic_allocation(S: torch.Tensor, m: int) -> torch.Tensor:
    """The reference's channel allocation: channels sorted by total score ``Σ_i S_ij`` (ascending) are
    cut into ``m`` runs of ``G = in/m``; run ``c`` fills position ``c`` of groups ``0..G-1``, odd runs
    reversed (a snake order, so no group gets only the best of every run).

    Returns ``perm [in]``: permuted position -> original input index.
    """
    cols = S.shape[1]
    order = torch.argsort(S.sum(0), stable=True)  # [in] ascending importance
    runs = order.reshape(m, cols // m).clone()  # [m, G] run c = positions c of every group
    runs[1::2] = runs[1::2].flip(-1)
    return runs.T.reshape(-1)  # [in]  group g = runs[:, g]


def swap_scores(S_b: torch.Tensor, c: int, n: int, m: int) -> torch.Tensor:
    """Score matrix of one assignment step: ``C[r, g]`` is the score group ``g`` keeps (``n`` of ``m``)
    when the channel at position ``c`` of group ``r`` replaces the one at position ``c`` of group ``g``.

    ``S_b [out, G*m]`` holds the scores in the current order. With the ``m - 1`` fixed scores of group
    ``g`` in row ``i`` sorted descending, ``T_ig`` the sum of the first ``n`` and ``o_ig`` the ``n``-th,
    a newcomer ``v`` is kept iff ``v > o_ig``, replacing ``o_ig``:
    ``C[r, g] = Σ_i T_ig + Σ_i max(v_ir − o_ig, 0)``  (float64).
    """
    out, cols = S_b.shape
    G = cols // m
    S3 = S_b.reshape(out, G, m)  # [out, G, m]
    V = S3[:, :, c]  # [out, G]  the candidates v_ir
    others = torch.cat([S3[:, :, :c], S3[:, :, c + 1 :]], dim=-1)  # [out, G, m-1]
    top = others.topk(n, dim=-1).values  # [out, G, n]  descending
    T = top.sum((0, 2)).double()  # [G]  Σ_i T_ig
    o = top[:, :, -1].double()  # [out, G]  o_ig
    V = V.double()  # float64: the sums below cancel
    # max(v − o, 0) = (v − o + |v − o|) / 2, and Σ_i |v_ir − o_ig| is an L1 distance (torch.cdist:
    # about 8x faster than the broadcast on the CPU)
    C = 0.5 * (V.sum(0)[:, None] - o.sum(0)[None, :] + torch.cdist(V.T, o.T, p=1))  # [G (r), G (g)]
    return C + T.unsqueeze(0)  # [G, G] float64


def _lsa_step(S_b: torch.Tensor, c: int, n: int, m: int) -> torch.Tensor:
    """Best reassignment of position ``c`` among the groups of ``S_b [out, G*m]``: ``src [G]``, the group
    whose position-``c`` channel moves into group ``g``."""
    from scipy.optimize import linear_sum_assignment

    C = swap_scores(S_b, c, n, m)  # [G (r), G (g)]
    g_idx, r_idx = linear_sum_assignment(C.T.cpu().numpy(), maximize=True)
    src = torch.empty(C.shape[0], dtype=torch.long)  # [G]
    src[torch.from_numpy(g_idx)] = torch.from_numpy(r_idx)
    return src.to(S_b.device)


def lsa_block_count(groups: int, blocks: int | None) -> int:
    """Blocks the assignment of ``groups`` groups is split into: ``blocks`` (at most one per group), or
    by default (``None``) the fewest with at most :data:`LSA_MAX_GROUPS` groups each."""
    if blocks is None:
        blocks = -(-groups // LSA_MAX_GROUPS)
    return max(1, min(blocks, groups))


def channel_permutation(
    S: torch.Tensor, n: int, m: int, lsa_rounds: int = 1, blocks: int | None = 1
) -> torch.Tensor:
    """An input-channel order in which an ``n``:``m`` mask (keep ``n`` of every ``m`` consecutive inputs)
    of the scores ``S [out, in]`` keeps as much total score as possible (RIA's channel permutation).

    Heuristic allocation (:func:`heuristic_allocation`), then ``lsa_rounds`` sweeps over the ``m``
    positions of a group, each solving a linear sum assignment within each of ``blocks`` contiguous
    blocks of groups (``None``: :func:`lsa_block_count`'s default). Never keeps less than the identity
    order. Pure: ``S`` is not modified.

    Returns ``perm [in]`` (long): permuted position -> original input index, so ``S[:, perm]`` is the
    permuted matrix.
    """
    out, cols = S.shape
    if cols % m:
        raise ValueError(
            f"an {n}:{m} pattern needs the input dimension to be a multiple of {m}, got {cols}; "
            "exclude this module with --ignore or use an unstructured pattern"
        )
    identity = torch.arange(cols, device=S.device)  # [in]
    if n <= 0 or n >= m:  # every assignment keeps the same score
        return identity
    G = cols // m
    nb = lsa_block_count(G, blocks)
    bounds = [m * (G * b // nb) for b in range(nb + 1)]  # column edges of blocks of whole groups
    perm = heuristic_allocation(S, m)  # [in]
    for _ in range(lsa_rounds):
        for c in range(m):
            for b0, b1 in zip(bounds[:-1], bounds[1:]):
                P_b = perm[b0:b1].reshape(-1, m)  # [G_b, m] view into perm
                src = _lsa_step(S[:, perm[b0:b1]], c, n, m)  # [G_b]
                P_b[:, c] = P_b[src, c].clone()
    kept_perm, kept_id = float(kept_score(S[:, perm], n, m)), float(kept_score(S, n, m))
    logger.debug("RIA channel permutation: kept score %.6g (identity order %.6g)", kept_perm, kept_id)
    return perm if kept_perm >= kept_id else identity


class RIAOptions(Settings):
    """RIA's options, fields of :class:`llmprune.PruneConfig`."""

    ria_alpha: float = Field(
        0.5, ge=0, description="RIA: exponent a on the input-activation norm ‖X_j‖₂ in the score (0: relative "
        "importance only).",
    )
    ria_permute: bool = Field(
        True, description="RIA N:M: reorder input channels so the N:M groups keep the most score (heuristic "
        "allocation + linear-sum assignment); the weight is saved in the original order.",
    )
    ria_lsa_rounds: int = Field(
        1, ge=0, description="RIA N:M permutation: sweeps of linear-sum-assignment refinement over the M positions "
        "of a group (0: heuristic allocation only; the reference sweeps once).",
    )
    ria_lsa_blocks: int | None = Field(
        None, ge=1, description="RIA N:M permutation: solve the assignment within this many contiguous blocks of "
        "channels (faster, slightly worse; the reference's --fast uses 4/8/16). Default: the fewest blocks of at "
        f"most {LSA_MAX_GROUPS} groups (one block up to {4 * LSA_MAX_GROUPS} inputs at 2:4); 1: one assignment over "
        "all channels, the reference's default, whose cost grows like the cube of the width.",
    )


@register_pruner
class RIA(Pruner):
    name = "ria"
    needs = frozenset({"sq"})
    options = tuple(RIAOptions.model_fields)

    def __init__(
        self, ria_alpha: float = 0.5, ria_permute: bool = True, ria_lsa_rounds: int = 1,
        ria_lsa_blocks: int | None = None,
    ):
        if ria_lsa_rounds < 0:
            raise ValueError(f"ria_lsa_rounds must be >= 0 (0: heuristic allocation only), got {ria_lsa_rounds}")
        if ria_lsa_blocks is not None and ria_lsa_blocks < 1:
            raise ValueError(f"ria_lsa_blocks must be >= 1 (1: one assignment over all channels) or None (blocks of "
                             f"at most {LSA_MAX_GROUPS} groups), got {ria_lsa_blocks}")
        self.alpha = ria_alpha
        self.permute = ria_permute
        self.lsa_rounds = ria_lsa_rounds
        self.lsa_blocks = ria_lsa_blocks

    def prune(
        self, W: torch.Tensor, stats: InputStats, sparsity: float, nm: tuple[int, int] | None = None
    ) -> PruneResult:
        x_norm = stats.col_sq_norms.sqrt()  # [in]  ‖X_j‖₂
        S = ria_scores(W, x_norm, self.alpha)  # [out, in]
        if nm is None:
            M = select_mask(S, sparsity, None, scope="matrix")  # [out, in]
            return PruneResult(W * M, M)
        if not self.permute:
            M = nm_mask(S, *nm)  # [out, in]
            return PruneResult(W * M, M)
        perm = channel_permutation(S, *nm, lsa_rounds=self.lsa_rounds, blocks=self.lsa_blocks)  # [in]
        M_perm = nm_mask(S[:, perm], *nm)  # [out, in] in the permuted order
        M = torch.empty_like(M_perm)  # [out, in] in the original order
        M[:, perm] = M_perm
        return PermutedResult(W * M, M, perm)
