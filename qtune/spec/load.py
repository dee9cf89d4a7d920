"""Read a QuantizationJob from YAML/JSON, turning every problem into a SpecError naming the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qtune.spec.errors import SpecError
from qtune.spec.models import QuantizationJob

_RELOCATED = re.compile(r"^@([\w.\[\]]+): (.*)$", re.S)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif str(item).startswith(("function-", "literal[", "list[", "union[", "constrained-")):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _describe(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error" and "expected" in ctx:
        return f"got {error.get('input')!r}; allowed: {ctx['expected']}"
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def job_from_dict(document: Any, source: str | None = None) -> QuantizationJob:
    if not isinstance(document, dict):
        raise SpecError("", "the document must be a mapping with apiVersion, kind, metadata and spec", source)
    try:
        return QuantizationJob.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_path(tuple(first["loc"]))
        description = _describe(first)
        relocated = _RELOCATED.match(description)
        if relocated:  # a cross-field rule names the field it is about: "@spec.x.y: message"
            field, description = relocated.group(1), relocated.group(2)
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise SpecError(field, description + suffix, source) from None


def load_job(path: str | Path) -> QuantizationJob:
    """Load and validate a job file. Raises SpecError (one line) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("", f"job file not found: {path}")
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError("", f"malformed YAML{where}: {problem}", str(path)) from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "QuantizationJob"]
    if len(documents) == 1:
        jobs = documents
    if len(jobs) != 1:
        raise SpecError("kind", f"expected exactly one QuantizationJob document, found {len(jobs)}", str(path))
    return job_from_dict(jobs[0], str(path))


def resolve_path(job_file: str | Path | None, value: str) -> Path:
    """Paths in a job are relative to the job file's folder."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or job_file is None:
        return candidate
    return (Path(job_file).resolve().parent / candidate).resolve()
