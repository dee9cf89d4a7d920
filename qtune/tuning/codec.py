"""The one codec of qtune's typed values: dataclasses and pydantic models to JSON-ready data and back.

The engine keeps its values typed (TuneConfig, TuningSpace, TrialRecord, History, ...); they become plain
data only at the edges: history.json, space.json, best_config.json, the report, the operator's status and
ConfigMaps, the files a unit reads. A pydantic `TypeAdapter` per type does both directions: loading ignores
unknown keys and fills defaults for missing ones (older files load), dumping keeps floats as they are
(NaN and infinities included: `json.dump` writes them as history.json always did).
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

from pydantic import TypeAdapter

T = TypeVar("T")

__all__ = ["dump", "load"]


@cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def dump(value: Any, kind: Any = None) -> Any:
    """`value` as JSON-ready data (dicts, lists, str, numbers, None); `kind` when it is not `type(value)`
    (e.g. `dict[str, SpeedMeasurement]`)."""
    return _adapter(kind if kind is not None else type(value)).dump_python(value, mode="python")


def load(kind: type[T], data: Any) -> T:
    """A `kind` from JSON-ready data (raises pydantic's ValidationError, a ValueError, when it does not fit)."""
    return _adapter(kind).validate_python(data)  # type: ignore[no-any-return]
