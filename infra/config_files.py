"""Config files, owned here: reading one as a YAML mapping, and a pydantic validation error as one
line naming the field (`model.depth: ...`). Light to import: yaml and pydantic only."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from infra.errors import UserError


class FieldError(ValueError):
    """A validator's error whose message names its field itself (for checks across sections)."""


def read_yaml(path: Path) -> dict:
    """The mapping in the YAML file `path`; `UserError` if unreadable, not YAML or not a mapping."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UserError(f"cannot read config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"config {path} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path}: expected a mapping of sections at the top level")
    return raw


def first_problem(error: ValidationError) -> str:
    """The first problem of a pydantic validation, as `field.path: message`."""
    problem = error.errors()[0]
    message = problem["msg"].removeprefix("Value error, ")
    if isinstance(problem.get("ctx", {}).get("error"), FieldError):
        return message
    location = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        return f"{location}: unknown key"
    return f"{location}: {message}" if location else message
