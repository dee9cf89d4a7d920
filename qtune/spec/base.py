"""What every spec model shares: the base class, the vocabularies of the QuantizationJob's fields, and the
field types built on them (lists that accept one value, `module:function` entrypoints).

`qtune.spec.models` re-exports all of it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from qtune.spec import cel

DTYPES = ("int8", "uint8", "int4", "fp32")
SCHEMES = ("sym", "asym")
BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Block sizes of weight-only quantization (`per_block_<n>`: n consecutive weights of one output channel along K
share a scale), as ORT's MatMulNBits takes them (a power of two >= 16)."""
GRANULARITIES = ("per_tensor", "per_channel", *(f"per_block_{n}" for n in BLOCK_SIZES))
ALGORITHMS = ("minmax", "kl", "percentile", "rtn", "k_quant", "gptq")
APPROACHES = ("static", "dynamic", "weight_only")
METRICS = ("top1", "topk", "f1", "mse", "cosine", "perplexity")
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


SMOOTH_QUANT_AUTO_ALPHAS = (0.5, 0.3, 0.7, 0.85)
"""What `smoothQuant: {alpha: auto}` searches (qtune.adaptors.onnxrt.smooth_quant.ALPHA_AUTO is the same)."""
SMOOTH_QUANT_PER_LAYER = "per_layer"
"""`smoothQuant: {alpha: per_layer}`: each smoothed MatMul group takes its own alpha (smooth_alpha.py)."""


class SmoothQuantSpec(SpecModel):
    """SmoothQuant for static int8 (onnxruntime): per input channel of a MatMul/Gemm whose activation has
    outlier channels, s = max|X|^alpha / max|W|^(1-alpha) moves the outliers from X into W's rows."""

    alpha: float | Literal["auto", "per_layer"] = Field(
        default=0.5, description="migration strength in (0, 1] (0.5: the paper's default); auto: the tuner "
                                 f"tries {', '.join(str(a) for a in SMOOTH_QUANT_AUTO_ALPHAS)} for the whole model "
                                 "and keeps the best config; per_layer: each MatMul group whose input has outlier "
                                 "channels takes the alpha (0.3-0.9) with the lowest int8 error on the calibration "
                                 "data, or none when smoothing does not lower it",
        json_schema_extra=cel.rules(minimum=0, exclusiveMinimum=True, maximum=1))

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_allowed(cls, value: Any) -> Any:
        if value in ("auto", SMOOTH_QUANT_PER_LAYER):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
            return value
        raise ValueError(f"{value!r} is not allowed; allowed: a number in (0, 1] (e.g. 0.5), auto or per_layer")

    def alphas(self) -> list[float | str]:
        """The alpha values to try, preferred first (per_layer: the one value `per_layer`)."""
        if self.alpha == "auto":
            return list(SMOOTH_QUANT_AUTO_ALPHAS)
        return [self.alpha] if self.alpha == SMOOTH_QUANT_PER_LAYER else [float(self.alpha)]


class DecodeSpec(SpecModel):
    """A language model's decode speed at batch 1 with its KV cache (qtune.runner.decode_speed): a prompt of
    `promptTokens` tokens in one run (prefill), then `newTokens` runs of one token each, every run's present
    keys and values fed back as the next run's past. The model needs an input_ids input, past inputs (names
    with "past") and as many present outputs (names with "present"), in the same order."""

    prompt_tokens: int = Field(default=64, ge=1, le=32768,
                               description="prompt length of the prefill, taken from the first evaluation sample's "
                                           "input_ids (repeated if shorter)")
    new_tokens: int = Field(default=32, ge=1, le=32768,
                            description="decode steps after the prompt; then the cache starts again from the prompt")
    with_batch_sizes: bool = Field(default=False, description="also measure spec.benchmark.batchSizes (whole "
                                                              "samples at those batch sizes); default: only the "
                                                              "prefill and decode figures")
