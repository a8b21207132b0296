"""Thread policy: how many intra-op threads torch uses and whether its OpenMP threads spin.

Why. torch's CPU build uses OpenMP (GNU libgomp for the pip wheels; Intel's libiomp5 in some
builds). Idle OpenMP workers spin for a while before sleeping. On an idle machine that is the
fastest choice (a lone SparseGPT prune of the embedded model: 38 s spinning, 44 s with
``OMP_WAIT_POLICY=PASSIVE``); on a shared machine the spinning workers of two runs steal the cores
from each other (two ``llmprune eval`` side by side: 2.1x to 2.9x the lone time spinning, 1.03x
passive). No fixed setting keeps both fast, so the policy is decided per run, from what the run
sees when it starts. The wait policy is read by the OpenMP runtime once, when torch loads, so the
CLI decides before torch is imported.

Inputs (gathered by :func:`observe`, decided by the pure :func:`decide`):

- cores available to the process: ``os.sched_getaffinity``, capped by the cgroup CPU quota
  (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded up;
- ranks on this node under ``torchrun`` / ``accelerate launch`` (``LOCAL_WORLD_SIZE``, else
  ``WORLD_SIZE`` when there is one node): each rank gets ``cores // ranks`` threads, at least 1;
- other demand for the CPU, now: runnable tasks (``procs_running`` of ``/proc/stat``, minus this
  process, the median of a few samples over ~50 ms so a passing shell command does not count). The
  1-minute load average lags both ways (it stays high for a minute after a job ends, which would
  make a lone run passive and slow), so it is only a fallback when ``/proc/stat`` cannot be read;
- other llmprune runs of this user: a registry of pid files in a runtime directory
  (``$XDG_RUNTIME_DIR/llmprune`` or ``<tmp>/llmprune-<uid>``). Each run registers *before* it
  looks, so of two runs starting at the same moment at least the second to look sees the first
  (usually both see each other), even before either has started computing. Dead pids are ignored
  and removed.

Decision. ``contended`` = another llmprune run is registered, or at least one other task is
runnable on the run's cores. Idle: the runtime's own spinning defaults are kept (no slower than
today). Contended: ``OMP_WAIT_POLICY=PASSIVE`` (libgomp: no spinning; libiomp5 also gets
``KMP_BLOCKTIME=0``), and never more threads than cores left (:func:`share_threads`): the share is
split evenly between the llmprune runs, and each other runnable task takes one core. An
oversubscribed OpenMP team is the slowest case of all: every parallel region ends at a barrier that
waits for whichever worker the scheduler has parked.

While a CLI evaluation goes on, other runs and other busy tasks may start or end:
:func:`llmprune.runtime.rebalance.start_rebalancing` moves its thread count to the new share (the
changes are kept in the record :func:`applied` returns). A prune keeps the count it started with: the
summation order of its statistics, and so its masks, follow the thread count. The wait policy cannot
change after torch loads; one thread per run needs no waiting policy at all.

Overrides, strongest first: ``--threads`` (CLI), ``LLMPRUNE_THREADS``; each takes ``auto``
(the policy), ``torch`` (change nothing: torch's own defaults, for comparison) or a positive
integer (that many threads; the wait policy still follows contention). ``OMP_NUM_THREADS`` or
``OMP_WAIT_POLICY`` set by the user are respected and never overwritten.

The Python API changes no process-wide setting by itself: call :func:`apply_thread_policy`
(``llmprune.apply_thread_policy()``) before importing torch to get the same behaviour as the CLI.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("llmprune.threads")

ENV = "LLMPRUNE_THREADS"
KEEP = "torch"  # override value: leave torch's defaults alone
AUTO = "auto"

WaitPolicy = Literal["default", "passive"]


class ThreadSettingError(ValueError):
    """A ``--threads`` / ``LLMPRUNE_THREADS`` value that is not auto, torch or a positive integer."""


@dataclass(frozen=True)
class Observation:
    """What the process sees of the machine when it starts."""

    affinity: int  # CPUs in the process's affinity mask
    quota: float | None = None  # cgroup CPU quota in cores; None: unlimited
    running: float | None = None  # other runnable tasks now (procs_running minus this process)
    load1: float | None = None  # 1-minute load average
    peers: int = 0  # other live llmprune runs registered by this user
    local_ranks: int = 1  # processes of this job on this node (torchrun / accelerate)
    local_rank: int = 0


@dataclass(frozen=True)
class ThreadPolicy:
    """The decision: threads, OpenMP wait policy and the environment that carries them, with why."""

    mode: Literal["auto", "fixed", "torch"]
    threads: int | None  # None: torch's default
    wait_policy: WaitPolicy  # "default": the runtime's own (spin, then sleep)
    contended: bool
    reason: str
    env: dict[str, str] = field(default_factory=dict)  # variables to set before torch loads

    def record(self) -> dict[str, Any]:
        """What reports and evaluation results store."""
        return asdict(self)


def parse_override(value: str | int | None, source: str) -> str | int | None:
    """``None`` / ``auto`` -> None (the policy), ``torch`` -> ``"torch"``, digits -> a positive int."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        text = str(value).strip().lower()
        if text in ("", AUTO):
            return None
        if text in (KEEP, "off", "default"):
            return KEEP
        try:
            n = int(text)
        except ValueError:
            raise ThreadSettingError(f"{source}={value!r} is not a thread setting; use 'auto' (the policy), "
                                     f"'torch' (torch's own defaults) or a positive integer such as 2") from None
    if n < 1:
        raise ThreadSettingError(f"{source}={value!r}: the number of threads must be at least 1; use a positive "
                                 "integer, 'auto' or 'torch'")
    return n


