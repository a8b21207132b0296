"""Pruning over several processes with ``torch.distributed`` (launched by ``torchrun`` or ``accelerate launch``).

Each rank runs the same sequential engine on its share of the calibration windows (contiguous blocks,
:meth:`Collective.shard`). Before a target is pruned, its input statistics (``Σx²``, ``Σx``, ``H = XᵀX``
and the token count) are summed over the ranks (``all_reduce``), once per shared input (q/k/v, gate/up),
so every rank holds the statistics of the whole calibration batch; the statistics an observe-only
pass hands to an allocator (OWL) are summed the same way.

Every rank then prunes the target itself, identically, rather than one rank pruning and broadcasting:
in true-sequential order each module's pruned weight is needed at once, by every rank's chunks, for the
inputs of the next module, so there is never a set of targets ready to be pruned concurrently, and the
pruning arithmetic is deterministic given the same statistics. That this holds is checked, not assumed:
after each layer the ranks compare every module's mask hash (a few bytes each) and stop with an error
naming the module if they differ. The communication per layer is thus one all-reduce per distinct input
(``in × in`` floats for a Hessian), one small header per target and one small gather. Rank 0 writes the
checkpoint, and the progress of ``--resume`` (each rank saves its own hidden states beside it).

Every rank must enter every collective in the same order, or the run hangs. So each sum of statistics
starts with a small header all-reduced by every rank (:meth:`Collective.reduce_stats`): which target it
is for (the ranks stop with an error if they name different ones), this rank's token count, whether its
statistics are still its own, and which tensors it holds. The tensors that follow are decided by the
header alone, the same on every rank. Routed experts rely on it: a rank's tokens may not reach every
expert, so a rank whose tokens missed an expert sums zeros of the right shape in its place, and an expert
that no rank's tokens reached is pruned by magnitude on every rank, as in one process.

The result equals a one-process run on the same windows up to the summation order of the statistics
(identical masks on the tiny test models).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from ...stats import InputStats

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """The ranks disagree, or the run cannot be distributed; the message says what and the fix."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """Whether this process was started by a launcher for several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_size() -> int:
    """Processes of this run on this machine (``LOCAL_WORLD_SIZE``, set by the launcher; else one)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup(device: str = "auto") -> tuple[int, int]:
    """Initialise the process group from the launcher's environment when launched for several processes
    (nccl on CUDA devices, gloo on the CPU); each rank takes the GPU ``LOCAL_RANK``. Returns ``(rank, world)``."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return world()
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, size = world()
    log.info("rank %d of %d (%s backend)", rank, size, dist.get_backend())
    return rank, size


