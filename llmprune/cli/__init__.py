"""Command line: a thin layer that parses flags into a :class:`~llmprune.config.PruneConfig` and calls the API.

Start-up order matters: the thread policy (:mod:`llmprune.runtime.threads`) sets the OpenMP wait policy,
which the OpenMP runtime reads once, when torch loads. So :func:`main` reads ``--threads`` (and the log
level) from the command line first, applies the policy, and only then imports the flag definitions
(:mod:`.parser`, which needs the configs and so torch) and the commands (:mod:`.commands`). Nothing
imported at the top of this module loads torch.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence

from ..runtime.rebalance import start_rebalancing
from ..runtime.threads import ThreadSettingError, apply_thread_policy, sync_torch

log = logging.getLogger("llmprune")

POLICY_COMMANDS = ("prune", "eval", "recover")  # the commands that compute: they get the thread policy
# ... and those whose thread count may follow the load while they run. Not prune: the summation order of its
# statistics follows the thread count, so a change mid-run (another job using the CPU for a few seconds)
# would change every later layer's masks. A prune keeps the count the policy chose at its start (recorded
# in the report); `--threads N` reproduces it. Evaluation rebalances: its scores move by float noise only.
REBALANCED = ("eval",)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (imports the configs, and so torch: call it after the thread policy)."""
    from .. import __version__
    from .parser import build_parser as build

    return build(__version__)


def _tune_heap() -> None:
    """Keep freed activations in glibc's heap for reuse instead of returning them at once.

    glibc's adaptive mmap threshold starts at 128 kB: until it has adapted, every activation of
    a few MB is a fresh mapping, page-faulted on first touch and unmapped when freed (measured:
    a SparseGPT run on the embedded model took 92 s with a 1 MB threshold, 78 s with 32 MB).
    Fixing it also fixes the trim threshold at 128 kB, so freeing a block at the top of the
    heap would shrink the heap for the next allocation to fault back in; that threshold is
    raised too. The disk offloader trims the heap when fragmentation has grown it
    (``malloc_trim``). glibc also gives each thread that allocates an arena of its own, each
    reserving 64 MiB of address space: harmless for resident memory, but an address-space cap
    (``ulimit -v``, ``prlimit --as``) counts them, so the arenas are capped at 2 unless
    ``MALLOC_ARENA_MAX`` is set. The CLI owns its process, so it may set these; the library never does.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # the user's own glibc tuning wins
                libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD = 32 MiB
            if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
                libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD = 1 GiB
            if "MALLOC_ARENA_MAX" not in os.environ:  # each thread's arena reserves 64 MiB of address space
                libc.mallopt(-8, 2)  # M_ARENA_MAX = 2: the main heap and one more (an `ulimit -v` cap counts them)
        except (OSError, AttributeError):
            pass


def _heap_for_streaming() -> None:
    """A streamed run (``--low-memory``, or chosen because the model does not fit) wants its address space
    flat, not the last few percent of speed: tensors of 1 MiB and more are mapped and unmapped on their own,
    so freed layers leave no holes in the heap (measured, 200-layer Llama, 3.3 GB of weights: the heap's
    address space grew to 4.2 GB at a resident 0.6 GB with the 32 MiB threshold, and stayed at 1.2 GB with
    1 MiB; an ``ulimit -v`` cap counts address space)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD = 128 MiB
    except (OSError, AttributeError):
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``timeout``, ``kill``): unwound like Ctrl-C, so every clean-up of the run runs
    (the disk offload removed, the progress for ``--resume`` kept) instead of the process vanishing."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _early(argv: Sequence[str]) -> argparse.Namespace:
    """The command, ``--threads`` and the log level, read before anything loads torch; the full parser
    validates every flag afterwards."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--threads", default=None)
    pre.add_argument("--quiet", "-q", action="store_true")
    pre.add_argument("--verbose", "-v", action="store_true")
    return pre.parse_known_args(argv)[0]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _tune_heap()
    early = _early(argv)
    level = logging.DEBUG if early.verbose else logging.WARNING if early.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # before torch loads: the OpenMP wait policy is read when it is imported
    if early.command in POLICY_COMMANDS and not {"-h", "--help"} & set(argv):
        try:
            apply_thread_policy(early.threads)
        except ThreadSettingError as e:
            print(f"llmprune: error: {e}", file=sys.stderr)
            return 2
    ns = build_parser().parse_args(argv)
    if ns.command in REBALANCED:
        start_rebalancing()  # follow other runs that start or end while this one goes on
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if getattr(ns, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from .commands import COMMANDS, RUN_ERRORS, USER_ERRORS, cmd_prune, interrupted  # after the policy

    sync_torch()  # torch is loaded now: make its thread count match the policy's
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (main() called from a thread): SIGTERM keeps its handler
        previous = None
    try:
        if ns.command == "prune":
            return cmd_prune(ns, _heap_for_streaming)
        return COMMANDS[ns.command](ns)
    except USER_ERRORS as e:  # bad input (a setting, a file, a model, a dataset): one line, exit 2
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except RUN_ERRORS as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"llmprune: error: no space left on the device ({e.filename or 'while writing'}); free some and run "
              f"again: {interrupted(ns)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"llmprune: {what}; {interrupted(ns)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
