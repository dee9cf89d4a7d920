"""Pydantic models of the QuantizationJob resource (group qtune.io, version v1alpha1).

The same document drives `qtune tune job.yaml` and the Kubernetes operator. Field names are
camelCase in YAML (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_VERSION = "qtune.io/v1alpha1"
KIND = "QuantizationJob"

DTYPES = ("int8", "uint8", "fp32")
SCHEMES = ("sym", "asym")
GRANULARITIES = ("per_tensor", "per_channel")
ALGORITHMS = ("minmax", "kl", "percentile")
APPROACHES = ("static", "dynamic")
METRICS = ("top1", "topk", "f1", "mse", "cosine")
OBJECTIVES = ("latency", "size")
BUILTIN_FRAMEWORKS = ("onnxruntime", "pytorch")
BUILTIN_STRATEGIES = ("basic", "exhaustive", "random")

_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SpecModel(BaseModel):
    """Base: camelCase aliases, unknown fields rejected, Python names accepted too."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _as_list(value: Any) -> Any:
    """Constraint values may be written as one value or a list of values."""
    if value is None or isinstance(value, list):
        return value
    return [value]


DTypeList = Annotated[list[Literal["int8", "uint8", "fp32"]] | None, BeforeValidator(_as_list)]
SchemeList = Annotated[list[Literal["sym", "asym"]] | None, BeforeValidator(_as_list)]
GranularityList = Annotated[list[Literal["per_tensor", "per_channel"]] | None, BeforeValidator(_as_list)]
AlgorithmList = Annotated[list[Literal["minmax", "kl", "percentile"]] | None, BeforeValidator(_as_list)]
def _entrypoint_form(value: str | None) -> str | None:
    if value is not None and not _ENTRYPOINT.match(value):
        raise ValueError(f"{value!r} is not of the form module:function")
    return value


Entrypoint = Annotated[str | None, AfterValidator(_entrypoint_form)]
BoolList = Annotated[list[bool] | None, BeforeValidator(_as_list)]
ApproachList = Annotated[list[Literal["static", "dynamic"]] | None, BeforeValidator(_as_list)]


class TensorConstraint(SpecModel):
    """Allowed choices for one tensor role (activation or weight); None leaves the adaptor's."""

    dtype: DTypeList = None
    scheme: SchemeList = None
    granularity: GranularityList = None
    algorithm: AlgorithmList = None
    reduce_range: BoolList = None


class OpConstraint(SpecModel):
    activation: TensorConstraint | None = None
    weight: TensorConstraint | None = None
    approach: ApproachList = None


class InputSpec(SpecModel):
    name: str
    shape: list[int | str] | None = None
    dtype: str = "float32"


class ModelSpec(SpecModel):
    framework: str = Field(
        description="onnxruntime, pytorch, a registered adaptor name, or module:Class of your own adaptor"
    )
    path: str | None = Field(default=None, description="model file, relative to the job file")
    entrypoint: Entrypoint = Field(default=None, description="module:function building the model")
    weights: str | None = Field(default=None, description="weights file (loaded weights-only)")
    inputs: list[InputSpec] | None = None

    @field_validator("framework")
    @classmethod
    def _framework_known(cls, value: str) -> str:
        if value in BUILTIN_FRAMEWORKS or _ENTRYPOINT.match(value) or re.match(r"^[A-Za-z_][\w-]*$", value):
            return value
        raise ValueError(
            f"unknown framework {value!r}; allowed: {', '.join(BUILTIN_FRAMEWORKS)}, "
            "a registered adaptor name, or module:Class"
        )

    @model_validator(mode="after")
    def _path_or_entrypoint(self) -> ModelSpec:
        if not self.path and not self.entrypoint:
            raise ValueError("give model.path (a model file) or model.entrypoint (module:function)")
        return self


class DatasetSpec(SpecModel):
    path: str | None = Field(default=None, description=".npz with one array per model input, plus labels")
    entrypoint: Entrypoint = Field(default=None, description="module:function returning (inputs, labels)")
    samples: int | None = Field(default=None, ge=1, description="use at most this many samples")
    labels: str = Field(default="labels", description="name of the label array in the .npz")

    @model_validator(mode="after")
    def _path_or_entrypoint(self) -> DatasetSpec:
        if bool(self.path) == bool(self.entrypoint):
            raise ValueError("give exactly one of path (.npz file) or entrypoint (module:function)")
        return self


class EvaluationSpec(DatasetSpec):
    metric: Literal["top1", "topk", "f1", "mse", "cosine"] = "top1"
    k: int = Field(default=5, ge=1, description="k of the topk metric")
    output: str | int | None = Field(default=None, description="model output the metric reads (default first)")
    batch_size: int = Field(default=64, ge=1)


class DataSpec(SpecModel):
    calibration: DatasetSpec
    evaluation: EvaluationSpec


