"""The data sections of a QuantizationJob (`spec.data`): calibration and evaluation datasets, and how a
model is scored. `qtune.spec.models` re-exports them.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from qtune.spec import cel
from qtune.spec.base import ENTRYPOINT_PATTERN, METRICS, Entrypoint, SpecModel


class DatasetSpec(SpecModel):
    """Calibration data: samples along axis 0, one array per model input, named like the inputs."""

    model_config = ConfigDict(json_schema_extra=cel.rules(cel.cel(  # _path_or_entrypoint
        "has(self.path) != has(self.entrypoint)",
        "give exactly one of path (.npz file) or entrypoint (module:function)")))

    path: str | None = Field(
        default=None,
        description=".npz file (numpy, no pickles) with one array per model input, keyed by input name, relative "
                    "to the job file's folder (in a pod: to the workspace mount). Arrays must have the model's "
                    "input dtypes (float32 unless spec.model.inputs says otherwise); no labels needed",
    )
    entrypoint: Entrypoint = Field(
        default=None,
        description="module:function returning (inputs, labels) - inputs a dict of arrays keyed by input name "
                    "(or one array for a one-input model), labels may be None - or a qtune Dataset",
    )
    samples: int | None = Field(
        default=None, ge=1,
        description="use the first N samples in file order (no shuffling); default: all",
    )
    labels: str = Field(default="labels", description="name of the label array in the .npz")

    @model_validator(mode="after")
    def _path_or_entrypoint(self) -> DatasetSpec:
        if bool(self.path) == bool(self.entrypoint):
            raise ValueError("give exactly one of path (.npz file) or entrypoint (module:function)")
        return self


def _metric_form(value: str | None) -> str | None:
    if value is not None and value not in METRICS and not ENTRYPOINT_PATTERN.match(value):
        raise ValueError(
            f"got {value!r}; allowed: {', '.join(repr(m) for m in METRICS[:-1])} or {METRICS[-1]!r}, or "
            "module:Name of your own metric (a class with "
            "update(preds, labels), reset(), result(), or a function (preds, labels) -> float)"
        )
    return value


class EvaluationSpec(DatasetSpec):
    """Evaluation data and how a model is scored: a metric over (outputs, labels) batches, or your own
    evaluation function."""

    model_config = ConfigDict(json_schema_extra=cel.rules(  # _path_or_entrypoint
        cel.cel("has(self.evalFunc) || has(self.path) != has(self.entrypoint)",
                "give exactly one of path (.npz file) or entrypoint (module:function), or an evalFunc "
                "(module:function) that loads its own data"),
        cel.cel("!has(self.evalFunc) || !(has(self.path) && has(self.entrypoint))",
                "give at most one of path (.npz file) or entrypoint (module:function)"),
        cel.cel("!has(self.evalFunc) || !has(self.metric)",
                "give either metric or evalFunc, not both (evalFunc returns the score itself)"),
    ))

    path: str | None = Field(
        default=None,
        description=".npz file (numpy, no pickles) with one array per model input, keyed by input name, plus "
                    "the labels array (any dtype the metric reads: integer class indices for top1/topk/f1, "
                    "integer next-token ids for perplexity, "
                    "numbers for mse, strings for a metric of your own), relative to the job file's folder "
                    "(in a pod: to the workspace mount)",
    )
    samples: int | None = Field(
        default=None, ge=1,
        description="evaluate the first N samples in file order (no shuffling); default: all",
    )
    metric: Annotated[str | None, AfterValidator(_metric_form)] = Field(
        default=None,
        description="top1 | topk | f1 | mse | cosine | perplexity, or module:Name of your own: a class with "
                    "update(preds, "
                    "labels), reset(), result() (optional higher_is_better, and bounds(remaining_labels) -> "
                    "(low, high) to enable early stopping), or a function (preds, labels) -> float over the "
                    "whole set. Default: top1 (none with evalFunc). cosine, and mse without labels, compare "
                    "with the fp32 model's outputs; perplexity (lower is better) reads logits [batch, positions, "
                    "vocabulary] and integer next-token labels, negative ones left out",
    )
    eval_func: Entrypoint = Field(
        default=None,
        description="module:function(model) -> float instead of a metric: `model` is callable on a dict of "
                    "named numpy inputs (or one array) and returns the list of outputs, whatever the framework. "
                    "Evaluation data is then optional (benchmark batches come from the calibration data)",
    )
    k: int = Field(default=5, ge=1, description="k of the topk metric")
    output: str | int | None = Field(
        default=None,
        description="model output the metric reads: name or index (pytorch: index or output_<index>); default 0",
    )
    batch_size: int = Field(default=64, ge=1, description="samples per model run during evaluation")

    @model_validator(mode="after")
    def _path_or_entrypoint(self) -> EvaluationSpec:
        if self.eval_func:
            if self.path and self.entrypoint:
                raise ValueError("give at most one of path (.npz file) or entrypoint (module:function)")
            if self.metric is not None:
                raise ValueError("give either metric or evalFunc, not both (evalFunc returns the score itself)")
            return self
        if bool(self.path) == bool(self.entrypoint):
            raise ValueError("give exactly one of path (.npz file) or entrypoint (module:function), "
                             "or an evalFunc (module:function) that loads its own data")
        return self

    @property
    def has_data(self) -> bool:
        return bool(self.path or self.entrypoint)

    @property
    def metric_name(self) -> str:
        """What the score is: the metric, or the evaluation function (reports and status name it)."""
        return self.eval_func or self.metric or "top1"

    @property
    def builtin_metric(self) -> bool:
        return not self.eval_func and (self.metric or "top1") in METRICS


class CalibrationSpec(DatasetSpec):
    """Calibration data, and the memory calibrating with it may take."""

    memory_limit: str | None = Field(
        default=None,
        description="onnxruntime: memory one calibration may add to its process (the intermediate tensors it "
                    "holds at once), a Kubernetes quantity such as 2Gi or 512Mi. The samples are calibrated in "
                    "chunks sized from one probe sample to stay within it, with the same ranges as all at once. "
                    "Default 2Gi; in a container with a memory limit (a trial pod) at most half of what that "
                    "limit leaves free, an explicit value included. Below one sample's need: one sample at a "
                    "time. The peak is reported per baseline and trial (peak_rss_bytes in the history)",
        json_schema_extra=cel.rules(pattern=cel.MEMORY_RE, maxLength=32))  # _memory_quantity

    @field_validator("memory_limit")
    @classmethod
    def _memory_quantity(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", value):
            raise ValueError(f"{value!r} is not a Kubernetes memory quantity such as 2Gi or 512Mi")
        return value


class DataSpec(SpecModel):
    calibration: CalibrationSpec = Field(description="data that calibrates activation ranges (static approach)")
    evaluation: EvaluationSpec = Field(description="data and metric that score every model against the criterion")
