"""Several processes (torch.distributed, gloo): calibration windows sharded, statistics all-reduced; the
masks equal a one-process run's on the same windows, and every rank holds the same pruned model."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_tiny_model

import llmprune
from llmprune.engine.residency.distributed import Collective, DistributedError

SETTINGS = {
    "sparsegpt-owl": dict(method="sparsegpt", sparsity=0.6, allocation="owl", owl_lambda=0.1),
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
}


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(1))  # [n, L]


def _prune(settings: dict) -> dict[str, torch.Tensor]:
    model = make_tiny_model("llama", num_hidden_layers=3)
    report = llmprune.prune(model, None, calibration=_ids(), nsamples=6, seqlen=16, device="cpu",
                            progress=False, **settings)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["__communication__"] = torch.tensor(report.seconds.get("communication", -1.0))
    return state


def _worker(rank: int, world: int, rdzv: str, out: str, settings: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        torch.save(_prune(settings), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_two_processes_prune_as_one(name, tmp_path):
    settings = SETTINGS[name]
    mp.spawn(_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path / "state"), settings), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"state.{r}") for r in range(2)]
    one = _prune(settings)
    assert float(one.pop("__communication__")) == -1.0  # one process: no collectives
    assert all(float(r.pop("__communication__")) >= 0 for r in ranks)
    for k, v in one.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank holds the same model
        if ".layers." in k and v.dim() == 2:
            assert torch.equal(v == 0, ranks[0][k] == 0), f"{k}: masks differ"  # identical masks
            torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)  # up to summation order
        else:
            assert torch.equal(ranks[0][k], v), k


def test_shards_are_contiguous_blocks_and_too_few_windows_are_refused():
    ids = torch.arange(10).view(5, 2)
    parts = [Collective(r, 2).shard(ids) for r in range(2)]
    assert torch.equal(torch.cat(parts), ids) and [p.shape[0] for p in parts] == [3, 2]
    assert torch.equal(Collective(1, 2).shard(torch.zeros(1, 1, dtype=torch.long)), torch.zeros(1, 1))
    with pytest.raises(DistributedError, match="--nsamples 3"):
        Collective(0, 3).shard(ids[:2])


KILL_RANK_1 = """
import os, signal, sys
import llmprune.engine.residency.offload as offload

real = offload.DiskOffloader.release

def release(self, index, layer):
    real(self, index, layer)
    if index == 0 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # one rank dies after the first layer

offload.DiskOffloader.release = release
from llmprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_rank_ends_the_run_and_leaves_nothing(tmp_path):
    """Under torchrun, SIGKILL of one rank mid-run: the run ends (no hang), the other rank says so in one line,
    nothing is written, and the only scratch folder left is the killed rank's, which --overwrite removes."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from test_stream import _save_tiny

    from llmprune.engine.residency.resume import leftovers

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    src = _save_tiny("llama", tmp_path / "src", num_hidden_layers=4)
    (src / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script), "prune", str(src),
                          "--method", "sparsegpt", "--calib", str(src / "calib.txt"), "--nsamples", "4", "--seqlen",
                          "16", "--device", "cpu", "--output", str(out), "-q"], env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode != 0, res.stderr[-2000:]
    assert "llmprune: error: rank 0 lost the other processes while" in res.stderr, res.stderr[-3000:]
    assert not out.exists() and len(leftovers(out)) == 1  # rank 1's offload: a SIGKILL runs no clean-up
    from llmprune.engine.residency.resume import check_partial

    check_partial(out, resume=False, overwrite=True)  # what the next run with --overwrite does first
    assert leftovers(out) == []
