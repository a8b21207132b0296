"""The thresholding modules of activation sparsity: :class:`ThresholdSpec` (one thresholded tensor,
as data), :class:`ActivationThreshold` (the module that zeroes what falls below it),
:class:`CallShape` (the ``(b, L)`` of the running call) and :class:`SparseDecodeLinear` (the sparse
CPU decode). :mod:`.apply` installs them on a model and takes them off.

**Where thresholds apply** (``prefill``, the ``activation_prefill`` setting, stored in ``config.json``):
a call of one position per sequence (a decode step) is always thresholded; of a call of ``L > 1``
positions (a prefill, or a perplexity window), only the last ``⌊prefill·L⌋`` positions are, the first
ones stay dense. ``prefill = 0`` (the default of new runs): decode only, where the speed is (TEAL's
kernels and the sparse decode path below speed up decode only; a dense prefill keeps the prompt's
cache exact). ``0.5``: TEAL's reference (``SparsifyFn`` with ``apply_prefill=True``: decode and the
last half of each prefill, what its paper's evaluations ran). ``0.99``: WINA's reference. ``1``: every
position (llmprune before issue 27, and checkpoints written before it). The positions are read from the
tensor (``[..., L, in]``); a flattened ``[tokens, in]`` input (fused MoE experts) takes ``(b, L)`` from
the call of the first decoder layer. The calibration pass thresholds every position of its windows.

``sparse_decode=True`` (CPU, batch-1 decode): every thresholded ``nn.Linear`` / GPT-2 ``Conv1D``
gets its weight stored transposed (``W^T [in, out]``, rows contiguous; the Parameter keeps its
shape and name, ``weight.data`` becomes a transposed view) and a :class:`SparseDecodeLinear`
computes ``y = Σ_{j: |x_j| ≥ t} x_j W^T[j]`` for a single token with one ``embedding_bag`` (a
gather-and-sum over the surviving rows that never materialises them): only the columns of ``W``
whose inputs survive are read. It applies the threshold itself (no pre-hook): the mask goes to
the surviving indices at once, once per shared input. Prefill and batched calls take the dense path (``F.linear`` on the
transposed view: the same GEMM). ``remove`` puts the weights back in their own layout.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..engine.targets import find_decoder_layers

SITES = ("input", "output")  # thresholded tensor: a module's input (pre-hook) or its output (CATS act_fn)


@dataclass
class ThresholdSpec:
    """One thresholded tensor: the modules that read it and its threshold.

    ``members`` are full module names; with ``site == "input"`` the tensor is their common input, with
    ``site == "output"`` (CATS) the output of the single member (the MLP's activation module).
    ``threshold`` is on the criterion's score: ``|x|`` (teal, cats) or ``|x_j|·‖W_:,j‖₂`` (wina).
    """

    name: str  # the group's name: its first member
    members: list[str]
    threshold: float
    site: str = "input"
    target: float | None = None  # sparsity the threshold was chosen for
    calibration: float | None = None  # sparsity it reached on the calibration tokens
    measured: float | None = None  # sparsity measured on held-out text
    weights: int = 0  # weights this tensor feeds (what its zeros spare reading)
    norms: bool | None = None  # wina: scored with the members' column norms; None: yes (checkpoints before issue 27)


class ActivationThreshold(nn.Module):
    """Zeroes the entries of a tensor whose score is below the threshold.

    ``per_feature`` (WINA) holds ``t / ‖W_:,j‖₂`` for every input feature ``j``: ``|x_j| ≥ t_j`` is
    ``|x_j|·‖W_:,j‖₂ ≥ t`` without a product at run time. The comparison runs in the tensor's own
    dtype and device (float32, bfloat16, float16; CPU or CUDA), on any leading shape (batch,
    padding, prefill or one decode token): thresholds are per entry, never across tokens.
    ``prefill``: the fraction of a multi-position call's last positions thresholded (module docstring);
    ``call``: the ``(b, L)`` of the current model call, for flattened inputs.
    """

    def __init__(self, spec: ThresholdSpec, per_feature: torch.Tensor | None = None, prefill: float = 1.0,
                 call: CallShape | None = None):
        super().__init__()
        self.spec = spec
        self.prefill = prefill
        self.call = call
        self.threshold = float(spec.threshold)
        self.register_buffer("per_feature", per_feature, persistent=False)  # [in] or None
        self._cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._last_in: weakref.ref | None = None
        self._last_out: torch.Tensor | None = None
        self._uses = 0
        self._rows_in: weakref.ref | None = None  # the same memo for the sparse decode path's (idx, values)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows_uses = 0
        self.measuring = False
        self.zeros = 0
        self.total = 0

    def _feature_thresholds(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        t = self._cast.get(key)
        if t is None:
            t = self._cast[key] = self.per_feature.to(device=x.device, dtype=x.dtype)
        return t

    def _threshold(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_feature is None:
            keep = x.abs() >= self.threshold
        else:
            keep = x.abs() >= self._feature_thresholds(x)
        y = x * keep  # exact zeros; NaN/inf inputs are not hidden behind a fill
        if self.measuring:  # counted over the thresholded positions only (as TEAL's and WINA's references)
            self.zeros += int((y == 0).sum())
            self.total += y.numel()
        return y

    def _sequences(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` as ``[..., L, in]`` when it is a call of ``L > 1`` positions per sequence, else None."""
        if x.dim() >= 3:
            return x if x.shape[-2] > 1 else None
        shape = self.call.shape if self.call is not None else None
        if x.dim() == 2 and shape is not None and shape[1] > 1 and shape[0] * shape[1] == x.shape[0]:
            return x.view(shape[0], shape[1], x.shape[-1])  # [b, L, in]
        return None  # one position per sequence (a decode step), or no way to tell: every row thresholded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prefill >= 1.0:
            return self._threshold(x)
        seq = self._sequences(x)
        if seq is None:
            return self._threshold(x)
        L = seq.shape[-2]
        dense = L - int(self.prefill * L)  # leading positions left dense (TEAL: the first half)
        if dense >= L:
            return x
        y = torch.cat((seq[..., :dense, :], self._threshold(seq[..., dense:, :])), dim=-2)  # [..., L, in]
        return y.view(x.shape)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse tensor for ``x``, computed once for all the members reading the same ``x``."""
        last = self._last_in() if self._last_in is not None else None
        if last is x and self._last_out is not None:
            out = self._last_out
        else:
            out = self(x)
            self._last_in, self._last_out, self._uses = weakref.ref(x), out, 0
        self._uses += 1
        if self._uses >= len(self.spec.members):  # every member has read it: do not keep it alive
            self._last_in, self._last_out = None, None
        return out


    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For one token ``x [..., in]``: the surviving inputs' indices ``idx [k]`` and values ``[k]``.

        The sparse decode path's form of :meth:`shared` (computed once for the members reading ``x``):
        the mask goes straight to indices, without the zero-filled copy of ``x``.
        """
        last = self._rows_in() if self._rows_in is not None else None
        if last is x and self._rows is not None:
            out = self._rows
        else:
            v = x.reshape(-1)  # [in]
            t = self.threshold if self.per_feature is None else self._feature_thresholds(x)
            idx = (v.abs() >= t).nonzero().squeeze(1)  # [k]
            vals = v.index_select(0, idx)  # [k]
            if self.measuring:
                self.zeros += v.numel() - int(torch.count_nonzero(vals))
                self.total += v.numel()
            out = idx, vals
            self._rows_in, self._rows, self._rows_uses = weakref.ref(x), out, 0
        self._rows_uses += 1
        if self._rows_uses >= len(self.spec.members):
            self._rows_in, self._rows = None, None
        return out


class CallShape:
    """``(b, L)`` of the model call running now, set by a pre-hook on the first decoder layer and cleared
    after the last; None outside a model call (the calibration pass calls layers directly)."""

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None

    def hooks(self, model: nn.Module) -> list[Any]:
        try:
            _, layers = find_decoder_layers(model)
        except ValueError:
            return []  # not a decoder stack: flattened inputs are thresholded on every row

        def start(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs.get("hidden_states")
            self.shape = tuple(h.shape[:2]) if isinstance(h, torch.Tensor) and h.dim() == 3 else None

        def end(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.shape = None

        return [layers[0].register_forward_pre_hook(start, with_kwargs=True),
                layers[-1].register_forward_hook(end, with_kwargs=True, always_call=True)]


class SparseDecodeLinear(nn.Module):
    """A linear map that, for one token, reads only the rows of ``W^T`` whose inputs are nonzero.

    Holds the original module's ``weight`` and ``bias`` Parameters under the same names (the
    ``state_dict`` keys do not change); ``weight.data`` is a transposed view of a contiguous
    ``W^T [in, out]``. CPU only: on other devices every call is the dense ``F.linear``.
    """

    def __init__(self, module: nn.Module, thr: ActivationThreshold | None = None):
        super().__init__()
        self.conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores W^T [in, out] already
        self.original = [module]  # not a submodule: restored by remove()
        # the threshold on this module's input (applied here, not by a pre-hook, so that a decode step
        # goes from the mask to the surviving rows at once); None: the input is sparse already (CATS down_proj)
        self.thr = [thr] if thr is not None else []  # a list: the threshold module is not a submodule here
        self.weight = module.weight
        self.bias = module.bias
        if not self.conv1d:
            self.weight.data = self.weight.data.t().contiguous().t()  # [out, in] view of W^T [in, out]
        self.in_features = self.weight.shape[0 if self.conv1d else 1]
        self._offsets = torch.zeros(1, dtype=torch.long)

    def _WT(self) -> torch.Tensor:
        return self.weight if self.conv1d else self.weight.t()  # [in, out], contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.device.type == "cpu" and not x.requires_grad:
            if self.thr:
                idx, vals = self.thr[0].rows(x)  # [k] surviving inputs, their values
            else:
                v = x.reshape(-1)  # [in]
                idx = v.nonzero().squeeze(1)
                vals = v.index_select(0, idx)
            y = F.embedding_bag(idx, self._WT(), self._offsets, mode="sum",
                                per_sample_weights=vals.to(self.weight.dtype))  # [1, out]
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
        if self.thr:
            x = self.thr[0].shared(x)
        if self.conv1d:
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight) if self.bias is not None \
                else x.reshape(-1, x.shape[-1]) @ self.weight
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return F.linear(x, self.weight, self.bias)

    def restore(self) -> nn.Module:
        module = self.original[0]
        if not self.conv1d:
            self.weight.data = self.weight.data.contiguous()
        return module
