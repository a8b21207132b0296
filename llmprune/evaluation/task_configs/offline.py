"""Offline documents for the lm-eval task configs in this folder.

Every task YAML here includes ``_offline.yaml``, which sets ``custom_dataset: !function offline.load``.
lm-eval 0.4.13 calls that hook instead of ``datasets.load_dataset`` as
``load(**task_metadata, **dataset_kwargs)`` (``ConfigurableTask.download`` in ``lm_eval/api/task.py``),
so ``dataset_kwargs.offline_task`` in each YAML names the reader below, and a ``data_dir`` key in the
run-time metadata (``lm_eval --metadata '{"data_dir": "/path/to/data"}'``,
``TaskManager(metadata={"data_dir": ...})``) picks the data folder before ``$LLMPRUNE_DATA_DIR``.
The folder is read at run time and is laid out like ``shared/data`` (see its README.md).

Each reader returns the evaluation split in the record schema of the Hub dataset that lm-eval's
official config loads, so the official ``doc_to_text``/``doc_to_target``/``doc_to_choice`` apply
unchanged. The other splits the official config names (``train``, and ``validation`` where the
evaluation split is ``test``) have no offline copy; they are present but empty, and ``OfflineSampler``
turns a few-shot request on them into an error that says so. The one documented difference is
HellaSwag: see ``split_hellaswag_ctx``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from lm_eval.api.samplers import ContextSampler

__all__ = [
    "DATA_DIR_ENV",
    "OFFLINE_TASKS",
    "OfflineDataError",
    "OfflineSampler",
    "dataset_dict",
    "load",
    "records",
    "resolve_data_dir",
    "split_hellaswag_ctx",
]

DATA_DIR_ENV = "LLMPRUNE_DATA_DIR"
SPLITS = ("train", "validation", "test")
FIX_HINT = (
    f"set {DATA_DIR_ENV}=/path/to/data (a folder laid out like shared/data, e.g. ../shared/data), "
    "or pass the folder as task metadata: lm_eval ... --metadata '{\"data_dir\": \"/path/to/data\"}', "
    "TaskManager(include_path=..., metadata={\"data_dir\": ...}) in Python, --data-dir in eval/check_tasks.py"
)


class OfflineDataError(FileNotFoundError):
    """The offline data folder or one of its files is missing; the message names the path and the fix."""


# ----------------------------------------------------------------------------------------------
# lm-eval hooks
# ----------------------------------------------------------------------------------------------


def load(offline_task: str | None = None, data_dir: str | os.PathLike | None = None, **_: Any) -> datasets.DatasetDict:
    """``custom_dataset`` hook: the offline evaluation split of ``offline_task``, other splits empty.

    Other keyword arguments are the rest of the task metadata (``version``, ``config_source``, and
    under the ``lm_eval`` CLI the ``--model_args`` too); they are ignored.
    """
    if offline_task not in OFFLINE_TASKS:
        raise OfflineDataError(
            f"unknown offline_task {offline_task!r} in the task's dataset_kwargs; "
            f"choose one of: {', '.join(OFFLINE_TASKS)}"
        )
    return dataset_dict(offline_task, records(offline_task, data_dir))


def dataset_dict(offline_task: str, docs: list[dict]) -> datasets.DatasetDict:
    """``docs`` as the official evaluation split of ``offline_task``; the other split names exist, empty."""
    split = OFFLINE_TASKS[offline_task][0]
    ds = datasets.Dataset.from_list(docs)
    # Every split name exists so that the official split keys work unchanged; only one has documents.
    return datasets.DatasetDict({name: ds if name == split else ds.select([]) for name in SPLITS})


class OfflineSampler(ContextSampler):
    """lm-eval's default few-shot sampler, failing clearly when the few-shot split has no documents.

    The official configs draw few-shot examples from the Hub train split (LAMBADA: from its test
    split, which is here). The data dir holds evaluation splits only, so a k-shot run would otherwise
    stop on ``assert self.df`` with "no documents available for sampling".
    """

    def sample(self, n: int, eval_doc: dict | None = None, df: Any = None, **kwargs: Any):
        if n > 0 and not (df or self.df):
            raise OfflineDataError(
                f"num_fewshot={n} needs the official few-shot split (the Hub train split), which has no "
                "offline copy in the data dir; run zero-shot (num_fewshot 0, the official default), or use "
                "lm-eval's own task (without --include_path eval/tasks) where the Hub is reachable"
            )
        return super().sample(n, eval_doc=eval_doc, df=df, **kwargs)


# ----------------------------------------------------------------------------------------------
# Data dir and files
# ----------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The data folder and where it came from: ``data_dir`` (task metadata) first, else ``$LLMPRUNE_DATA_DIR``."""
    if data_dir is not None and str(data_dir) != "":
        origin = "metadata data_dir"
    elif os.environ.get(DATA_DIR_ENV):
        data_dir, origin = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    else:
        raise OfflineDataError(f"no offline data dir: neither metadata data_dir nor ${DATA_DIR_ENV} is set; {FIX_HINT}")
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise OfflineDataError(f"data dir '{path}' (from {origin}) is not a folder; {FIX_HINT}")
    return path, origin


def records(offline_task: str, data_dir: str | os.PathLike | None = None, **reader_kwargs: Any) -> list[dict]:
    """The evaluation documents of ``offline_task`` in the official Hub schema, in file order."""
    _split, files, reader = OFFLINE_TASKS[offline_task]
    root, origin = resolve_data_dir(data_dir)
    paths = [root / rel for rel in files]
    for path in paths:
        if not path.is_file():
            raise OfflineDataError(
                f"{offline_task}: expected offline file '{path}' is missing (data dir from {origin}); {FIX_HINT}"
            )
    return reader(*paths, **reader_kwargs)


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _same_length(task: str, a: Path, n_a: int, b: Path, n_b: int) -> None:
    if n_a != n_b:
        raise OfflineDataError(f"{task}: '{a}' has {n_a} records but '{b}' has {n_b}; the two files must pair line by line")