def core_share(obs: Observation) -> int:
    """The cores this process may use: affinity, capped by the cgroup quota, split between the job's ranks."""
    cores = obs.affinity
    if obs.quota is not None:
        cores = max(1, min(cores, int(-(-obs.quota // 1))))  # a 1.5-core quota still runs 2 threads part time
    return max(1, cores // max(1, obs.local_ranks))


def share_threads(share: int, peers: int, others: float) -> int:
    """Threads for one run given its ``share`` of cores, ``peers`` other llmprune runs (each will use
    its own share: the cores are split between them) and ``others`` other runnable tasks (one core
    each). Never more threads than cores left: an oversubscribed OpenMP team waits at every barrier
    for a worker the scheduler has parked (measured, 2 cores: two evals with 2 threads each took
    4.1x the lone time, with 1 thread each 1.7x, the floor set by their CPU time)."""
    threads = share
    if peers > 0:
        threads = min(threads, max(1, share // (1 + peers)))
    if others >= 1:
        threads = min(threads, max(1, share - math.ceil(others)))
    return threads


def decide(obs: Observation, override: str | int | None = None, runtime: str = "gnu",
           user_env: dict[str, str] | None = None) -> ThreadPolicy:
    """The policy for ``obs`` (pure: no I/O). ``override`` is parsed by :func:`parse_override`;
    ``runtime`` is the OpenMP runtime (``gnu`` or ``intel``); ``user_env`` holds OMP settings the
    user already set, which are kept."""
    user_env = user_env or {}
    if override == KEEP:
        return ThreadPolicy("torch", None, "default", False, "override: torch's own defaults kept")
    share = core_share(obs)
    others = obs.running if obs.running is not None else (
        max(0.0, obs.load1 - 1) if obs.load1 is not None else 0.0)
    # ranks of this job are registered too: they are accounted by the share, not as contention
    peers = max(0, obs.peers - (obs.local_ranks - 1))
    contended = peers > 0 or others >= 1
    parts = [f"{obs.affinity} CPUs in affinity"]
    if obs.quota is not None:
        parts.append(f"cgroup quota {obs.quota:g} cores")
    if obs.local_ranks > 1:
        parts.append(f"{obs.local_ranks} ranks on this node")
    parts.append(f"{others:g} other runnable" + (" (load average)" if obs.running is None else ""))
    parts.append(f"{peers} other llmprune run{'s' if peers != 1 else ''}")
    if isinstance(override, int):
        mode, threads = "fixed", override
        parts.append(f"override {override} threads")
    else:
        mode = "auto"
        threads = share_threads(share, peers, others)
    wait: WaitPolicy = "passive" if contended else "default"
    env: dict[str, str] = {}
    if "OMP_NUM_THREADS" in user_env:
        parts.append(f"OMP_NUM_THREADS={user_env['OMP_NUM_THREADS']} set by the user, kept")
        threads = None if mode == "auto" else threads
    elif threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if "OMP_WAIT_POLICY" in user_env:
        parts.append(f"OMP_WAIT_POLICY={user_env['OMP_WAIT_POLICY']} set by the user, kept")
        wait = "passive" if user_env["OMP_WAIT_POLICY"].strip().upper() == "PASSIVE" else "default"
    elif wait == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        if runtime == "intel":
            env["KMP_BLOCKTIME"] = "0"
    verdict = "contended: threads sleep when idle" if contended else "idle: threads spin (runtime default)"
    return ThreadPolicy(mode, threads, wait, contended, f"{verdict}; " + ", ".join(parts), env)


# ---- observation ---------------------------------------------------------------------------------

def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPU quota of this process's cgroup in cores, or None when unlimited or unreadable."""
    try:  # v2
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for base in (root / "cpu", root / "cpu,cpuacct"):  # v1
        try:
            quota_us = int((base / "cpu.cfs_quota_us").read_text())
            period_us = int((base / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
        except (OSError, ValueError):
            continue
    return None


def runnable_tasks(samples: int = 5, interval: float = 0.01, stat: Path = Path("/proc/stat")) -> float | None:
    """Other runnable tasks now: median of ``procs_running - 1`` over a few samples, or None."""
    values = []
    for i in range(samples):
        try:
            for line in stat.read_text().splitlines():
                if line.startswith("procs_running "):
                    values.append(max(0, int(line.split()[1]) - 1))
                    break
        except (OSError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return float(statistics.median(values)) if values else None


def runtime_dir() -> Path:
    """Where running llmprune processes register (one pid file each)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "llmprune"
    return Path(tempfile.gettempdir()) / f"llmprune-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register(directory: Path | None = None) -> Path | None:
    """Register this process (removed at exit); None when the directory cannot be written."""
    directory = directory or runtime_dir()
    path = directory / str(os.getpid())
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(" ".join(sys.argv[:2]) + "\n")
    except OSError as e:
        log.debug("cannot register in %s: %s", directory, e)
        return None
    atexit.register(lambda: path.unlink(missing_ok=True))
    return path


def live_peers(directory: Path | None = None) -> int:
    """Other registered llmprune processes still alive; stale files are removed."""
    directory = directory or runtime_dir()
    count = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _alive(int(entry.name)):
            count += 1
        else:
            entry.unlink(missing_ok=True)
    return count


def rank_env(environ: dict[str, str] | os._Environ) -> tuple[int, int]:
    """(ranks on this node, local rank) from torchrun / accelerate variables; (1, 0) outside them."""
    def num(key: str, default: int) -> int:
        try:
            return max(0, int(environ.get(key, default)))
        except ValueError:
            return default

    local = environ.get("LOCAL_WORLD_SIZE")
    ranks = num("LOCAL_WORLD_SIZE", 1) if local else num("WORLD_SIZE", 1)  # one node when only WORLD_SIZE
    return max(1, ranks), num("LOCAL_RANK", 0)


def observe(register_dir: Path | None = None, do_register: bool = True) -> Observation:
    """Look at the machine: cores, quota, runnable tasks, load, peers (after registering this run)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if do_register:
        register(register_dir)
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    ranks, rank = rank_env(os.environ)
    return Observation(affinity=affinity, quota=cgroup_quota(), running=runnable_tasks(), load1=load1,
                       peers=live_peers(register_dir), local_ranks=ranks, local_rank=rank)


def openmp_runtime() -> str:
    """``intel`` when torch ships libiomp5, else ``gnu``; found without importing torch."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(loc) / "lib"
        if lib.is_dir() and any(p.name.startswith("libiomp5") for p in lib.iterdir()):
            return "intel"
    return "gnu"


# ---- applying -------------------------------------------------------------------------------------

_applied: ThreadPolicy | None = None
_observed: Observation | None = None  # what the applied auto policy was decided on
_changes: list[dict[str, Any]] = []  # rebalancing: threads changed while running


def applied() -> dict[str, Any] | None:
    """The policy applied in this process (for reports), or None when none was."""
    if _applied is None:
        return None
    record = _applied.record()
    if _changes:
        record["rebalanced"] = list(_changes)
    return record


def record_change(change: dict[str, Any]) -> None:
    """Note a change of the thread count made while running (by :mod:`llmprune.runtime.rebalance`);
    :func:`applied` reports them under ``rebalanced``."""
    _changes.append(change)


def auto_policy() -> tuple[ThreadPolicy, Observation] | None:
    """The applied automatic policy and the observation it was decided on; None when no policy was
    applied, or it was fixed (``--threads N``), torch's own, or left the count to ``OMP_NUM_THREADS``."""
    if _applied is None or _observed is None or _applied.threads is None:
        return None
    return _applied, _observed


def apply_thread_policy(threads: str | int | None = None, *, environ: Any = None) -> ThreadPolicy:
    """Decide the thread policy and apply it to this process; returns it.

    ``threads``: ``None`` (then ``LLMPRUNE_THREADS``, else ``auto``), ``"auto"``, ``"torch"`` or a
    positive integer. Call it before ``import torch``: the OpenMP wait policy is read when torch
    loads, so afterwards only the number of threads can change (``torch.set_num_threads``), and a
    warning says so. The CLI calls it for ``prune`` and ``eval``; the library never does by itself.
    """
    global _applied, _observed
    environ = os.environ if environ is None else environ
    override = parse_override(threads, "--threads") if threads is not None else parse_override(
        environ.get(ENV), ENV)
    if override == KEEP:
        policy = decide(Observation(affinity=1), KEEP)
        _observed = None
    else:
        user = {k: environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if environ.get(k)}
        obs = observe()
        policy = decide(obs, override, runtime=openmp_runtime(), user_env=user)
        _observed = obs if policy.mode == "auto" and policy.threads is not None else None
    torch_loaded = "torch" in sys.modules
    if torch_loaded and "OMP_WAIT_POLICY" in policy.env:
        log.warning("torch was imported before the thread policy was applied: the OpenMP wait policy cannot "
                    "change now; call llmprune.apply_thread_policy() before importing torch")
    for k, v in policy.env.items():
        environ[k] = v
    _applied = policy
    _changes.clear()  # a new policy starts a new record of changes
    log.info("threads: %s (%s)", policy.threads if policy.threads is not None else "torch default", policy.reason)
    if torch_loaded:
        sync_torch()
    return policy


def sync_torch() -> None:
    """Set ``torch.set_num_threads`` to the applied policy's count (once torch is loaded)."""
    if _applied is None or _applied.threads is None or "torch" not in sys.modules:
        return
    import torch

    if torch.get_num_threads() != _applied.threads:
        torch.set_num_threads(_applied.threads)
