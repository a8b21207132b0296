"""Several processes (torch.distributed, gloo): calibration windows sharded, statistics all-reduced; the
masks equal a one-process run's on the same windows, and every rank holds the same pruned model. Also with
routed experts (some reached by one rank's tokens only, one by none), streamed from the shards, and resumed."""

from __future__ import annotations

from pathlib import Path

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
    # rank 0 ends in one line either way: its next collective finds the peer gone, or torchrun's agent, which
    # saw rank 1 die, sends it SIGTERM first (a race of milliseconds: both happen on a loaded machine)
    assert ("llmprune: error: rank 0 lost the other processes while" in res.stderr
            or "llmprune: terminated; nothing was written" in res.stderr), res.stderr[-3000:]
    assert not out.exists() and len(leftovers(out)) == 1  # rank 1's offload: a SIGKILL runs no clean-up
    from llmprune.engine.residency.resume import check_partial

    check_partial(out, resume=False, overwrite=True)  # what the next run with --overwrite does first
    assert leftovers(out) == []


# ---- one launch of two processes for the tests below (each launch imports torch and transformers twice) ----
MARK = 2  # a token id the random windows never hold (they draw from 3..127)
MOE_SETTINGS = {
    "wanda": dict(method="wanda"),  # one chunk per rank: the experts pruned in the hooks
    "sparsegpt-owl-chunks": dict(method="sparsegpt", allocation="owl", owl_lambda=0.1, batch_size=1),  # lockstep
    "sparsegpt-dense-layer": dict(method="sparsegpt", sequential="dense-layer", batch_size=2),
}


class _Interrupted(Exception):
    pass


def _route(module, args, output):
    """The router's choice replaced by one read from the token: a marked token (its hidden state's feature 0
    dominates, 8 after the norm against at most 2.5 for the others) goes to experts 3 and 0, every other token
    to 0 and 1; expert 2 gets none. Only rank 1's windows hold marked tokens."""
    logits, _, _ = output
    x = args[0].reshape(-1, module.hidden_dim)  # [T, H]
    index = torch.tensor([[0, 1]]).repeat(x.shape[0], 1)  # [T, k]
    index[x[:, 0] > 4] = torch.tensor([3, 0])
    return logits, torch.full(index.shape, 0.5), index


def _moe_ids() -> torch.Tensor:
    ids = _ids()  # [6, 16]
    ids[3:, ::4] = MARK  # in windows 3..5 only: rank 1's share of two
    return ids


def _prune_moe(settings: dict) -> tuple[dict[str, torch.Tensor], dict]:
    model = make_tiny_model("mixtral")
    with torch.no_grad():
        model.model.embed_tokens.weight[MARK, 0] = 1000.0
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(_route)
    report = llmprune.prune(model, None, calibration=_moe_ids(), nsamples=6, seqlen=16, device="cpu",
                            progress=False, **settings)
    modules = {m.name: (m.tokens, m.fallback) for layer in report.layers for m in layer.modules}
    return {k: v.clone() for k, v in model.state_dict().items()}, modules


def _ckpt_config(src: Path, **kw):
    from llmprune import PruneConfig

    return PruneConfig.build({**dict(model=str(src), method="sparsegpt", sparsity=0.5, calib=str(src / "calib.txt"),
                                     nsamples=4, seqlen=16, device="cpu"), **kw})


def _interrupted(src: Path, out: Path, after: int, **kw) -> None:
    """A run stopped by an error on every rank once layer ``after``'s progress is saved."""
    import llmprune.engine.residency.resume as resume
    from llmprune import prune_checkpoint

    done = resume.Progress.layer_done

    def layer_done(self, run, plan, i, *args):
        done(self, run, plan, i, *args)
        if i == after:
            raise _Interrupted

    resume.Progress.layer_done = layer_done
    try:
        prune_checkpoint(_ckpt_config(src, **kw), out, progress=False)
    except _Interrupted:
        pass
    finally:
        resume.Progress.layer_done = done


def _two_ranks_worker(rank: int, world: int, rdzv: str, src: str, work: str) -> None:
    import torch.distributed as dist

    from llmprune import prune_checkpoint
    from llmprune.stats import InputStats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    src, work = Path(src), Path(work)
    try:
        # routed experts
        torch.save({name: _prune_moe(settings) for name, settings in MOE_SETTINGS.items()}, work / f"moe.{rank}")
        # ranks summing the statistics of different modules (separate-module experts reached in another order)
        stats = InputStats("sq")
        stats.add(torch.ones(3, 4))
        try:
            Collective(rank, world).reduce_stats(f"experts.{rank}.w1", stats, 4, torch.device("cpu"))
        except DistributedError as e:
            (work / f"mismatch.{rank}").write_text(str(e))
        # streamed, and resumed
        prune_checkpoint(_ckpt_config(src, low_memory=True, method="wanda"), work / "wanda", progress=False)
        prune_checkpoint(_ckpt_config(src, low_memory=True), work / "stream", progress=False)
        _interrupted(src, work / "resumed", 1, low_memory=True)  # streamed, stopped after layer 1 ...
        prune_checkpoint(_ckpt_config(src, low_memory=False), work / "resumed", progress=False, resume=True)
        _interrupted(src, work / "left", 0, low_memory=False)  # ... resumed in memory; progress left here
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, Path]:
    """``(src, work)``: a tiny checkpoint, and what :func:`_two_ranks_worker` wrote in ``work``."""
    from test_stream import _save_tiny

    work = tmp_path_factory.mktemp("two_ranks")
    src = _save_tiny("llama", work / "src", num_hidden_layers=4)
    (src / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    mp.spawn(_two_ranks_worker, args=(2, str(work / "rdzv"), str(src), str(work)), nprocs=2, join=True)
    return src, work


def _assert_same_model(ranks: list[dict], one: dict, atol: float = 1e-5) -> None:
    """Every rank holds the same model; it has the one-process run's masks (equal) and weights (allclose: up to
    the summation order of the statistics); what is not pruned is equal."""
    for k, v in one.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        if ".layers." in k and v.dim() >= 2:
            assert torch.equal(v == 0, ranks[0][k] == 0), f"{k}: masks differ"
            torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=atol)
        else:
            assert torch.equal(ranks[0][k], v), k


