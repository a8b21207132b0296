"""The package's shape, as ARCHITECTURE.md states it: imports go one way down its layer table, no
circles, no imports of the package's own modules hidden in functions (but the CLI's start-up), and no
CLI path that loads torch before the thread policy is applied."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmprune"
# The CLI's start-up imports its parser and commands after applying the thread policy (and the version).
LAZY_ALLOWED = {"llmprune.cli"}


def _layers() -> list[tuple[str, list[str]]]:
    """``[(layer, [module prefixes])]`` from the table of ARCHITECTURE.md, top layer first."""
    rows = []
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`llmprune"):
            rows.append((cells[0], re.findall(r"`(llmprune[\w.]*)`", cells[1])))
    return rows


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """``{module: [(imported llmprune module, inside a function)]}``, typing-only imports left out."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, list[tuple[str, bool]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            p, in_function, typing_only = parents.get(node), False, False
            while p is not None:
                in_function |= isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))
                typing_only |= isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test)
                p = parents.get(p)
            if not typing_only:
                found += [(t, in_function) for t in targets if t.split(".")[0] == "llmprune" and t != name]
        out[name] = found
    return out


def _layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int:
    """The index (0 = top) of the layer whose prefix matches ``module`` most closely."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer of ARCHITECTURE.md's table; add it to one"
    return index


def test_every_module_has_a_layer_and_imports_only_downwards():
    layers = _layers()
    assert [name for name, _ in layers][:2] == ["faces", "pipeline"] and layers[-1][0] == "leaves"
    upward = []
    for module, imports in _imports().items():
        mine = _layer_of(module, layers)
        for target, _ in imports:
            if target == "llmprune" and module.startswith("llmprune.cli"):
                continue  # the CLI reads the version from the package itself
            theirs = _layer_of(target, layers)
            if theirs < mine:
                upward.append(f"{module} ({layers[mine][0]}) imports {target} ({layers[theirs][0]})")
    assert not upward, "imports that reach up the layer table:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {m: {t for t, _ in imports} for m, imports in _imports().items()}
    for m in graph:  # a package importing its own children is not a circle by itself
        graph[m] = {t for t in graph[m] if t in graph and not (t.startswith(m + ".") and m != "llmprune")}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in sorted(graph[m]):
            assert seen.get(t) != 1, "import circle: " + " -> ".join(path[path.index(t):] + [t])
            if t not in seen:
                visit(t, path + [t])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])


def test_no_package_imports_hidden_in_functions():
    hidden = [f"{module} -> {target}" for module, imports in _imports().items() for target, lazy in imports
              if lazy and module not in LAZY_ALLOWED]
    assert not hidden, "imports of llmprune modules inside functions (move them to the top):\n" + "\n".join(hidden)


def test_importing_the_cli_loads_no_torch():
    code = "import sys, llmprune.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_computing_command_applies_the_thread_policy_before_torch_loads(tmp_path):
    """prune and eval: the policy (which sets OMP_WAIT_POLICY, read once when torch loads) runs first. The
    command then fails on a bad flag value, after the policy, without loading a model."""
    code = (
        "import sys, llmprune.cli as cli\n"
        "seen = []\n"
        "real = cli.apply_thread_policy\n"
        "def policy(threads=None, **kw):\n"
        "    seen.append('torch' in sys.modules)\n"
        "    return real(threads, **kw)\n"
        "cli.apply_thread_policy = policy\n"
        "rc = cli.main(sys.argv[1:])\n"
        "print('policy-saw-torch', seen)\n"
    )
    for argv in (["prune", "--output", str(tmp_path / "out"), "--nsamples", "0"],
                 ["eval", "--ppl", "wikitext2", "--max-windows", "0"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert "policy-saw-torch [False]" in out.stdout, (argv, out.stdout, out.stderr[-2000:])
        assert "torch was imported before the thread policy" not in out.stderr
