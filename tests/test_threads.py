"""The thread policy: decisions on given inputs, overrides, and where it is applied and recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmprune.runtime import rebalance, threads
from llmprune.runtime.threads import KEEP, Observation, ThreadSettingError, decide, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_idle_machine_keeps_spinning_on_all_cores():
    p = decide(Observation(affinity=8, running=0.0, load1=0.2))
    assert (p.threads, p.wait_policy, p.contended, p.mode) == (8, "default", False, "auto")
    assert p.env == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}
    assert "idle" in p.reason


def test_one_other_runnable_task_makes_threads_sleep():
    p = decide(Observation(affinity=2, running=1.0))
    assert (p.threads, p.wait_policy, p.contended) == (1, "passive", True)  # one core left
    assert p.env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "KMP_BLOCKTIME" not in p.env  # libgomp
    assert decide(Observation(affinity=2, running=1.0), runtime="intel").env["KMP_BLOCKTIME"] == "0"


def test_registered_peer_counts_even_before_it_runs():
    """Two runs starting together: the registry shows the other before it loads the CPU, and the
    cores are split between them (an oversubscribed team waits at every barrier)."""
    p = decide(Observation(affinity=2, running=0.0, peers=1))
    assert p.contended and p.wait_policy == "passive" and p.threads == 1
    assert "1 other llmprune run" in p.reason
    assert decide(Observation(affinity=16, running=0.0, peers=1)).threads == 8
    assert decide(Observation(affinity=16, running=0.0, peers=3)).threads == 4
    assert decide(Observation(affinity=16, running=8.0, peers=1)).threads == 8  # the peer already runs its 8
    assert decide(Observation(affinity=2, running=0.0, peers=5)).threads == 1


def test_oversubscribed_machine_gets_fewer_threads():
    assert decide(Observation(affinity=2, running=2.0)).threads == 1
    assert decide(Observation(affinity=8, running=3.0)).threads == 5  # the cores left
    assert decide(Observation(affinity=8, running=10.0)).threads == 1
    assert decide(Observation(affinity=1, running=5.0)).threads == 1


def test_cgroup_quota_caps_the_threads():
    assert decide(Observation(affinity=16, quota=4.0, running=0.0)).threads == 4
    assert decide(Observation(affinity=16, quota=1.5, running=0.0)).threads == 2  # rounded up
    assert decide(Observation(affinity=16, quota=0.2, running=0.0)).threads == 1
    assert "cgroup quota 4 cores" in decide(Observation(affinity=16, quota=4.0, running=0.0)).reason


def test_ranks_share_the_cores_and_are_not_contention():
    p = decide(Observation(affinity=16, running=0.0, peers=3, local_ranks=4, local_rank=2))
    assert (p.threads, p.contended) == (4, False)  # the 3 peers are this job's other ranks
    assert decide(Observation(affinity=2, running=0.0, local_ranks=4)).threads == 1
    assert decide(Observation(affinity=16, running=0.0, peers=4, local_ranks=4)).contended  # one foreign run


def test_rebalancer_follows_runs_that_start_and_end(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "_changes", [])
    now, busy = [100.0], [0.0]
    seen: list[int] = []
    reb = rebalance.Rebalancer(Observation(affinity=4, running=0.0), threads=4, interval=1.0, directory=tmp_path,
                               set_threads=seen.append, clock=lambda: now[0], others=lambda: busy[0])
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / str(peer.pid)).write_text("llmprune eval\n")
        assert reb.check() is None  # not due yet: it looks at most once per interval
        now[0] += 1.0
        assert reb.check() == 2 and seen == [2]  # a new run: half the cores each, at once
        now[0] += 0.5
        reb(None, ())  # the forward pre-hook form; not due
        now[0] += 1.0
        assert reb.check() is None  # unchanged: nothing to set
    finally:
        peer.kill()
        peer.wait()
    now[0] += 1.0
    assert reb.check() is None  # the other run ended: one look is not enough to take the cores back
    now[0] += 1.0
    assert reb.check() == 4 and seen == [2, 4]  # two looks agree
    assert not (tmp_path / str(peer.pid)).exists()  # its stale file is dropped
    busy[0] = 3.0  # a passing command: seen once, ignored
    now[0] += 1.0
    assert reb.check() is None
    busy[0] = 0.0
    now[0] += 1.0
    assert reb.check() is None and reb.threads == 4
    busy[0] = 2.0  # a lasting one: two looks, then two cores left to us
    for _ in range(2):
        now[0] += 1.0
        got = reb.check()
    assert got == 2 and seen == [2, 4, 2]
    assert [c["threads"] for c in threads._changes] == [2, 4, 2]
    monkeypatch.setattr(threads, "_applied", decide(Observation(affinity=4, running=0.0)))
    assert threads.applied()["rebalanced"][0] == {"seconds": 1.0, "threads": 2, "peers": 1, "others_running": 0.0}


def test_others_running_subtracts_this_process_threads(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 5\nprocs_blocked 0\n")
    tasks = tmp_path / "task"
    for tid, state in ((10, "R"), (11, "R"), (12, "S")):
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} (py thon) {state} 1 2 3\n")
    assert rebalance.own_running_threads(tasks) == 2
    assert rebalance.others_running(stat, tasks) == 3.0
    assert rebalance.others_running(tmp_path / "missing", tasks) is None
    assert rebalance.own_running_threads() >= 1  # this thread, running now


def test_rebalancing_only_for_the_automatic_policy(monkeypatch):
    monkeypatch.setattr(rebalance, "_rebalancer", None)
    monkeypatch.setattr(threads, "_applied", decide(Observation(affinity=4, running=0.0), 2))
    monkeypatch.setattr(threads, "_observed", None)  # a fixed --threads N: nothing to follow
    assert rebalance.start_rebalancing() is None
    monkeypatch.setattr(threads, "_applied", decide(Observation(affinity=1, running=0.0)))
    monkeypatch.setattr(threads, "_observed", Observation(affinity=1, running=0.0))
    assert rebalance.start_rebalancing() is None  # one core: nothing to split


def test_rank_env():
    assert threads.rank_env({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (4, 3)
    assert threads.rank_env({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (2, 1)
    assert threads.rank_env({}) == (1, 0)
    assert threads.rank_env({"LOCAL_WORLD_SIZE": "x"}) == (1, 0)


def test_load_average_is_only_a_fallback():
    # /proc/stat readable and idle: a high (lagging) load average does not make the run passive
    assert not decide(Observation(affinity=2, running=0.0, load1=3.0)).contended
    p = decide(Observation(affinity=2, running=None, load1=3.0))
    assert p.contended and "load average" in p.reason
    assert not decide(Observation(affinity=2, running=None, load1=0.9)).contended


def test_overrides():
    assert parse_override(None, "x") is None and parse_override("auto", "x") is None
    assert parse_override(" Torch ", "x") == KEEP and parse_override("off", "x") == KEEP
    assert parse_override("3", "x") == 3 and parse_override(2, "x") == 2
    p = decide(Observation(affinity=8, running=1.0), 3)
    assert (p.mode, p.threads, p.wait_policy) == ("fixed", 3, "passive")
    keep = decide(Observation(affinity=8, running=5.0), KEEP)
    assert (keep.mode, keep.threads, keep.env) == ("torch", None, {})


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", 0])
def test_bad_override_names_value_and_fix(bad):
    with pytest.raises(ThreadSettingError, match=r"LLMPRUNE_THREADS=.*(positive integer)"):
        parse_override(bad, "LLMPRUNE_THREADS")


def test_user_omp_settings_are_kept():
    p = decide(Observation(affinity=4, running=1.0), user_env={"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "active"})
    assert p.env == {} and p.threads is None and p.wait_policy == "default"
    assert "set by the user, kept" in p.reason


def test_observation_inputs(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota(v1) == 2.0
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 4\nprocs_blocked 0\n")
    assert threads.runnable_tasks(samples=3, interval=0, stat=stat) == 3.0
    assert threads.runnable_tasks(stat=tmp_path / "missing") is None


def test_registry_counts_live_peers_and_drops_dead(tmp_path):
    reg = threads.register(tmp_path)
    assert reg is not None and reg.name == str(os.getpid())
    (tmp_path / str(os.getppid())).write_text("peer\n")  # alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / str(dead.pid)).write_text("gone\n")
    assert threads.live_peers(tmp_path) == 1
    assert not (tmp_path / str(dead.pid)).exists()


def test_api_import_changes_nothing():
    """Importing and using the library sets no thread variable; only the helper does."""
    code = ("import os, llmprune, llmprune.api; "
            "print(sorted(k for k in ('OMP_NUM_THREADS','OMP_WAIT_POLICY','MKL_NUM_THREADS') if k in os.environ)); "
            "print(llmprune.apply_thread_policy is llmprune.runtime.threads.apply_thread_policy)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                             threads.ENV)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_apply_sets_env_and_records(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "_applied", None)
    monkeypatch.setattr(threads, "observe", lambda: Observation(affinity=2, running=1.0))
    environ: dict[str, str] = {}
    p = threads.apply_thread_policy(environ=environ)
    assert environ == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.applied() == p.record()
    environ = {threads.ENV: "torch"}
    assert threads.apply_thread_policy(environ=environ).mode == "torch" and environ == {threads.ENV: "torch"}
    with pytest.raises(ThreadSettingError, match="LLMPRUNE_THREADS='many'"):
        threads.apply_thread_policy(environ={threads.ENV: "many"})
    assert threads.apply_thread_policy("1", environ={threads.ENV: "torch"}).threads == 1  # the flag wins

    from llmprune.evaluation.results import EvalResults
    from llmprune.report import PruneReport

    assert PruneReport(config={}, model="m", calibration={}).threads["threads"] == 1
    r = EvalResults(model="m")
    assert r.to_dict()["threads"]["mode"] == "fixed"
    assert EvalResults.from_dict({k: v for k, v in r.to_dict().items() if k != "threads"}).threads is None
    monkeypatch.setattr(threads, "_applied", None)
    assert PruneReport(config={}, model="m", calibration={}).threads is None


def _cli(args: list[str], extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                             threads.ENV)}
    env.update(extra_env)
    code = ("import os, sys; from llmprune.cli import main; rc = main(sys.argv[1:]); "
            "print('ENV', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS')); "
            "import torch; print('TORCH', torch.get_num_threads()); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def test_cli_applies_logs_and_rejects_bad_values(tmp_path):
    # an eval that fails at its preflight (unknown task) still went through the policy first
    res = _cli(["eval", "--tasks", "no_such_task", "--threads", "1"], {})
    assert "INFO llmprune.threads: threads: 1 (" in res.stderr
    assert "ENV" in res.stdout and " 1\n" in res.stdout.split("ENV", 1)[1]
    assert "TORCH 1" in res.stdout
    res = _cli(["eval", "--tasks", "piqa", "--threads", "zero"], {})
    assert res.returncode == 2 and "--threads='zero' is not a thread setting" in res.stderr
    res = _cli(["eval", "--tasks", "no_such_task"], {threads.ENV: "torch"})
    assert "ENV None None" in res.stdout and "torch's own defaults kept" in res.stderr


def test_bench_script_commands_and_table(tmp_path):
    sys.path.insert(0, str(REPO / "eval"))
    try:
        import bench_threads as bench
    finally:
        sys.path.remove(str(REPO / "eval"))
    ev = bench.commands("eval", "/data", quick=False, out=tmp_path)
    assert ev[ev.index("--limit") + 1] == "20" and ev[ev.index("--batch-size") + 1] == "1"
    pr = bench.commands("prune", "/data", quick=False, out=tmp_path)
    assert [pr[pr.index(f) + 1] for f in ("--method", "--sparsity", "--nsamples", "--seqlen")] == [
        "sparsegpt", "0.5", "32", "512"]
    rows = [{"kind": "eval", "policy": "policy", "threads": "auto", "lone": [30.0, 32.0, 31.0], "lone_median": 31.0,
             "pair": [33.0, 34.1], "ratio": [33.0 / 31, 34.1 / 31], "lone_cpu_median": 40.0, "pair_cpu": [20.0, 21.0],
             "floor": 40.0 / 31},
            {"kind": "eval", "policy": "torch defaults", "threads": "torch", "lone": [31.0], "lone_median": 31.0,
             "pair": [68.0, 70.0], "ratio": [68 / 31, 70 / 31]}]
    md = bench.markdown({"rows": rows, "before": {}, "after": {}, "machine": "m", "runtime": "r", "date": "d",
                         "command": "python eval/bench_threads.py", "quick": False, "repeats": 3})
    assert "| eval | policy | 31.0 | 30.0, 32.0, 31.0 | 40.0 | 33.0, 34.1 | 20.0, 21.0 | 1.10x | 1.29x | <= 1.3x met |" in md
    assert "| eval | torch defaults | 31.0 | 31.0 | - | 68.0, 70.0 | - | 2.26x | - |  |" in md
    assert "lone eval: policy 31.0 s vs torch defaults 31.0 s (1.00x)" in md


NEIGHBOUR = """
import json, os, subprocess, sys
import llmprune.engine.residency.resume as resume
from llmprune.cli import main
from llmprune.runtime import rebalance

