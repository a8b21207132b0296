"""What a pruning run did: per-module sparsity and error, per-layer time, and the run's settings."""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from .engine import LayerReport

EVAL_FILE = "llmprune_eval.json"  # evaluation results saved beside a pruned checkpoint
PERMUTATIONS_FILE = "llmprune_permutations.safetensors"  # input-channel permutations of N:M modules (RIA)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("llmprune", "torch", "transformers", "accelerate", "safetensors", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class PruneReport:
    config: dict[str, Any]
    model: str
    calibration: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # load, calibration, prune, save, total
    versions: dict[str, str] = field(default_factory=library_versions)
    evaluation: Any = None  # EvalResults of the pruned model, when evaluated before saving
    layer_targets: list[tuple[float, str]] | None = None  # per layer (sparsity, pattern) when not uniform
    permutations: dict[str, Any] = field(default_factory=dict)  # module -> int32 [in] (RIA N:M), see save
    execution: str | None = None  # how the engine ran the layers' chunks (lockstep, replay, ...)
    skipped: dict[str, str] = field(default_factory=dict)  # modules left dense by role (routers), and why
    nm_search: dict[str, str] = field(default_factory=dict)  # N:M pattern -> group choice that ran (SparseGPT)

    @property
    def modules(self):
        return [m for layer in self.layers for m in layer.modules]

    @property
    def sparsity(self) -> float:
        """Measured sparsity over all pruned weights (weighted by size)."""
        mods = self.modules
        total = sum(m.shape[0] * m.shape[1] for m in mods)
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in mods)
        return zeros / total if total else 0.0

    @property
    def portable_config(self) -> dict[str, Any]:
        """The settings as the checkpoint records them: data sources by name, no path of this machine."""
        from .data import portable_settings

        return portable_settings(self.config)

    @property
    def masks_sha256(self) -> str:
        """One hash of every pruned module's zero pattern (modules by name): equal hashes, equal masks."""
        import hashlib

        h = hashlib.sha256()
        for m in sorted(self.modules, key=lambda m: m.name):
            h.update(f"{m.name}:{m.mask_sha256}\n".encode())
        return h.hexdigest()

    @property
    def fallbacks(self) -> dict[str, str]:
        """Modules not pruned by the run's method, and why (e.g. experts no calibration token reached)."""
        return {m.name: m.fallback for m in self.modules if m.fallback}

    @property
    def decoder_sparsity(self) -> float:
        """Zeros over every weight matrix inside the decoder layers: targets and what stayed dense
        (routers, ignored modules), so it never overstates the model's sparsity."""
        total = sum(layer.weights for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    @property
    def pruned_params(self) -> int:
        return sum(m.shape[0] * m.shape[1] for m in self.modules)

    def metadata(self) -> dict[str, Any]:
        """The block written into ``config.json`` under ``"llmprune"``."""
        return {
            "method": self.config["method"],
            "pattern": self.config["pattern"],
            "target_sparsity": self.config.get("target_sparsity"),
            "measured_sparsity": round(self.sparsity, 6),
            "decoder_sparsity": round(self.decoder_sparsity, 6),
            "module_sparsity": {m.name: round(m.sparsity, 6) for m in self.modules},
            "module_target_sparsity": {m.name: round(m.target_sparsity, 6) for m in self.modules},
            "sequential": self.config.get("sequential"),
            "execution": self.execution,
            "masks_sha256": self.masks_sha256,
            **({"fallbacks": self.fallbacks} if self.fallbacks else {}),
            **({"skipped": self.skipped} if self.skipped else {}),
            **({"nm_search": self.nm_search} if self.nm_search else {}),
            "refine": self.config.get("refine"),
            "allocation": self.config.get("allocation"),
            **({"layer_sparsity": [{"sparsity": round(s, 6), "pattern": p} for s, p in self.layer_targets]}
               if self.layer_targets is not None else {}),
            "calibration": self.calibration,
            "seed": self.config["seed"],
            "config": self.portable_config,
            "versions": self.versions,
            **({"permutations": {
                "file": PERMUTATIONS_FILE, "modules": len(self.permutations),
                "meaning": "the N:M groups of these modules are over permuted input channels: W[:, perm] has "
                           "N nonzeros at most in every M consecutive columns; W keeps the original order",
            }} if self.permutations else {}),
            **({"eval": {"file": EVAL_FILE, "metrics": self.evaluation.metrics}} if self.evaluation else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean(
            {
                "model": self.model,
                "config": self.portable_config,
                "calibration": self.calibration,
                "measured_sparsity": self.sparsity,
                "decoder_sparsity": self.decoder_sparsity,
                "pruned_params": self.pruned_params,
                "seconds": self.seconds,
                "versions": self.versions,
                "eval": self.evaluation.metrics if self.evaluation else None,
                "layer_targets": self.layer_targets,
                "execution": self.execution,
                "masks_sha256": self.masks_sha256,
                "fallbacks": self.fallbacks,
                "skipped": self.skipped,
                "nm_search": self.nm_search,
                "layers": [
                    {"index": layer.index, "seconds": layer.seconds, "error": layer.error,
                     "modules": [asdict(m) for m in layer.modules]}
                    for layer in self.layers
                ],
            }
        )

    def summary(self) -> str:
        """A plain-text table: one row per module kind (e.g. ``self_attn.q_proj``), then totals."""
        kinds: dict[str, list] = {}
        for layer in self.layers:
            for m in layer.modules:
                kind = m.name.split(f".{layer.index}.", 1)[-1]
                kinds.setdefault(kind, []).append(m)
        rows = [("module", "count", "shape", "target", "sparsity", "rel. error")]
        for kind, mods in kinds.items():
            errs = [m.error for m in mods if m.error == m.error]
            rows.append((
                kind, str(len(mods)), "x".join(map(str, mods[0].shape)),
                f"{mods[0].target_sparsity:.3f}",
                f"{sum(m.sparsity for m in mods) / len(mods):.4f}",
                f"{sum(errs) / len(errs):.4f}" if errs else "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        c = self.config
        secs = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        lines += [
            "",
            f"model {self.model}: {c['method']} {c['pattern']}, measured sparsity {self.sparsity:.4f} "
            f"over {self.pruned_params:,} weights in {len(self.modules)} modules "
            f"({self.decoder_sparsity:.4f} over every weight matrix of the decoder layers)",
            f"calibration {self.calibration.get('source')}: {self.calibration.get('nsamples')} x "
            f"{self.calibration.get('seqlen')} tokens, seed {c['seed']}",
            f"time: {secs}",
        ]
        if self.skipped:
            lines.append(f"left dense by role: {len(self.skipped)} module(s) (routers and gates), e.g. "
                         f"{next(iter(self.skipped))}; see 'skipped' in the report")
        if self.fallbacks:
            lines.append(f"warning: {len(self.fallbacks)} module(s) pruned by magnitude (no calibration tokens "
                         f"reached them): {', '.join(list(self.fallbacks)[:5])}{' ...' if len(self.fallbacks) > 5 else ''}")
        return "\n".join(lines)
