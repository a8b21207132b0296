"""Evaluation results: one JSON schema, markdown tables, comparisons and a chart.

Metric keys are normalized as ``<dataset or task>/<metric>``: ``wikitext2/ppl``, ``c4/ppl``,
``piqa/acc``, ``piqa/acc_norm``, ``lambada_openai/perplexity``. A metric computed under an
lm-eval filter other than ``none`` gets it appended: ``gsm8k/exact_match@strict-match``.

Results hold no path of the machine that measured them: settings name files by base name and the
data dir only as set. A perplexity measured on the very file the model was calibrated on (same
``data_sha256`` as the pruning's calibration) is marked ``overlaps_calibration`` and not comparable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import portable_settings
from ..report import library_versions
from ..runtime.files import replace_atomic, write_json_atomic
from ..runtime.threads import applied

SCHEMA = "llmprune.eval/1"
LOWER_IS_BETTER = ("ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def lower_is_better(key: str) -> bool:
    return key.split("/", 1)[-1].split("@")[0] in LOWER_IS_BETTER


def eval_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = library_versions()
    try:
        out["lm_eval"] = md.version("lm_eval")
    except md.PackageNotFoundError:
        pass
    return out


def _thread_policy() -> dict[str, Any] | None:
    return applied()


@dataclass
class EvalResults:
    """What an evaluation measured, and exactly how."""

    model: str
    metrics: dict[str, float] = field(default_factory=dict)  # normalized key -> value
    stderr: dict[str, float] = field(default_factory=dict)  # normalized key -> standard error
    perplexity: dict[str, dict] = field(default_factory=dict)  # dataset -> protocol (seqlen, windows, tokens, ...)
    tasks: dict[str, dict] = field(default_factory=dict)  # task -> protocol (version, docs, num_fewshot, source, ...)
    settings: dict[str, Any] = field(default_factory=dict)  # the evaluation config
    pruning: dict[str, Any] | None = None  # the checkpoint's "llmprune" metadata, if any
    seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=eval_versions)
    threads: dict[str, Any] | None = field(default_factory=_thread_policy)  # CPU thread policy applied, if any
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        self.settings = portable_settings(self.settings)
        if isinstance(self.pruning, dict) and isinstance(self.pruning.get("config"), dict):
            self.pruning = {**self.pruning, "config": portable_settings(self.pruning["config"])}

    def mark_overlaps(self) -> None:
        """Mark each perplexity measured on the pruning's calibration file (same ``data_sha256``) as
        ``overlaps_calibration``, not comparable, with a note; called before results are written or shown."""
        calib = (self.pruning or {}).get("calibration") or {}
        sha = calib.get("data_sha256")
        for p in self.perplexity.values():
            if sha and p.get("data_sha256") == sha:
                p["overlaps_calibration"] = True
                p["comparable"] = False
                p["note"] = (f"measured on the calibration data ({calib.get('source')}): the model was pruned "
                             "with statistics of this text, so the perplexity is not comparable")

    # ---- I/O -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self.mark_overlaps()
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (temporary file, then rename)."""
        return write_json_atomic(Path(path).expanduser(), self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResults:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not an llmprune evaluation result (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        return cls(**{"threads": None,  # a file without it: not this process's policy
                      **{k: v for k, v in data.items() if k in cls.__dataclass_fields__}})

    @classmethod
    def load(cls, path: str | Path) -> EvalResults:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and "results" in data and "schema" not in data:  # a --compare file
            raise ValueError(f"{path} holds several results; load it with load_all()")
        return cls.from_dict(data)

    # ---- tables ----------------------------------------------------------------------------
    def markdown(self) -> str:
        self.mark_overlaps()
        rows = ["| metric | value | ± stderr | protocol |", "|---|---|---|---|"]
        for key, value in self.metrics.items():
            name = key.split("/", 1)[0]
            err = self.stderr.get(key)
            rows.append(f"| {key} | {_fmt(value)} | {_fmt(err) if err is not None else ''} | "
                        f"{_protocol(self, name)} |")
        return "\n".join(rows)


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def _protocol(r: EvalResults, name: str) -> str:
    if name in r.perplexity:
        p = r.perplexity[name]
        note = ("" if p.get("comparable", True) else
                ", overlaps the calibration data" if p.get("overlaps_calibration") else ", not the papers' data")
        return f"seqlen {p['seqlen']}, {p['windows']} windows, {p['tokens']} tokens{note}"
    if name in r.tasks:
        t = r.tasks[name]
        limit = f", limit {t['limit']}" if t.get("limit") is not None else ""
        return f"{t.get('docs', '?')} docs, {t.get('num_fewshot', 0)}-shot, {t.get('source', '')}{limit}"
    return ""


def _label(r: EvalResults) -> str:
    p = r.pruning
    if p:
        return f"{r.model} ({p.get('method')} {p.get('pattern')} {p.get('measured_sparsity', 0):.0%})"
    return r.model


def compare_table(results: list[EvalResults]) -> str:
    """Markdown: one row per metric, one column per model, deltas against the first model."""
    if not results:
        return ""
    base = results[0]
    keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    head = "| metric | " + " | ".join(_label(r) for r in results) + " |"
    rows = [head, "|---" * (len(results) + 1) + "|"]
    for key in keys:
        b = base.metrics.get(key)
        cells = [_fmt(b)]
        for r in results[1:]:
            v = r.metrics.get(key)
            if v is None or b is None:
                cells.append(_fmt(v))
                continue
            d = v - b
            better = (d < 0) if lower_is_better(key) else (d > 0)
            arrow = "" if d == 0 else (" ↑" if better else " ↓")
            cells.append(f"{_fmt(v)} ({d:+.4g}{arrow})")
        rows.append(f"| {key}{' *' if _not_comparable(results, key) else ''} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("Deltas are against the first model; ↑ better, ↓ worse (lower is better for perplexities).")
    if any(_not_comparable(results, key) for key in keys):
        rows.append("\\* not comparable for some model (not the papers' data, or measured on its calibration data; "
                    "see each result's perplexity protocol).")
    return "\n".join(rows)


def _not_comparable(results: list[EvalResults], key: str) -> bool:
    name = key.split("/", 1)[0]
    for r in results:
        r.mark_overlaps()
    return any(r.perplexity.get(name, {}).get("comparable", True) is False for r in results)


def save_all(results: list[EvalResults], path: str | Path) -> Path:
    """Several models' results in one file: ``{"results": [...], "table": "..."}``."""
    return write_json_atomic(Path(path).expanduser(), {"schema": SCHEMA + "+compare", "results": [
        r.to_dict() for r in results], "table": compare_table(results)}, indent=2)


def load_all(path: str | Path) -> list[EvalResults]:
    data = json.loads(Path(path).read_text())
    if "results" in data:
        return [EvalResults.from_dict(d) for d in data["results"]]
    return [EvalResults.from_dict(data)]


def compare_chart(results: list[EvalResults], path: str | Path) -> Path:
    """A PNG with one bar chart per metric, one bar per model (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("the comparison chart needs matplotlib: pip install 'llmprune[plot]'") from e
    keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    if not keys:
        raise ValueError("no metrics to chart")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    labels = [_label(r) for r in results]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        vals = [r.metrics.get(key, float("nan")) for r in results]
        ax.bar(range(len(vals)), vals, color=[colors[i % len(colors)] for i in range(len(vals))])
        ax.set_title(key + (" (lower is better)" if lower_is_better(key) else ""), fontsize=9)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels([str(i + 1) for i in range(len(vals))], fontsize=8)
        if lower_is_better(key) and all(v > 0 for v in vals if not math.isnan(v)) and \
                max(vals) / max(min(vals), 1e-9) > 20:
            ax.set_yscale("log")
        for i, v in enumerate(vals):
            if not math.isnan(v):
                ax.annotate(_fmt(v), (i, v), ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colors[i % len(colors)]) for i in range(len(labels))],
               [f"{i + 1}: {lab}" for i, lab in enumerate(labels)], loc="lower center",
               ncol=1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * len(labels) / max(rows, 1), 1, 1))
    try:
        return replace_atomic(Path(path).expanduser(), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
