"""EoRA: training-free compensation of a compressed model by a low-rank correction in the eigenspace
of the input activations (Liu et al., NVIDIA 2024, "EoRA: Fine-tuning-free Compensation for Compressed
LLM with Eigenspace Low-Rank Approximation", arXiv:2410.21271).

Per pruned module, the pruning error ``ΔW = W − Ŵ [out, in]`` is approximated at rank ``r`` in the
norm that matters for the outputs, ``‖ΔW X‖_F`` (``H = XᵀX``), not in the plain Frobenius norm:
with ``H = Q Λ Qᵀ`` the paper projects ``ΔW' = ΔW Q'`` (``Q' = Q √Λ``), truncates the SVD
``ΔW' ≈ U_r Σ_r V_rᵀ`` and projects back: ``B A`` with ``B = U_r Σ_r^½ [out, r]`` and
``A = Σ_r^½ V_rᵀ Q'⁻¹ [r, in]``, so ``W ≈ Ŵ + B A`` — a LoRA pair with scale 1 (``lora_alpha = r``).
The paper's code puts all of ``Σ_r`` on ``B``; the product is the same (up to rounding), but split
evenly the two factors have the same scale, which is what LoRA fine-tuning of the adapter expects (with
``Σ_r`` on ``B`` alone, ``A``'s rows have unit norm in the ``Q'`` metric and ``B`` carries every
magnitude, so one learning rate suits neither).

Any square root of ``H`` gives the same ``B`` and ``A``: with the Cholesky factor ``H = L Lᵀ``,
``Q' = L O`` for an orthogonal ``O``, the singular values of ``ΔW L`` are those of ``ΔW Q'`` and
``V_rᵀ Q'⁻¹ = V_rᵀ L⁻¹`` after the rotation. This step uses the Cholesky factor (a sixth of the
flops of an eigendecomposition, measured 0.1 s against 0.6-2.8 s for 1536 inputs on the 2-core CPU);
the result is the paper's, as the tests check against the eigendecomposition form.

The rank: ``rank`` per module, or ``eora_budget``, a fraction of each module's weights added as
adapter parameters (``r = round(budget · out · in / (out + in))``, so every module adds the same
fraction and the whole adapter adds ``budget`` of the pruned weights).

The adapters are saved beside the sparse base as a standard PEFT LoRA adapter
(:func:`save_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors``); evaluation after
pruning runs the base with the corrections added (:func:`applied`).

The truncated SVD: exact (LAPACK) while the module's smaller side is at most ``EXACT_SVD_MAX`` (1,024,
every module of the embedded model, as before), randomized beyond it (Halko, Martinsson & Tropp 2011:
a Gaussian sketch of ``2r`` columns from a fixed seed, 6 power iterations re-orthonormalised by QR, then
the exact SVD of the ``2r × in`` projection; :func:`randomized_svd`). A full SVD costs ``O(out·in·min)``
at LAPACK's slow pace (minutes for a Llama-3-8B ``down_proj`` on a CPU, 560 of them up to 8192 × 28672
at 70B) where the sketch costs ``14 · out · in · 2r`` multiply-adds at matrix-product speed. Its error,
measured on a 1024 × 2816 pruning error (50 % Wanda-style mask, heavy-tailed inputs; a nearly flat
spectrum, the hard case for a sketch): the relative residual ``‖ΔW X − B A X‖ / ‖ΔW X‖`` was 0.916970
against the exact SVD's 0.916375 (6.5e-4 above it), 2.1e-3 above with 4 power iterations, 1.2e-2 with
2 and ``r + 8`` columns. ``eora_svd`` picks the exact or the randomized SVD for every module.

Deviations from the paper: ``H`` is damped (``+ λI``, ``λ`` = ``damp`` × the mean diagonal, as the
pruners), which keeps the factor defined for inputs that never fire; the statistics of each module
are those of the pruned model *without* the corrections of the modules before it (the engine
prunes layer by layer and does not run the adapters during calibration).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..pruners.sparsegpt import SparseGPTOptions
from ..registry import register_compensator
from ..settings import Settings
from ..stats import InputStats
from .base import Compensator, LowRank

log = logging.getLogger(__name__)

EXACT_SVD_MAX = 1024  # eora_svd="auto": exact SVD while min(out, in) is at most this, randomized beyond
SKETCH_POWER_ITERS = 6  # power iterations of the randomized SVD (6.5e-4 excess residual, measured above)
SKETCH_SEED = 0  # the sketch's Gaussian draws: a fixed seed, so a run is deterministic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class EoRAOptions(Settings):
    """EoRA's options, fields of :class:`llmprune.PruneConfig` (``damp`` is SparseGPT's)."""

    damp: float = SparseGPTOptions.model_fields["damp"]
    rank: int = Field(
        64, ge=1, description="EoRA: LoRA rank of the correction of every pruned module.",
    )
    eora_svd: Literal["auto", "exact", "randomized"] = Field(
        "auto", description="EoRA: the truncated SVD of each module's projected error: 'exact' (LAPACK), "
        "'randomized' (a 2r-column sketch with 6 power iterations; measured 6.5e-4 above the exact residual), "
        f"'auto' exact while the module's smaller side is at most {EXACT_SVD_MAX}, randomized beyond.",
    )
    eora_budget: float | None = Field(
        None, gt=0, lt=1, description="EoRA: instead of --rank, add this fraction of each module's weights as "
        "adapter parameters (rank = budget · out · in / (out + in)).",
    )


@register_compensator
class EoRA(Compensator):
    name = "eora"
    needs = frozenset({"hessian"})
    options = tuple(EoRAOptions.model_fields)

    def __init__(self, damp: float = 0.01, rank: int = 64, eora_svd: str = "auto", eora_budget: float | None = None):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1 (the LoRA rank of every module), got {rank!r}")
        if eora_budget is not None and not 0 < eora_budget < 1:
            raise ValueError(f"eora_budget must be a fraction in (0, 1) of each module's weights, got {eora_budget!r}")
        if not 0 <= damp < 1:
            raise ValueError(f"damp must be in [0, 1) (a fraction of the mean Hessian diagonal), got {damp!r}")
        if eora_svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"eora_svd must be 'auto', 'exact' or 'randomized', got {eora_svd!r}")
        self.damp = float(damp)
        self.rank = rank
        self.svd = eora_svd
        self.budget = eora_budget

    def rank_of(self, out: int, cols: int) -> int:
        """The rank of an ``[out, in]`` module: ``rank``, or the budget's share of its weights."""
        r = self.rank if self.budget is None else round(self.budget * out * cols / (out + cols))
        return max(1, min(r, out, cols))

    def factor(self, stats: InputStats) -> torch.Tensor:
        """Lower Cholesky factor ``L [in, in]`` of ``H/n + λI``, once per input (q/k/v share it)."""
        key = ("eora", self.damp, stats.n)
        hit = stats.cache.get(key)
        if hit is not None:
            return hit
        if stats.H is None:
            raise ValueError("EoRA needs the layer Hessian; accumulate statistics with needs={'hessian'}")
        H = stats.H.float() / max(stats.n, 1)  # [in, in]
        diag = torch.diagonal(H)
        live = diag > 0
        lam = self.damp * float(diag[live].mean()) if bool(live.any()) else 1.0
        Hd = H.clone()  # [in, in]
        Hd.diagonal().add_(max(lam, 1e-12 * float(diag.max().clamp_min(1.0))))
        Hd.diagonal()[~live] = max(lam, 1e-12)  # inputs never active: any direction, no output error
        for attempt in range(4):
            L, info = torch.linalg.cholesky_ex(Hd)  # [in, in]
            if int(info) == 0:
                break
            bump = (10 ** attempt) * 1e-6 * float(diag.mean().clamp_min(1e-12))
            log.warning("EoRA: damped Hessian not positive definite; adding %.3g to its diagonal", bump)
            Hd.diagonal().add_(bump)
        else:
            raise ValueError("EoRA: the input Hessian is not positive definite even after damping; raise --damp")
        stats.cache[key] = L
        return L

    def compensate(self, W: torch.Tensor, W_hat: torch.Tensor, stats: InputStats) -> LowRank | None:
        out, cols = W.shape
        r = self.rank_of(out, cols)
        L = self.factor(stats)  # [in, in] lower, H = L Lᵀ
        dW = W.float() - W_hat.float()  # [out, in]  ΔW
        P = dW @ L  # [out, in]  ΔW projected: ‖P‖_F = ‖ΔW X‖_F / sqrt(n)
        exact = self.svd == "exact" or (self.svd == "auto" and min(out, cols) <= EXACT_SVD_MAX)
        if exact:
            U, S, Vh = torch.linalg.svd(P, full_matrices=False)  # [out, k], [k], [k, in]
        else:
            U, S, Vh = randomized_svd(P, min(2 * r, out, cols), SKETCH_POWER_ITERS)  # [out, q], [q], [q, in]
        root = S[:r].sqrt()  # [r]  Σ_r^½: one half of the scale on each factor
        B = U[:, :r] * root  # [out, r]  U_r Σ_r^½
        A = torch.linalg.solve_triangular(L, Vh[:r], upper=False, left=False) * root[:, None]  # [r, in]  Σ_r^½ V_rᵀ L⁻¹
        ref = float((W.float() @ L).norm())  # ‖W X‖_F / sqrt(n)
        total = float(S.pow(2).sum()) if exact else float(P.pow(2).sum())
        # ‖P − U_r Σ_r V_rᵀ‖² = ‖P‖² − Σ_r σ²: exact for LAPACK's factors and for the sketch's (U_r Σ_r = P V_r)
        rest = float(S[r:].pow(2).sum()) if exact else max(total - float(S[:r].pow(2).sum()), 0.0)
        before = (total ** 0.5) / ref if ref > 0 else 0.0
        after = (rest ** 0.5) / ref if ref > 0 else 0.0
        return LowRank(A.contiguous(), B.contiguous(), before, after)


