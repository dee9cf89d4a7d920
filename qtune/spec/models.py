"""Pydantic models of the QuantizationJob resource (group qtune.io, version v1alpha1).

The same document drives `qtune tune job.yaml` and the Kubernetes operator. Field names are
camelCase in YAML (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qtune.spec import cel

# Re-exported: the shared base and vocabularies (qtune.spec.base) and the data sections (qtune.spec.data_models)
# are part of this module's namespace, so `from qtune.spec.models import X` works for all of them.
from qtune.spec.base import (  # noqa: F401
    ALGORITHMS,
    APPROACHES,
    BUILTIN_FRAMEWORKS,
    BUILTIN_STRATEGIES,
    DTYPES,
    ENTRYPOINT_PATTERN,
    GRANULARITIES,
    METRICS,
    OBJECTIVES,
    SCHEMES,
    AlgorithmList,
    ApproachList,
    BoolList,
    DecodeSpec,
    DTypeList,
    Entrypoint,
    GranularityList,
    SchemeList,
    SmoothQuantSpec,
    SpecModel,
    _as_list,
)
from qtune.spec.data_models import CalibrationSpec, DatasetSpec, DataSpec, EvaluationSpec  # noqa: F401

API_VERSION = "qtune.io/v1alpha1"
KIND = "QuantizationJob"

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class TensorConstraint(SpecModel):
    """Allowed choices for one tensor role (activation or weight); None leaves the adaptor's."""

    dtype: DTypeList = Field(default=None, description="allowed dtypes: int8, uint8, int4 (weight_only weights), fp32 "
                                                       "(fp32 = keep in fp32)")
    scheme: SchemeList = Field(default=None, description="sym (zero point 0) and/or asym")
    granularity: GranularityList = Field(
        default=None, description="per_tensor and/or per_channel (weights); weight_only: per_block_<n>, n in 16, 32, "
                                  "64, 128, 256")
    algorithm: AlgorithmList = Field(default=None, description="calibration: minmax, kl (entropy), percentile; "
                                                               "weight_only weights: rtn (round to nearest), k_quant "
                                                               "(asymmetric), gptq (int4 only; uses the calibration "
                                                               "data)")
    reduce_range: BoolList = Field(default=None, description="7-bit ranges (for CPUs without VNNI): true and/or false")


class OpConstraint(SpecModel):
    activation: TensorConstraint | None = Field(default=None, description="choices for the op's activations")
    weight: TensorConstraint | None = Field(default=None, description="choices for the op's weights")
    approach: ApproachList = Field(default=None, description="static, dynamic and/or weight_only")


class InputSpec(SpecModel):
    name: str = Field(description="input name (ONNX graph input; pytorch: forward() argument)")
    shape: list[int | str] | None = Field(
        default=None, description="dimensions; a name (e.g. batch) or dimension 0 is dynamic (pytorch export)")
    dtype: str = Field(default="float32", description="numpy/torch dtype name the data arrays must have")


