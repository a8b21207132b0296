"""The model card (``README.md``) of a pruned checkpoint, made from the checkpoint itself.

Everything in the card is read from the folder: ``config.json``'s ``llmprune`` block (method,
pattern, sparsity, allocation, refinement, activation thresholds, calibration, seed, versions,
compressed layout) and ``llmprune_eval.json`` (results), so the card cannot disagree with them.
The front matter is built with ``huggingface_hub``'s ``ModelCardData``/``EvalResult``; no YAML
is written by hand. No local path and no token ever enter the card.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..evaluation.results import load_all
from ..report import EVAL_FILE
from ..runtime.files import write_text_atomic
from .folder import REPORT_FILE
from .format import LAYOUT_KEY, read_config

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
KNOWN_LICENSES = {EMBEDDED_BASE: "apache-2.0", "HuggingFaceTB/SmolLM2-135M": "apache-2.0"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATASETS = {  # how perplexity sources are named on the Hub, for model-index
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test"),
    "c4": ("allenai/c4", "en", "validation"),
}


def recorded_model(folder: Path, meta: dict[str, Any]) -> str | None:
    """What the run loaded: ``llmprune_report.json``'s ``model`` (``embedded:...`` for the default),
    else the ``model`` setting; None for a model pruned in memory."""
    path = folder / REPORT_FILE
    if path.is_file():
        try:
            model = json.loads(path.read_text()).get("model")
            if isinstance(model, str) and model:
                return model
        except json.JSONDecodeError:
            pass
    model = (meta.get("config") or {}).get("model")
    return model if isinstance(model, str) else None


def base_model_of(model: str | None) -> str | None:
    """The base model's Hub id when the run recorded one (the embedded default counts), else None:
    a local folder is not a Hub id and its path is never written into a card."""
    if model is None:
        return None
    if model.startswith("embedded:"):
        return EMBEDDED_BASE
    if _HUB_ID.match(model) and not Path(model).expanduser().exists():
        return model
    return None


def _model_label(model: str | None) -> str:
    return base_model_of(model) or (Path(model).name if model and not model.startswith("embedded:") else "a model")


def _eval_results(folder: Path) -> tuple[Any, Any]:
    """(pruned, dense) EvalResults from ``llmprune_eval.json``; dense only when the file holds a
    comparison with an unpruned model."""
    path = folder / EVAL_FILE
    if not path.is_file():
        return None, None
    results = load_all(path)
    pruned = next((r for r in results if r.pruning), results[-1])
    dense = next((r for r in results if not r.pruning and r is not pruned), None)
    return pruned, dense


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def _index_entries(metrics: dict[str, float]) -> list[EvalResult]:
    out = []
    for key, value in metrics.items():
        if value is None or value != value:  # NaN: not a result
            continue
        name, metric = key.split("/", 1)
        dataset, config, split = _DATASETS.get(name, (name, None, None))
        out.append(EvalResult(
            task_type="text-generation", dataset_type=dataset, dataset_name=name, dataset_config=config,
            dataset_split=split, metric_type="perplexity" if metric in ("ppl", "perplexity") else metric,
            metric_name=key, metric_value=float(value),
        ))
    return out


def build_card(folder: str | Path, *, license: str | None = None, repo_id: str | None = None) -> ModelCard:
    """The model card of checkpoint ``folder`` (not written; see :func:`write_card`)."""
    folder = Path(folder).expanduser()
    config = read_config(folder)
    meta = config.get("llmprune") or {}
    layout = meta.get(LAYOUT_KEY)
    model = recorded_model(folder, meta)
    base = base_model_of(model)
    method, pattern = meta.get("method", "unknown"), meta.get("pattern", "unstructured")
    pruned, dense = _eval_results(folder)
    tags = ["pruned", "sparse", "llmprune", str(method)]
    if pattern and pattern != "unstructured":
        tags.append(f"{pattern.replace(':', 'of')}-sparsity")
    if layout:
        tags.append("llmprune-compressed")
    if meta.get("activation"):
        tags.append("activation-sparsity")
    structure = meta.get("structure")
    if structure:
        tags = ["pruned", "structured-pruning", "llmprune"]
        removed = structure["decoder_params"]["fraction_removed"]
        label = f"structured-{round(100 * removed)}pct"
    else:
        label = f"{method}-{pattern}"
    if meta.get("recovery"):
        tags.append("distilled" if meta["recovery"].get("method") == "distillation" else "fine-tuned")
    name = repo_id.split("/")[-1] if repo_id else f"{_model_label(model).split('/')[-1]}-{label}"
    data = ModelCardData(
        base_model=base,
        library_name="transformers",
        license=license or KNOWN_LICENSES.get(base or ""),
        tags=tags,
        model_name=name,
        eval_results=_index_entries(pruned.metrics) if pruned is not None and pruned.metrics else None,
    )
    content = f"---\n{data.to_yaml()}\n---\n\n" + _body(name, meta, layout, pruned, dense, model, repo_id)
    return ModelCard(content)


def _structure_section(st: dict) -> list[str]:
    """What structured removal took out: a smaller dense model, and the indices per layer."""
    d, p, per, gone = st["decoder_params"], st["params"], st["per_layer"], st["removal"]
    lines = ["## What was removed", "",
             f"A smaller dense model: {d['fraction_removed']:.1%} of the decoder layers' parameters were removed "
             f"({d['before']:,} -> {d['after']:,}; the whole model {p['before']:,} -> {p['after']:,}). It loads and "
             "runs like any model of its architecture, with no custom code.", ""]
    if gone["layers"]:
        lines.append(f"- decoder layers removed ({(st.get('depth') or {}).get('method')}): {gone['layers']} "
                     "(indices in the original model)")
    for k, what in (("kv_heads", "key/value heads"), ("heads", "query heads"), ("channels", "MLP channels")):
        if per.get(k):
            lines.append(f"- {what} removed from every remaining layer: {per[k]} (chosen by "
                         f"{st.get('width_method')}; indices per layer in `config.json` under "
                         "`llmprune.structure.removal`)")
    return lines + [""]


def _recovery_lines(rec: dict) -> list[str]:
    """What ``llmprune recover`` did after pruning: distilled (or fine-tuned) on what, how long."""
    cfg, data = rec.get("config") or {}, rec.get("data") or {}
    terms = [f"{w} x {name}" for name, w in (("logit KD", cfg.get("kd_weight")), ("SquareHead",
             cfg.get("squarehead_weight")), ("LM loss", cfg.get("lm_weight"))) if w]
    how = "distilled from " + str(rec.get("teacher")) if rec.get("method") == "distillation" else "fine-tuned"
    lines = [f"Then {how} with `llmprune recover`{' (LoRA, merged keeping the zeros)' if cfg.get('lora') else ''}: "
             f"{rec.get('steps')} steps, {rec.get('tokens'):,} tokens of {data.get('source')} (held apart from the "
             f"calibration), loss {' + '.join(terms)}"
             f"{'; the pruned weights stayed zero' if (rec.get('sparsity') or {}).get('revived') == 0 else ''}."]
    if rec.get("evals"):
        lines.append("Perplexity during recovery: " + ", ".join(f"step {e['step']}: {_fmt(e['ppl'])}"
                                                              for e in rec["evals"]) + f" ({cfg.get('eval_ppl')}).")
    return lines + [""]


def _body(name: str, meta: dict, layout: dict | None, pruned, dense, model: str | None, repo_id: str | None) -> str:
    base = base_model_of(model)
    cal = meta.get("calibration") or {}
    cfg = meta.get("config") or {}
    versions = meta.get("versions") or {}
    where = repo_id or "PATH"
    lines = [f"# {name}", "",
             f"{_model_label(model)} pruned one-shot with [llmprune](https://pypi.org/project/llmprune/).", ""]
    if meta.get("recovery"):
        lines += _recovery_lines(meta["recovery"])
    structure = meta.get("structure")
    if structure:
        lines += _structure_section(structure)
    lines += ["## What was done", "", "| setting | value |", "|---|---|"]
    rows = [
        ("method", meta.get("method")), ("pattern", meta.get("pattern")),
        ("target sparsity", meta.get("target_sparsity")),
        ("measured sparsity (pruned weights)", meta.get("measured_sparsity")),
        ("sparsity over all decoder weight matrices", meta.get("decoder_sparsity")),
        ("allocation", meta.get("allocation") or "uniform"), ("refinement", meta.get("refine") or "none"),
        ("reconstruction", meta.get("reconstruct") or "none"), ("compensation", meta.get("compensate") or "none"),
        ("calibration", f"{cal.get('source')}: {cal.get('nsamples')} x {cal.get('seqlen')} tokens"
         if cal else None),
        ("seed", meta.get("seed")), ("masks sha256", meta.get("masks_sha256")),
    ]
    act = meta.get("activation")
    if act:
        rows.append(("activation thresholds", ", ".join(f"{k}: {_fmt(v)}" for k, v in act.items()
                                                        if isinstance(v, (str, int, float)))))
    search = meta.get("search")
    if search:
        kl = search.get("fitness_kl", {})
        rows.append(("search allocation", f"{search.get('chosen')} allocation chosen after {search.get('generations')} "
                     "generations; fitness (KL from the dense model) " + ", ".join(f"{k} {_fmt(v)}" for k, v in kl.items())
                     + "; per-module sparsities in config.json"))
    if cfg.get("dtype"):
        rows.append(("dtype", cfg.get("dtype")))
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]
    if pruned is not None and pruned.metrics:
        lines += ["", "## Results", ""]
        if dense is not None:
            lines += ["| metric | dense | pruned |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(dense.metrics.get(k))} | {_fmt(v)} |" for k, v in pruned.metrics.items()]
        else:
            lines += ["| metric | pruned |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in pruned.metrics.items()]
        lines += ["", f"Measured by llmprune's evaluation; protocols in `{EVAL_FILE}`."]
    lines += ["", "## How to load it", ""]
    if layout:
        lines += [
            "The weights are in llmprune's compressed sparse format (kept values plus a packed bitmask, or packed",
            f"N:M indices; {layout.get('stored_bytes', 0) / 1e6:.1f} MB instead of "
            f"{layout.get('dense_bytes', 0) / 1e6:.1f} MB dense). Plain transformers cannot read it:", "",
            "```python", "import llmprune", "from transformers import AutoTokenizer", "",
            f'model = llmprune.load("{where}")  # a local folder: download it first', f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            "```", "", f"or write a dense copy once with `llmprune decompress {where} OUT` and load OUT with transformers.",
        ]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
        if act:
            lines += ["", "The activation thresholds are not installed by transformers; "
                      f'`llmprune.load("{where}")` loads the model with them.']
    if base:
        lines += ["", f"Base model: [{base}](https://huggingface.co/{base})."]
    return "\n".join(lines) + "\n"


def write_card(folder: str | Path, *, license: str | None = None, repo_id: str | None = None) -> Path:
    """Write ``README.md`` into ``folder`` from its metadata and results; returns its path."""
    folder = Path(folder).expanduser()
    card = build_card(folder, license=license, repo_id=repo_id)
    path = folder / CARD_FILE
    write_text_atomic(path, str(card))
    log.info("wrote model card %s", path)
    return path


def read_front_matter(path: str | Path) -> dict[str, Any]:
    """The card's front matter as a dict (parsed by huggingface_hub)."""
    return ModelCard.load(Path(path)).data.to_dict()


__all__ = ["CARD_FILE", "build_card", "read_front_matter", "write_card"]
