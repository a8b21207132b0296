"""Calibration data: ``nsamples`` token windows of ``seqlen`` tokens, ``[nsamples, seqlen]`` int64 on CPU.

Sampling follows the reference code of SparseGPT (Frantar & Alistarh 2023,
https://arxiv.org/abs/2301.00774) and Wanda (Sun et al. 2023, https://arxiv.org/abs/2306.11695):

* **documents** (C4, records of a .jsonl/.json/.parquet file or an HF dataset): draw a random
  document, keep it if its tokenization is longer than ``seqlen``, cut a window at a random offset
  ``randint(0, len - seqlen - 1)``; repeat ``nsamples`` times.
* **streams** (WikiText-2, a .txt file): tokenize the whole text once, cut ``nsamples`` windows at
  random offsets.
* **self**: text sampled by the model itself (Williams et al. 2024, "Self-calibration for language
  model quantization and pruning", https://arxiv.org/abs/2410.17170).
* **pre-tokenized** tensors, token lists and DataLoaders are windowed as they are.

Tokenization rule (BOS): a *document* is tokenized as the reference code does, ``tokenizer(text)``
with the tokenizer's default special tokens, so with a Llama-style tokenizer a window drawn at
offset 0 starts with BOS. A *stream* (WikiText-2, .txt, the concatenation fallback) is tokenized with
``add_special_tokens=False`` and has no BOS; documents concatenated into a stream are joined by the
tokenizer's EOS token (or ``"\\n\\n"`` when it has none). Chat records are rendered with the chat
template, which writes its own special tokens, and are always tokenized with
``add_special_tokens=False``.

Deviations from the reference code, all deliberate:

* randomness comes from a local ``random.Random(seed)`` (same draws as their ``random.seed(seed)``,
  without touching global state);
* a document is used at most once and a document found too short is not tokenized again, so the
  loop ends when the documents run out: the remaining windows are then drawn from the documents
  concatenated into one stream, with a warning (the reference code loops forever);
* documents are tokenized lazily, one per draw, never the whole corpus up front;
* offline, WikiText-2 calibrates on the train split when the data dir has it, else on the valid
  split (logged); the test split is never used for calibration.

One file per source: ``named.py`` (c4, wikitext2), ``files.py``, ``hf.py`` (HF datasets),
``self_generated.py``, ``tokens.py`` (pre-tokenized); ``sampling.py`` holds the document and stream
sampling they share, ``common.py`` the data dir, fingerprints and portable settings. This module is the
public face: it dispatches on the kind of source and describes sources for run metadata. Every module
logs under the logger ``llmprune.calibration``.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import random
from pathlib import Path
from typing import Any

import torch

from ..loading.models import effective_seqlen, model_context
from .common import (
    CHOICES_MSG,
    LOCAL_DIR_RECORDED,
    NAMED_SOURCES,
    CalibrationError,
    file_sha256,
    is_int,
    looks_like_path,
    portable_settings,
    portable_source,
    resolve_data_dir,
)
from .files import from_file, read_records
from .hf import dataset_docs, hf_docs, is_hf_dataset, is_text_dataset
from .named import c4_docs, local_copy, wikitext2_text
from .sampling import require_tokenizer, sample_documents, sample_stream
from .self_generated import self_calibration
from .tokens import from_pretokenized, shape_as_given, warn_if_few

__all__ = [
    "LOCAL_DIR_RECORDED", "CalibrationError", "calibration_tokens", "describe_source", "file_sha256",
    "get_calibration", "portable_settings", "portable_source", "read_records", "resolve_data_dir",
    "source_fingerprint",
]


def describe_source(source: Any, data_dir: str | os.PathLike | None = None) -> str:
    """A short JSON-friendly description of a calibration source, for run metadata.

    A source is named, never located: a local file by its base name and the sha256 of its bytes
    (:func:`source_fingerprint`), so that the metadata of a checkpoint holds no path of the machine
    that pruned it. E.g. ``"c4 (local copy c4_validation_2k.jsonl, sha256 1a2b3c4d5e6f7a8b)"``,
    ``"wikitext2 (hub: Salesforce/wikitext wikitext-2-raw-v1 train)"``, ``"file calib.jsonl (sha256 ...)"``,
    ``"hf: name:config:split"``, ``"tensor[32x512]"``.
    """
    if isinstance(source, torch.Tensor):
        return "tensor[" + "x".join(str(s) for s in source.shape) + "]"
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        key = source.strip().lower()
        local = _source_file(source, data_dir)
        if key == "c4":
            return (f"c4 (local copy {local.name}, sha256 {file_sha256(local)})" if local
                    else "c4 (hub: allenai/c4 en/c4-train.00000-of-01024.json.gz)")
        if key == "wikitext2":
            return (f"wikitext2 (local copy {local.name}, sha256 {file_sha256(local)})" if local
                    else "wikitext2 (hub: Salesforce/wikitext wikitext-2-raw-v1 train)")
        if key == "self":
            return "self (sampled from the model)"
        if local is not None:
            return f"file {local.name} (sha256 {file_sha256(local)})"
        if looks_like_path(source):
            return f"file {Path(source).name}"
        return f"hf: {source}"
    if isinstance(source, (list, tuple)):
        if source and all(is_int(t) for t in source):
            return f"token list[{len(source)}]"
        return f"token lists[{len(source)}]"
    if isinstance(source, torch.utils.data.DataLoader):
        return f"DataLoader({type(source.dataset).__name__})"
    if is_hf_dataset(source):
        rows = f"{len(source)} rows, " if hasattr(source, "__len__") else ""
        return f"datasets.{type(source).__name__}[{rows}columns {', '.join(source.column_names or [])}]"
    return f"iterable ({type(source).__name__})"


def source_fingerprint(source: Any, data_dir: str | os.PathLike | None = None) -> str | None:
    """The sha256 prefix of the local file a calibration source reads (the data dir's copy of ``c4`` or
    ``wikitext2``, or the file given); None for the Hub, ``self`` and pre-tokenized sources."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return None
    local = _source_file(source, data_dir)
    return file_sha256(local) if local is not None else None