class ModelSpec(SpecModel):
    model_config = ConfigDict(json_schema_extra=cel.rules(
        cel.cel("has(self.path) || has(self.entrypoint)",
                "give model.path (a model file) or model.entrypoint (module:function)")))  # _path_or_entrypoint

    framework: str = Field(
        description="onnxruntime, pytorch, a registered adaptor name, or module:Class of your own adaptor "
                    "(imported from the job's folder or the Python path)",
        json_schema_extra=cel.rules(cel.cel(  # _framework_known
            f"self in {cel.in_list(BUILTIN_FRAMEWORKS)} || self.matches('{cel.NAME_RE}') "
            f"|| self.matches('{cel.ENTRYPOINT_RE}')",
            message_expression=f"'unknown framework \"' + self + '\"; allowed: {', '.join(BUILTIN_FRAMEWORKS)}, "
                               "a registered adaptor name, or module:Class'"), maxLength=253),
    )
    path: str | None = Field(
        default=None,
        description="model file, relative to the job file's folder (in a pod: to the workspace mount). "
                    "onnxruntime: a .onnx file (external data beside it); pytorch: a torch.export program (.pt2)",
    )
    entrypoint: Entrypoint = Field(
        default=None,
        description="pytorch: module:function returning an nn.Module (or an ExportedProgram), imported from the "
                    "job's folder or the Python path",
    )
    weights: str | None = Field(
        default=None,
        description="pytorch with entrypoint: a state_dict file (torch.save(model.state_dict()), loaded with "
                    "weights_only=True) or .safetensors, relative to the job file's folder",
    )
    inputs: list[InputSpec] | None = Field(
        default=None,
        description="model inputs (name, shape, dtype); default: read from the model (pytorch: from forward's "
                    "signature, shapes from the first calibration batch)",
    )

    @field_validator("framework")
    @classmethod
    def _framework_known(cls, value: str) -> str:
        if value in BUILTIN_FRAMEWORKS or ENTRYPOINT_PATTERN.match(value) or re.match(r"^[A-Za-z_][\w-]*$", value):
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


class QuantizationSpec(SpecModel):
    model_config = ConfigDict(json_schema_extra=cel.rules(cel.cel(  # _smooth_quant_static
        "!has(self.smoothQuant) || !has(self.approach) || self.approach in ['static', 'auto']",
        "smoothQuant applies to static int8 (approach static or auto)", field_path=".smoothQuant")))

    approach: Literal["static", "dynamic", "auto", "weight_only"] = Field(
        default="static", description="static: calibrated activation ranges; dynamic: ranges per batch at run "
                                      "time; auto: the strategy tries both; weight_only: MatMul weights in 4 or 8 "
                                      "bits per block (onnxruntime MatMulNBits), activations int8 at compute time "
                                      "(accuracy_level 4) or fp32")
    format: Literal["QDQ", "QOperator"] = Field(
        default="QDQ", description="onnxruntime: QuantizeLinear/DequantizeLinear pairs, or integer operators")
    calibration_samples: int | None = Field(default=None, ge=1, description="overrides data.calibration.samples")
    model_wise: OpConstraint | None = Field(default=None, description="constraints on every op")
    op_type_wise: dict[str, OpConstraint] = Field(default_factory=dict,
                                                  description="constraints per op type (e.g. Conv, MatMul, Linear)")
    op_wise: dict[str, OpConstraint] = Field(default_factory=dict, description="constraints per op name")
    keep_non_finite_fp32: bool = Field(
        default=True, description="keep tensors with infinite or absurd calibration ranges in fp32"
    )
    smooth_quant: SmoothQuantSpec | None = Field(
        default=None, description="SmoothQuant before static int8 (onnxruntime), e.g. {alpha: 0.5} or {alpha: auto}; "
                                  "unset: off")

    @model_validator(mode="after")
    def _smooth_quant_static(self) -> QuantizationSpec:
        if self.smooth_quant is not None and self.approach not in ("static", "auto"):
            raise ValueError(f"@spec.quantization.smoothQuant: applies to static int8 (approach static or auto), "
                             f"not approach {self.approach}; remove smoothQuant or change the approach")
        return self