def randomized_svd(P: torch.Tensor, q: int, power_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``q`` singular triplets of ``P [out, in]`` by a randomized range finder (Halko, Martinsson &
    Tropp 2011, Alg. 4.4): ``Y = P Ω`` for a Gaussian ``Ω [in, q]`` (seed :data:`SKETCH_SEED`), ``power_iters``
    rounds of ``P Pᵀ`` re-orthonormalised by QR, then the exact SVD of ``Qᵀ P [q, in]``.

    Returns ``(U [out, q], S [q], Vh [q, in])`` with orthonormal columns of ``U`` and rows of ``Vh`` and
    ``U diag(S) = P Vhᵀ``, so ``P − U_r S_r Vh_r`` has squared norm ``‖P‖² − Σ_{i<r} S_i²``."""
    gen = torch.Generator(device=P.device).manual_seed(SKETCH_SEED)
    omega = torch.randn(P.shape[1], q, generator=gen, device=P.device, dtype=P.dtype)  # [in, q]
    Q = torch.linalg.qr(P @ omega).Q  # [out, q]
    for _ in range(power_iters):
        Z = torch.linalg.qr(P.T @ Q).Q  # [in, q]
        Q = torch.linalg.qr(P @ Z).Q  # [out, q]
    Ub, S, Vh = torch.linalg.svd(Q.T @ P, full_matrices=False)  # [q, q], [q], [q, in]
    return Q @ Ub, S, Vh


class _LoRAHook:
    """Forward hook adding ``x Aᵀ Bᵀ`` to a module's output (``[..., in] -> [..., out]``)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A, self.B = A, B  # [r, in], [out, r]

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        A, B = self.A.to(x.device, x.dtype), self.B.to(x.device, x.dtype)
        return output + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B)


