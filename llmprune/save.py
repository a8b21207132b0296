"""Writing a pruned checkpoint that plain ``transformers`` loads.

Everything is written into a temporary sibling folder and renamed into place once complete,
so an interrupted run never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .report import EVAL_FILE, PERMUTATIONS_FILE, PruneReport

log = logging.getLogger(__name__)

REPORT_FILE = "llmprune_report.json"


class OutputExistsError(FileExistsError):
    pass


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``output`` exists and may not be replaced."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out)!r} already exists and is not empty; pass --overwrite "
            "(overwrite=True) to replace it, or choose another --output"
        )
    return out


def save_pruned(model, tokenizer, output: str | Path, report: PruneReport, overwrite: bool = False) -> Path:
    """Save weights (safetensors, exact zeros), config with an ``llmprune`` block, tokenizer,
    generation config, ``llmprune_report.json`` and (if evaluated) ``llmprune_eval.json`` into ``output``."""
    out = check_output(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["llmprune"] = report.metadata()
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if report.evaluation is not None:
            report.evaluation.save(tmp / EVAL_FILE)
        if report.permutations:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in report.permutations.items()}, tmp / PERMUTATIONS_FILE)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pruned model to %s", out)
    return out
