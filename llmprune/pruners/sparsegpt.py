"""SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot
(Frantar & Alistarh, 2023, arXiv:2301.00774).

OBS weight reconstruction with the layer Hessian ``H = Σ x xᵀ``: columns are visited left to
right; each pruned weight's error is spread over the not-yet-visited columns of its row through
the upper Cholesky factor of ``H⁻¹``. Lazy batch updates apply the accumulated error to the rest
of the matrix once per block of ``blocksize`` columns; the unstructured mask is chosen adaptively
per block from the saliency ``w² / [H⁻¹]_jj²``; N:M masks per group of M columns when the group
is reached.

Deviations from the reference code (IST-DASLab/sparsegpt):
- N:M (``nm_exact``): when a group of M columns is reached, the M - N weights of each row to prune
  are chosen by the exact output error the sweep will leave (from the group's block of the
  inverse-Hessian factor); the reference scores the columns one by one (``w² / [H⁻¹]_jj²``),
  ignoring that pruning one weight of the group changes the others. ``nm_exact="auto"`` (default)
  scores every one of the C(M, M - N) sets when there are at most ``EXACT_SETS_AUTO`` (70) of
  them (2:4, 4:8, any M <= 8) and beyond that chooses greedily on the same loss, one column at a time
  (``_group_mask_greedy``; exact when one weight per group is pruned); ``True`` always scores every
  set (refused above ``EXACT_SETS_MAX``); ``False`` is the reference. :meth:`SparseGPT.nm_choice`
  says which ran;
- column order (``act_order``, GPTQ's act-order, default on for N:M): whole groups of columns are
  visited by decreasing Hessian diagonal, so the inputs that matter most are pruned while the
  most columns are left to absorb their error; the weight and mask are returned in the original
  order, so N:M groups stay consecutive input columns;
- an unstructured block prunes exactly ``floor(sparsity · block size)`` weights (the reference's
  ``<= threshold`` prunes one more and all ties);
- if the damped Hessian is still not positive definite, damping is raised tenfold (up to three
  times) with a warning instead of failing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field

from ..masks import apply_mask_, invert, lowest_mask, parse_pattern
from ..stats import InputStats
from ..registry import register_pruner
from ..runtime.blas import scipy_blas_single_thread
from ..settings import Settings
from .base import Pruner, PruneResult

log = logging.getLogger(__name__)

# nm_exact="auto" scores every set of a group's columns up to this many sets (2:4 has 6, 4:8 70,
# 5:10 252, 6:12 924, 8:16 12,870: every pattern with M <= 8 stays exact) and chooses greedily
# beyond. Measured on a 576 x 1536 weight (random SPD Hessian; the search runs on one thread, as
# in the sweep): the whole unstructured prune takes 0.15-0.3 s; the exact search adds 0.18 s for
# 4:8, 1.2 s for 5:10, 2.4 s for 6:12, 85 s for 8:16; the greedy one 0.24 s for 4:8, 0.29 s for
# 5:10 and 6:12, 0.38 s for 8:16, 0.78 s for 16:32. Past 70 sets the exact search alone costs
# several unstructured prunes.
EXACT_SETS_AUTO = 70
# nm_exact=True refuses more sets than this: the triangular blocks and indices of the sets take
# C · p · (p + 2) floats (C(19, 9) = 92,378 sets: 37 MB), and the time grows with C · p².
EXACT_SETS_MAX = 100_000
# row chunk of the exact search: its [C, rows, p] solves stay under this many floats (64 MiB each);
# 4:8 is solved in one piece up to 59,918 rows
_EXACT_CHUNK = 1 << 24


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def _combinations(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every k-subset of m columns: as masks ``[C(m, k), m]`` and as increasing indices ``[C(m, k), k]``."""
    idx = torch.tensor(list(itertools.combinations(range(m), k)), dtype=torch.long).reshape(-1, k)  # [C, k]
    masks = torch.zeros(len(idx), m, dtype=torch.bool).scatter_(1, idx, True)  # [C, m]
    return masks.to(device), idx.to(device)


