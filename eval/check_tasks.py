"""Check the offline lm-eval tasks in eval/tasks against lm-eval's official ones, document by document.

For every task, two ConfigurableTask objects over the same local files:
  official  lm-eval's own YAML (the installed lm-eval's tasks/ folder), built from its config dict,
            with the Hub download replaced by the local documents mapped to the official Hub schema
            (by reference_records below, written apart from eval/tasks/offline.py so that the two
            mappings check each other);
  offline   the task that TaskManager(include_path="eval/tasks") resolves the same name to.
It compares their configs field by field and, for every document, the instance requests (context,
continuation), doc_to_text/doc_to_target/doc_to_choice (gold and number of choices), the
decontamination query, and process_results on the same synthetic log-likelihoods (the metrics).

    python eval/check_tasks.py --data-dir ../shared/data [--tasks piqa hellaswag ...] [--limit N]

Exit status 1 on any mismatch. HellaSwag: the local copy has no ctx_a/ctx_b, so the official side
gets the literal mapping (ctx_a = ctx, ctx_b = ""), while the offline task rebuilds ctx_b and the
official process_docs capitalises its first letter; documents that differ only in that letter are
counted as "explained" and reported separately (see eval/tasks/README.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval builds requests under a tqdm bar per task

import argparse
import dataclasses
import functools
import inspect
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from lm_eval import utils as lm_eval_utils
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager itself uses
from lm_eval.utils import apply_template

TASKS_DIR = (Path(__file__).resolve().parent / "tasks").resolve()  # a link to llmprune/evaluation/task_configs
TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "lambada_openai")
# Documents in the official Hub split each task evaluates on.
OFFICIAL_DOCS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
                 "boolq": 3270, "openbookqa": 500, "lambada_openai": 5153}
# TaskConfig fields that must be equal; the rest differ by design (where the documents come from).
COMPARED_FIELDS = (
    "output_type", "training_split", "validation_split", "test_split", "fewshot_split", "process_docs",
    "doc_to_text", "doc_to_target", "doc_to_choice", "process_results", "use_prompt", "description",
    "target_delimiter", "fewshot_delimiter", "num_fewshot", "metric_list", "generation_kwargs", "repeats",
    "filter_list", "should_decontaminate", "doc_to_decontamination_query", "gen_prefix",
)
EXPECTED_DIFFERENT = ("dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "fewshot_config.sampler", "tag")


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split()


def reference_records(name: str, root: Path) -> list[dict]:
    """The local files in the official Hub schema, written apart from eval/tasks/offline.py on purpose:
    a mapping error there (a flipped label, a wrong field) then shows up as a mismatch here.
    HellaSwag gets the literal mapping ctx_a = ctx, ctx_b = "" (the local copy has no split)."""
    if name == "piqa":
        rows, labels = _jsonl(root / "piqa/valid.jsonl"), _labels(root / "piqa/valid-labels.lst")
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
                for r, y in zip(rows, labels, strict=True)]
    if name in ("arc_easy", "arc_challenge"):
        stem = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl"}
        return _jsonl(root / stem[name])  # already id, question, choices{text,label}, answerKey
    if name == "hellaswag":
        return [{"activity_label": r["activity_label"], "ctx_a": r["ctx"], "ctx_b": "", "ctx": r["ctx"],
                 "endings": r["endings"], "label": str(r["label"])}
                for r in _jsonl(root / "hellaswag/hellaswag_val_preprocessed.jsonl")]
    if name == "winogrande":
        rows, labels = _jsonl(root / "winogrande/dev.jsonl"), _labels(root / "winogrande/dev-labels.lst")
        return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y}
                for r, y in zip(rows, labels, strict=True)]
    if name == "boolq":  # super_glue boolq: label ClassLabel(names=["False", "True"])
        return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": 1 if r["answer"] else 0}
                for i, r in enumerate(_jsonl(root / "boolq/dev.jsonl"))]
    if name == "openbookqa":
        return [{"id": r["id"], "question_stem": r["question"]["stem"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]},
                 "answerKey": r["answerKey"]}
                for r in _jsonl(root / "openbookqa/test.jsonl")]
    if name == "lambada_openai":
        return _jsonl(root / "lambada_openai/lambada_test.jsonl")
    raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")


def official_task(name: str, data_dir: Path, official_index: dict) -> ConfigurableTask:
    """lm-eval's own config for ``name``, built as lm-eval builds it, with the local documents in place of the Hub."""
    yaml_path = official_index[name].yaml_path
    cfg = load_yaml(yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):  # structural keys TaskFactory also drops
        cfg.pop(key, None)
    # The evaluation split is the one lm-eval's eval_docs picks: test if the config names one, else validation.
    eval_split = cfg.get("test_split") or cfg["validation_split"]
    docs = datasets.Dataset.from_list(reference_records(name, data_dir))
    named = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
    dataset = datasets.DatasetDict({s: docs if s == eval_split else docs.select([]) for s in named})
    cfg["custom_dataset"] = lambda **_: dataset
    cfg["metadata"] = {**(cfg.get("metadata") or {}), "config_source": str(yaml_path)}
    return ConfigurableTask(config=cfg)


