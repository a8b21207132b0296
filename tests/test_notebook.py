"""The quickstart notebook runs top to bottom (quick settings) on the embedded model."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(shared_data_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LLMPRUNE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    nb = nbformat.read(NOTEBOOK, as_version=4)  # executed in memory; the committed file is untouched
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "quick settings" in outputs
    for method in ("magnitude", "wanda", "sparsegpt"):
        assert f"{method:10s} 50%: measured sparsity 0.500" in outputs
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "error"]


RECOVERY = NOTEBOOK.parent / "sparse_recovery.ipynb"


def test_sparse_recovery_notebook_runs(shared_data_dir, monkeypatch):
    """Prune, fine-tune with the masks kept through a Trainer, evaluate: quick settings, top to bottom."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LLMPRUNE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    nb = nbformat.read(RECOVERY, as_version=4)  # executed in memory; the committed file is untouched
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(RECOVERY.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "quick settings" in outputs
    assert "measured sparsity 0.599" in outputs  # 60 % of each 576-wide row, rounded down: 345/576
    found = re.search(r"sparsity of the pruned weights: before (\S+), after (\S+) \(mask (\S+)\)", outputs)
    assert found and found.group(1) == found.group(2) == found.group(3), outputs[-500:]
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+", outputs)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "error"]
