"""Typed settings: the base of every config model (pruning, evaluation, the methods' options).

Unknown keys are errors; values are validated on construction and on assignment, and
:meth:`Settings.build` turns pydantic's errors into one message that names the field, the value
received and the fix.
"""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


def split_list(v: Any) -> Any:
    """``"wikitext2,c4"`` -> ``["wikitext2", "c4"]`` (CLI and YAML may give either form)."""
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    return v


def check_regex(v: str | None) -> str | None:
    """``v`` unchanged if it is a valid regular expression (or None); an error quoting it otherwise."""
    if v is not None:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is not a valid regular expression ({e})") from None
    return v


class Settings(BaseModel):
    """Typed settings: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def build(cls, data: dict[str, Any], source: str = "config") -> Any:
        """Validate ``data``; errors name the field, the value and the fix."""
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"invalid {source}:\n  key {bad[0]!r} is not a name; valid keys are: "
                              f"{', '.join(cls.model_fields)}")
        try:
            return cls(**data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, source, cls)) from None


def _nested(cls: type[BaseModel], field: str) -> type[BaseModel] | None:
    """The settings model a field of ``cls`` holds (``PruneConfig.eval`` -> ``EvalConfig``), if any."""
    info = cls.model_fields.get(field)
    if info is None:
        return None
    for arg in (info.annotation, *typing.get_args(info.annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def format_validation_error(e: ValidationError, source: str, cls: type[BaseModel]) -> str:
    lines = [f"invalid {source}:"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            model = (_nested(cls, str(err["loc"][0])) if len(err["loc"]) > 1 else None) or cls
            known = ", ".join(model.model_fields)
            lines.append(f"  unknown key {loc!r}; valid keys are: {known}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc} = {err.get('input')!r}: {msg}")
    return "\n".join(lines)