class QuantizationSpec(SpecModel):
    approach: Literal["static", "dynamic", "auto"] = "static"
    format: Literal["QDQ", "QOperator"] = "QDQ"
    calibration_samples: int | None = Field(default=None, ge=1, description="overrides data.calibration.samples")
    model_wise: OpConstraint | None = None
    op_type_wise: dict[str, OpConstraint] = Field(default_factory=dict)
    op_wise: dict[str, OpConstraint] = Field(default_factory=dict)
    keep_non_finite_fp32: bool = Field(
        default=True, description="keep tensors with infinite or absurd calibration ranges in fp32"
    )


class AccuracyCriterion(SpecModel):
    """Allowed accuracy loss against the fp32 baseline. Exactly one of relative/absolute.

    relative r, higherIsBetter:  passes when accuracy >= baseline * (1 - r)
    relative r, lowerIsBetter:   passes when accuracy <= baseline * (1 + r)
    absolute a, higherIsBetter:  passes when accuracy >= baseline - a
    absolute a, lowerIsBetter:   passes when accuracy <= baseline + a
    The edge counts as passing.
    """

    relative: float | None = Field(default=None, ge=0, lt=1)
    absolute: float | None = Field(default=None, ge=0)
    higher_is_better: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_relative(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("relative") is None and data.get("absolute") is None:
            return {**data, "relative": 0.01}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> AccuracyCriterion:
        if self.relative is not None and self.absolute is not None:
            raise ValueError("give only one of relative or absolute, not both")
        return self


class TuningSpec(SpecModel):
    strategy: str = "basic"
    accuracy_criterion: AccuracyCriterion = Field(default_factory=AccuracyCriterion)
    objective: Literal["latency", "size"] = "latency"
    max_trials: int = Field(default=50, ge=1, le=10000)
    max_failed_trials: int | None = Field(default=None, ge=1)
    timeout_seconds: int = Field(default=0, ge=0, description="wall-clock limit of the whole tuning; 0 = none")
    trial_timeout_seconds: int = Field(default=1800, ge=1, description="wall-clock limit of one trial")
    parallel_trials: int = Field(default=1, ge=1, le=256)
    seed: int = 0
    objective_tolerance: float = Field(
        default=0.05, ge=0, lt=1,
        description="objective values within this fraction of the best count as equal; then fewest fp32 ops wins",
    )

    @field_validator("strategy")
    @classmethod
    def _strategy_known(cls, value: str) -> str:
        if value in BUILTIN_STRATEGIES or _ENTRYPOINT.match(value):
            return value
        raise ValueError(
            f"unknown strategy {value!r}; allowed: {', '.join(BUILTIN_STRATEGIES)} or module:Class"
        )

    @model_validator(mode="after")
    def _parallel_within_max(self) -> TuningSpec:
        if self.parallel_trials > self.max_trials:
            raise ValueError(
                f"parallelTrials ({self.parallel_trials}) must not exceed maxTrials ({self.max_trials})"
            )
        return self


class BenchmarkSpec(SpecModel):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    warmup_runs: int = Field(default=10, ge=0)
    runs: int = Field(default=50, ge=1)
    threads: int | None = Field(default=None, ge=1, description="default: the CPUs the trial owns")


class ResourcesSpec(SpecModel):
    cpu: int = Field(default=2, ge=1, description="whole CPUs (requests = limits, Guaranteed QoS)")
    memory: str = "4Gi"

    @field_validator("memory")
    @classmethod
    def _memory_quantity(cls, value: str) -> str:
        if not re.match(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", value):
            raise ValueError(f"{value!r} is not a Kubernetes memory quantity such as 4Gi or 512Mi")
        return value


class TrialSpec(SpecModel):
    """Cluster-only settings of trial pods; `qtune tune` ignores them."""

    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    node_affinity: dict[str, Any] | None = Field(
        default=None, description="replaces the default Intel Xeon pool affinity"
    )
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    service_account_name: str | None = None


class WorkspaceSpec(SpecModel):
    path: str | None = Field(default=None, description="local folder (qtune tune); default .qtune/<job>")
    persistent_volume_claim: str | None = Field(default=None, description="cluster: PVC holding model and data")
    mount_path: str = "/workspace"


class OutputSpec(SpecModel):
    path: str | None = Field(default=None, description="where the best model, config and report go")


class JobSpec(SpecModel):
    model: ModelSpec
    data: DataSpec
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    trial: TrialSpec = Field(default_factory=TrialSpec)
    workspace: WorkspaceSpec = Field(default_factory=WorkspaceSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if len(value) > 63 or not _DNS1123.match(value):
            raise ValueError(
                f"{value!r} is not a valid name: lowercase letters, digits, '-' and '.', at most 63 characters"
            )
        return value


class QuantizationJob(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["qtune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["QuantizationJob"]
    metadata: Metadata
    spec: JobSpec
    status: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.metadata.name