class AccuracyCriterion(SpecModel):
    """Allowed accuracy loss against the fp32 baseline. Exactly one of relative/absolute.

    relative r, higherIsBetter:  passes when accuracy >= baseline * (1 - r)
    relative r, lowerIsBetter:   passes when accuracy <= baseline * (1 + r)
    absolute a, higherIsBetter:  passes when accuracy >= baseline - a
    absolute a, lowerIsBetter:   passes when accuracy <= baseline + a
    The edge counts as passing.
    """

    model_config = ConfigDict(json_schema_extra=cel.rules(cel.cel(  # _one_kind
        "!(has(self.relative) && has(self.absolute))", "give only one of relative or absolute, not both")))

    relative: float | None = Field(default=None, ge=0, lt=1,
                                   description="allowed loss as a fraction of the fp32 score (default 0.01)")
    absolute: float | None = Field(default=None, ge=0, description="allowed loss in the metric's units")
    higher_is_better: bool = Field(
        default=True,
        description="direction of the metric; default: the built-in metric's (false for mse and perplexity), else "
                    "your metric class's higher_is_better attribute must agree with it; true for evalFunc unless set",
        json_schema_extra=cel.no_default,  # set from the metric by JobSpec._direction_of_the_metric
    )

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
    model_config = ConfigDict(json_schema_extra=cel.rules(cel.cel(  # _parallel_within_max
        "!has(self.parallelTrials) || !has(self.maxTrials) || self.parallelTrials <= self.maxTrials",
        "parallelTrials must not exceed maxTrials (raise maxTrials or run fewer trials at once)",
        field_path=".parallelTrials")))

    strategy: str = Field(
        default="basic", description="basic, exhaustive, random, mixed_bits (weight_only: per-layer int4/int8/fp32; "
                                     "basic uses it for weight_only too), or module:Class of your own Strategy "
                                     "(imported from the job's folder)",
        json_schema_extra=cel.rules(cel.cel(  # _strategy_known
            f"self in {cel.in_list(BUILTIN_STRATEGIES)} || self.matches('{cel.ENTRYPOINT_RE}')",
            message_expression=f"'unknown strategy \"' + self + '\"; allowed: {', '.join(BUILTIN_STRATEGIES)}, "
                               "or module:Class of your own strategy'"), maxLength=253),
    )
    accuracy_criterion: AccuracyCriterion = Field(default_factory=AccuracyCriterion,
                                                  description="allowed loss of the score against fp32")
    objective: Literal["latency", "size"] = Field(
        default="latency", description="what the best passing config minimises (latency: at the largest batch size)")
    max_trials: int = Field(default=50, ge=1, le=10000, description="trials (quantized configs) at most")
    max_failed_trials: int | None = Field(default=None, ge=1,
                                          description="stop after this many crashed trials; default: no limit")
    max_consecutive_failures: int = Field(
        default=3, ge=0, le=1000,
        description="stop (RepeatedFailures) when this many trials in a row failed alike (same reason, e.g. "
                    "OOMKilled; for crashes also the same kind of message); the best passing config found is "
                    "still reported; 0 = never")
    timeout_seconds: int = Field(default=0, ge=0, description="wall-clock limit of the whole tuning; 0 = none")
    trial_timeout_seconds: int = Field(default=1800, ge=1, description="wall-clock limit of one trial")
    parallel_trials: int = Field(default=1, ge=1, le=256,
                                 description="trials at once (locally each is pinned to its share of the CPUs)")
    seed: int = Field(default=0, description="seed of randomised strategies")
    objective_tolerance: float = Field(
        default=0.05, ge=0, lt=1,
        description="objective: size: sizes within this fraction of the best count as equal; then fewest fp32 ops "
                    "wins (latency uses the measured confidence intervals instead)",
    )
    min_speedup: float = Field(
        default=1.0, gt=0,
        description="objective: latency: a passing config counts as a success only when its speedup over fp32 is "
                    "above this beyond measurement doubt (the whole confidence interval); else the run ends NoSpeedup",
    )
    confirm_candidates: int = Field(
        default=3, ge=0, le=10,
        description="objective: latency: before the run ends, re-measure this many best candidates against fp32 "
                    "and each other in one interleaved session; 0 = keep the in-trial figures",
    )

    @field_validator("strategy")
    @classmethod
    def _strategy_known(cls, value: str) -> str:
        if value in BUILTIN_STRATEGIES or ENTRYPOINT_PATTERN.match(value):
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
    """How latency is measured: the candidate and the fp32 model alternate in short windows in one process
    (A B A B ...), with the thread count the trial owns, until the speedup's confidence interval is narrow
    enough to decide or the time budget is spent."""

    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 32], min_length=1,
        description="batch sizes measured, each a batch tiled from the evaluation inputs (calibration inputs "
                    "with an evalFunc and no evaluation data); objective latency decides at the largest")
    warmup_runs: int = Field(default=10, ge=0, description="untimed runs of each model before measuring")
    runs: int = Field(default=50, ge=1, description="at least this many timed runs of each model per batch size")
    threads: int | None = Field(
        default=None, ge=1,
        description="intra-op threads of benchmark and evaluation; default: the CPUs the trial owns (locally the "
                    "machine's CPUs split among parallelTrials, in a pod spec.trial.resources.cpu)")
    min_rounds: int = Field(default=5, ge=3, le=1000, description="at least this many A/B rounds")
    max_seconds: float = Field(default=20.0, gt=0, le=3600,
                               description="time budget of one speed measurement per batch size")
    target_precision: float = Field(default=0.05, gt=0, lt=1,
                                    description="stop adding rounds once the speedup interval's half-width is "
                                                "below this fraction of the speedup")
    confidence: float = Field(default=0.95, ge=0.5, lt=1, description="confidence level of the speedup interval")
    decode: DecodeSpec | None = Field(
        default=None, description="a language model's decode speed instead: prefill time of a prompt and time per "
                                  "new token at batch 1 with the KV cache, e.g. {promptTokens: 64, newTokens: 32}; "
                                  "objective latency then decides on the time per token")


    @property
    def measured_batch_sizes(self) -> list[int]:
        """The batch sizes a speed measurement measures: all, except with `decode` (unless its withBatchSizes)."""
        return list(self.batch_sizes) if self.decode is None or self.decode.with_batch_sizes else []


