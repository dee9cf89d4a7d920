"""The tuning space: an adaptor's capability intersected with the user's constraints.

Typed values (space.json through `qtune.tuning.codec`), so the operator can propose trials without importing any
framework: the baseline step computes the space once and stores it in the job's workspace.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import field_serializer, field_validator

from qtune.spec.errors import SpecError
from qtune.spec.models import OpConstraint, QuantizationSpec, TensorConstraint
from qtune.tuning import codec
from qtune.tuning.config import FP32, OpConfig, TensorConfig, TuneConfig

logger = logging.getLogger(__name__)

TENSOR_FIELDS = ("dtype", "scheme", "granularity", "algorithm", "reduce_range")
HEAVY_OP_TYPES = {"Conv": 1.0, "ConvTranspose": 1.0, "MatMul": 1.0, "Gemm": 1.0, "Attention": 1.0, "LSTM": 1.0,
                  "Conv1d": 1.0, "Conv2d": 1.0, "Conv3d": 1.0, "Linear": 1.0}
"""Op types (ONNX and torch names) where int8 saves time: the prior when no profile was measured."""
LIGHT_OP_WEIGHT = 0.02
WEIGHT_ONLY = "weight_only"
SMOOTH_QUANT = "smooth_quant_alpha"
"""TuneConfig.extras key of a static config's SmoothQuant alpha (qtune.adaptors.onnxrt.smooth_quant.EXTRA_KEY)."""
"""The approach where only weights are quantized (per block) and the activation dtype is the compute type."""
_CAMEL = {"reduce_range": "reduceRange"}


@dataclass
class OpSpace:
    """Choices for one op. `weight` is None for ops without weights."""

    name: str
    op_type: str
    activation: dict[str, list[Any]]
    weight: dict[str, list[Any]] | None
    approach: list[str]
    algorithm_dtypes: dict[str, list[str]] = field(default_factory=dict)
    """Weight algorithm → the only weight dtypes it takes (weight_only gptq: int4); absent: every dtype."""

    def quantizable(self, approach: str) -> bool:
        if approach == WEIGHT_ONLY:  # the weight decides; an fp32 activation is fp32 compute
            return approach in self.approach and any(d != FP32 for d in (self.weight or {}).get("dtype", []))
        return approach in self.approach and any(d != FP32 for d in self.activation.get("dtype", []))

    def _weight_only_activations(self) -> list[TensorConfig]:
        """weight_only: the compute type (activation dtype only, fp32 included: MatMulNBits in fp32)."""
        return [TensorConfig(dtype) for dtype in self.activation.get("dtype", [])] or [TensorConfig.fp32()]

    def _tensor_options(self, options: dict[str, list[Any]] | None) -> list[TensorConfig]:
        if options is None:
            return []
        dtypes = [d for d in options.get("dtype", []) if d != FP32]
        values = [options.get(name) or [None] for name in ("scheme", "granularity", "algorithm")]
        reduce = options.get("reduce_range") or [False]
        return [
            TensorConfig(dtype, scheme, granularity, algorithm, bool(rr))
            for dtype, scheme, granularity, algorithm, rr in itertools.product(dtypes, *values, reduce)
            if _paired(self.algorithm_dtypes, dtype, algorithm)
        ]

    def choices(self, approach: str) -> list[OpConfig]:
        """Every quantized setting of this op (preferred first); fp32 fallback is not included."""
        if not self.quantizable(approach):
            return []
        if approach == WEIGHT_ONLY:
            return [OpConfig(self.op_type, a, w) for a, w in
                    itertools.product(self._weight_only_activations(), self._tensor_options(self.weight))]
        activations = self._tensor_options(self.activation)
        if approach == "dynamic":  # activations are quantized at run time: only the dtype matters
            activations = list(dict.fromkeys(TensorConfig(a.dtype) for a in activations))
        weights: list[TensorConfig | None] = list(self._tensor_options(self.weight)) or [None]
        if self.weight is not None and weights == [None]:
            weights = [TensorConfig.fp32()]
        return [OpConfig(self.op_type, a, w) for a, w in itertools.product(activations, weights)]

    def allows(self, op_cfg: OpConfig, approach: str) -> bool:
        """`op_cfg` is one of `choices(approach)` (checked field by field, without listing them)."""
        if not self.quantizable(approach) or op_cfg.op_type != self.op_type:
            return False
        activation = op_cfg.activation
        if approach == WEIGHT_ONLY:
            return (activation in self._weight_only_activations() and op_cfg.weight is not None
                    and self.weight is not None and _tensor_allowed(self.weight, op_cfg.weight)
                    and _paired(self.algorithm_dtypes, op_cfg.weight.dtype, op_cfg.weight.algorithm))
        if approach == "dynamic":
            if activation != TensorConfig(activation.dtype):
                return False
            act_ok = activation.dtype != FP32 and activation.dtype in self.activation.get("dtype", [])
        else:
            act_ok = _tensor_allowed(self.activation, activation)
        if self.weight is None:
            return act_ok and op_cfg.weight is None
        if not [d for d in self.weight.get("dtype", []) if d != FP32]:
            return act_ok and op_cfg.weight == TensorConfig.fp32()
        return act_ok and op_cfg.weight is not None and _tensor_allowed(self.weight, op_cfg.weight)

    def default(self, approach: str) -> OpConfig:
        """The first of `choices(approach)` (built directly: the full list can hold hundreds)."""
        if not self.quantizable(approach):
            return self.fp32()
        if approach == WEIGHT_ONLY:
            return OpConfig(self.op_type, self._weight_only_activations()[0],
                            next(iter(self._tensor_options(self.weight)), None))
        activation = _first_tensor(self.activation)
        assert activation is not None  # quantizable: a non-fp32 activation dtype exists
        if approach == "dynamic":
            activation = TensorConfig(activation.dtype)
        weight = _first_tensor(self.weight)
        if self.weight is not None and weight is None:
            weight = TensorConfig.fp32()
        return OpConfig(self.op_type, activation, weight)

    def fp32(self) -> OpConfig:
        return OpConfig(self.op_type, TensorConfig.fp32(), None if self.weight is None else TensorConfig.fp32())


