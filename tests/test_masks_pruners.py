"""Mask selection and the three pruners on bare tensors: hand-computed masks, N:M validity,
measured sparsity, reconstruction error ordering and SparseGPT's numerical corner cases."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from llmprune.masks import apply_mask_, lowest_mask, nm_mask, select_mask, unstructured_mask, zero_fraction
from llmprune.pruners import PRUNERS, Magnitude, SparseGPT, Wanda, get_pruner
from llmprune.stats import InputStats, relative_error

METHODS = ["magnitude", "wanda", "sparsegpt"]




def _stats(kind: str, X: torch.Tensor) -> InputStats:
    st = InputStats(kind)
    st.add(X)
    return st


def _random_problem(out: int, inp: int, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)  # [out, in], no exact zeros
    X = torch.randn(tokens, inp, generator=g)  # [t, in]
    return W, X


def _prune(method: str, W: torch.Tensor, X: torch.Tensor, sparsity: float, nm=None, **options):
    pruner = get_pruner(method, **options)
    return pruner.prune(W, _stats(pruner.stats_kind, X), sparsity, nm)


# ----------------------------------------------------------------------------------------------
# Hand-computed masks
# ----------------------------------------------------------------------------------------------


def test_magnitude_is_per_matrix():
    # |W| sorted: 0.1 0.5 1 2 | 6 7 8 9 -> the four largest are three in row 0 and one in row 1,
    # so a per-matrix mask keeps 3 + 1 (a per-row mask would keep 2 + 2).
    W = torch.tensor([[9.0, -8.0, 7.0, 0.5], [-2.0, 6.0, -0.1, 1.0]])
    expected = torch.tensor([[True, True, True, False], [False, True, False, False]])
    res = Magnitude().prune(W, None, 0.5)
    assert torch.equal(res.M, expected)
    assert torch.equal(res.W, W * expected)
    assert torch.equal(unstructured_mask(W.abs(), 0.5, "matrix"), expected)


def test_wanda_activation_norms_flip_the_magnitude_ranking():
    W = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    X = torch.tensor([[0.1, 10.0, 1.0, 1.0]])  # one token: ‖X_j‖₂ = [0.1, 10, 1, 1]
    # S = |W| * ‖X_j‖: row 0 [0.4, 10, 3, 2] -> keep cols 1, 2; row 1 [0.1, 20, 3, 4] -> keep cols 1, 3
    expected = torch.tensor([[False, True, True, False], [False, True, False, True]])
    # per-row magnitude would keep cols 0, 2 in row 0 and cols 2, 3 in row 1
    by_magnitude = torch.tensor([[True, False, True, False], [False, False, True, True]])

    res = Wanda().prune(W, _stats("norms", X), 0.5)
    assert torch.equal(res.M, expected)
    assert torch.equal(res.W, W * expected)
    assert torch.equal(unstructured_mask(W.abs(), 0.5, "row"), by_magnitude)
    # the Hessian's diagonal carries the same norms
    assert torch.equal(Wanda().prune(W, _stats("hessian", X), 0.5).M, expected)


W_NM = torch.tensor(
    [
        [1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0],
        [-4.0, 1.0, -3.0, 2.0, 0.5, -9.0, 9.5, -0.1],
    ]
)
# 2:4 keeps the two largest |w| of cols 0-3 and of cols 4-7 in each row
EXPECTED_2_4 = torch.tensor(
    [
        [False, False, True, True, True, True, False, False],
        [True, False, True, False, False, True, True, False],
    ]
)
# 4:8 keeps the four largest |w| of the row: row 0 -> 8 7 6 5, row 1 -> 9.5 -9 -4 -3
EXPECTED_4_8 = torch.tensor(
    [
        [False, False, False, False, True, True, True, True],
        [True, False, True, False, False, True, True, False],
    ]
)


@pytest.mark.parametrize("nm, expected", [((2, 4), EXPECTED_2_4), ((4, 8), EXPECTED_4_8)], ids=["2:4", "4:8"])
def test_nm_masks_by_hand(nm, expected):
    assert torch.equal(nm_mask(W_NM.abs(), *nm), expected)
    assert torch.equal(select_mask(W_NM.abs(), 0.5, nm), expected)
    res = Magnitude().prune(W_NM, None, 0.5, nm)
    assert torch.equal(res.M, expected)
    assert torch.equal(res.W, W_NM * expected)
    # equal activation norms: Wanda reduces to magnitude within each group
    assert torch.equal(Wanda().prune(W_NM, _stats("norms", torch.ones(3, 8)), 0.5, nm).M, expected)


@pytest.mark.parametrize("scope", ["matrix", "row"])
@pytest.mark.parametrize("ties", [False, True])
def test_lowest_mask_numpy_path_equals_torch_top_k(scope, ties):
    g = torch.Generator().manual_seed(3)
    S = torch.randn(6, 40, generator=g)
    if ties:  # many equal scores straddle every threshold: the exact top-k fallback decides
        S = (S * 2).round()
    k = 13
    P = lowest_mask(S, k, scope)  # numpy on the CPU
    if scope == "row":
        assert torch.equal(P.sum(1), torch.full((6,), k))
        ref = torch.zeros_like(P).scatter_(1, torch.topk(S, k, dim=1, largest=False).indices, True)
        assert torch.equal(S[P].sort().values, S[ref].sort().values)  # the same scores pruned
        assert (S.masked_fill(~P, -1e9).max(1).values <= S.masked_fill(P, 1e9).min(1).values).all()
    else:
        assert int(P.sum()) == k
        assert S[P].max() <= S[~P].min()
    P_torch = lowest_mask(S.to(torch.float64).requires_grad_(), k, scope)  # the torch path
    assert torch.equal(P_torch.sum(), P.sum())
    if not ties:
        assert torch.equal(P_torch, P)
    assert not lowest_mask(S, 0, scope).any() and lowest_mask(S, 40 if scope == "row" else 240, scope).all()


def test_apply_mask_writes_positive_zeros_and_counts_them():
    W = torch.tensor([[-1.5, 2.0, -3.0], [4.0, -0.0, 6.0]])
    keep = torch.tensor([[False, True, False], [True, False, True]])
    Wt = W.T.contiguous().T  # a strided view takes the same path
    for w in (W.clone(), Wt.clone()):
        apply_mask_(w, keep)
        assert torch.equal(w, torch.tensor([[0.0, 2.0, 0.0], [4.0, 0.0, 6.0]]))
        assert not torch.signbit(w[~keep]).any()  # +0.0, not the -0.0 of a product with a negative weight
        assert zero_fraction(w) == pytest.approx(0.5)
    assert zero_fraction(torch.zeros(3, dtype=torch.bfloat16)) == 1.0  # torch path for dtypes numpy lacks


def test_select_mask_rejects_input_dim_not_divisible_by_m():
    with pytest.raises(ValueError, match=r"multiple of 4, got 6") as e:
        select_mask(torch.rand(2, 6), 0.5, (2, 4))
    assert "--ignore" in str(e.value) and "unstructured" in str(e.value)
    W, X = _random_problem(4, 6)
    with pytest.raises(ValueError, match=r"multiple of 4, got 6.*--ignore"):
        _prune("sparsegpt", W, X, 0.5, (2, 4))


# ----------------------------------------------------------------------------------------------
# Properties: N:M in every group, measured sparsity, mask agrees with the zeros
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)], ids=lambda nm: f"{nm[0]}:{nm[1]}")
@pytest.mark.parametrize("method", METHODS)
def test_nm_pattern_holds_in_every_group(method, nm):
    n, m = nm
    W, X = _random_problem(64, 128)
    res = _prune(method, W, X, 1 - n / m, nm)
    nonzeros = (res.W != 0).reshape(64, 128 // m, m).sum(-1)  # [out, groups]
    assert torch.all(nonzeros == n)  # W has no zeros: exactly N kept in each group
    assert torch.equal(res.M, res.W != 0)
    assert torch.isfinite(res.W).all()


def test_sparsegpt_nm_pattern_with_blocksize_not_multiple_of_m():
    W, X = _random_problem(8, 16)
    res = _prune("sparsegpt", W, X, 0.5, (2, 4), blocksize=6)
    assert torch.all((res.W != 0).reshape(8, 4, 4).sum(-1) == 2)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("method", METHODS)
def test_measured_sparsity(method, sparsity):
    out, inp, blocksize = 48, 160, 64  # blocks of 64, 64 and 32 columns for SparseGPT
    W, X = _random_problem(out, inp, seed=1)
    res = _prune(method, W, X, sparsity, **({"blocksize": blocksize} if method == "sparsegpt" else {}))
    zeros = res.W == 0  # [out, in]
    assert torch.equal(res.M, ~zeros)
    if method == "wanda":  # per output row
        assert torch.all(zeros.sum(1) == math.floor(inp * sparsity))
    elif method == "magnitude":  # per matrix
        assert int(zeros.sum()) == math.floor(W.numel() * sparsity)
    else:  # per column block
        for i1 in range(0, inp, blocksize):
            block = zeros[:, i1 : i1 + blocksize]
            assert int(block.sum()) == math.floor(block.numel() * sparsity)
    n_blocks = math.ceil(inp / blocksize)
    assert abs(float(zeros.float().mean()) - sparsity) <= n_blocks / W.numel()


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_keeps_the_weight(method):
    W, X = _random_problem(16, 32)
    res = _prune(method, W, X, 0.0)
    assert res.M.all()
    assert torch.allclose(res.W, W, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_pruner_does_not_modify_its_input(method):
    W, X = _random_problem(16, 32)
    W0 = W.clone()
    _prune(method, W, X, 0.5)
    assert torch.equal(W, W0)


def test_get_pruner_unknown_method_lists_choices():
    with pytest.raises(ValueError, match=r"unknown method 'wandaa'; choose one of: alps, magnitude, ria, sparsegpt, wanda"):
        get_pruner("wandaa")
    assert set(PRUNERS) >= {*METHODS, "ria"}
    with pytest.raises(ValueError, match="method 'wanda' takes no option blocksize"):
        get_pruner("wanda", blocksize=32)
    sg = get_pruner("sparsegpt", blocksize=32, damp=0.1)
    assert (sg.blocksize, sg.damp) == (32, 0.1)


# ----------------------------------------------------------------------------------------------
# Reconstruction: SparseGPT < Wanda < magnitude on LLM-like inputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_like_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs with a few high-variance outlier features, as LLM activations have."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2048, 64, generator=g)  # [t, d]
    A = torch.randn(64, 64, generator=g) / 8  # [d, in] mixing -> correlated features
    X = Z @ A  # [t, in]
    X[:, [3, 17, 42]] *= 20  # outlier features
    W = torch.randn(48, 64, generator=g)  # [out, in]
    return W, X


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["50%", "2:4"])
def test_reconstruction_error_ordering(llm_like_layer, nm):
    W, X = llm_like_layer
    errors = {}
    for method in METHODS:
        res = _prune(method, W, X, 0.5, nm)
        assert float((res.W == 0).float().mean()) == pytest.approx(0.5)
        dY = (W - res.W) @ X.T  # [out, t]
        errors[method] = float(dY.norm() / (W @ X.T).norm())
        assert errors[method] == pytest.approx(relative_error(W, res.W, X), rel=1e-4)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# ----------------------------------------------------------------------------------------------
# SparseGPT corner cases
# ----------------------------------------------------------------------------------------------


def test_sparsegpt_dead_inputs_are_zeroed_without_nan():
    W, X = _random_problem(16, 32, seed=2)
    X[:, 5] = 0  # input 5 is never active
    X[:, 20] = 0
    res = _prune("sparsegpt", W, X, 0.5)
    assert torch.isfinite(res.W).all()
    assert torch.all(res.W[:, [5, 20]] == 0)
    assert not res.M[:, [5, 20]].any()
    assert torch.equal(res.M, res.W != 0)
    assert float((res.W == 0).float().mean()) >= 0.5


def test_sparsegpt_damping_interpolates_towards_magnitude():
    W, X = _random_problem(32, 64, seed=3)
    X[:, :4] *= 10  # uneven Hessian diagonal, so the OBS saliency differs from |w|
    H_stats = _stats("hessian", X)
    light = SparseGPT(blocksize=64, damp=0.01).prune(W, H_stats, 0.5)
    heavy = SparseGPT(blocksize=64, damp=1e6).prune(W, H_stats, 0.5)
    # a huge damping makes H⁻¹ ∝ I: the mask is per-matrix magnitude and the update vanishes
    mag = Magnitude().prune(W, None, 0.5)
    assert torch.equal(heavy.M, mag.M)
    assert torch.allclose(heavy.W, mag.W, atol=1e-4)
    assert not torch.equal(light.M, heavy.M)
    assert relative_error(W, light.W, X) < relative_error(W, heavy.W, X)


def test_sparsegpt_rank_deficient_hessian():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(256, 8, generator=g) @ torch.randn(8, 64, generator=g)  # [t, in], rank 8
    W = torch.randn(32, 64, generator=g)
    assert torch.linalg.matrix_rank(X.T @ X) == 8
    res = _prune("sparsegpt", W, X, 0.5)
    assert torch.isfinite(res.W).all()
    assert float((res.W == 0).float().mean()) == pytest.approx(0.5)
    assert relative_error(W, res.W, X) < relative_error(W, Magnitude().prune(W, None, 0.5).W, X)


def test_sparsegpt_indefinite_hessian_retries_with_more_damping(caplog):
    n, d = 10, 16
    # eigenvalues d - 0.05 and -0.05: damping 0.01 * mean diag is too little, 10x that is enough
    stats = InputStats("hessian", n=n, H=(torch.ones(d, d) - 0.05 * torch.eye(d)) * n)
    W = torch.randn(8, d, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        res = SparseGPT().prune(W, stats, 0.5)
    assert "not positive definite" in caplog.text
    assert torch.isfinite(res.W).all()
    assert float((res.W == 0).float().mean()) == pytest.approx(0.5)


def _reference_sparsegpt(W: torch.Tensor, X: torch.Tensor, sparsity: float, nm=None, blocksize: int = 16,
                         damp: float = 0.01) -> torch.Tensor:
    """The reference algorithm (IST-DASLab/sparsegpt) written plainly: H⁻¹ through cholesky_inverse,
    every column's update applied to the whole rest of its block, no sub-blocks or transposes.
    The one deviation kept from llmprune: a block prunes exactly floor(sparsity · size) weights."""
    W = W.clone().double()
    H = (X.T @ X).double() / X.shape[0]  # [in, in]
    H += damp * torch.mean(torch.diagonal(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # [in, in]
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1, prune = torch.zeros_like(W1), torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            S = W1.pow(2) / torch.diagonal(Hinv1).pow(2)
            prune.view(-1)[torch.topk(S.flatten(), int(S.numel() * sparsity), largest=False).indices] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                S = W1[:, i : i + nm[1]].pow(2) / torch.diagonal(Hinv1)[i : i + nm[1]].pow(2)
                prune.scatter_(1, i + torch.topk(S, nm[1] - nm[0], dim=1, largest=False).indices, True)
            q = W1[:, i].clone()
            q[prune[:, i]] = 0
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_equals_the_reference_algorithm(nm):
    W, X = _random_problem(24, 96, seed=7)
    X = X * torch.linspace(0.2, 3, 96)  # uneven Hessian diagonal
    ref = _reference_sparsegpt(W, X, 0.5, nm)
    res = SparseGPT(blocksize=16, nm_exact=False).prune(W, _stats("hessian", X), 0.5, nm)
    assert torch.equal(res.M, ref != 0)
    assert torch.allclose(res.W.double(), ref, atol=1e-4)


def test_hessian_from_its_upper_block_triangle():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 700, generator=g)  # [t, in]: 700 inputs span several accumulation blocks
    st = InputStats("hessian")
    st.add(X[:100])
    st.add(X[100:])
    H = st.H  # [in, in]
    assert torch.equal(H, H.T)
    assert torch.allclose(H, X.T @ X, rtol=1e-4, atol=1e-3)
    assert st.n == 300
    st.add(X[:1])  # adding after a read keeps the mirror right
    assert torch.allclose(st.H, X.T @ X + X[:1].T @ X[:1], rtol=1e-4, atol=1e-3)


def test_lower_triangular_inverse():
    from llmprune.pruners.sparsegpt import _lower_inverse

    A = torch.randn(200, 200, generator=torch.Generator().manual_seed(1))
    L = torch.linalg.cholesky(A @ A.T + 200 * torch.eye(200))  # [n, n] lower
    Li = _lower_inverse(L)
    assert torch.equal(Li, Li.tril())
    assert torch.allclose(Li @ L, torch.eye(200), atol=1e-5)


def test_lower_inverse_runs_scipy_openblas_on_one_thread():
    # SciPy's OpenBLAS worker threads busy-wait after a call and steal the cores torch's threads use
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info

    from llmprune.runtime.blas import scipy_blas_single_thread

    with scipy_blas_single_thread()():
        inside = [i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"]
    assert inside and all(n == 1 for n in inside)


def test_sparsegpt_needs_a_hessian():
    W, X = _random_problem(4, 8)
    with pytest.raises(ValueError, match="kind='hessian'"):
        SparseGPT().prune(W, _stats("norms", X), 0.5)



# ----------------------------------------------------------------------------------------------
# SparseGPT N:M group choice and column order
# ----------------------------------------------------------------------------------------------


def test_sparsegpt_group_mask_minimizes_the_output_error_of_the_sweep():
    """Brute force over the 6 ways to prune 2 of a group's 4 columns: the OBS sweep (later columns
    compensate) leaves the output error ΔW H ΔWᵀ; _group_mask must pick the cheapest."""
    import itertools

    g = torch.Generator().manual_seed(3)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    H = A @ A.T + 0.1 * torch.eye(8, dtype=torch.float64)  # [in, in]: one group of 4, then 4 more columns
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # [in, in] upper: H⁻¹ = Uᵀ U
    assert torch.allclose(U, U.triu()) and torch.allclose(U.T @ U, torch.linalg.inv(H))
    W = torch.randn(64, 8, generator=g, dtype=torch.float64)  # [out, in]
    M = SparseGPT._group_mask(W[:, :4].clone(), U[:4, :4], 2)  # [out, 4] True = prune
    assert torch.equal(M.sum(1), torch.full((64,), 2))

    def output_error(w: torch.Tensor, S: tuple[int, ...]) -> float:
        q = w.clone()
        for c in S:  # in column order; each pruned weight's error spread over the later columns
            q[c:] -= q[c] / U[c, c] * U[c, c:]
        d = q - w
        return float(d @ H @ d)

    greedy_worse = 0
    for r in range(64):
        loss = {S: output_error(W[r], S) for S in itertools.combinations(range(4), 2)}
        chosen = tuple(torch.nonzero(M[r]).flatten().tolist())
        assert loss[chosen] == pytest.approx(min(loss.values()), rel=1e-9)
        S_ref = torch.topk(W[r, :4].pow(2) / torch.diagonal(U)[:4].pow(2), 2, largest=False).indices
        greedy_worse += loss[tuple(sorted(S_ref.tolist()))] > loss[chosen] * (1 + 1e-9)
    assert greedy_worse > 0  # the reference's one-by-one saliency is not always the optimum


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)], ids=["50%", "2:4", "4:8"])
def test_sparsegpt_act_order_keeps_the_pattern_in_the_original_columns(llm_like_layer, nm):
    W, X = llm_like_layer
    res = SparseGPT(blocksize=16, act_order=True).prune(W, _stats("hessian", X), 0.5, nm)
    assert float((res.W == 0).float().mean()) == pytest.approx(0.5)
    assert torch.equal(res.W != 0, res.M)
    if nm is not None:
        n, m = nm
        assert torch.all(res.M.reshape(W.shape[0], -1, m).sum(-1) == n)
    # act-order visits the high-variance (outlier) inputs first; it must not do worse here
    plain = SparseGPT(blocksize=16, act_order=False).prune(W, _stats("hessian", X), 0.5, nm)
    assert relative_error(W, res.W, X) <= relative_error(W, plain.W, X) * 1.05


def test_sparsegpt_act_order_is_a_no_op_when_the_diagonal_is_already_sorted():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 32, generator=g) * torch.linspace(3, 1, 32)  # decreasing input scale
    W = torch.randn(16, 32, generator=g)
    st = _stats("hessian", X)
    a = SparseGPT(blocksize=8, act_order=True).prune(W, st, 0.5, (2, 4))
    b = SparseGPT(blocksize=8, act_order=False).prune(W, st, 0.5, (2, 4))
    assert torch.equal(a.M, b.M) and torch.allclose(a.W, b.W)


def test_the_triangular_inverse_keeps_nothing():
    """No cache holds a layer's factor or its inverse after the call (a stray memoisation once kept every
    Hessian factor of a run alive: +750 MB on the embedded model)."""
    import gc
    import weakref

    from llmprune.pruners.sparsegpt import _lower_inverse

    L = torch.linalg.cholesky(torch.eye(16) * 2 + 0.1)  # [16, 16] lower
    ref = weakref.ref(L)
    inv = _lower_inverse(L)
    torch.testing.assert_close(inv @ L, torch.eye(16), rtol=1e-5, atol=1e-5)
    del L, inv
    gc.collect()
    assert ref() is None
