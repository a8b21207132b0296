"""Pushing a checkpoint to the Hugging Face Hub: the repo is created if missing, the folder and a
freshly built model card go up in one commit.

The token comes from ``token=``, else ``HF_TOKEN`` / the login cache (``hf auth login``), and
travels only in the ``Authorization`` header that ``huggingface_hub`` sets; it is scrubbed from
every error message, and never logged or written into the card. The local folder is only read:
the card is built in memory (so it names the repo), and a failed push leaves everything as it was.
Pushing again is safe: the repo exists already (``exist_ok``) and the files are committed anew.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..loading.integrity import CheckpointFileError, check_json
from ..loading.shards import check_checkpoint
from ..steps.eora import ADAPTER_CONFIG, retargeted_adapter_config
from .card import CARD_FILE, build_card
from .compressed import check_compressed
from .format import DENSE_WEIGHTS, CompressedFormatError, layout_of
from .save import save

log = logging.getLogger(__name__)


class PushError(RuntimeError):
    """A push failed or was refused; the message says why (auth, network, name, folder) and what to do."""


@dataclass
class PushResult:
    """Where a push went: the repo, the commit and, with ``create_pr``, the pull request."""

    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str | None
    pr_url: str | None
    files: list[str]


def check_folder(folder: Path) -> dict[str, Any]:
    """Refuse a folder that is not a complete llmprune checkpoint; return its ``llmprune`` block."""
    push_any = (f"to push any other folder use `hf upload REPO_ID {folder}` (huggingface_hub's CLI)")
    if not folder.is_dir():
        raise PushError(f"{str(folder)!r} is not a folder; give a checkpoint folder written by llmprune")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise PushError(f"{str(folder)!r} has no config.json: not a complete llmprune checkpoint; {push_any}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise PushError(f"{str(cfg_path)!r} is not valid JSON ({e}): the checkpoint is damaged; write it again "
                        "with llmprune prune, or copy it again") from None
    meta = config.get("llmprune")
    if not isinstance(meta, dict) or "method" not in meta:
        raise PushError(f"{str(folder)!r} has no llmprune metadata in config.json: not a checkpoint written by "
                        f"llmprune prune; {push_any}")
    if any(p.name.startswith(".") and ".tmp-" in p.name for p in folder.iterdir()):
        raise PushError(f"{str(folder)!r} holds a temporary folder: a write into it is still running or was "
                        "interrupted; wait for it or write the checkpoint again")
    try:
        check_json(folder)
        layout = layout_of(config)
        if layout is not None:
            missing = [f for f in layout.get("files", []) if not (folder / f).is_file()]
            if missing or not layout.get("files"):
                raise PushError(f"{str(folder)!r} is incomplete: {', '.join(missing) or 'weight files'} missing; "
                                "write the checkpoint again (llmprune prune / llmprune compress)")
            check_compressed(folder, config)
        else:
            shards = [p.name for p in folder.iterdir() if DENSE_WEIGHTS.match(p.name)]
            index = folder / "model.safetensors.index.json"
            if index.is_file():
                wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
                missing = sorted(wanted - set(shards))
            else:
                missing = [] if shards else ["model.safetensors"]
            if missing:
                raise PushError(f"{str(folder)!r} is incomplete: {', '.join(missing)} missing; write the checkpoint "
                                "again with llmprune prune")
            check_checkpoint(folder)  # every header against its file, the shapes against config.json
    except (CheckpointFileError, CompressedFormatError) as e:
        raise PushError(f"{e}; nothing was pushed") from None
    return meta


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _explain(e: BaseException, repo_id: str, token: str | None) -> PushError:
    """A PushError naming the cause (auth, name, network, server), with no token in it."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    detail = _scrub(str(e).splitlines()[0] if str(e) else type(e).__name__, token)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        why = (f"repo {repo_id!r} was not found or is not yours: check the name (OWNER/NAME) and that the token "
               "may write to that owner")
    elif isinstance(e, RevisionNotFoundError):
        why = "the revision does not exist on the Hub"
    elif status in (401, 403):
        why = ("the Hub refused the token (authentication): log in with `hf auth login` or set HF_TOKEN to a token "
               "with write access")
    elif status == 409:
        why = "the Hub reported a conflict (the repo name is taken by another type, or a concurrent commit)"
    elif status is not None and 400 <= status < 500:
        why = f"the Hub rejected the request (HTTP {status}); check the repo name {repo_id!r} and the revision"
    elif isinstance(e, HfHubHTTPError) and status is not None:
        why = f"the Hub failed (HTTP {status}, server error); try again later"
    elif isinstance(e, (OSError, TimeoutError)) or type(e).__module__.startswith(("httpx", "httpcore", "requests")):
        why = "the Hub could not be reached (network): check the connection, HF_ENDPOINT and any proxy"
    else:
        why = f"the client failed ({type(e).__name__})"
    return PushError(f"push to {repo_id!r} failed: {why} ({detail}). The local checkpoint is unchanged; "
                     "pushing again is safe")


