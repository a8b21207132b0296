"""Progress saved after every pruned layer, and ``--resume`` from it after a crash.

:func:`llmprune.prune_checkpoint` keeps a hidden folder beside the output, ``.<output>.partial``
(no ``config.json`` at its top: it never looks like a checkpoint), and after each decoder layer
saves there, in this order:

1. the pruned layer's tensors, ``layer-<i>.safetensors`` (a streamed run wrote it already: it is the
   layer's output shard);
2. the next layer's inputs (every calibration chunk's hidden states), ``hidden-<i>.safetensors``, and
   what the pruning plan gathered so far (RIA permutations, EoRA corrections), ``plan-<i>.safetensors``;
3. ``progress.json``, replaced atomically (``os.replace``): the layers done, their reports, the
   engine's call order, the routers skipped, the plan's records, the torch RNG state, and the
   fingerprints that bind it to its run: the config (every field but ``low_memory``), the model (its
   ``config.json`` and every shard's header, size and first and last MiB) and the calibration tokens.

``progress.json`` is the commit point: a kill before it leaves the previous layer's progress intact.
``--resume`` re-runs what is cheap and deterministic (loading, calibration, capture of the first
layer's inputs, an observe pass such as OWL's), checks the fingerprints (a changed config, model or
calibration is refused with a message), restores the pruned layers and the hidden states and goes on
from the next layer: the checkpoint is the same, bit for bit, as an uninterrupted run's. The folder
is removed once the output is complete. A streamed run may be resumed in memory and vice versa.

Under several processes (:mod:`.distributed`) rank 0 saves the layers, the plan and ``progress.json``,
and each rank its own hidden states (``hidden-<i>-rank<r>.safetensors``: its share of the calibration
windows); ``progress.json`` is replaced only once every rank has saved them, and every rank reads it to
resume. A run is resumed with as many processes as it was started with (the windows are shared by rank).
The folder must then be on a filesystem every rank sees.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import ConfigError
from ...runtime.files import save_tensors_atomic, write_json_atomic
from ...steps import LowRank
from ..layer import LayerReport, ModuleReport
from .distributed import Collective
from .streaming import ShardStream

if TYPE_CHECKING:
    from ...config import PruneConfig

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
FORMAT = 1
# fields that change how a run executes, never its result
NOT_HASHED = ("low_memory", "execution")  # no bearing on the result
_MIB = 2**20


class ResumeError(ConfigError):
    """Saved progress that does not belong to this run; the message says what differs and the fix."""


def partial_folder(output: str | Path) -> Path:
    """The hidden sibling of ``output`` where a run keeps its progress."""
    out = Path(output).expanduser()
    return out.parent / f".{out.name}.partial"


def hashed_settings(config: PruneConfig) -> dict[str, Any]:
    """The settings that bind saved progress to its run: every field but those with no bearing on the result."""
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in NOT_HASHED}


def config_hash(config: PruneConfig) -> str:
    return hashlib.sha256(json.dumps(hashed_settings(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``["sparsity 0.5 then, 0.6 now", ...]``: the settings that differ between two runs."""
    return [f"{k} {saved.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if json.dumps(saved.get(k), sort_keys=True, default=str) != json.dumps(now.get(k), sort_keys=True,
                                                                                  default=str)]


def model_fingerprint(folder: str | Path) -> str:
    """sha256 of ``config.json`` and, for every safetensors file, its name, size, header (names, dtypes,
    shapes, offsets) and its first and last MiB: cheap on a 100 GB model, and any re-export, changed
    shape or retrained tensor at either end of a shard changes it."""
    folder = Path(folder)
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(f"{shard.name}:{size}".encode())
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
            h.update(f.read(_MIB))
            f.seek(max(size - _MIB, 8 + n))
            h.update(f.read(_MIB))
    return h.hexdigest()[:16]


def tokens_hash(chunks: list[torch.Tensor]) -> str:
    return hashlib.sha256(torch.cat(chunks).numpy().tobytes()).hexdigest()[:16]