# ----------------------------------------------------------------------------------------------
# Readers: local files -> the Hub schema of the official config
# ----------------------------------------------------------------------------------------------


def _piqa(docs_path: Path, labels_path: Path) -> list[dict]:
    """``baber/piqa`` validation: goal, sol1, sol2, label (int 0/1 from valid-labels.lst)."""
    docs, labels = _jsonl(docs_path), _lines(labels_path)
    _same_length("piqa", docs_path, len(docs), labels_path, len(labels))
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)]


def _arc(path: Path) -> list[dict]:
    """``allenai/ai2_arc`` test: the local file already has the Hub schema (id, question, choices{text,label}, answerKey)."""
    return [
        {"id": d["id"], "question": d["question"],
         "choices": {"text": list(d["choices"]["text"]), "label": list(d["choices"]["label"])},
         "answerKey": d["answerKey"]}
        for d in _jsonl(path)
    ]


def _boolq(path: Path) -> list[dict]:
    """``aps/super_glue`` boolq validation: question, passage, idx, label (0 = False, 1 = True)."""
    return [
        {"question": d["question"], "passage": d["passage"], "idx": i, "label": int(bool(d["answer"]))}
        for i, d in enumerate(_jsonl(path))
    ]


def _winogrande(docs_path: Path, labels_path: Path) -> list[dict]:
    """``allenai/winogrande`` winogrande_xl validation: sentence, option1, option2, answer ("1"/"2" string)."""
    docs, labels = _jsonl(docs_path), _lines(labels_path)
    _same_length("winogrande", docs_path, len(docs), labels_path, len(labels))
    out = []
    for i, (d, y) in enumerate(zip(docs, labels)):
        if str(d.get("answer", y)) != y:
            raise OfflineDataError(
                f"winogrande: record {i} of '{docs_path}' has answer {d['answer']!r} but '{labels_path}' says {y!r}"
            )
        out.append({"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": y})
    return out


def _openbookqa(path: Path) -> list[dict]:
    """``allenai/openbookqa`` main test: id, question_stem, choices{text,label}, answerKey."""
    return [
        {"id": d["id"], "question_stem": d["question"]["stem"],
         "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                     "label": [c["label"] for c in d["question"]["choices"]]},
         "answerKey": d["answerKey"]}
        for d in _jsonl(path)
    ]


def _lambada(path: Path) -> list[dict]:
    """``EleutherAI/lambada_openai`` default test: text."""
    return [{"text": d["text"]} for d in _jsonl(path)]


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """Rebuild HellaSwag's ``(ctx_a, ctx_b)`` from the joined, preprocessed ``ctx`` of the local copy.

    lm-eval's official prompt is ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``;
    the local copy keeps only ``ctx = ctx_a + " " + ctx_b``. In HellaSwag, ``ctx_b`` is empty for WikiHow
    items and, for ActivityNet items, the lower-case start of the next sentence (``"the lady"``). In the
    10,042 local validation items every WikiHow context ends with ``.`` and no ActivityNet context does
    (their last sentence is unfinished), every ActivityNet context has a ``". "`` before that fragment,
    and every earlier sentence starts with a non-lower-case character. So: a context that ends with
    ``.`` has ``ctx_b = ""``; otherwise ``ctx_b`` is the text after the last ``". "``.
    This is exact unless an original ``ctx_b`` itself contains ``". "`` (not detectable from the file).
    """
    if ctx.endswith(".") or ". " not in ctx:
        return ctx, ""
    ctx_a, ctx_b = ctx.rsplit(". ", 1)
    return ctx_a + ".", ctx_b


def _hellaswag(path: Path, rebuild_ctx_b: bool = True) -> list[dict]:
    """``Rowan/hellaswag`` validation: activity_label, ctx_a, ctx_b, ctx, endings, label (string).

    The local copy was preprocessed by llama.cpp's extractor (see hellaswag/SOURCE.txt), so the
    official ``process_docs`` runs on already-preprocessed text; ``ind``, ``source_id``, ``split`` and
    ``split_type`` do not exist locally and are left out (no prompt reads them). ``rebuild_ctx_b=False``
    gives the literal mapping ``ctx_a = ctx, ctx_b = ""`` that eval/check_tasks.py compares against.
    """
    out = []
    for d in _jsonl(path):
        ctx_a, ctx_b = split_hellaswag_ctx(d["ctx"]) if rebuild_ctx_b else (d["ctx"], "")
        out.append({"activity_label": d["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": d["ctx"],
                    "endings": list(d["endings"]), "label": str(d["label"])})
    return out


# offline_task -> (evaluation split of the official config, files under the data dir, reader)
OFFLINE_TASKS: dict[str, tuple[str, tuple[str, ...], Callable[..., list[dict]]]] = {
    "piqa": ("validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    "arc_easy": ("test", ("arc_easy/ARC-Easy-Test.jsonl",), _arc),
    "arc_challenge": ("test", ("arc_challenge/ARC-Challenge-Test.jsonl",), _arc),
    "hellaswag": ("validation", ("hellaswag/hellaswag_val_preprocessed.jsonl",), _hellaswag),
    "winogrande": ("validation", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), _winogrande),
    "boolq": ("validation", ("boolq/dev.jsonl",), _boolq),
    "openbookqa": ("test", ("openbookqa/test.jsonl",), _openbookqa),
    "lambada_openai": ("test", ("lambada_openai/lambada_test.jsonl",), _lambada),
}