class ResourcesSpec(SpecModel):
    cpu: int = Field(
        default=2, ge=1, description="whole CPUs (requests = limits, Guaranteed QoS)",
        json_schema_extra=cel.rules(cel.cel(  # ge=1; in the cluster an int or a quantity string such as "4"
            "type(self) == int ? self >= 1 : self.matches('^[1-9][0-9]*$')",
            "trial.resources.cpu must be a whole number of CPUs such as 2 or \"4\" (requests = limits, "
            "Guaranteed QoS)"), maxLength=6))
    memory: str = Field(default="4Gi", description="memory of a trial pod (requests = limits)",
                        json_schema_extra=cel.rules(pattern=cel.MEMORY_RE, maxLength=32))  # _memory_quantity

    @field_validator("memory")
    @classmethod
    def _memory_quantity(cls, value: str) -> str:
        if not re.match(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", value):
            raise ValueError(f"{value!r} is not a Kubernetes memory quantity such as 4Gi or 512Mi")
        return value


class TrialSpec(SpecModel):
    """Cluster-only settings of trial pods; `qtune tune` ignores them."""

    image: str | None = Field(default=None, description="image of the job's pods; default: the operator's trial "
                                                        "image. Another one must be allowed by the operator's "
                                                        "settings (allowed images). Immutable")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Kubernetes imagePullPolicy of trial pods")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="CPU and memory of a trial pod")
    node_selector: dict[str, str] = Field(default_factory=dict, description="extra node labels trial pods need "
                                                                           "(besides the Intel Xeon pool's)")
    node_affinity: dict[str, Any] | None = Field(
        default=None, description="narrows the Intel Xeon pool affinity: the pool's required expressions are "
                                  "added to each required term (never replaced)"
    )
    tolerations: list[dict[str, Any]] = Field(default_factory=list,
                                              description="tolerations of trial pods (dedicated pools); only "
                                                          "taint keys the operator's settings allow")
    service_account_name: str | None = Field(
        default=None, description="ServiceAccount every pod of the job runs as instead of the job's own generated "
                                  "one (<job>-runner); it must exist in the job's namespace and carry the label "
                                  "qtune.io/job-account: \"true\" (set by the namespace's administrator), else the "
                                  "job fails InvalidSpec; the operator never creates or changes it. Fixed once the "
                                  "job's pods ran: a later change fails the job InvalidSpec")
    queue_name: str | None = Field(
        default=None, description="Kueue LocalQueue (in the job's namespace) that admits each unit pod: the pods "
                                  "carry the label kueue.x-k8s.io/queue-name and wait for Kueue's admission "
                                  "(docs/kueue.md); default: none, pods are not queued",
        json_schema_extra=cel.rules(pattern=cel.QUEUE_NAME_RE, maxLength=63))  # _queue_name

    @field_validator("queue_name")
    @classmethod
    def _queue_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not re.match(cel.QUEUE_NAME_RE, value)):
            raise ValueError(f"{value!r} is not a LocalQueue name usable as a label value (lowercase letters, "
                             "digits, '-' and '.', at most 63 characters, starting and ending alphanumeric)")
        return value