def _first_tensor(options: dict[str, list[Any]] | None) -> TensorConfig | None:
    """The first of OpSpace._tensor_options(options), None when there is none."""
    if options is None:
        return None
    dtypes = [d for d in options.get("dtype", []) if d != FP32]
    if not dtypes:
        return None
    first = [(options.get(name) or [None])[0] for name in ("scheme", "granularity", "algorithm")]
    return TensorConfig(dtypes[0], *first, bool((options.get("reduce_range") or [False])[0]))


def _paired(algorithm_dtypes: dict[str, list[str]], dtype: str, algorithm: str | None) -> bool:
    return algorithm not in algorithm_dtypes or dtype in algorithm_dtypes[algorithm]


def _tensor_allowed(options: dict[str, list[Any]], tensor: TensorConfig) -> bool:
    """`tensor` is one of OpSpace._tensor_options(options)."""
    if tensor.dtype == FP32 or tensor.dtype not in options.get("dtype", []):
        return False
    for name in ("scheme", "granularity", "algorithm"):
        if getattr(tensor, name) not in (options.get(name) or [None]):
            return False
    return bool(tensor.reduce_range) in {bool(v) for v in options.get("reduce_range") or [False]}


@dataclass
class LightChain:
    """Light ops (element-wise, activations) the framework runs int8 from one compute-heavy op to the next
    without a Q/DQ boundary, when all of them and their `ends` (the heavy ops they connect) are int8: worth
    quantizing whole with its ends, never in part (see qtune/adaptors/onnxrt/chains.py)."""

    ops: list[str]
    ends: list[str]


