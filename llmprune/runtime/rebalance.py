"""Rebalancing: while a CLI evaluation goes on, follow other runs and other busy tasks that start or end
(never a prune: its masks follow the thread count, which it keeps from its start).

Other llmprune runs and other busy tasks may start or end while a run goes on: :func:`start_rebalancing`
looks again at most once a second (the registry, and ``procs_running`` minus this process's own
running threads; from a forward pre-hook, on the thread that runs the model) and moves
``torch.set_num_threads`` to the new share: down at once for a new llmprune run, otherwise after two
looks in a row agree, and back up when the others are gone (a lone run that started beside a passing
command gets its cores back). Each change is recorded through
:func:`~llmprune.runtime.threads.record_change`, so :func:`~llmprune.runtime.threads.applied` reports it.
The policy it starts from (shares, registry, observation) is :mod:`llmprune.runtime.threads`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .threads import (
    Observation,
    auto_policy,
    core_share,
    live_peers,
    record_change,
    runnable_tasks,
    share_threads,
    sync_torch,
)

log = logging.getLogger("llmprune.threads")  # the policy's logger: one name to grep for thread messages


def own_running_threads(task_dir: Path = Path("/proc/self/task")) -> int | None:
    """Threads of this process in state R now (its OpenMP workers spin as R), or None when unreadable."""
    try:
        count = 0
        for task in task_dir.iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended
            if stat[stat.rindex(")") + 2:].startswith("R"):
                count += 1
        return count
    except (OSError, ValueError):
        return None


def others_running(stat: Path = Path("/proc/stat"), task_dir: Path = Path("/proc/self/task"),
                   samples: int = 3) -> float | None:
    """Runnable tasks of other processes now: ``procs_running`` minus this process's running threads, the
    least of a few back-to-back reads (the two files are not read at the same instant: a worker of this
    process going to sleep between them would count as another task)."""
    seen = []
    for _ in range(samples):
        total = runnable_tasks(samples=1, stat=stat)  # procs_running - 1
        own = own_running_threads(task_dir)
        if total is None or own is None:
            return None
        seen.append(max(0.0, total + 1 - own))
    return min(seen)


class Rebalancer:
    """Moves the thread count to this run's share as other llmprune runs and other busy tasks come and go.

    Called often (a global forward pre-hook), it looks at most every ``interval`` seconds: the registry
    (other llmprune runs) and the runnable tasks of other processes. Fewer threads are taken at once when
    a new run registers; any other change waits until two looks in a row agree, so a passing command does
    not move it. ``set_threads`` is ``torch.set_num_threads`` (it must run on the thread that runs the
    model: OpenMP's thread count is per calling thread)."""

    def __init__(self, obs: Observation, threads: int, interval: float = 1.0, directory: Path | None = None,
                 set_threads=None, clock=time.monotonic, others=others_running) -> None:
        self.obs, self.threads, self.interval, self.directory = obs, threads, interval, directory
        self.share = core_share(obs)
        self.clock, self.next = clock, clock() + interval
        self.t0 = self.next - interval
        self.set_threads, self.others = set_threads, others
        self.peers = max(0, obs.peers - (obs.local_ranks - 1))
        self.pending: int | None = None

    def check(self) -> int | None:
        """Look again when due; the new thread count when it changed, else None."""
        now = self.clock()
        if now < self.next:
            return None
        self.next = now + self.interval
        peers = max(0, live_peers(self.directory) - (self.obs.local_ranks - 1))
        others = self.others()
        wanted = share_threads(self.share, peers, others or 0.0)
        new_run = peers > self.peers
        self.peers = peers
        if wanted == self.threads:
            self.pending = None
            return None
        if not new_run and self.pending != wanted:  # wait for a second look that agrees
            self.pending = wanted
            return None
        self.pending = None
        log.info("threads: %d -> %d (%d other llmprune run%s, %g other runnable)", self.threads, wanted, peers,
                 "s" if peers != 1 else "", others or 0.0)
        record_change({"seconds": round(now - self.t0, 1), "threads": wanted, "peers": peers,
                       "others_running": others})
        self.threads = wanted
        if self.set_threads is not None:
            self.set_threads(wanted)
        return wanted

    def __call__(self, module: Any, args: Any) -> None:  # forward pre-hook signature
        self.check()


_rebalancer: Rebalancer | None = None


def start_rebalancing(interval: float = 1.0) -> Rebalancer | None:
    """For the CLI, after :func:`~llmprune.runtime.threads.apply_thread_policy`: follow other runs while this
    one goes on (a global forward pre-hook; imports torch). Only for the automatic policy on more than one
    core; None otherwise. The library never calls it: it changes the process's thread count."""
    global _rebalancer
    auto = auto_policy()
    if auto is None or core_share(auto[1]) < 2:
        return None
    if _rebalancer is not None:
        return _rebalancer
    import torch  # only now: the thread policy must be applied before torch loads

    policy, obs = auto
    sync_torch()
    _rebalancer = Rebalancer(obs, policy.threads, interval, set_threads=torch.set_num_threads)
    torch.nn.modules.module.register_module_forward_pre_hook(_rebalancer)
    return _rebalancer
