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
(``in × in`` floats for a Hessian) and one small gather. Rank 0 writes the checkpoint.

The result equals a one-process run on the same windows up to the summation order of the statistics
(identical masks on the tiny test models). Models with routed experts are refused (a rank's tokens may not
reach every expert, so the ranks would not prune in the same order), and so are ``--low-memory`` and
progress saving for ``--resume``, which are single-process features for now.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

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

    def reduce_stats(self, stats: InputStats | None) -> None:
        """Sum ``stats`` over the ranks in place, once (statistics shared by q/k/v are summed once)."""
        import torch.distributed as dist

        if stats is None or getattr(stats, "_reduced", False):  # q/k/v share one; OWL's first layer is reused
            return
        stats._reduced = True
        t0 = time.perf_counter()
        with _peers(self.rank, "summing the input statistics"):
            n = torch.tensor([float(stats.n)], dtype=torch.float64)
            dist.all_reduce(n)
            stats.n = int(n.item())
            for name in ("sq", "sum"):
                t = getattr(stats, name)
                if t is not None:
                    dist.all_reduce(t)
                    self.bytes += t.numel() * t.element_size()
            if stats._H is not None:
                H = stats.H  # symmetric: the ranks' partial upper triangles mirrored first
                dist.all_reduce(H)
                self.bytes += H.numel() * H.element_size()
        stats.cache = {}
        self.seconds += time.perf_counter() - t0

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