@dataclass
class TuningSpace:
    ops: dict[str, OpSpace]
    """Quantizable ops in graph (topological) order."""
    approaches: list[str]
    format: str
    calibration_sampling_size: int
    fused_patterns: list[list[str]] = field(default_factory=list)
    """Op-type chains the framework fuses (LPOT's query_fused_patterns), e.g. ["Conv", "Relu"]."""
    sensitivity: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    fused_groups: list[list[str]] = field(default_factory=list)
    """Op NAMES that run as one fused kernel (a Conv and its Relu, ...): quantized or kept fp32
    together, since one fp32 op inside a fused int8 chain leaves Q/DQ around an unfused kernel."""
    time_share: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per-op time from the framework's profiler, as fractions of the fp32 model's total time:
    {"fp32": {op: share}, "int8": {op: share (Q/DQ attributed to their op)}}; an "(other)" key
    holds what no quantizable op accounts for. Empty when not measured."""
    light_chains: list[LightChain] = field(default_factory=list)
    """The adaptor's light chains whose ops and ends are all in the space."""
    smooth_quant_alphas: list[float | str] = field(default_factory=list)
    """SmoothQuant alphas a static config may carry (TuneConfig.extras[SMOOTH_QUANT], preferred first); empty: off."""

    def default_config(self, approach: str | None = None, alpha: float | str | None = None) -> TuneConfig:
        """The preferred config of `approach`; static with SmoothQuant on: with `alpha` (default the first)."""
        approach = approach or self.approaches[0]
        extras: dict[str, Any] = {}
        if approach == "static" and self.smooth_quant_alphas:
            value = alpha if alpha is not None else self.smooth_quant_alphas[0]
            extras[SMOOTH_QUANT] = value if isinstance(value, str) else float(value)  # str: per_layer
        return TuneConfig(
            approach=approach,
            format=self.format,
            ops={name: op.default(approach) for name, op in self.ops.items()},
            calibration_sampling_size=self.calibration_sampling_size,
            extras=extras,
        )

    def default_configs(self) -> list[TuneConfig]:
        """The preferred config of each approach; static once per SmoothQuant alpha (the alpha search)."""
        out = []
        for approach in self.approaches:
            alphas: list[float | str | None] = list(self.smooth_quant_alphas) if approach == "static" else []
            out += [self.default_config(approach, alpha) for alpha in alphas or [None]]
        return out

    def op_gains(self) -> dict[str, float]:
        """Fraction of the fp32 model's time that quantizing each op saves (negative: int8 is slower
        there). From the measured profile when present; else a prior by op type (compute-heavy ops
        carry the time, element-wise and shape ops little, and their Q/DQ cost about what they save)."""
        fp32, int8 = self.time_share.get("fp32", {}), self.time_share.get("int8", {})
        if fp32 and int8:
            return {name: float(fp32.get(name, 0.0)) - float(int8.get(name, 0.0)) for name in self.ops}
        weights = {name: HEAVY_OP_TYPES.get(op.op_type, LIGHT_OP_WEIGHT) for name, op in self.ops.items()}
        total = sum(weights.values()) or 1.0
        return {name: 0.5 * weight / total for name, weight in weights.items()}

    def sensitivity_order(self) -> list[str]:
        """Ops most sensitive first; without measurements, last ops first (outputs tend to be fragile)."""
        position = {name: i for i, name in enumerate(self.ops)}
        return sorted(self.ops, key=lambda n: (-self.sensitivity.get(n, 0.0), -position[n]))

    @field_validator("ops", mode="before")
    @classmethod
    def _ops_by_name(cls, ops: Any) -> Any:
        """space.json lists the ops (in graph order); the space keys them by name."""
        if isinstance(ops, list):
            return {op.name if isinstance(op, OpSpace) else op["name"]: op for op in ops}
        return ops

    @field_serializer("ops")
    def _ops_as_list(self, ops: dict[str, OpSpace]) -> list[Any]:
        return [codec.dump(op) for op in ops.values()]


def _intersect(options: dict[str, list[Any]] | None, constraint: TensorConstraint | None, field_path: str,
               op_label: str) -> dict[str, list[Any]] | None:
    if options is None or constraint is None:
        return options
    result = dict(options)
    for name in TENSOR_FIELDS:
        wanted = getattr(constraint, name)
        if wanted is None:
            continue
        if name == "dtype" and wanted == [FP32]:
            result["dtype"] = [FP32]
            continue
        available = options.get(name) or []
        kept = [value for value in available if value in wanted]
        if name == "dtype":
            kept = [value for value in kept if value != FP32] + ([FP32] if FP32 in wanted else [])
        if not [v for v in kept if v != FP32]:
            allowed = ", ".join(str(v) for v in available if v != FP32) or "none"
            raise SpecError(
                f"{field_path}.{_CAMEL.get(name, name)}",
                f"{wanted} is not supported for {op_label}; allowed: {allowed}",
            )
        result[name] = kept
    return result


def _apply(op: OpSpace, constraint: OpConstraint | None, field_path: str) -> OpSpace:
    if constraint is None:
        return op
    label = f"{op.name} ({op.op_type})"
    approach = op.approach
    if constraint.approach is not None:
        approach = [a for a in op.approach if a in constraint.approach]
    weight = op.weight
    if constraint.weight is not None and weight is not None:
        weight = _intersect(weight, constraint.weight, f"{field_path}.weight", label)
    activation = _intersect(op.activation, constraint.activation, f"{field_path}.activation", label)
    return OpSpace(op.name, op.op_type, activation or {}, weight, approach, op.algorithm_dtypes)