def push(
    path_or_model: str | Path | nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    tokenizer: Any = None,
    license: str | None = None,
    report: Any = None,
) -> PushResult:
    """Upload a pruned checkpoint folder (or an in-memory model with its ``llmprune`` config block)
    to the Hub repo ``repo_id`` in one commit, with a model card built from its metadata.

    Args:
        path_or_model: a folder written by ``llmprune prune`` / ``llmprune compress``, or a model
            (saved to a temporary folder first by :func:`llmprune.save`, with ``tokenizer`` and ``report``
            if given; without a report the model must carry llmprune metadata, as a loaded checkpoint does).
        repo_id: ``OWNER/NAME``; created if missing (``private`` applies only then).
        revision: branch to commit to (created from main if missing); None: the default branch.
        commit_message: default ``"Upload <method> <pattern> checkpoint with llmprune"``.
        create_pr: open a pull request instead of committing to the branch.
        token: a Hub token; None reads ``HF_TOKEN`` or the login cache. Sent only as a header.
        license: the card's licence when the base model's is not known to llmprune.
        report: with a model, the :class:`llmprune.PruneReport` of its pruning (its metadata and card).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass token=...")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"repo id {repo_id!r} is not OWNER/NAME (e.g. my-org/SmolLM2-135M-sparsegpt-2of4)")
    tmp: Path | None = None
    if isinstance(path_or_model, nn.Module):
        tmp = Path(tempfile.mkdtemp(prefix="llmprune-push-"))
        try:
            folder = save(path_or_model, tokenizer, tmp / "checkpoint", report)
        except (ValueError, TypeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PushError(f"cannot push this model: {e}") from None
    else:
        folder = Path(path_or_model).expanduser()
    try:
        meta = check_folder(folder)
        card = str(build_card(folder, license=license, repo_id=repo_id)).encode("utf-8")
        files = sorted(p for p in folder.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                       and p.relative_to(folder).as_posix() != CARD_FILE)
        ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
               for p in files if p.relative_to(folder).as_posix() != ADAPTER_CONFIG]
        adapter = retargeted_adapter_config(folder, repo_id)  # an EoRA adapter's base: this repo, not the dense source
        if adapter is not None:
            ops.append(CommitOperationAdd(path_in_repo=ADAPTER_CONFIG, path_or_fileobj=adapter))
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
        message = commit_message or f"Upload {meta.get('method')} {meta.get('pattern')} checkpoint with llmprune"
        api = HfApi(token=token)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main" and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=revision,
                                     create_pr=create_pr, repo_type="model")
        except Exception as e:  # any failure of the client: explained, token scrubbed
            raise _explain(e, repo_id, token) from None
        names = [op.path_in_repo for op in ops]
        log.info("pushed %d files to %s (%s)", len(names), repo_id, info.commit_url)
        return PushResult(repo_id=repo_id, repo_url=str(repo), commit_url=info.commit_url,
                          commit_oid=info.oid, pr_url=info.pr_url, files=names)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
