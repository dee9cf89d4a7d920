"""What every spec model shares: the base class, the vocabularies of the QuantizationJob's fields, and the
field types built on them (lists that accept one value, `module:function` entrypoints).

`qtune.spec.models` re-exports all of it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

from qtune.spec import cel

DTYPES = ("int8", "uint8", "int4", "fp32")
SCHEMES = ("sym", "asym")
BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Block sizes of weight-only quantization (`per_block_<n>`: n consecutive weights of one output channel along K
share a scale), as ORT's MatMulNBits takes them (a power of two >= 16)."""
GRANULARITIES = ("per_tensor", "per_channel", *(f"per_block_{n}" for n in BLOCK_SIZES))
ALGORITHMS = ("minmax", "kl", "percentile", "rtn")
APPROACHES = ("static", "dynamic", "weight_only")
METRICS = ("top1", "topk", "f1", "mse", "cosine")
OBJECTIVES = ("latency", "size")
BUILTIN_FRAMEWORKS = ("onnxruntime", "pytorch")
BUILTIN_STRATEGIES = ("basic", "exhaustive", "random", "mixed_bits")

ENTRYPOINT_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SpecModel(BaseModel):
    """Base: camelCase aliases, unknown fields rejected, Python names accepted too."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )


def _as_list(value: Any) -> Any:
    """Constraint values may be written as one value or a list of values."""
    if value is None or isinstance(value, list):
        return value
    return [value]


DTypeList = Annotated[list[Literal[DTYPES]] | None, BeforeValidator(_as_list)]
SchemeList = Annotated[list[Literal["sym", "asym"]] | None, BeforeValidator(_as_list)]
GranularityList = Annotated[list[Literal[GRANULARITIES]] | None, BeforeValidator(_as_list)]
AlgorithmList = Annotated[list[Literal[ALGORITHMS]] | None, BeforeValidator(_as_list)]


def _entrypoint_form(value: str | None) -> str | None:
    if value is not None and not ENTRYPOINT_PATTERN.match(value):
        raise ValueError(f"{value!r} is not of the form module:function")
    return value


Entrypoint = Annotated[str | None, AfterValidator(_entrypoint_form),
                       Field(json_schema_extra=cel.rules(pattern=cel.ENTRYPOINT_RE, maxLength=253))]
BoolList = Annotated[list[bool] | None, BeforeValidator(_as_list)]
ApproachList = Annotated[list[Literal[APPROACHES]] | None, BeforeValidator(_as_list)]
