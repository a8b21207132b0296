"""Plain-text lines about a run's activation thresholds, for :meth:`PruneReport.summary`."""

from __future__ import annotations

from .result import ActivationResult


def summary_lines(result: ActivationResult) -> list[str]:
    """Per tensor kind (``self_attn.q_proj/k_proj/v_proj``, ...): target, calibration and held-out sparsity;
    then the model-wide figures."""
    kinds: dict[str, list] = {}
    for s in result.specs:
        layer_prefix = s.name.rsplit(".", 2)[0] if s.name.count(".") >= 2 else ""
        kind = "/".join(m.split(".")[-1] for m in s.members)
        parent = s.name.split(".")[-2] if "." in s.name else ""
        kinds.setdefault(f"{parent}.{kind}" if parent and layer_prefix else kind, []).append(s)
    rows = [("activation tensor", "count", "target", "calibration", "held-out")]
    for kind, specs in kinds.items():
        def mean(xs):
            xs = [x for x in xs if x is not None]
            return f"{sum(xs) / len(xs):.4f}" if xs else "-"
        rows.append((kind, str(len(specs)), mean([s.target for s in specs]), mean([s.calibration for s in specs]),
                     mean([s.measured for s in specs])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", *("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)]
    lines.insert(2, "  ".join("-" * w for w in widths))
    cal = result.calibration_sparsity["weighted"]
    held = (result.holdout or {}).get("weighted")
    where = (f"{result.holdout['source']}, {result.holdout['tokens']} tokens" if result.holdout else "not measured")
    lines.append(f"activation sparsity {result.criterion} ({result.allocation}): target {result.target:.3f}, "
                 f"calibration {cal:.4f}, held-out {'-' if held is None else f'{held:.4f}'} ({where}); weighted "
                 f"by the weights each tensor feeds; {len(result.specs)} thresholds in {result.seconds:.1f}s")
    return lines
