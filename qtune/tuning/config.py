"""Tune configs: plain, JSON-serialisable data that travels to worker processes, pods and status.

A tune config says, per quantizable op (keyed by op name), the activation and weight settings,
`dtype: fp32` meaning the op stays in fp32 (fallback). The approach (static/dynamic) and format
(QDQ/QOperator) are model-wise, as ONNX Runtime and torch apply them to a whole graph.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import Field

from qtune.tuning import codec

FP32 = "fp32"


@dataclass(frozen=True)
class TensorConfig:
    """Quantization of one tensor role. For dtype fp32 the other fields are meaningless (None)."""

    dtype: str
    scheme: str | None = None
    granularity: str | None = None
    algorithm: str | None = None
    reduce_range: bool = False

    @property
    def is_fp32(self) -> bool:
        return self.dtype == FP32

    @classmethod
    def fp32(cls) -> TensorConfig:
        return cls(dtype=FP32)


@dataclass(frozen=True)
class OpConfig:
    op_type: str
    activation: TensorConfig
    weight: Annotated[TensorConfig | None, Field(exclude_if=lambda weight: weight is None)] = None
    """None for ops without weights; such an op's data has no `weight` key (the form config keys were always
    computed from)."""

    @property
    def is_fp32(self) -> bool:
        return self.activation.is_fp32 and (self.weight is None or self.weight.is_fp32)

    def as_fp32(self) -> OpConfig:
        return OpConfig(self.op_type, TensorConfig.fp32(), None if self.weight is None else TensorConfig.fp32())


@dataclass(frozen=True)
class TuneConfig:
    approach: str
    format: str
    ops: dict[str, OpConfig]
    calibration_sampling_size: int = 100
    extras: dict[str, Any] = field(default_factory=dict)

    def fp32_ops(self) -> list[str]:
        return sorted(name for name, op in self.ops.items() if op.is_fp32)

    def quantized_ops(self) -> list[str]:
        return sorted(name for name, op in self.ops.items() if not op.is_fp32)

    def with_ops(self, updates: dict[str, OpConfig]) -> TuneConfig:
        return replace(self, ops={**self.ops, **updates})

    def with_fallback(self, names: list[str] | set[str]) -> TuneConfig:
        return self.with_ops({name: self.ops[name].as_fp32() for name in names if name in self.ops})

    def algorithms(self) -> set[str]:
        """Calibration algorithms this config needs (static activations only)."""
        return {
            op.activation.algorithm
            for op in self.ops.values()
            if not op.activation.is_fp32 and op.activation.algorithm
        }

    def weights_text(self) -> str:
        """A weight-only config's weights by dtype and algorithm, most used first, e.g. "31 int4 k_quant, 7 int8
        rtn, 1 fp32" (how trial lines and the report show what a trial tried); "" for other approaches."""
        if self.approach != "weight_only":
            return ""
        counts: dict[str, int] = {}
        for op in self.ops.values():
            weight = op.weight
            label = "fp32" if weight is None or weight.is_fp32 else f"{weight.dtype} {weight.algorithm or 'rtn'}"
            counts[label] = counts.get(label, 0) + 1
        return ", ".join(f"{count} {label}" for label, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def key(self) -> str:
        """Stable identity of the config: equal configs have equal keys in every process (computed once
        per instance: a config is never changed in place, `with_ops` and `replace` make new ones)."""
        cached = self.__dict__.get("_key")
        if cached is None:
            canonical = json.dumps(codec.dump(self), sort_keys=True, separators=(",", ":"))
            cached = hashlib.sha256(canonical.encode()).hexdigest()[:16]
            object.__setattr__(self, "_key", cached)
        return cached
