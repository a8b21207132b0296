"""eval/bench_scale.py: every method's flags are valid settings, the table's ratios and reused rows; with
--runslow, its smoke mode end to end on three cheap methods (about a minute: the model is built first)."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from llmprune.cli.parser import build_parser, config_from_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
try:
    import bench_scale as bench
finally:
    sys.path.remove(str(REPO / "eval"))


@pytest.mark.parametrize("name", list(bench.METHODS))
def test_every_method_is_a_valid_config(name):
    base, flags, layers = bench.METHODS[name]
    assert base in bench.METHODS and layers >= 1
    ns = build_parser().parse_args(["prune", "/m", *flags, "--output", "/o", "--nsamples", "16", "--seqlen", "1024"])
    config_from_args(ns)  # raises on a flag or value the library no longer takes


def _row(method: str, layer_s: float | None, wall: float, rss: float, **kw) -> dict:
    row = {"width": "8b", "method": method, "rc": 0, "timed_out": False, "wall_s": wall, "peak_rss_gb": rss,
           "nsamples": 16, "seqlen": 1024, "extra": [], "timeout_s": 600.0, "date": "d", "others_cpu_share": 0.0,
           "seconds": {"calibration": 10.0}, "layer_s": layer_s, "model": {"layer_weights_gb": 0.87}}
    return {**row, **kw}


def test_table_ratios_projection_and_timeouts():
    rows = [_row("sparsegpt", 100.0, 120.0, 8.0), _row("sparsegpt-2:4", 200.0, 220.0, 8.0),
            _row("wanda", 50.0, 70.0, 6.0), _row("ria-2:4", None, 600.0, 9.0, rc=-9, timed_out=True),
            _row("alps", None, 30.0, 4.0, rc=1, error="Traceback\nValueError: boom", others_cpu_share=0.5)]
    md = bench.markdown({"commands": ["python eval/bench_scale.py"], "machine": "m", "versions": {},
                         "rows": {f"8b/{r['method']}": r for r in rows}})
    assert "| wanda | 50.0 | 0.50 | 70.0 | 6.00 | 0.75 | 0.45 h |" in md  # 10 s + 32 x 50 s
    assert "| sparsegpt-2:4 | 200.0 | 1.00 | 220.0 | 8.00 | 1.00 | 1.78 h |" in md
    assert "| ria-2:4 | not finished after 600 s | > 2.7 (whole run) |" in md  # against SparseGPT 2:4's 220 s
    assert "| alps ⁽ˡ⁾ | failed | - | 30.0 | 4.00 | - | - | exit 1: ValueError: boom |" in md


def test_reuse_of_rows():
    args = Namespace(rerun=False, nsamples=16, seqlen=1024, extra=[])
    assert bench.reusable(_row("wanda", 1.0, 2.0, 1.0), args, 600.0)
    assert not bench.reusable(_row("wanda", 1.0, 2.0, 1.0, nsamples=8), args, 600.0)
    assert not bench.reusable(_row("wanda", 1.0, 2.0, 1.0, rc=1), args, 600.0)
    timed_out = _row("alps", None, 600.0, 1.0, timed_out=True, rc=-9)
    assert bench.reusable(timed_out, args, 600.0) and not bench.reusable(timed_out, args, 1200.0)
    assert not bench.reusable(_row("wanda", 1.0, 2.0, 1.0), Namespace(**{**vars(args), "rerun": True}), 600.0)


def test_layer_seconds_counts_the_stages_that_grow_with_layers():
    report = {"seconds": {"load": 5.0, "calibration": 3.0, "observe": 2.0, "prune": 10.0, "save": 4.0},
              "activation": {"seconds": 6.0}}
    assert bench.layer_seconds(report, 2) == pytest.approx(9.0)


@pytest.mark.slow
def test_smoke_run(tmp_path, shared_data_dir):
    out = tmp_path / "scale"
    subprocess.run([sys.executable, str(REPO / "eval" / "bench_scale.py"), "--smoke", "--data-dir", str(shared_data_dir),
                    "--methods", "magnitude", "sparsegpt", "ria-2:4-nopermute", "--work", str(tmp_path / "work"),
                    "--out", str(out)], check=True, capture_output=True, text=True)
    state = json.loads(out.with_suffix(".json").read_text())
    assert {r["method"] for r in state["rows"].values()} == {"magnitude", "sparsegpt", "ria-2:4-nopermute"}
    assert all(r["rc"] == 0 and r["layer_s"] > 0 and r["peak_rss_gb"] > 0.1 for r in state["rows"].values())
    assert "| sparsegpt" in out.with_suffix(".md").read_text()
