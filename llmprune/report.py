"""What a pruning run did: per-module sparsity and error, per-layer time, and the run's settings."""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from .activation.report import summary_lines
from .calibration import portable_settings
from .engine.layer import LayerReport
from .runtime.threads import applied
from .steps.eora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

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


def _thread_policy() -> dict[str, Any] | None:
    return applied()


@dataclass
class PruneReport:
    """What :func:`llmprune.prune` did: settings, calibration, per-layer and per-module sparsity, error and
    mask hash, timings; ``summary()`` for the terminal, ``metadata()`` for the checkpoint."""

    config: dict[str, Any]
    model: str
    calibration: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # load, calibration, prune, save, total
    versions: dict[str, str] = field(default_factory=library_versions)
    evaluation: Any = None  # EvalResults of the pruned model, when evaluated before saving
    layer_targets: list[tuple[float, str]] | None = None  # per layer (sparsity, pattern) when not uniform
    search: dict[str, Any] | None = None  # the search allocation's summary (llmprune.pipeline.search)
    permutations: dict[str, Any] = field(default_factory=dict)  # module -> int32 [in] (RIA N:M), see save
    execution: str | None = None  # how the engine ran the layers' chunks (lockstep, replay, ...)
    skipped: dict[str, str] = field(default_factory=dict)  # modules left dense by role (routers), and why
    nm_search: dict[str, str] = field(default_factory=dict)  # N:M pattern -> group choice that ran (SparseGPT)
    adapters: dict[str, Any] = field(default_factory=dict)  # module -> LowRank correction (compensate), see save
    uncompensated: dict[str, str] = field(default_factory=dict)  # pruned modules left without a correction, and why
    activation: Any = None  # ActivationResult: calibrated activation thresholds (llmprune/activation), if asked for
    activation_handle: Any = field(default=None, repr=False)  # the thresholds installed on the model in memory
    threads: dict[str, Any] | None = field(default_factory=_thread_policy)  # CPU thread policy applied (threads.py)
    structure: dict[str, Any] | None = None  # structured removal: what went (indices), parameters before/after

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

    @property
    def adapter_params(self) -> int:
        """Parameters of the low-rank corrections (LoRA A and B of every adapted module)."""
        return sum(lr.params for lr in self.adapters.values())

    def reconstruction_summary(self) -> dict[str, Any] | None:
        """The reconstruction step's effect: relative output errors before and after, weighted by module size."""
        mods = [m for m in self.modules if m.reconstruct]
        if not mods:
            return None
        size = [m.shape[0] * m.shape[1] for m in mods]
        total = sum(size)
        return {
            "method": self.config.get("reconstruct"),
            "modules": len(mods),
            "mean_error_before": sum(m.reconstruct["error_before"] * w for m, w in zip(mods, size)) / total,
            "mean_error_after": sum(m.reconstruct["error_after"] * w for m, w in zip(mods, size)) / total,
            "iterations": sum(m.reconstruct["iterations"] for m in mods),
        }

    def compensation_summary(self) -> dict[str, Any] | None:
        """The compensation step: adapter files, ranks, parameters (also as a fraction of the pruned weights)."""
        if not self.config.get("compensate"):
            return None
        ranks = sorted({lr.rank for lr in self.adapters.values()})
        return {
            "method": self.config.get("compensate"),
            "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS] if self.adapters else [],
            "modules": len(self.adapters),
            "ranks": ranks,
            "adapter_params": self.adapter_params,
            "adapter_fraction": self.adapter_params / self.pruned_params if self.pruned_params else 0.0,
            **({"uncompensated": self.uncompensated} if self.uncompensated else {}),
            "meaning": "a PEFT LoRA adapter beside the sparse base: PeftModel.from_pretrained(base, folder) "
                       "computes W_sparse x + B A x; merge_and_unload() would make the weights dense",
        }

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
            **({"search": {k: v for k, v in self.search.items() if k not in ("history", "database", "levels")}}
               if self.search else {}),
            "reconstruct": self.config.get("reconstruct"),
            **({"reconstruction": self.reconstruction_summary()} if self.reconstruction_summary() else {}),
            "compensate": self.config.get("compensate"),
            **({"compensation": self.compensation_summary()} if self.compensation_summary() else {}),
            **({"layer_sparsity": [{"sparsity": round(s, 6), "pattern": p} for s, p in self.layer_targets]}
               if self.layer_targets is not None else {}),
            "calibration": self.calibration,
            "seed": self.config["seed"],
            "config": self.portable_config,
            "versions": self.versions,
            **({"threads": self.threads} if self.threads else {}),
            **({"permutations": {
                "file": PERMUTATIONS_FILE, "modules": len(self.permutations),
                "meaning": "the N:M groups of these modules are over permuted input channels: W[:, perm] has "
                           "N nonzeros at most in every M consecutive columns; W keeps the original order",
            }} if self.permutations else {}),
            **({"eval": {"file": EVAL_FILE, "metrics": self.evaluation.metrics}} if self.evaluation else {}),
            **({"activation": self.activation.metadata()} if self.activation is not None else {}),
            **({"structure": self.structure} if self.structure is not None else {}),
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
                "threads": self.threads,
                "eval": self.evaluation.metrics if self.evaluation else None,
                "layer_targets": self.layer_targets,
                "search": self.search,
                "execution": self.execution,
                "masks_sha256": self.masks_sha256,
                "fallbacks": self.fallbacks,
                "skipped": self.skipped,
                "nm_search": self.nm_search,
                "reconstruction": self.reconstruction_summary(),
                "compensation": self.compensation_summary(),
                **({"activation": {**self.activation.metadata(), "holdout": self.activation.holdout,
                                   "seconds": self.activation.seconds}} if self.activation is not None else {}),
                "layers": [
                    {"index": layer.index, "seconds": layer.seconds, "error": layer.error,
                     "modules": [asdict(m) for m in layer.modules]}
                    for layer in self.layers
                ],
            }
        )

    def _structure_line(self) -> str:
        st = self.structure
        gone = st["removal"]
        per = st["per_layer"]
        what = [f"{len(gone['layers'])} layers ({st['depth']['method']}: {gone['layers']})"] if gone["layers"] else []
        what += [f"{per[k]} {k.replace('_', '/')} per layer" for k in ("kv_heads", "heads", "channels") if per[k]]
        if st.get("width_method"):
            what[-1] += f" ({st['width_method']})"
        d = st["decoder_params"]
        return (f"model {self.model}: structured removal of {', '.join(what) or 'nothing'}; decoder parameters "
                f"{d['before']:,} -> {d['after']:,} ({d['fraction_removed']:.1%} removed), model "
                f"{st['params']['before']:,} -> {st['params']['after']:,}")

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
        if c["method"] == "none":  # activation sparsity only or structured removal: no sparsity table
            lines = []
        lines += [
            "",
            self._structure_line() if self.structure is not None else
            f"model {self.model}: weights left dense (method none)" if c["method"] == "none" else
            f"model {self.model}: {c['method']} {c['pattern']}, measured sparsity {self.sparsity:.4f} "
            f"over {self.pruned_params:,} weights in {len(self.modules)} modules "
            f"({self.decoder_sparsity:.4f} over every weight matrix of the decoder layers)",
            f"calibration {self.calibration.get('source')}: {self.calibration.get('nsamples')} x "
            f"{self.calibration.get('seqlen')} tokens, seed {c['seed']}",
            f"time: {secs}",
        ]
        rec = self.reconstruction_summary()
        if rec:
            lines.append(f"{'reconstruction ' + str(rec['method']) if self.structure is None else 'consumers re-solved'}"
                         f": relative output error {rec['mean_error_before']:.4f} -> "
                         f"{rec['mean_error_after']:.4f} (mean over {rec['modules']} modules, by size)")
        comp = self.compensation_summary()
        if comp:
            lines.append(f"compensation {comp['method']}: {comp['modules']} LoRA corrections, rank "
                         f"{'/'.join(map(str, comp['ranks'])) or '-'}, {comp['adapter_params']:,} parameters "
                         f"({comp['adapter_fraction']:.2%} of the pruned weights), saved as a PEFT adapter")
        if self.activation is not None:
            lines += summary_lines(self.activation)
        if self.skipped:
            lines.append(f"left dense by role: {len(self.skipped)} module(s) (routers and gates), e.g. "
                         f"{next(iter(self.skipped))}; see 'skipped' in the report")
        if self.fallbacks:
            lines.append(f"warning: {len(self.fallbacks)} module(s) pruned by magnitude (no calibration tokens "
                         f"reached them): {', '.join(list(self.fallbacks)[:5])}{' ...' if len(self.fallbacks) > 5 else ''}")
        return "\n".join(lines)