def _norm(value: Any) -> Any:
    """A comparable form of a config value: functions by source, dataclasses as dicts."""
    if callable(value):
        try:
            return ("function", inspect.getsource(value))
        except (OSError, TypeError):
            return ("function", getattr(value, "__qualname__", repr(value)))
    if dataclasses.is_dataclass(value):
        return {f.name: _norm(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def config_differences(official: ConfigurableTask, offline: ConfigurableTask) -> list[str]:
    out = []
    for field in COMPARED_FIELDS:
        a, b = _norm(official.config[field]), _norm(offline.config[field])
        if a != b:
            out.append(f"{field}: official {a!r} != offline {b!r}")
    fa, fb = _norm(official.config.fewshot_config), _norm(offline.config.fewshot_config)
    for key in sorted(set(fa) | set(fb)):
        if key != "sampler" and fa.get(key) != fb.get(key):
            out.append(f"fewshot_config.{key}: official {fa.get(key)!r} != offline {fb.get(key)!r}")
    va, vb = (official.config.metadata or {}).get("version"), (offline.config.metadata or {}).get("version")
    if va != vb:
        out.append(f"metadata.version: official {va!r} != offline {vb!r}")
    for attr in ("_metric_fn_list", "_aggregation_list", "_higher_is_better"):
        a, b = _norm(getattr(official, attr)), _norm(getattr(offline, attr))
        if a != b:
            out.append(f"{attr}: official {a!r} != offline {b!r}")
    return out


def requests_by_doc(task: ConfigurableTask, limit: int | None) -> dict[int, list]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = defaultdict(list)
    for inst in task.instances:
        by_doc[inst.doc_id].append(inst)
    return {k: sorted(v, key=lambda i: i.idx) for k, v in by_doc.items()}


def synthetic_results(doc_id: int, n: int) -> list[tuple[float, bool]]:
    """Fixed fake (loglikelihood, is_greedy) per request: the same inputs give the same metrics on both sides."""
    return [(-1.0 - 0.5 * ((7 * doc_id + 3 * i) % 5) - 0.01 * i, (doc_id + i) % 2 == 0) for i in range(n)]


def decontamination_query(task: ConfigurableTask, doc: dict) -> Any:
    """The decontamination text. lm-eval 0.4.13's doc_to_decontamination_query runs ast.literal_eval on a
    rendered template, which raises for ARC's and LAMBADA's; compare the rendered template instead."""
    if not task.config.should_decontaminate:
        return None
    query = task.config.doc_to_decontamination_query
    if isinstance(query, str) and query not in task.features:
        return apply_template(query, doc)
    return task.doc_to_decontamination_query(doc)


def doc_view(task: ConfigurableTask, inst_list: list) -> dict[str, Any]:
    doc = inst_list[0].doc
    view = {
        "requests": [tuple(i.arguments) for i in inst_list],
        "doc_to_text": task.doc_to_text(doc) if task.multiple_input else None,  # winogrande: the gold index
        "doc_to_target": task.doc_to_target(doc),
        "choices": task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None,
        "decontamination_query": decontamination_query(task, doc),
        "metrics": task.process_results(doc, synthetic_results(inst_list[0].doc_id, len(inst_list))),
    }
    view["n_choices"] = len(view["choices"]) if view["choices"] is not None else None
    return view


def capitalised_ctx_b(official: dict, offline: dict) -> bool:
    """The one HellaSwag difference the offline rebuild explains: one letter of the context upper-cased."""
    if {k: v for k, v in official.items() if k != "requests"} != {k: v for k, v in offline.items() if k != "requests"}:
        return False
    if len(official["requests"]) != len(offline["requests"]):
        return False
    for (ctx_a, cont_a), (ctx_b, cont_b) in zip(official["requests"], offline["requests"]):
        if cont_a != cont_b or len(ctx_a) != len(ctx_b):
            return False
        diff = [p for p, (x, y) in enumerate(zip(ctx_a, ctx_b)) if x != y]
        if len(diff) != 1 or not (ctx_a[diff[0]].islower() and ctx_b[diff[0]] == ctx_a[diff[0]].upper()):
            return False
    return True


def first_difference(official: dict, offline: dict) -> str:
    for key in official:
        if official[key] != offline[key]:
            a, b = official[key], offline[key]
            if key == "requests":
                for i, (x, y) in enumerate(zip(a, b)):
                    if x != y:
                        return f"request {i}: official {x!r:.300} != offline {y!r:.300}"
            return f"{key}: official {a!r:.300} != offline {b!r:.300}"
    return "?"


def check_task(name: str, data_dir: Path, tm: TaskManager, official_index: dict,
               limit: int | None, explain: Callable | None) -> dict[str, Any]:
    offline = tm.load(name)["tasks"][name]
    source = Path(offline.config.metadata["config_source"]).resolve()
    official = official_task(name, data_dir, official_index)

    row: dict[str, Any] = {"task": name, "source": source, "config": config_differences(official, offline)}
    if not source.is_relative_to(TASKS_DIR):
        row["config"].insert(0, f"name resolved to {source}, not to a config under {TASKS_DIR}")
    if name == "hellaswag":
        wikihow = sum(1 for d in official.eval_docs if d["ctx"].endswith("."))
        row["note"] = (
            f"not checkable offline: the {wikihow} WikiHow docs (ctx_b empty) come from llama.cpp's extractor, which "
            "drops a [step]/[title]/[substeps] tag at the start of an ending together with the space after it; "
            "lm-eval's preprocess keeps that space, so such official continuations start with two spaces "
            "(see eval/tasks/README.md)"
        )
    row["split"] = official.config.test_split if official.has_test_docs() else official.config.validation_split
    row["docs"], row["expected_docs"] = len(offline.eval_docs), OFFICIAL_DOCS[name]

    req_a, req_b = requests_by_doc(official, limit), requests_by_doc(offline, limit)
    row["compared"] = len(req_a)
    row["requests"] = sum(len(v) for v in req_b.values())
    row["identical"] = row["explained"] = 0
    row["mismatches"], row["first_mismatch"], row["first_explained"] = 0, None, None
    for doc_id in sorted(set(req_a) | set(req_b)):
        if doc_id not in req_a or doc_id not in req_b:
            row["mismatches"] += 1
            row["first_mismatch"] = row["first_mismatch"] or f"doc {doc_id} has requests on one side only"
            continue
        a, b = doc_view(official, req_a[doc_id]), doc_view(offline, req_b[doc_id])
        if a == b:
            row["identical"] += 1
        elif explain is not None and explain(a, b):
            row["explained"] += 1
            row["first_explained"] = row["first_explained"] or f"doc {doc_id}: {first_difference(a, b)}"
        else:
            row["mismatches"] += 1
            row["first_mismatch"] = row["first_mismatch"] or f"doc {doc_id}: {first_difference(a, b)}"
    return row


def print_report(rows: list[dict], limit: int | None) -> None:
    header = ("task", "split", "docs", "official", "compared", "requests", "identical", "explained", "mismatches", "config")
    table = [header] + [
        (r["task"], r["split"], str(r["docs"]), str(r["expected_docs"]), str(r["compared"]), str(r["requests"]),
         str(r["identical"]), str(r["explained"]), str(r["mismatches"]), "same" if not r["config"] else f"{len(r['config'])} diff")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print(f"documents compared: {'all' if limit is None else f'first {limit} per task'}; "
          f"config fields that differ by design: {', '.join(EXPECTED_DIFFERENT)}, metadata other than version")
    for r in rows:
        print(f"{r['task']}: offline config {r['source']}")
        for d in r["config"]:
            print(f"  CONFIG MISMATCH {d}")
        if limit is None and r["docs"] != r["expected_docs"]:
            print(f"  DOCS MISMATCH {r['docs']} offline documents, the official split has {r['expected_docs']}")
        if r["first_mismatch"]:
            print(f"  first mismatch: {r['first_mismatch']}")
        if r.get("note"):
            print(f"  {r['note']}")
        if r["explained"]:
            print(f"  explained (ctx_b rebuilt and capitalised, official side has ctx_b = \"\"): {r['explained']} docs; "
                  f"first: {r['first_explained']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR"),
                        help="Folder laid out like shared/data (default: $LLMPRUNE_DATA_DIR).")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK",
                        help=f"Tasks to check (default: all of {', '.join(TASKS)}).")
    parser.add_argument("--limit", type=int, default=None, help="Compare only the first N documents per task.")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("no data dir: pass --data-dir /path/to/data or set LLMPRUNE_DATA_DIR (e.g. ../shared/data)")
    data_dir = Path(args.data_dir).expanduser().resolve()

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task override / custom-dataset notices
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # "couldn't be hashed" notice for process_docs' inner function
    # Speed only (both sides alike): lm-eval compiles the Jinja template anew on every render.
    lm_eval_utils.env.from_string = functools.lru_cache(maxsize=None)(lm_eval_utils.env.from_string)

    official_index = TaskManager().task_index
    tm = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(data_dir)})
    rows = []
    for name in args.tasks:
        explain = capitalised_ctx_b if name == "hellaswag" else None
        rows.append(check_task(name, data_dir, tm, official_index, args.limit, explain))
    print_report(rows, args.limit)
    failed = any(r["mismatches"] or r["config"] or (args.limit is None and r["docs"] != r["expected_docs"]) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