class WorkspaceSpec(SpecModel):
    path: str | None = Field(default=None, description="local folder of the run's state (qtune tune), relative to "
                                                        "the job file's folder; default .qtune/<job name> beside it")
    persistent_volume_claim: str | None = Field(
        default=None, description="cluster: PVC holding model and data; it must carry the operator's workspace "
                                  "label (default qtune.io/workspace=true, set by the namespace's administrator). "
                                  "Immutable")
    mount_path: str = Field(default="/workspace", description="cluster: where the PVC is mounted, read-only, in "
                                                             "pods; relative paths and user modules resolve there. "
                                                             "Pods write only in the job's own folder "
                                                             ".qtune/<job>-<uid8> of it (their working directory) "
                                                             "and /tmp")
    trial_models: Literal["keep-best", "keep-all"] | None = Field(
        default=None, description="when the run ends, keep-best deletes the models of all trials but the winner "
                                  "and the other configs on the accuracy-speed front from the workspace (results "
                                  "and logs stay); keep-all keeps every model. Default: "
                                  "keep-best with qtune tune, the operator's setting (chart cleanup.trialModels) on "
                                  "a cluster")


class OutputSpec(SpecModel):
    path: str | None = Field(default=None, description="where the best model, config and report go, relative to "
                                                        "the job file's folder; default ./qtune-output/<job name> in "
                                                        "the current directory (qtune tune -o overrides)")


LOWER_IS_BETTER_METRICS = ("mse", "perplexity")


class JobSpec(SpecModel):
    model: ModelSpec = Field(description="the fp32 model and its framework")
    data: DataSpec = Field(description="calibration and evaluation data, and the metric")
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec, description="the search space")
    tuning: TuningSpec = Field(default_factory=TuningSpec, description="strategy, criterion, objective, limits")
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec, description="how latency is measured")
    trial: TrialSpec = Field(default_factory=TrialSpec, description="cluster only: trial pods")
    workspace: WorkspaceSpec = Field(default_factory=WorkspaceSpec, description="where the run's state lives")
    output: OutputSpec = Field(default_factory=OutputSpec, description="where the results go")

    @model_validator(mode="after")
    def _direction_of_the_metric(self) -> JobSpec:
        """accuracyCriterion.higherIsBetter follows a built-in metric unless given; given, it must agree."""
        evaluation, criterion = self.data.evaluation, self.tuning.accuracy_criterion
        if not evaluation.builtin_metric:
            return self  # a user metric's direction is checked when it is imported (runner)
        metric = evaluation.metric_name
        direction = metric not in LOWER_IS_BETTER_METRICS
        if "higher_is_better" not in criterion.model_fields_set:
            criterion.higher_is_better = direction
        elif criterion.higher_is_better != direction:
            raise ValueError(
                f"@spec.tuning.accuracyCriterion.higherIsBetter: {str(criterion.higher_is_better).lower()} "
                f"contradicts spec.data.evaluation.metric {metric} ({'higher' if direction else 'lower'} is "
                f"better); allowed: {str(direction).lower()}, or leave it out"
            )
        return self


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
