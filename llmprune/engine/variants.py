"""The search's database of per-module variants, and the whole model's fitness under a candidate.

:class:`VariantDatabase` is a folder: ``manifest.json`` (what the variants were built from: model,
calibration, method and its options, targets) and one small safetensors file per module and level
(``variants/<module>/<level>.safetensors``: the kept values and a one-bit-per-weight mask), plus each
module's dense weight (``dense.safetensors``) to put back after the search. Files are written to a
temporary name and renamed, so a killed build leaves whole variants only and a rerun builds the rest.

:func:`build_variants` fills it in one sequential prune pass at the uniform target: each target is pruned
at every level it lacks with the run's plan (pruner, refinement, reconstruction), from the statistics it
sees in that pass, and the pass goes on with the uniform variant. The reference builds its database from the
dense model's inputs (``prune.py`` keeps the dense outputs); on the embedded model at 70 % the uniform model
stitched from such variants scores a WikiText-2 perplexity of 820 against 272 for the sequential prune, so a
search over them optimises a model far from the one the engine then makes.

:class:`KLFitness` scores a candidate: the variants are put into the model (only the modules whose
level changed since the last call) and ``KL(p_dense ‖ p)`` of the final logits is averaged over the
fitness tokens (the reference's ``compute_kl_div``), optionally over the dense model's top-k tokens and
one bucket for the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from ..errors import ConfigError
from ..runtime.files import save_tensors_atomic, write_json_atomic
from ..steps import LayerTarget
from ..steps.evopress import window_cuts
from .capture import inference_state
from .plan import PrunePlan
from .targets import Target

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DENSE = "dense"


def _safe(name: str) -> str:
    """A module name as a folder name (expert indices ``[5]`` become ``_5_``)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


class VariantDatabase:
    """Per-module variants on disk, for one model, calibration and method (``key``)."""

    def __init__(self, folder: str | os.PathLike, key: Mapping):
        self.folder = Path(folder).expanduser()
        self.key = dict(key)
        manifest = self.folder / MANIFEST
        if manifest.exists():
            try:
                have = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"search database {self.folder}: {MANIFEST} is unreadable ({e}); delete the "
                                  "folder to rebuild it, or give another --search-dir") from None
            if have.get("key") != self.key:
                diff = sorted(k for k in set(have.get("key", {})) | set(self.key)
                              if have.get("key", {}).get(k) != self.key.get(k))
                raise ConfigError(
                    f"search database {self.folder} was built for another run (differs in: {', '.join(diff)}); "
                    "give another --search-dir, or delete the folder to rebuild it for this one")
            self.divisor = have.get("divisor")
        else:
            self.divisor = None
            write_json_atomic(manifest, {"key": self.key, "divisor": None}, sort_keys=True)

    def set_divisor(self, divisor: int | None) -> None:
        """Record the unstructured grid's ``D`` (``Δ = gcd/D``), so later searches use the same grid."""
        if self.divisor is None and divisor is not None:
            self.divisor = divisor
            write_json_atomic(self.folder / MANIFEST, {"key": self.key, "divisor": divisor}, sort_keys=True)

    def path(self, name: str, level: str) -> Path:
        return self.folder / "variants" / _safe(name) / f"{level}.safetensors"

    def has(self, name: str, level: str) -> bool:
        return self.path(name, level).exists()

    def write(self, name: str, level: str, W: torch.Tensor, dtype: torch.dtype) -> None:
        """``W [out, in]`` stored as its nonzero values (in the model's ``dtype``) and a packed mask."""
        M = (W != 0).cpu()  # [out, in]
        bits = torch.from_numpy(np.packbits(M.numpy().reshape(-1)))  # [ceil(out·in/8)] uint8
        values = W.cpu()[M].to(dtype).contiguous()  # [kept]
        save_tensors_atomic(self.path(name, level), {"mask": bits, "values": values},
                            {"shape": json.dumps(list(W.shape))})

    def read(self, name: str, level: str) -> torch.Tensor:
        """The variant as a dense ``[out, in]`` tensor (zeros off its mask) in the stored dtype."""
        path = self.path(name, level)
        try:
            with safe_open(str(path), framework="pt") as f:
                shape = json.loads(f.metadata()["shape"])
                bits, values = f.get_tensor("mask"), f.get_tensor("values")
        except Exception as e:  # a damaged or foreign file: name it and the fix
            raise ConfigError(f"search database file {path} is unreadable ({type(e).__name__}: {e}); delete it "
                              "and run again to rebuild it") from None
        n = int(np.prod(shape))
        M = torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool)).view(shape)
        W = torch.zeros(shape, dtype=values.dtype)
        W[M] = values
        return W

    def search_path(self, fingerprint: str) -> Path:
        return self.folder / "searches" / f"{fingerprint}.json"