@contextlib.contextmanager
def applied(model: nn.Module, adapters: dict[str, LowRank]) -> Iterator[nn.Module]:
    """The model computing ``Ŵ x + B A x`` for every adapted module, for as long as the context lasts
    (forward hooks, removed on exit): what ``PeftModel`` computes with the saved adapter."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, lr in adapters.items():
            handles.append(modules[name].register_forward_hook(_LoRAHook(lr.A, lr.B)))
        yield model
    finally:
        for h in handles:
            h.remove()


def adapter_config(adapters: dict[str, LowRank], base_model: str | None, fan_in_fan_out: bool) -> dict:
    """A PEFT ``LoraConfig`` as JSON: the modules by full name, the most common rank as ``r``, the
    others in ``rank_pattern``; ``lora_alpha`` equal to each rank, so every correction has scale 1."""
    ranks = [lr.rank for lr in adapters.values()]
    r = max(set(ranks), key=ranks.count)
    pattern = {name: lr.rank for name, lr in adapters.items() if lr.rank != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(adapters),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def retargeted_adapter_config(folder: str | Path, base: str) -> bytes | None:
    """``folder``'s ``adapter_config.json`` with ``base_model_name_or_path`` set to ``base`` (None: no adapter).

    The base of an EoRA adapter is the sparse model beside it, never the dense model it was pruned from:
    ``transformers`` (with ``peft`` installed) and ``AutoPeftModelForCausalLM`` load a Hub repo holding an
    adapter from the repo that field names, so a pushed or copied checkpoint must name itself there."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    return (json.dumps(cfg, indent=2) + "\n").encode("utf-8")


def retarget_adapter(folder: str | Path, base: str) -> None:
    """Rewrite ``folder``'s adapter config (if any) so that its base is ``base`` (see above)."""
    data = retargeted_adapter_config(folder, base)
    if data is not None:
        (Path(folder) / ADAPTER_CONFIG).write_bytes(data)


def save_adapter(folder: str | Path, adapters: dict[str, LowRank], base_model: str | None = None,
                 fan_in_fan_out: bool = False) -> list[str]:
    """Write ``adapters`` as a PEFT LoRA adapter into ``folder``; returns the file names written.

    Keys are PEFT's: ``base_model.model.<module>.lora_A.weight [r, in]`` and ``...lora_B.weight [out, r]``,
    float32, so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), folder)``
    loads the sparse base with the corrections. ``base_model`` is the adapter's
    ``base_model_name_or_path``: the folder the sparse base is saved in (see :func:`retarget_adapter`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {}
    for name, lr in adapters.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lr.A.detach().float().cpu().contiguous()  # [r, in]
        tensors[f"base_model.model.{name}.lora_B.weight"] = lr.B.detach().float().cpu().contiguous()  # [out, r]
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    cfg = adapter_config(adapters, base_model, fan_in_fan_out)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
