"""Recipe files: the packaged recipes by name, their one-line summaries, and reading one.

A recipe is a YAML mapping of :class:`llmprune.PruneConfig` fields; ``PruneConfig.from_yaml`` validates it
and applies overrides. Each packaged recipe starts with a comment: the command that runs it, then what it
reproduces.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"  # shipped with the package (package data)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 integers, so an unquoted ``pattern: 2:4`` stays the string '2:4'."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"), list("-+0123456789")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_recipe(path: Path) -> dict[str, Any]:
    """The mapping in the recipe file ``path``; an error naming the line and the fix otherwise."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML{at}: {problem}; fix the file "
                          "(see `llmprune recipes` for examples)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of config fields, got {type(data).__name__}")
    return data


def recipe_path(recipe: str | Path) -> Path:
    """The file of ``recipe``: a YAML path, or the name of a packaged recipe (``sparsegpt-50``)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{recipe}.yaml"
    if path.suffix == "" and path.name == str(recipe) and named.is_file():
        return named
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {str(recipe)!r} does not exist: it is neither a YAML file nor a packaged recipe; give "
                      f"a path, or one of: {', '.join(names)} (`llmprune recipes` lists what each does)")


def recipe_summaries() -> list[tuple[str, str]]:
    """``(name, what it reproduces)`` of every packaged recipe: its name and the line below its command."""
    out = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        comments = [ln.lstrip("# ").strip() for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.startswith("#")]
        out.append((path.stem, comments[1] if len(comments) > 1 else ""))
    return out