busy = []
done = resume.Progress.layer_done

def layer_done(self, run, plan, i, *args):
    done(self, run, plan, i, *args)
    if i == 0 and sys.argv[1] == "busy":  # two CPU-bound neighbours start once the first layer is pruned
        busy.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2))

resume.Progress.layer_done = layer_done
try:
    rc = main(sys.argv[2:])
finally:
    for p in busy:
        p.kill()
meta = json.load(open(os.path.join(sys.argv[sys.argv.index("--output") + 1], "config.json")))["llmprune"]
print("RESULT", json.dumps({"rc": rc, "masks": meta["masks_sha256"], "threads": meta.get("threads"),
                            "rebalancer": rebalance._rebalancer is not None}))
"""


def test_a_prune_keeps_its_thread_count_whatever_starts_beside_it(tmp_path):
    """A neighbour that starts mid-run changes nothing: the prune keeps the thread count it started with
    (no rebalancing), records it, and a run alone at that count gives the same masks."""
    import json

    from test_stream import _save_tiny

    src = _save_tiny("llama", tmp_path / "src", num_hidden_layers=6)
    (src / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", threads.ENV)}
    env["PYTHONPATH"] = str(REPO)

    def run(mode: str, out: str, *extra: str) -> dict:
        args = ["prune", str(src), "--method", "sparsegpt", "--calib", str(src / "calib.txt"), "--nsamples", "8",
                "--seqlen", "64", "--device", "cpu", "--output", str(tmp_path / out), "-q", *extra]
        res = subprocess.run([sys.executable, "-c", NEIGHBOUR, mode, *args], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.split("RESULT", 1)[1])

    busy = run("busy", "busy")
    assert not busy["rebalancer"] and "rebalanced" not in (busy["threads"] or {})
    alone = run("alone", "alone", "--threads", str(busy["threads"]["threads"]))
    assert alone["masks"] == busy["masks"]