def test_routed_experts_two_processes_prune_as_one(two_ranks):
    """Expert 3 reached by rank 1's tokens only is pruned with them on both ranks; expert 2, reached by none, by
    magnitude on both, as in one process; in the hooks, in lockstep chunks and dense-layer order alike."""
    _, work = two_ranks
    ranks = [torch.load(work / f"moe.{r}") for r in range(2)]
    for name, settings in MOE_SETTINGS.items():
        one, modules = _prune_moe(settings)
        # SparseGPT's updates amplify the summation order of H through its inverse: 2.2e-5 at most measured on
        # weights of about 0.02 (wanda: equal bit for bit); the masks are equal
        _assert_same_model([ranks[0][name][0], ranks[1][name][0]], one, atol=1e-4)
        assert ranks[0][name][1] == ranks[1][name][1] == modules, name  # token counts summed, same fallbacks
        for i in range(2):
            experts = f"model.layers.{i}.mlp.experts"
            assert modules[f"{experts}.gate_up_proj[3]"] == (12, None)  # the marked tokens, all of rank 1
            assert modules[f"{experts}.down_proj[2]"][1].startswith("magnitude: no calibration tokens")


def test_ranks_summing_different_modules_stop_with_the_fix(two_ranks):
    """Separate-module experts called in a token-dependent order would pair the ranks' sums wrongly: the header
    of every sum names its module, and the ranks stop at the first that differs."""
    _, work = two_ranks
    for r in range(2):
        assert "--sequential dense-layer" in (work / f"mismatch.{r}").read_text()


def test_streaming_and_resume_over_two_processes(two_ranks, tmp_path):
    """Two ranks stream the layers from the shards (rank 0 writes): the one-process streamed checkpoint up to
    the summation order (Wanda: equal; SparseGPT: the masks agree but for near-ties). Stopped after layer 1 and
    resumed (in memory): the uninterrupted two-process checkpoint, bit for bit. Progress of two processes is
    refused to one, with the fix."""
    import json

    from test_stream import _tensors

    from llmprune import prune_checkpoint
    from llmprune.engine.residency.resume import PROGRESS_FILE, ResumeError, leftovers, partial_folder

    src, work = two_ranks
    prune_checkpoint(_ckpt_config(src, low_memory=True, method="wanda"), tmp_path / "one-wanda", progress=False)
    prune_checkpoint(_ckpt_config(src, low_memory=True), tmp_path / "one", progress=False)
    one, stream, resumed = _tensors(tmp_path / "one"), _tensors(work / "stream"), _tensors(work / "resumed")
    wanda, one_wanda = _tensors(work / "wanda"), _tensors(tmp_path / "one-wanda")
    assert sorted(wanda) == sorted(one_wanda) and all(torch.equal(wanda[k], one_wanda[k]) for k in wanda)
    # SparseGPT on a repeated phrase: Hessians so degenerate that the summation order flips near-ties (2 to 4 of
    # 8,192 entries in a few modules, measured; the same in memory, where two processes ran before streaming)
    assert sorted(stream) == sorted(one)
    for k, v in one.items():
        agree = ((v == 0) == (stream[k] == 0)).float().mean().item()
        assert agree >= 0.999, (k, agree)
        if ".layers." not in k:
            assert torch.equal(stream[k], v), k
    assert sorted(resumed) == sorted(stream) and all(torch.equal(resumed[k], stream[k]) for k in stream)
    for name in ("wanda", "stream", "resumed"):
        assert not partial_folder(work / name).exists() and leftovers(work / name) == []
    left = partial_folder(work / "left")
    saved = json.loads((left / PROGRESS_FILE).read_text())
    assert saved["processes"] == 2 and saved["layers_done"] == 1
    assert sorted(p.name for p in left.glob("hidden-*")) == [f"hidden-000000-rank00{r}.safetensors" for r in (0, 1)]
    with pytest.raises(ResumeError, match="in 2 process.*--nproc-per-node 2"):
        prune_checkpoint(_ckpt_config(src, low_memory=False), work / "left", progress=False, resume=True)