def _hidden_file(i: int, rank: int, size: int) -> str:
    """The file of rank ``rank``'s hidden states after layer ``i`` (one process: no rank in the name)."""
    return f"hidden-{i:06d}.safetensors" if size == 1 else f"hidden-{i:06d}-rank{rank:03d}.safetensors"


def _report_from(d: dict) -> LayerReport:
    mods = [ModuleReport(**{**m, "shape": tuple(m["shape"])}) for m in d.pop("modules")]
    return LayerReport(**d, modules=mods)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


class Progress:
    """Layer residency wrapper: ``inner`` (a :class:`~llmprune.offload.DiskOffloader` or a
    :class:`~llmprune.stream.ShardStream`) does the residency; this saves progress after every layer
    (``layer_done``) and, when resuming, brings the engine to where the saved progress stopped (``restore``).
    Under several processes rank 0 (the ``writer``) saves all but the other ranks' hidden states."""

    def __init__(self, inner: Any, folder: str | Path, config: PruneConfig, model_folder: str | Path | None,
                 resume: bool):
        self.inner = inner
        self.collective = Collective.current()  # None in one process
        self.rank, self.size = (0, 1) if self.collective is None else (self.collective.rank, self.collective.size)
        self.writer = self.rank == 0
        self.folder = Path(folder)  # created with the first layer's progress (a streamed run's shards: before)
        self.resume = resume
        self.stamp = {"format": FORMAT, "config_sha256": config_hash(config),
                      "model_sha256": model_fingerprint(model_folder) if model_folder is not None else None}
        self.settings = hashed_settings(config)  # saved beside the hash, so a refusal can name what differs
        self.saved = self.load() if resume else None
        if self.saved is not None:
            self._check(self.saved, self.stamp, self.settings)
            processes = int(self.saved.get("processes", 1))
            if processes != self.size:
                raise ResumeError(
                    f"cannot resume: the interrupted run ran in {processes} process(es), this one in {self.size} "
                    "(each rank saved the hidden states of its share of the calibration windows); launch "
                    f"{'it without torchrun' if processes == 1 else f'{processes} processes (torchrun --nproc-per-node {processes})'}"
                    ", or pass --overwrite without --resume to start again"
                )

    def __getattr__(self, name: str) -> Any:  # acquire, release, set_aside, observed, fetch, paging_out
        return getattr(self.__dict__["inner"], name)

    # ---- reading ---------------------------------------------------------------------------
    def load(self) -> dict | None:
        path = self.folder / PROGRESS_FILE
        if not path.is_file():
            log.info("no saved progress in %s: starting from the first layer", self.folder)
            return None
        return json.loads(path.read_text())

    @staticmethod
    def _check(saved: dict, expected: dict, settings: dict | None = None) -> None:
        what = {"format": "the progress format", "config_sha256": "the config",
                "model_sha256": "the model", "tokens_sha256": "the calibration tokens"}
        for key, value in expected.items():
            if saved.get(key) != value:
                differs = (settings_diff(saved["settings"], settings)
                           if key == "config_sha256" and settings is not None and "settings" in saved else [])
                detail = f": {'; '.join(differs)}" if differs else f" ({key} {saved.get(key)} saved, {value} now)"
                raise ResumeError(
                    f"cannot resume: {what[key]} differs from the interrupted run's{detail}; rerun with the same "
                    "settings and model, or pass --overwrite without --resume to start again"
                )

    @property
    def layers_done(self) -> int:
        return 0 if self.saved is None else int(self.saved["layers_done"])

    # ---- engine hooks ----------------------------------------------------------------------
    def restore(self, run, plan, hidden: list[torch.Tensor]) -> tuple[int, list[str] | None, list[LayerReport]]:
        """``(start, order, reports)``: the pruned layers put back, ``hidden`` overwritten with the saved
        inputs of layer ``start``, the plan's records and the RNG restored."""
        self.stamp["tokens_sha256"] = self._tokens_hash(run.chunks)
        if self.saved is None:
            return 0, None, []
        self._check(self.saved, {"tokens_sha256": self.stamp["tokens_sha256"]})
        k = self.layers_done
        for i in range(k):
            self._restore_layer(run, i)
        saved_hidden = _load_tensors(self.folder / _hidden_file(k - 1, self.rank, self.size))
        for c in range(len(hidden)):
            saved = saved_hidden[str(c)]
            if hidden[c].shape == saved.shape and hidden[c].dtype == saved.dtype:
                hidden[c].copy_(saved)  # into the run's buffer (one block, or the spill file)
            else:
                hidden[c] = saved
        state = _load_tensors(self.folder / f"plan-{k - 1:06d}.safetensors")
        plan.permutations.update({n[len("perm."):]: t for n, t in state.items() if n.startswith("perm.")})
        for name, rec in self.saved["adapters"].items():
            plan.adapters[name] = LowRank(A=state[f"A.{name}"], B=state[f"B.{name}"], **rec)
        plan.nm_search.update(self.saved["nm_search"])
        plan.uncompensated.update(self.saved["uncompensated"])
        run.skipped.update(self.saved["skipped"])
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(self.saved["rng"])), dtype=torch.uint8))
        log.info("resuming after layer %d of %d (progress in %s)", k - 1, len(run.layers), self.folder)
        return k, self.saved["order"], [_report_from(dict(r)) for r in self.saved["reports"]]

    def _tokens_hash(self, chunks: list[torch.Tensor]) -> str:
        """The calibration tokens' fingerprint: of this process's chunks, or of every rank's share in rank order
        (the same on every rank)."""
        mine = tokens_hash(chunks)
        if self.collective is None:
            return mine
        everyone = self.collective.gather(mine, "comparing the calibration tokens")
        return hashlib.sha256("".join(everyone).encode()).hexdigest()[:16]

    def _restore_layer(self, run, i: int) -> None:
        path = self.folder / f"layer-{i:06d}.safetensors"
        layer = run.layers[i]
        if isinstance(self.inner, ShardStream):  # the layer's output shard is already written
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                names = list(f.keys())
            self.inner.shards[path.name] = names
            self.inner.bytes += path.stat().st_size
            return
        values = _load_tensors(path)
        prefix = f"{run.layers_name}.{i}."
        self.inner.acquire(i, layer)
        for name, p in layer.state_dict(keep_vars=True).items():
            p.data.copy_(values[prefix + name])
        self.inner.release(i, layer)

    def layer_done(self, run, plan, i: int, hidden: list[torch.Tensor], order: list[str] | None,
                   reports: list[LayerReport]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"layer-{i:06d}.safetensors"
        if self.writer and not isinstance(self.inner, ShardStream):  # in memory: the layer (streamed: its shard)
            prefix = f"{run.layers_name}.{i}."
            save_tensors_atomic(path, {prefix + k: v for k, v in run.layers[i].state_dict().items()})
            observed = getattr(self.inner, "observed", None)
            if observed is not None:  # read, not changed: the disk offloader hands the pages back
                observed(i, run.layers[i])
        save_tensors_atomic(self.folder / _hidden_file(i, self.rank, self.size), {str(c): h for c, h in enumerate(hidden)})
        if self.collective is not None:  # every rank's hidden states on disk before progress.json names them
            self.collective.barrier(f"saving the progress of layer {i}")
        if not self.writer:
            return
        tensors = {f"perm.{n}": t for n, t in plan.permutations.items()}
        for name, lr in plan.adapters.items():
            tensors[f"A.{name}"], tensors[f"B.{name}"] = lr.A, lr.B
        save_tensors_atomic(self.folder / f"plan-{i:06d}.safetensors", tensors)
        adapters = {n: {f.name: getattr(lr, f.name) for f in dataclasses.fields(lr) if f.name not in ("A", "B")}
                    for n, lr in plan.adapters.items()}
        progress = {
            **self.stamp, "settings": self.settings, "processes": self.size, "layers_done": i + 1, "layers": len(run.layers), "order": order,
            "reports": [dataclasses.asdict(r) for r in reports], "skipped": dict(run.skipped),
            "nm_search": dict(plan.nm_search), "uncompensated": dict(plan.uncompensated), "adapters": adapters,
            "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        }
        write_json_atomic(self.folder / PROGRESS_FILE, progress)
        stale = [_hidden_file(i - 1, r, self.size) for r in range(self.size)] + [f"plan-{i - 1:06d}.safetensors"]
        for name in stale:
            (self.folder / name).unlink(missing_ok=True)

    def discard(self) -> None:
        """The output is complete: the progress is no longer needed (removed by the writer, rank 0)."""
        if self.writer:
            shutil.rmtree(self.folder, ignore_errors=True)

    def failed(self) -> None:
        """The run stopped with an error: its progress stays for ``--resume``, unless there is none (the writer,
        rank 0, decides)."""
        if self.writer and not (self.folder / PROGRESS_FILE).is_file():
            shutil.rmtree(self.folder, ignore_errors=True)


def source_folder(source: str | Path) -> Path | None:
    """The local folder of a loaded model's ``source``: itself, or its Hub snapshot in the cache."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "config.json")
    except Exception:  # not a repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def leftovers(output: str | Path) -> list[Path]:
    """Scratch folders an interrupted writer of ``output`` may leave beside it: the disk offload
    (``.NAME.offload-*``), a staging folder (``.NAME.tmp-*``) and a replaced output not yet removed
    (``.NAME.old-*``). A run removes its own as it stops, unless it was killed (SIGKILL, power loss)."""
    out = Path(output).expanduser()
    if not out.parent.is_dir():
        return []
    return sorted(p for kind in ("offload", "tmp", "old") for p in out.parent.glob(f".{out.name}.{kind}-*")
                  if p.is_dir())


def describe_partial(output: str | Path) -> str | None:
    """One line on the progress an interrupted run kept for ``--resume``, or None when it kept none."""
    folder = partial_folder(output)
    if not (folder / PROGRESS_FILE).is_file():
        return None
    try:
        done = json.loads((folder / PROGRESS_FILE).read_text())["layers_done"]
    except (OSError, ValueError, KeyError):
        done = "?"
    return (f"the progress of {done} pruned layer(s) is kept in {str(folder)!r} ({_size(folder) / 2**20:.0f} MB): "
            "run the same command with --resume to continue, or with --overwrite to start again (which removes it)")


def check_partial(output: str | Path, resume: bool, overwrite: bool, writer: bool = True) -> Path:
    """The progress folder of ``output``; an interrupted run's progress is never discarded silently.
    ``overwrite`` also removes the scratch folders a killed run left (:func:`leftovers`). Only a ``writer``
    (rank 0 of several processes) removes anything; the other ranks check alike."""
    folder = partial_folder(output)
    kept = (folder / PROGRESS_FILE).is_file()
    if folder.exists() and not kept and writer:  # killed before its first layer: nothing to keep
        shutil.rmtree(folder, ignore_errors=True)
    stale = leftovers(output)
    if stale and overwrite:
        if writer:
            log.info("removing %d folder(s) a killed run left beside the output (--overwrite): %s", len(stale),
                     ", ".join(p.name for p in stale))
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
    elif stale:
        log.warning("a killed run left %d scratch folder(s) beside the output (%.0f MB): %s; --overwrite removes them",
                    len(stale), sum(map(_size, stale)) / 2**20, ", ".join(p.name for p in stale))
    if kept and not resume:
        done = None
        try:
            done = json.loads((folder / PROGRESS_FILE).read_text())["layers_done"]
        except (OSError, ValueError, KeyError):
            pass
        if not overwrite:
            raise ResumeError(
                f"an interrupted run left its progress in {str(folder)!r}"
                + (f" ({done} layer(s) pruned, {_size(folder) / 2**20:.0f} MB)" if done is not None else "")
                + "; pass --resume to continue it, or --overwrite to start again"
            )
        if writer:
            log.info("discarding the progress of an interrupted run in %s (--overwrite)", folder)
            shutil.rmtree(folder)
    return folder