def _flatten_opwise(opwise: dict[Any, dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    flat = []
    for key, value in opwise.items():
        name, op_type = key if isinstance(key, tuple) else (key, value.get("op_type", ""))
        flat.append((name, op_type, value))
    return flat


def build_space(capability: dict[str, Any], quantization: QuantizationSpec,
                fused_patterns: list[list[str]], calibration_samples: int) -> TuningSpace:
    """Intersect the adaptor capability with the job's model-, op-type- and op-wise constraints.

    Raises SpecError naming the field when a constraint names an op that does not exist or asks
    for something the op cannot do."""
    flat = _flatten_opwise(capability.get("opwise", {}))
    by_name = {name: (op_type, value) for name, op_type, value in flat}
    order = [n for n in capability.get("graph_order", []) if n in by_name]
    order += [n for n in by_name if n not in order]

    unknown = sorted(set(quantization.op_wise) - set(by_name))
    if unknown:
        sample = ", ".join(order[:8]) + (", ..." if len(order) > 8 else "")
        raise SpecError(
            f"spec.quantization.opWise.{unknown[0]}",
            f"no quantizable op named {unknown[0]!r} in the model; quantizable ops: {sample}",
        )
    present_types = {op_type for op_type, _ in by_name.values()}
    for op_type in sorted(set(quantization.op_type_wise) - present_types):
        logger.warning("spec.quantization.opTypeWise.%s: the model has no quantizable %s op", op_type, op_type)

    ops: dict[str, OpSpace] = {}
    for name in order:
        op_type, value = by_name[name]
        op = OpSpace(name, op_type, dict(value.get("activation", {})),
                     dict(value["weight"]) if value.get("weight") else None,
                     list(value.get("approach", ["static"])), dict(value.get("algorithm_dtypes") or {}))
        ops[name] = _constrained(op, quantization)

    approaches = ["static", "dynamic"] if quantization.approach == "auto" else [quantization.approach]
    approaches = [a for a in approaches if any(op.quantizable(a) for op in ops.values())]
    if not approaches:
        raise SpecError(
            "spec.quantization.approach",
            f"no op of the model can be quantized with approach {quantization.approach!r}"
            + (" (weight_only: the onnxruntime adaptor's MatMul/Gemm ops with a constant float weight)"
               if quantization.approach == WEIGHT_ONLY else ""),
        )
    alphas: list[float] = []
    if quantization.smooth_quant is not None:
        if not capability.get("smooth_quant"):
            raise SpecError("spec.quantization.smoothQuant", "this framework's adaptor cannot apply SmoothQuant; "
                                                             "allowed with framework onnxruntime only")
        alphas = quantization.smooth_quant.alphas() if "static" in approaches else []
    return TuningSpace(
        smooth_quant_alphas=alphas,
        ops=ops,
        approaches=approaches,
        format=quantization.format,
        calibration_sampling_size=calibration_samples,
        fused_patterns=fused_patterns,
        notes={str(k): str(v) for k, v in capability.get("notes", {}).items()},
        fused_groups=_fused_groups(capability.get("fused_groups", []), ops),
        light_chains=[LightChain(list(c["ops"]), list(c["ends"])) for c in capability.get("light_chains", [])
                      if all(name in ops for name in [*c["ops"], *c["ends"]])],
    )


def _constrained(op: OpSpace, quantization: QuantizationSpec) -> OpSpace:
    """`op` under the job's model-, op-type- and op-wise constraints, in that order."""
    op = _apply(op, quantization.model_wise, "spec.quantization.modelWise")
    op = _apply(op, quantization.op_type_wise.get(op.op_type), f"spec.quantization.opTypeWise.{op.op_type}")
    op = _apply(op, quantization.op_wise.get(op.name), f"spec.quantization.opWise.{op.name}")
    _check_pairs(op, quantization)
    return op


def _check_pairs(op: OpSpace, quantization: QuantizationSpec) -> None:
    """A weight restricted to algorithms none of whose dtypes is left (gptq with int8 only) is an error naming the
    field that set the algorithm (the most specific constraint that did)."""
    dtypes = [d for d in (op.weight or {}).get("dtype", []) if d != FP32]
    algorithms = (op.weight or {}).get("algorithm") or []
    if not op.algorithm_dtypes or not dtypes or not algorithms:
        return
    if any(_paired(op.algorithm_dtypes, d, a) for d in dtypes for a in algorithms):
        return
    path = "spec.quantization.modelWise"
    for where, constraint in ((f"spec.quantization.opTypeWise.{op.op_type}", quantization.op_type_wise.get(op.op_type)),
                              (f"spec.quantization.opWise.{op.name}", quantization.op_wise.get(op.name))):
        if constraint is not None and constraint.weight is not None and constraint.weight.algorithm is not None:
            path = where
    takes = "; ".join(f"{a} takes {', '.join(op.algorithm_dtypes.get(a, ['any dtype']))}" for a in algorithms)
    raise SpecError(f"{path}.weight.algorithm", f"{algorithms} cannot quantize {op.name} ({op.op_type}) to weight "
                                                f"dtype {', '.join(dtypes)}: {takes}")


def _fused_groups(groups: list[list[str]], ops: dict[str, OpSpace]) -> list[list[str]]:
    """The adaptor's fused groups restricted to the space's ops (groups of one op are no groups)."""
    out = []
    for group in groups:
        names = [str(name) for name in group if name in ops]
        if len(names) > 1:
            out.append(names)
    return out