def _lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``L``: LAPACK's triangular inverse (``trtri``, a third of the
    flops of a triangular solve against the identity) on the CPU when SciPy has it, else a solve."""
    if L.device.type == "cpu" and L.dtype in (torch.float32, torch.float64):
        try:
            from scipy.linalg import lapack
        except ImportError:  # pragma: no cover - scipy comes with lm-eval's dependencies
            lapack = None
        if lapack is not None:
            trtri = lapack.strtri if L.dtype == torch.float32 else lapack.dtrtri
            with scipy_blas_single_thread()():
                inv, info = trtri(L.numpy(), lower=1)  # the strict upper triangle is not referenced: stays 0
            if info == 0:
                return torch.from_numpy(inv)  # [in, in]
    eye = torch.eye(L.shape[0], device=L.device, dtype=L.dtype)
    return torch.linalg.solve_triangular(L, eye, upper=False)


class SparseGPTOptions(Settings):
    """SparseGPT's options, fields of :class:`llmprune.PruneConfig`. ``damp`` is declared here once; ALPS,
    ADMM reconstruction and EoRA take the same field (``damp: float = SparseGPTOptions.model_fields["damp"]``)."""

    blocksize: int = Field(128, ge=1, description="SparseGPT: columns per lazy-update block.")
    damp: float = Field(
        0.01, gt=0, lt=1, description="SparseGPT, ALPS, ADMM reconstruction, EoRA: Hessian damping as a fraction of "
        "its mean diagonal."
    )
    act_order: bool | None = Field(
        None,
        description="SparseGPT: visit input columns (whole N:M groups) by decreasing Hessian diagonal, as GPTQ's "
        "act-order. None: on for N:M patterns, off for unstructured (whose blocks each get the same sparsity).",
    )
    nm_exact: bool | Literal["auto"] = Field(
        "auto",
        description="SparseGPT N:M: which M-N weights of each group to prune. true: the set with the least exact "
        "OBS loss, every C(M, M-N) set scored (refused above 100,000 sets); auto: exact up to 70 sets (every "
        "M <= 8), beyond that greedy on the same loss, one weight at a time; false: the reference's one-by-one "
        "saliency w^2 / [H^-1]_jj^2.",
    )


@register_pruner
class SparseGPT(Pruner):
    name = "sparsegpt"
    needs = frozenset({"hessian"})
    options = tuple(SparseGPTOptions.model_fields)

    def __init__(self, blocksize: int = 128, damp: float = 0.01, act_order: bool | None = False,
                 nm_exact: bool | str = "auto"):
        if not (isinstance(nm_exact, bool) or nm_exact == "auto"):
            raise ValueError(f"nm_exact {nm_exact!r} is not understood; choose one of: auto, true, false")
        self.blocksize = blocksize
        self.damp = damp
        self.act_order = act_order  # None: on for N:M patterns, off for unstructured
        self.nm_exact = nm_exact

    @classmethod
    def check_config(cls, config: Any) -> None:
        """``nm_exact=true`` with a pattern whose exact search is too large fails now, before any model loads."""
        if config.nm_exact is True:
            patterns = [config.pattern, *[v for v in (config.module_sparsity or {}).values() if isinstance(v, str)]]
            for p in patterns:
                cls(nm_exact=True).nm_choice(parse_pattern(p))

    def nm_choice(self, nm: tuple[int, int] | None) -> str | None:
        """How the weights of an N:M group are chosen: ``"exact"`` (every set scored),
        ``"greedy"`` (one column at a time on the same loss) or ``"saliency"`` (the reference);
        None for unstructured. Raises if ``nm_exact=True`` asks for more than ``EXACT_SETS_MAX`` sets."""
        if nm is None:
            return None
        if self.nm_exact is False:
            return "saliency"
        n_keep, m = nm
        sets = math.comb(m, m - n_keep)
        if self.nm_exact is True:
            if sets > EXACT_SETS_MAX:
                raise ValueError(
                    f"nm_exact=true would score C({m}, {m - n_keep}) = {sets:,} sets per group of an {n_keep}:{m} "
                    f"pattern, over the limit of {EXACT_SETS_MAX:,}; set nm_exact to 'auto' (greedy beyond "
                    f"{EXACT_SETS_AUTO} sets) or false (the reference saliency)"
                )
            return "exact"
        return "exact" if sets <= EXACT_SETS_AUTO else "greedy"

    def inverse_hessian_factor(self, H: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Upper Cholesky factor of the damped ``H⁻¹`` and the mask of dead inputs."""
        H = H / max(n, 1)  # [in, in]
        diag = torch.diagonal(H)  # view
        dead = diag == 0  # inputs never active: their weights cannot matter
        diag[dead] = 1
        damp = self.damp * torch.mean(diag)
        d0 = diag.clone()
        for attempt in range(4):
            try:
                torch.add(d0, damp, out=diag)  # H + damp·I
                # Upper factor U of H⁻¹ = UᵀU without forming H⁻¹: with J the reversal permutation
                # and J H J = L Lᵀ, U = J L⁻¹ J (one Cholesky and one triangular inverse).
                L = torch.linalg.cholesky(H.flip(0, 1))  # [in, in]
                return _lower_inverse(L).flip(0, 1), dead
            except torch.linalg.LinAlgError:
                if attempt == 3:
                    raise
                damp = damp * 10
                log.warning("Hessian not positive definite; retrying with damping %.3g", float(damp))
        raise AssertionError("unreachable")

    def _factor(self, stats: InputStats, nm: tuple[int, int] | None):
        """``(H_inv, dead, perm)`` of ``stats``, computed once for the modules that share an input (q/k/v)."""
        act_order = nm is not None if self.act_order is None else self.act_order
        key = ("sparsegpt", self.damp, act_order, None if nm is None else nm[1], stats.n)
        if stats.cache.get("key") == key:
            return stats.cache["value"]
        H = stats.H.float().clone()  # [in, in]
        perm = None
        if act_order:
            g = 1 if nm is None else nm[1]
            if H.shape[0] % g == 0:
                # visit groups of columns (whole N:M groups) by decreasing Hessian diagonal
                order = torch.argsort(torch.diagonal(H).reshape(-1, g).sum(1), descending=True)  # [in/g]
                perm = (order.unsqueeze(1) * g + torch.arange(g, device=H.device)).reshape(-1)  # [in]
                H = H[perm][:, perm]
        H_inv, dead = self.inverse_hessian_factor(H, stats.n)  # [in, in] upper
        stats.cache = {"key": key, "value": (H_inv, dead, perm)}
        return H_inv, dead, perm

    def prune(
        self, W: torch.Tensor, stats: InputStats, sparsity: float, nm: tuple[int, int] | None = None
    ) -> PruneResult:
        if stats.H is None:
            raise ValueError("SparseGPT needs the layer Hessian; accumulate statistics with kind='hessian'")
        cols = W.shape[1]
        choice = self.nm_choice(nm)  # before any work: nm_exact=True may refuse the pattern
        H_inv, dead, perm = self._factor(stats, nm)  # [in, in] upper, [in], [in] | None
        if nm is not None:
            n_keep, m = nm
            if cols % m:
                raise ValueError(
                    f"an {n_keep}:{m} pattern needs the input dimension to be a multiple of {m}, got {cols}; "
                    "exclude this module with --ignore or use an unstructured pattern"
                )
        # Work on Wᵀ: column j of W is the contiguous row WT[j], so blocks of columns, the
        # per-column updates and the lazy updates all touch contiguous memory.
        WT = (W[:, perm] if perm is not None else W).T.float().contiguous()  # [in, out]
        any_dead = bool(dead.any())
        if any_dead:
            WT[dead] = 0
        PT_all = torch.zeros_like(WT, dtype=torch.bool)  # [in, out] True where pruned

        # N:M groups must not straddle blocks: round the block to a multiple of M
        bs = self.blocksize if nm is None else max(nm[1], self.blocksize // nm[1] * nm[1])
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            WT1 = WT[i1:i2]  # [B, out] view
            H_inv1 = H_inv[i1:i2, i1:i2]  # [B, B]
            PT = PT_all[i1:i2]  # [B, out] view
            if nm is None:
                d = torch.diagonal(H_inv1)  # [B]
                S = WT1.pow(2) / d.pow(2).unsqueeze(1)  # [B, out] OBS saliency w² / [H⁻¹]_jj²
                PT.copy_(lowest_mask(S, int(S.numel() * sparsity)))
            with _single_thread(WT.device):  # tiny per-column ops: thread sync would dominate
                ET = self._sweep(WT1, H_inv1, PT, nm, choice)  # [B, out]; fills PT for N:M
            # (the block's pruned entries of WT are stale from here on; zeroed once at the end)
            WT[i2:].addmm_(H_inv[i1:i2, i2:].T, ET, alpha=-1)  # lazy batch update of the remaining columns

        if any_dead:
            PT_all[dead] = True
        KT = invert(PT_all)  # [in, out] True where kept
        apply_mask_(WT, KT)
        if perm is not None:
            inv = torch.argsort(perm)
            WT, KT = WT[inv], KT[inv]
        return PruneResult(WT.T, KT.T)  # [out, in] views of the transposed results

    @staticmethod
    def _group_mask(W1: torch.Tensor, U: torch.Tensor, prune_n: int) -> torch.Tensor:
        """Which ``prune_n`` of a group's ``m`` columns to prune, per row, by the exact loss of the sweep.

        ``W1 [out, m]`` are the group's current weights and ``U [m, m]`` the group's block of the
        upper factor of ``H⁻¹``. The sweep prunes a set S of columns left to right, with the
        columns already visited frozen: ``e_c = w_c / U_cc`` and ``w_k -= e_c U_ck`` for later k,
        so the errors solve ``e_S U[S, S] = w_S`` and the output error ``ΔW H ΔWᵀ`` it leaves is
        ``‖e_S‖²``. Every one of the C(m, prune_n) sets is scored (one batched triangular solve)
        and the cheapest kept; the reference scores columns one by one (``w² / d²``), ignoring how
        pruning one column of the group changes the others. Rows are solved in chunks that keep
        the ``[C, rows, prune_n]`` solve under ``_EXACT_CHUNK`` floats.
        """
        out, m = W1.shape
        P, idx = _combinations(m, prune_n, W1.device)  # [C, m] True = prune, [C, p] its columns
        U_S = U[idx.unsqueeze(2), idx.unsqueeze(1)]  # [C, p, p] upper triangular
        rows = max(1, _EXACT_CHUNK // (len(idx) * prune_n))
        best = []
        for r1 in range(0, out, rows):
            W_S = W1[r1 : r1 + rows, idx].transpose(0, 1)  # [C, rows, p]
            E = torch.linalg.solve_triangular(U_S, W_S, upper=True, left=False)  # [C, rows, p]  E U_S = W_S
            best.append(E.pow(2).sum(-1).argmin(dim=0))  # [rows]
        return P[best[0] if len(best) == 1 else torch.cat(best)]  # [out, m]

    @staticmethod
    def _group_mask_greedy(W1: torch.Tensor, U: torch.Tensor, prune_n: int) -> torch.Tensor:
        """Which ``prune_n`` of a group's ``m`` columns to prune, per row, chosen one column at a time.

        The loss is :meth:`_group_mask`'s, ``‖e_S‖²`` with ``e_S U[S, S] = w_S``; each step adds the
        column c whose addition costs least given the columns S already chosen (so with
        ``prune_n = 1`` it is the exact choice, and the reference's ``w² / d²``). Adding c keeps
        the errors of S before c, gives c the error ``y_c = q_c / U_cc`` (``q = w - e U``: the
        weight the sweep leaves at c) and moves the errors after c by ``-y_c g_c``, with
        ``g_c = U[c, S>c] U[S>c, S>c]⁻¹``, so the loss grows by ``y_c² (1 + ‖g_c‖²) - 2 y_c ⟨e, g_c⟩``.
        Per row, with ``V = U[S, S]⁻¹`` embedded in ``[m, m]``, ``Z = V U`` and ``G = triu(U, 1) V``
        (rows ``g_c``) are kept; adding c changes ``V`` by the rank-1 ``v rᵀ`` (``v`` its new column
        c, ``r = 1_c - g_c``), so ``Z`` and ``G`` too. Cost per row: O(prune_n · m²) instead of
        C(m, prune_n) triangular solves.
        """
        WT = W1.T  # [m, out]: rows last, so every step is vectorized over the rows
        m, out = WT.shape
        d = torch.diagonal(U).unsqueeze(1)  # [m, 1]
        U_s = torch.triu(U, 1)  # [m, m] strictly upper
        P = torch.zeros(m, out, dtype=torch.bool, device=W1.device)  # [m, out] True = prune
        e = WT.new_zeros(m, out)  # [m, out] errors e_S of the columns chosen so far, 0 elsewhere
        Z = WT.new_zeros(m, m, out)  # [m, m, out] V U, V = U[S, S]⁻¹ embedded (column c: V U[:, c])
        G = WT.new_zeros(m, m, out)  # [m, m, out] row c: g_c (zero at columns <= c and outside S)
        q = WT.clone(memory_format=torch.contiguous_format)  # [m, out] w - e U: the sweep's weights outside S
        for step in range(prune_n):
            y = q / d  # [m, out] error of each column if it is added
            a = G.square().sum(1)  # [m, out] ‖g_c‖²
            b = (G * e).sum(1)  # [m, out] ⟨e, g_c⟩
            cost = (y * (1 + a) - 2 * b).mul_(y)  # [m, out] growth of ‖e_S‖² by adding c
            c = cost.masked_fill_(P, float("inf")).argmin(dim=0, keepdim=True)  # [1, out]
            P.scatter_(0, c, True)
            if step == prune_n - 1:
                break
            y_c = y.gather(0, c)  # [1, out]
            one = torch.ones_like(y_c)  # [1, out]
            idx = c.unsqueeze(0).expand(1, m, out)  # [1, m, out]
            r = G.gather(0, idx).squeeze(0).neg_().scatter_add_(0, c, one)  # [m, out] 1_c - g_c
            v = Z.gather(1, idx.transpose(0, 1)).squeeze(1).neg_().scatter_add_(0, c, one)  # [m, out]
            v /= d.squeeze(1)[c]  # column c of the new V: (1_c - V U[:, c]) / U_cc
            rU = U.T @ r  # [m, out] (r U)ᵀ
            Z.addcmul_(v.unsqueeze(1), rU.unsqueeze(0))  # V += v rᵀ
            G.addcmul_((U_s @ v).unsqueeze(1), r.unsqueeze(0))
            e.addcmul_(y_c, r)
            q.sub_(y_c * rU)
        return P.T  # [out, m]

    @staticmethod
    def _sweep(WT: torch.Tensor, U: torch.Tensor, PT: torch.Tensor, nm: tuple[int, int] | None,
               choice: str | None = "exact", sub: int = 32) -> torch.Tensor:
        """Column-by-column OBS inside one block; returns the errors ``E [B, out]``.

        Works on the block transposed, ``WT [B, out]`` (column i of W is the contiguous row
        ``WT[i]``), so each column costs two kernels: ``e_i = w_i · p_i / U_ii`` and the rank-1
        update of the later columns. ``U [B, B]`` is the block of the upper factor of ``H⁻¹``;
        ``PT [B, out]`` (True = prune) is given for unstructured masks and filled here for N:M
        as each group is reached, by ``choice`` (see :meth:`nm_choice`). The block is swept in sub-blocks of ``sub`` columns: a column's
        update reaches the rest of its sub-block only, and one matrix product per sub-block
        carries the sub-block's errors to the rest of the block (the same arithmetic as updating
        the whole block per column). Pruned entries of ``WT`` are left to the caller to zero.
        """
        B = WT.shape[0]
        d_inv = torch.diagonal(U).reciprocal().unsqueeze(1)  # [B, 1]
        ST = PT.to(WT.dtype).mul_(d_inv)  # [B, out] 1 / U_ii where pruned, 0 where kept
        ET = torch.empty_like(WT)  # [B, out]
        if nm is not None:
            n_keep, m = nm
            prune_n = m - n_keep
            sub = max(m, sub // m * m)  # N:M groups must not straddle sub-blocks
        Wr, Sr, Er, Ur = WT.unbind(0), ST.unbind(0), ET.unbind(0), U.unbind(0)  # row views, made once
        for j1 in range(0, B, sub):
            j2 = min(j1 + sub, B)
            for i in range(j1, j2):
                if nm is not None and i % m == 0:
                    g = slice(i, i + m)
                    if choice == "exact":
                        PT[g] = SparseGPT._group_mask(WT[g].T, U[g, g], prune_n).T  # [m, out]
                    elif choice == "greedy":
                        PT[g] = SparseGPT._group_mask_greedy(WT[g].T, U[g, g], prune_n).T  # [m, out]
                    else:  # the reference: the group's prune_n lowest w² / d²
                        S = WT[g].pow(2) * d_inv[g].pow(2)  # [m, out]
                        PT[g].scatter_(0, torch.topk(S, prune_n, dim=0, largest=False).indices, True)
                    torch.mul(PT[g], d_inv[g], out=ST[g])
                torch.mul(Wr[i], Sr[i], out=Er[i])  # e_i = (w_i - q_i) / U_ii, q_i = w_i off the mask
                if i + 1 < j2:
                    WT[i + 1 : j2].addr_(Ur[i][i + 1 : j2], Er[i], alpha=-1)  # OBS update of later columns
            if j2 < B:  # lazy update of the rest of the block  [B - j2, out]
                WT[j2:].addmm_(U[j1:j2, j2:].T, ET[j1:j2], alpha=-1)
        return ET