def _source_file(source: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The local file a string source reads: the data dir's copy of c4/wikitext2 (as the loaders choose
    it), or the file given; None for the Hub, ``self`` and HF datasets."""
    key = source.strip().lower()
    if key in ("c4", "wikitext2"):
        try:
            d = resolve_data_dir(data_dir)
        except CalibrationError:
            return None
        return local_copy(key, d)
    if key == "self":
        return None
    path = Path(source).expanduser()
    return path if path.is_file() else None


def get_calibration(
    source: Any,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    model: torch.nn.Module | None = None,
) -> torch.LongTensor:
    """Draw ``nsamples`` calibration windows of ``seqlen`` tokens; returns ``[nsamples, seqlen]`` int64 on CPU.

    ``source`` is one of:

    * ``"c4"``: documents of the C4 calibration shard, as SparseGPT/Wanda (``allenai/c4``,
      ``en/c4-train.00000-of-01024.json.gz``); offline ``<data_dir>/c4/c4_validation_2k.jsonl``.
    * ``"wikitext2"``: the WikiText-2 train split as one stream (rows joined with ``" "`` as in the
      reference code); offline the data dir's train split, else its valid split (logged).
    * a ``.txt`` (one stream), ``.jsonl``/``.json``/``.parquet`` (records with ``text_field``, or chat
      records with ``messages`` rendered by ``tokenizer.apply_chat_template``) path.
    * an HF dataset ``"name[:config][:split]"`` (split defaults to ``train``), records as above.
    * ``"self"``: sequences sampled by ``model`` from BOS (``top_p=0.95``, ``temperature=1``).
    * pre-tokenized ids: a LongTensor ``[n, L]`` or ``[L]``, a list of token-id lists, or a
      DataLoader/iterable of tensors, ``{"input_ids": ...}`` dicts or ``(input_ids, target)`` pairs.
      If the first ``nsamples`` rows are at least ``seqlen`` long, each gives one window at a seeded
      random offset; otherwise all rows are concatenated and cut into consecutive windows.
    * a ``datasets.Dataset``: with an ``input_ids`` column, rows of pre-tokenized ids as above; otherwise
      records with ``text_field`` (or chat ``messages``), sampled as documents like C4.

    The same ``seed`` gives the same windows. See the module docstring for the sampling and BOS rules.
    """
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if not is_int(value) or value < 1:
            raise CalibrationError(f"{name} must be an integer >= 1, got {value!r}")
    rng = random.Random(seed)

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        out = _from_string(source, tokenizer, nsamples, seqlen, rng, seed, data_dir, text_field, model)
    elif is_text_dataset(source):
        require_tokenizer(tokenizer, describe_source(source))
        out = sample_documents(dataset_docs(source, text_field, tokenizer, describe_source(source)),
                               tokenizer, nsamples, seqlen, rng)
    else:
        out = from_pretokenized(source, describe_source(source), nsamples, seqlen, rng)
    return out.to(device="cpu", dtype=torch.long).contiguous()  # [nsamples, seqlen]


def _from_string(
    source: str,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    rng: random.Random,
    seed: int,
    data_dir: str | os.PathLike | None,
    text_field: str,
    model: torch.nn.Module | None,
) -> torch.Tensor:
    """Windows of a source named by a string: ``self``, ``c4``, ``wikitext2``, a file, or an HF dataset spec."""
    key = source.strip().lower()
    if key == "self":
        return self_calibration(model, tokenizer, nsamples, seqlen, seed)

    path = Path(source).expanduser()
    if key not in ("c4", "wikitext2"):
        if path.exists():
            if not path.is_file():
                raise CalibrationError(f"calibration source '{source}' is a folder; pass a file ({CHOICES_MSG})")
        elif looks_like_path(source):
            raise CalibrationError(
                f"calibration file '{source}' does not exist; check the path, or use one of: {CHOICES_MSG}"
            )
        elif "/" not in source and ":" not in source:
            close = difflib.get_close_matches(key, NAMED_SOURCES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CalibrationError(f"unknown calibration source '{source}'; choose one of: {CHOICES_MSG}{hint}")

    require_tokenizer(tokenizer, source)
    if key == "c4":
        return sample_documents(c4_docs(data_dir), tokenizer, nsamples, seqlen, rng)
    if key == "wikitext2":
        name, text = wikitext2_text(data_dir)
        return sample_stream(name, text, tokenizer, nsamples, seqlen, rng)
    if path.is_file():
        return from_file(path, source, tokenizer, nsamples, seqlen, rng, text_field)
    return sample_documents(hf_docs(source, text_field, tokenizer), tokenizer, nsamples, seqlen, rng)


def is_pretokenized(source: Any) -> bool:
    """Whether ``source`` holds token ids (anything but a name, a path or a ``datasets.Dataset`` of text)."""
    return not isinstance(source, (str, os.PathLike)) and not is_text_dataset(source)


def calibration_tokens(config, model, tokenizer, calibration: Any = None) -> tuple[torch.Tensor, dict]:
    """``(input_ids [nsamples, seqlen], description)`` from ``calibration`` or ``config.calib``.

    Pre-tokenized ``calibration`` (a tensor, token lists, a DataLoader or Dataset of ``input_ids``) is used as
    given where ``config`` leaves ``nsamples``/``seqlen`` unset: its own row count and row length
    (:func:`~.tokens.shape_as_given`); settings given explicitly are kept and validated against it.

    The description names the source and fingerprints what was read (``data_sha256``: the local file's
    bytes, None for the Hub and pre-tokenized sources; ``windows_sha256``: the windows drawn), never a path.
    """
    source = config.calib if calibration is None else calibration
    nsamples, seqlen = config.nsamples, config.seqlen
    unset, given = {"nsamples", "seqlen"} - config.model_fields_set, None
    if unset and is_pretokenized(source):  # the tokens handed over are used as they are given
        given = shape_as_given(source, describe_source(source), None if "nsamples" in unset else nsamples,
                               None if "seqlen" in unset else seqlen, model_context(model))
        if given is not None:
            nsamples, seqlen = given
    seqlen = effective_seqlen(model, seqlen)
    ids = get_calibration(
        source, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=config.seed,
        data_dir=config.data_dir, text_field=config.text_field, model=model,
    )
    name = describe_source(source, config.data_dir)
    if given is not None:  # used as given
        warn_if_few(ids, name)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
        raise CalibrationError(f"calibration token id {bad} of {name} is outside the model's vocabulary "
                               f"(ids 0..{vocab - 1}); tokenize with the model's own tokenizer")
    desc = {"source": name,
            "data_sha256": source_fingerprint(source, config.data_dir),
            "windows_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
            "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": config.seed}
    return ids, desc