class VariantPlan(PrunePlan):
    """A prune pass that writes every level of each target to the database, then prunes the target to its own
    (uniform) target as ``plan`` would, so the pass goes on sequentially with the uniform model."""

    def __init__(self, plan: PrunePlan, db: VariantDatabase,
                 levels: Mapping[str, Sequence[tuple[str, LayerTarget]]], dtype: torch.dtype):
        super().__init__(plan.pruner, plan._target_of, refiner=plan.refiner, nm=plan.nm,
                         reconstructor=plan.reconstructor)
        self.db, self.levels, self.dtype = db, levels, dtype
        self.built = 0

    def __call__(self, t: Target, stats):
        W = t.get_weight()  # [out, in] float32, dense
        if not self.db.has(t.name, DENSE):
            self.db.write(t.name, DENSE, W, self.dtype)
        own = self.target_of(t.name)
        for key, spec in self.levels.get(t.name, ()):
            if spec != own and not self.db.has(t.name, key):
                res, _, _, _ = self.pruned(t.name, W, stats, spec)
                self.db.write(t.name, key, res.W.masked_fill(res.W == 0, 0.0), self.dtype)
                self.built += 1
        report = super().__call__(t, stats)
        for key, spec in self.levels.get(t.name, ()):  # the uniform level: what the pass just wrote to the model
            if spec == own and not self.db.has(t.name, key):
                self.db.write(t.name, key, t.get_weight(), self.dtype)
                self.built += 1
        return report


def build_variants(run, plan: PrunePlan, db: VariantDatabase, levels: Mapping[str, Sequence[tuple[str, LayerTarget]]],
                   dtype: torch.dtype) -> int:
    """One sequential prune pass of ``run`` (it prunes the model to ``plan``'s uniform targets) that writes, for
    every target, each ``(key, target)`` of ``levels[name]`` missing from ``db``, pruned from the statistics the
    target sees there, and its dense weight. Returns the number of variants built; the model is left pruned
    (:meth:`KLFitness.restore` or the dense variants put it back)."""
    vplan = VariantPlan(plan, db, levels, dtype)
    run.prune(vplan)
    return vplan.built


def missing(db: VariantDatabase, levels: Mapping[str, Sequence[tuple[str, LayerTarget]]]) -> int:
    return sum(not db.has(name, key) for name, specs in levels.items() for key, _ in specs) + sum(
        not db.has(name, DENSE) for name in levels)


class KLFitness:
    """``KL(p_dense ‖ p)`` of ``model``'s final logits over fitness windows ``ids [n, L]``, with the
    targets set to a candidate's variants. The dense log-probabilities are computed once (all of them,
    or the top ``topk`` and the log-mass of the rest)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, db: VariantDatabase, targets: Mapping[str, Target],
                 device: torch.device, topk: int | None = None):
        self.model, self.ids, self.db, self.targets = model, ids, db, dict(targets)
        self.device, self.topk = device, topk
        self.loaded: dict[str, str] = {}  # module -> variant in the model now
        self.evaluations = 0
        self.dense: list = []
        self.restore()  # the dense model's own outputs
        with inference_state(model):
            for i in range(ids.shape[0]):
                logp = torch.log_softmax(model(ids[i:i + 1].to(device)).logits[0].float(), dim=-1)  # [L, V]
                if topk is None:
                    self.dense.append(logp.cpu())
                else:
                    top, idx = logp.topk(min(topk, logp.shape[-1]), dim=-1)  # [L, k]
                    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))  # [L]  log p(rest)
                    self.dense.append((top.cpu(), idx.cpu(), rest.cpu()))

    def load(self, variants: Mapping[str, str]) -> None:
        """Put ``variants`` (module -> level key, or ``DENSE``) into the model; only changed modules are read."""
        for name, key in variants.items():
            if self.loaded.get(name) != key:
                self.targets[name].set_weight(self.db.read(name, key).to(self.device))
                self.loaded[name] = key

    def restore(self) -> None:
        """Every target back to its dense weight."""
        self.load({name: DENSE for name in self.targets})

    def __call__(self, variants: Mapping[str, str], windows: Sequence[int], tokens: int) -> float:
        """Mean KL per token over ``windows`` (the last cut so that ``tokens`` tokens count)."""
        self.load(variants)
        self.evaluations += 1
        total, count = 0.0, 0
        with inference_state(self.model):
            for w, n in window_cuts(windows, tokens, self.ids.shape[1]):
                logits = self.model(self.ids[w:w + 1, :n].to(self.device)).logits[0].float()  # [n, V]
                logp = torch.log_softmax(logits, dim=-1).cpu()
                dense = self.dense[w]
                if self.topk is None:
                    p = dense[:n]
                    kl = (p.exp() * (p - logp)).sum(-1)  # [n]
                else:
                    top, idx, rest = (x[:n] for x in dense)
                    q = logp.gather(-1, idx)  # [n, k]
                    q_rest = torch.log1p(-q.exp().sum(-1).clamp(max=1 - 1e-7))  # [n]
                    kl = (top.exp() * (top - q)).sum(-1) + rest.exp() * (rest - q_rest)  # [n]
                total += float(kl.double().sum())
                count += n
        return total / max(count, 1)


def fingerprint(data: Mapping) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