@contextlib.contextmanager
def _peers(rank: int, what: str) -> Iterator[None]:
    """A collective whose peer died (killed, out of memory) fails in gloo or nccl with a RuntimeError: said as a
    :class:`DistributedError` naming this rank and the step, so the run stops with one line."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, DistributedError):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DistributedError(f"rank {rank} lost the other processes while {what} ({first.strip()[:200]}); "
                               "another rank has probably died: see its log, then run again (nothing was "
                               "written)") from e


class Collective:
    """The engine's collectives: sharding of the calibration windows, sums of input statistics, and the
    check that every rank pruned every module alike. Counts what it sends (``bytes``, ``seconds``)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.bytes = 0  # payload summed over all collectives of this rank
        self.seconds = 0.0  # time spent in them (including waiting for the other ranks)

    @classmethod
    def current(cls) -> Collective | None:
        """A collective over the initialised process group, or None in a one-process run."""
        rank, size = world()
        return cls(rank, size) if size > 1 else None

    def shard(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of the calibration windows ``[n, L]`` (sizes differ by at most one)."""
        n = input_ids.shape[0]
        if input_ids.shape == (1, 1):  # magnitude's placeholder window: no statistics are read
            return input_ids
        if n < self.size:
            raise DistributedError(f"{n} calibration window(s) cannot be shared by {self.size} processes; "
                                   f"give --nsamples {self.size} or more, or launch fewer processes")
        return input_ids.tensor_split(self.size)[self.rank]

    def reduce_stats(self, name: str, stats: InputStats, width: int, device: torch.device) -> None:
        """Sum ``stats``, the input statistics of target ``name`` (``width`` inputs), over the ranks in place.

        A header comes first, all-reduced by every rank: ``[pending, n, name, has sq, has sum, has H]`` per
        rank. Every rank then enters the same all-reduces, whatever its own statistics hold:

        - no rank pending (statistics shared by q/k/v, or OWL's first layer reused): nothing more;
        - every rank pending: each statistic that any rank holds is summed, zeros standing in for a rank
          that holds none (its tokens did not reach this expert);
        - some pending: those ranks had no tokens for this input (an expert) while the others hold the sum
          already (it reached them through a target sharing the input); the lowest of those sends it
          alone, the others zeros, so every rank ends with that same sum."""
        import torch.distributed as dist

        fields = ("sq", "sum", "_H")
        t0 = time.perf_counter()
        pending = not getattr(stats, "_reduced", False)
        mine = [float(pending), float(stats.n), float(zlib.crc32(name.encode()))]
        mine += [float(getattr(stats, f) is not None) for f in fields]
        header = torch.zeros(self.size, len(mine), dtype=torch.float64)  # exact for counts below 2**53
        header[self.rank] = torch.tensor(mine, dtype=torch.float64)
        header = header.to(device)  # nccl sums tensors on the GPU only
        with _peers(self.rank, "summing the input statistics"):
            dist.all_reduce(header)
            header = header.cpu()
            names = header[:, 2]
            if not bool((names == names[0]).all()):
                raise DistributedError(
                    f"the ranks reached different modules at the same step (rank {self.rank}: {name}): routed "
                    "experts that are separate modules run only for the tokens routed to them, so the ranks "
                    "prune them in different orders; use --sequential dense-layer, or run in one process")
            flags = header[:, 0].bool()
            stats._reduced = True
            if not bool(flags.any()):
                self.seconds += time.perf_counter() - t0
                return
            src = None if bool(flags.all()) else int((~flags).nonzero()[0])  # the rank that holds the sum
            if src is not None and bool((header[flags, 1] > 0).any()):
                raise DistributedError(f"{name}: some ranks hold the summed statistics while others still hold "
                                       "their own tokens; this is a bug, please report it")
            stats.n = int(header[:, 1].sum().item()) if src is None else int(header[src, 1].item())
            if stats._H is not None:
                stats.H = stats.H  # symmetric: the rank's partial upper triangle mirrored before the sum
            for k, f in enumerate(fields):
                if not bool(header[:, 3 + k].any()):
                    continue
                t = getattr(stats, f)
                if t is None:  # this rank's tokens did not reach the input: zeros of the others' shape
                    shape = (width, width) if f == "_H" else (width,)
                    t = torch.zeros(shape, dtype=torch.float32, device=device)
                    setattr(stats, f, t)
                send = t if src is None or pending or self.rank == src else torch.zeros_like(t)
                dist.all_reduce(send)
                if send is not t:  # this rank held the sum already; ``send`` now holds it too
                    t.copy_(send)
                self.bytes += t.numel() * t.element_size()
        stats.cache = {}
        self.seconds += time.perf_counter() - t0

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here (e.g. has saved its part of the progress)."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        with _peers(self.rank, what):
            dist.barrier()
        self.seconds += time.perf_counter() - t0

    def gather(self, obj: Any, what: str) -> list[Any]:
        """``obj`` of every rank, in rank order."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        everyone: list[Any] = [None] * self.size
        with _peers(self.rank, what):
            dist.all_gather_object(everyone, obj)
        self.seconds += time.perf_counter() - t0
        return everyone

    def any(self, flag: bool, what: str) -> bool:
        """Whether ``flag`` holds on any rank: one decision every rank takes alike."""
        return any(self.gather(bool(flag), what))

    def check_masks(self, index: int, masks: dict[str, str]) -> None:
        """Stop when any rank pruned a module of layer ``index`` differently (mask hashes compared)."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        everyone: list[dict[str, str] | None] = [None] * self.size
        with _peers(self.rank, f"comparing the masks of layer {index}"):
            dist.all_gather_object(everyone, masks)
        self.seconds += time.perf_counter() - t0
        for r, other in enumerate(everyone):
            if other != masks:
                bad = sorted(k for k in set(masks) | set(other or {}) if masks.get(k) != (other or {}).get(k))
                raise DistributedError(
                    f"rank {r} pruned layer {index} differently from rank {self.rank} ({', '.join(bad[:3])}): the "
                    "ranks' arithmetic is not identical (different devices or libraries?); run on identical "
                    "devices, or in one process"
                )
