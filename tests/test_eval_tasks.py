"""The offline lm-eval task configs (package data in llmprune/evaluation/task_configs/, linked from
eval/tasks/): they resolve under the official names, read the data dir, keep the official documents
and labels, and score a handful of examples on a tiny model through ``llmprune.evaluate``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import llmprune
from llmprune.evaluation import TaskError, offline_task_names, offline_tasks_dir

lm_eval = pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "llmprune" / "evaluation" / "task_configs"
DOCS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
        "boolq": 3270, "openbookqa": 500, "lambada_openai": 5153}
METRICS = {"piqa": {"acc", "acc_norm"}, "arc_easy": {"acc", "acc_norm"}, "arc_challenge": {"acc", "acc_norm"},
           "hellaswag": {"acc", "acc_norm"}, "winogrande": {"acc"}, "boolq": {"acc"},
           "openbookqa": {"acc", "acc_norm"}, "lambada_openai": {"perplexity", "acc"}}


@pytest.fixture(scope="module")
def offline(shared_data_dir):
    if str(TASKS_DIR) not in sys.path:
        sys.path.insert(0, str(TASKS_DIR))
    spec = importlib.util.spec_from_file_location("offline", TASKS_DIR / "offline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def task_dict(shared_data_dir, monkeypatch_module):
    from lm_eval.tasks import TaskManager

    monkeypatch_module.setenv("LLMPRUNE_DATA_DIR", str(shared_data_dir))
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return manager.load(sorted(DOCS))["tasks"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_offline_configs_are_found_by_name(monkeypatch):
    monkeypatch.delenv("LLMPRUNE_TASKS_DIR", raising=False)
    assert offline_tasks_dir() == TASKS_DIR  # the package's own folder, found without a checkout
    assert offline_task_names() == sorted(DOCS)
    assert (REPO / "eval" / "tasks").resolve() == TASKS_DIR  # commands and docs of a checkout keep working
    monkeypatch.setenv("LLMPRUNE_TASKS_DIR", str(REPO / "eval" / "tasks"))
    assert offline_tasks_dir() == REPO / "eval" / "tasks" and offline_task_names() == sorted(DOCS)


def test_offline_configs_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llmprune"]
    root = REPO / "llmprune"
    shipped = {p for g in globs for p in root.glob(g)}
    assert {p for p in TASKS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts} <= shipped


def test_offline_configs_override_the_official_ones():
    """With lm-eval's own tasks indexed too, the include path wins for every name."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR))
    index = manager.task_index
    for name in DOCS:
        assert Path(index[name]["yaml_path"] if isinstance(index[name], dict) else index[name].yaml_path
                    ).resolve().is_relative_to(TASKS_DIR)


def test_documents_and_first_prompts(task_dict):
    for name, n in DOCS.items():
        assert len(task_dict[name].eval_docs) == n, name
    piqa = task_dict["piqa"]
    doc = piqa.eval_docs[0]
    assert piqa.doc_to_text(doc) == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.doc_to_target(doc) == 0
    hs = task_dict["hellaswag"]
    assert hs.doc_to_text(hs.eval_docs[0]) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(hs.eval_docs[0]) == 3
    assert task_dict["lambada_openai"].doc_to_target(task_dict["lambada_openai"].eval_docs[0]) == " signs"
    assert task_dict["boolq"].doc_to_target(task_dict["boolq"].eval_docs[0]) == 0
    assert task_dict["openbookqa"].doc_to_target(task_dict["openbookqa"].eval_docs[0]) == 1
    assert task_dict["arc_challenge"].doc_to_target(task_dict["arc_challenge"].eval_docs[0]) == 2


def test_label_distributions(task_dict):
    from collections import Counter

    boolq = Counter(d["label"] for d in task_dict["boolq"].eval_docs)
    assert (boolq[1], boolq[0]) == (2033, 1237)
    hs = Counter(int(d["label"]) for d in task_dict["hellaswag"].eval_docs)
    assert [hs[i] for i in range(4)] == [2515, 2485, 2584, 2458]
    for name in ("arc_easy", "arc_challenge"):
        assert all(d["answerKey"] in d["choices"]["label"] for d in task_dict[name].eval_docs)
    assert {d["answer"] for d in task_dict["winogrande"].eval_docs} == {"1", "2"}


def test_missing_data_dir_names_the_fix(offline, tmp_path, monkeypatch):
    monkeypatch.delenv("LLMPRUNE_DATA_DIR", raising=False)
    with pytest.raises(offline.OfflineDataError, match="LLMPRUNE_DATA_DIR"):
        offline.load(offline_task="piqa")
    with pytest.raises(offline.OfflineDataError, match=str(tmp_path / "piqa" / "valid.jsonl")):
        offline.load(offline_task="piqa", data_dir=tmp_path)


def test_hellaswag_ctx_b_is_rebuilt(offline):
    assert offline.split_hellaswag_ctx("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert offline.split_hellaswag_ctx("Wash the car.") == ("Wash the car.", "")


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("name", sorted(DOCS))
def test_each_task_scores_a_tiny_model(name, tiny_lm, shared_data_dir):
    model, tok = tiny_lm
    r = llmprune.evaluate(model, tok, tasks=[name], limit=4, batch_size="4", data_dir=str(shared_data_dir),
                          progress=False)
    assert {k.split("/", 1)[1] for k in r.metrics} == METRICS[name]
    assert r.tasks[name]["docs"] == 4 and r.tasks[name]["source"] == "offline:eval/tasks"
    assert all(0 <= v <= 1 for k, v in r.metrics.items() if not k.endswith("perplexity"))


def test_few_shot_needs_the_official_train_split(tiny_lm, shared_data_dir):
    model, tok = tiny_lm
    with pytest.raises(Exception, match="few-shot|fewshot|train"):
        llmprune.evaluate(model, tok, tasks=["arc_easy"], num_fewshot=1, limit=1, data_dir=str(shared_data_dir),
                          progress=False)


def test_unknown_task_names_the_offline_ones(tiny_lm, shared_data_dir):
    model, tok = tiny_lm
    with pytest.raises(TaskError, match="Offline configs: arc_challenge, arc_easy"):
        llmprune.evaluate(model, tok, tasks=["arc_eazy"], task_source="local", data_dir=str(shared_data_dir),
                          progress=False)


def test_check_tasks_script_agrees_with_the_official_configs(shared_data_dir):
    spec = importlib.util.spec_from_file_location("check_tasks", REPO / "eval" / "check_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--data-dir", str(shared_data_dir), "--limit", "40"]) == 0
