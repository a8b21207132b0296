"""Mask selection, shared by every pruner.

A mask ``M`` has the weight's shape ``[out, in]`` and is True where a weight is *kept*
(the ``M ⊙ W`` of the SparseGPT paper). Scores ``S`` rank weights: low scores are pruned.

On the CPU the selections and mask applications run through numpy: its introselect and its
boolean kernels are several times faster there than torch's (``kthvalue``, ``gt`` and
``masked_fill_`` on bool masks); the results are the same.
"""

from __future__ import annotations

import re

from typing import Literal

import torch

Scope = Literal["row", "matrix"]


def _numpy_ok(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and not t.requires_grad and t.dtype in (torch.float32, torch.float64, torch.bool)
               for t in ts)


def nm_mask(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    out, cols = S.shape
    if cols % m:
        raise ValueError(
            f"an {n}:{m} pattern needs the input dimension to be a multiple of {m}, got {cols}; "
            "exclude this module with --ignore or use an unstructured pattern"
        )
    G = S.reshape(out, cols // m, m)  # [out, groups, m]
    keep = torch.topk(G, n, dim=-1).indices  # [out, groups, n]
    M = torch.zeros_like(G, dtype=torch.bool).scatter_(-1, keep, True)
    return M.reshape(out, cols)


def kth_smallest(S: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) along ``dim``, keeping the dimension. On the CPU numpy's
    introselect (``np.partition``), about 8x faster than ``torch.kthvalue`` there."""
    if _numpy_ok(S) and S.dtype != torch.bool:
        import numpy as np

        part = np.partition(S.numpy(), k - 1, axis=dim)
        return torch.from_numpy(np.take(part, [k - 1], axis=dim))
    return torch.kthvalue(S, k, dim=dim, keepdim=True).values


def lowest_mask(S: torch.Tensor, k: int, scope: Scope = "matrix") -> torch.Tensor:
    """True at exactly the ``k`` lowest scores of the matrix (``scope="matrix"``) or of each row
    (``"row"``): the weights to prune. Linear-time selection; ties at the threshold fall back to
    an exact top-k."""
    groups, size = (S.shape[0], S.shape[1]) if scope == "row" else (1, S.numel())  # k lowest of each group
    if k <= 0:
        return torch.zeros_like(S, dtype=torch.bool)
    if k >= size:
        return torch.ones_like(S, dtype=torch.bool)
    total = k * groups
    if _numpy_ok(S):
        import numpy as np

        a = S.numpy()
        if scope == "row":
            thresh = np.partition(a, k - 1, axis=1)[:, k - 1 : k]  # [out, 1]
        else:
            thresh = np.partition(a.reshape(-1), k - 1)[k - 1]
        P = np.less_equal(a, thresh)
        if np.count_nonzero(P) == total:
            return torch.from_numpy(P)
    else:
        thresh = kth_smallest(S, k, dim=1) if scope == "row" else kth_smallest(S.reshape(-1), k, dim=0)
        P = S <= thresh
        if int(P.sum()) == total:
            return P
    # ties at some threshold: the exact top-k
    if scope == "row":
        return torch.zeros_like(S, dtype=torch.bool).scatter_(1, torch.topk(S, k, dim=1, largest=False).indices, True)
    P = torch.zeros(S.numel(), dtype=torch.bool, device=S.device)
    P[torch.topk(S.reshape(-1), k, largest=False).indices] = True
    return P.reshape(S.shape)


def unstructured_mask(S: torch.Tensor, sparsity: float, scope: Scope) -> torch.Tensor:
    """Prune the ``floor(sparsity * size)`` lowest scores, per output row or per matrix."""
    k = int(S.shape[1] * sparsity) if scope == "row" else int(S.numel() * sparsity)
    return invert(lowest_mask(S, k, scope))


def select_mask(
    S: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: Scope = "row"
) -> torch.Tensor:
    """Keep-mask from scores: N:M when ``nm`` is given, else unstructured at ``sparsity``."""
    if nm is not None:
        return nm_mask(S, *nm)
    return unstructured_mask(S, sparsity, scope)


def invert(M: torch.Tensor) -> torch.Tensor:
    """``~M`` of a bool mask."""
    if _numpy_ok(M):
        import numpy as np

        return torch.from_numpy(np.logical_not(M.numpy()))
    return ~M


def apply_mask_(W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero ``W`` in place where ``keep`` is False (exact ``+0.0``); returns ``W``."""
    if _numpy_ok(W, keep):
        import numpy as np

        w = W.numpy()
        np.multiply(w, keep.numpy(), out=w)  # kept x 1, pruned x 0
        np.add(w, 0.0, out=w)  # negative weights x 0 gave -0.0
        return W
    return W.masked_fill_(~keep, 0.0)


def count_nonzero(W: torch.Tensor) -> int:
    """Number of nonzero entries of ``W`` (numpy's kernel on the CPU)."""
    if _numpy_ok(W):
        import numpy as np

        return int(np.count_nonzero(W.numpy()))
    return int(torch.count_nonzero(W))


def zero_fraction(W: torch.Tensor) -> float:
    """Fraction of exact zeros in ``W``."""
    if W.numel() == 0:
        return 0.0
    return 1.0 - count_nonzero(W) / W.numel()


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4): keep N of every M consecutive inputs."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not m:
        raise ValueError(
            f"pattern {pattern!r} is not understood; use 'unstructured' or 'N:M' such as '2:4' or '4:8'"
        )
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M (N weights kept in every group of M), e.g. '2:4'")
    return n, mm


def parse_module_sparsity(v: str) -> dict[str, str]:
    """``'RE=V;RE=V'`` (the command line's ``--module-sparsity``) as ``{regex: value}``; values are checked by
    the config."""
    out = {}
    for item in filter(None, (x.strip() for x in v.split(";"))):
        rx, sep, val = item.rpartition("=")
        if not sep or not rx:
            raise ValueError(f"module sparsity {item!r} is not understood; write REGEX=VALUE, e.g. 'mlp\\.=0.6'")
        out[rx] = val.strip()
    return out
