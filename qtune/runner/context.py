"""Everything one process needs to work on a job: the adaptor, the fp32 model, the data sets.

Paths in the job are relative to `base_dir` (the job file's folder locally, the workspace mount
in a pod). Shared, per-job state lives in the workspace folder: the tuning space, the baseline,
the fp32 reference outputs, the adaptor's calibration cache, and one folder per trial.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from qtune.adaptors import Adaptor, get_adaptor_class
from qtune.data import DataLoader, Dataset, Metric, create_metric, load_dataset
from qtune.data.metrics import UserMetric
from qtune.runner.evaluation import (
    EvaluationResult,
    StopRule,
    check_labels,
    evaluate_function,
    evaluate_metric,
)
from qtune.spec.entrypoints import add_job_dir, load_entrypoint
from qtune.spec.errors import DataError, ModelLoadError, SpecError
from qtune.spec.load import resolve_path
from qtune.spec.models import JobSpec, QuantizationJob
from qtune.spec.quantity import memory_bytes
from qtune.tuning import codec
from qtune.tuning.history import Baseline
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)

SPACE_FILE = "space.json"
BASELINE_FILE = "baseline.json"
REFERENCE_FILE = "reference_outputs.npy"


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class JobContext:
    job: QuantizationJob
    base_dir: Path
    workspace: Path
    threads: int = field(default_factory=default_threads)
    early_stopping: bool = field(default_factory=lambda: os.environ.get("QTUNE_EARLY_STOPPING", "1") != "0")
    """Stop a trial's evaluation once the criterion is out of reach (env QTUNE_EARLY_STOPPING=0: never)."""

    @property
    def spec(self) -> JobSpec:
        return self.job.spec

    def resolve(self, value: str) -> Path:
        return resolve_path(self.base_dir / "job.yaml", value)

    def __post_init__(self) -> None:
        add_job_dir(self.base_dir)  # every entrypoint of the job imports from its folder (qtune.spec.entrypoints)

    @cached_property
    def adaptor(self) -> Adaptor:
        cls = get_adaptor_class(self.spec.model.framework, self.base_dir)
        info: dict[str, Any] = {
            "workspace": str(self.workspace),
            "job_dir": str(self.base_dir),
            "inputs": [i.model_dump() for i in self.spec.model.inputs or []],
            "quantization": self.spec.quantization.model_dump(),
            "threads": self.threads,
            "random_seed": self.spec.tuning.seed,
            "output": self.spec.data.evaluation.output,
            "model": self.model_spec(),
            "calibration_memory_limit": self.calibration_memory_limit,
        }
        return cls(info)

    @property
    def calibration_memory_limit(self) -> int | None:
        """spec.data.calibration.memoryLimit in bytes; None: the adaptor's default budget."""
        quantity = self.spec.data.calibration.memory_limit
        return memory_bytes(quantity) if quantity is not None else None

    def model_spec(self) -> dict[str, Any]:
        model = self.spec.model.model_dump()
        for key in ("path", "weights"):
            if model.get(key):
                model[key] = str(self.resolve(model[key]))
        return model

    @cached_property
    def model(self) -> Any:
        spec = self.model_spec()
        if spec.get("path") and not Path(spec["path"]).exists():
            raise ModelLoadError(f"spec.model.path: model file not found: {spec['path']} (relative paths start "
                                 f"at the job file's folder, here {self.base_dir})")
        try:
            return self.adaptor.load_model(spec)
        except ModelLoadError as exc:
            if str(exc).startswith("spec."):
                raise
            raise ModelLoadError(f"spec.model.path: {exc}") from None

    @cached_property
    def input_names(self) -> list[str]:
        return self.adaptor.input_names(self.model)

    def _dataset(self, which: str, samples: int | None = None) -> Dataset:
        spec = getattr(self.spec.data, which)
        try:
            return load_dataset(spec, self.base_dir / "job.yaml", self.input_names, samples)
        except DataError as exc:
            raise DataError(f"spec.data.{which}: {exc}") from None

    @cached_property
    def calibration_set(self) -> Dataset:
        return self._dataset("calibration", self.spec.quantization.calibration_samples)

    @cached_property
    def evaluation_set(self) -> Dataset:
        evaluation = self.spec.data.evaluation
        if not evaluation.has_data:
            raise DataError("spec.data.evaluation: no evaluation data (path or entrypoint) is given; the evalFunc "
                            f"{evaluation.eval_func} loads its own")
        dataset = self._dataset("evaluation")
        if not evaluation.eval_func:
            source = Path(evaluation.path).name if evaluation.path else f"the data of {evaluation.entrypoint}"
            check_labels(evaluation.metric_name, dataset.labels, evaluation.labels, source,
                         evaluation.builtin_metric and self._builtin_needs_reference(dataset.labels is not None))
        return dataset

    def evaluation_loader(self) -> DataLoader:
        return self.evaluation_set.loader(self.spec.data.evaluation.batch_size)

    def calibration_loader(self) -> DataLoader:
        return self.calibration_set.loader(min(32, len(self.calibration_set)))

    @property
    def metric_name(self) -> str:
        """What `accuracy` means in results and reports: the built-in metric's name, or the user's
        `module:Name` metric or evalFunc. BaselineResult.metric carries it."""
        return self.spec.data.evaluation.metric_name

    def _builtin_needs_reference(self, has_labels: bool) -> bool:
        evaluation = self.spec.data.evaluation
        return create_metric(evaluation.metric_name, evaluation.k, has_labels).needs_reference

    def new_metric(self) -> Metric:
        """A fresh metric of the job (built-in, or the user's class/function imported from the job's folder).
        A user metric class declaring `higher_is_better` must agree with accuracyCriterion.higherIsBetter."""
        evaluation = self.spec.data.evaluation
        if evaluation.eval_func:
            raise DataError("spec.data.evaluation: the job scores models with its evalFunc, not a metric; "
                            "call JobContext.evaluate")
        metric = create_metric(evaluation.metric_name, evaluation.k, self.evaluation_set.labels is not None,
                               self.base_dir)
        if isinstance(metric, UserMetric) and metric.declares_direction:
            wanted = self.spec.tuning.accuracy_criterion.higher_is_better
            if metric.higher_is_better != wanted:
                raise SpecError(
                    "spec.tuning.accuracyCriterion.higherIsBetter",
                    f"is {str(wanted).lower()}, but metric {metric.name} says higher_is_better = "
                    f"{metric.higher_is_better}; allowed: {str(metric.higher_is_better).lower()}",
                )
        return metric

    @cached_property
    def eval_function(self) -> Callable[[Any], Any] | None:
        """The user's evalFunc(model) -> float, imported from the job's folder; None without one."""
        name = self.spec.data.evaluation.eval_func
        if not name:
            return None
        return load_entrypoint(name, "spec.data.evaluation.evalFunc", self.base_dir, kind="callable",
                               allowed="module:function(model) -> float")

    def pass_threshold(self, baseline_score: float) -> float:
        """The worst score that still meets the accuracy criterion against `baseline_score`."""
        from qtune.tuning.criterion import Criterion

        return Criterion.from_spec(self.spec.tuning.accuracy_criterion).threshold(baseline_score)

    def evaluate(self, model: Any, threshold: float | None = None,
                 baseline_score: float | None = None) -> EvaluationResult:
        """Score `model` the way the job says (metric over the evaluation batches, or the evalFunc).

        With `threshold` (or `baseline_score`, from which the criterion's threshold is computed) the
        evaluation stops as soon as the criterion can no longer be met and returns the best score
        still reachable (failing, `stopped_early` set); a model that passes is always evaluated in
        full. Without either (the fp32 baseline) it always runs in full."""
        evaluation = self.spec.data.evaluation
        if self.eval_function is not None:
            return evaluate_function(self.adaptor, model, self.eval_function, evaluation.metric_name,
                                     self.input_names)
        if threshold is None and baseline_score is not None:
            threshold = self.pass_threshold(baseline_score)
        rule = None
        if threshold is not None and self.early_stopping:
            rule = StopRule(threshold, self.spec.tuning.accuracy_criterion.higher_is_better)
        return evaluate_metric(self.adaptor, model, self.targets_loader(), self.new_metric(),
                               evaluation.metric_name, rule)

    @property
    def needs_reference(self) -> bool:
        """True when the metric compares with the fp32 model's outputs (cosine; mse without labels): the
        baseline then saves them (REFERENCE_FILE) for targets_loader()."""
        evaluation = self.spec.data.evaluation
        if evaluation.eval_func or not evaluation.builtin_metric:
            return False
        return self._builtin_needs_reference(self.evaluation_set.labels is not None)

    def targets_loader(self) -> DataLoader:
        """The evaluation data whose labels are what the metric compares against: the data-set
        labels, or the fp32 model's outputs for metrics that measure drift from fp32."""
        if not self.needs_reference:
            return self.evaluation_loader()
        reference = np.load(self.workspace / REFERENCE_FILE, allow_pickle=False)
        dataset = Dataset(self.evaluation_set.inputs, reference)
        return dataset.loader(self.spec.data.evaluation.batch_size)

    def benchmark_batches(self, sizes: list[int] | None = None) -> dict[int, dict[str, np.ndarray]]:
        """One input batch per batch size measured (`sizes`, default the benchmark's measured batch sizes), tiled
        from the evaluation data if short (from the calibration data when an evalFunc job has no evaluation data)."""
        source = self.evaluation_set if self.spec.data.evaluation.has_data else self.calibration_set
        batches = {}
        for size in (self.spec.benchmark.measured_batch_sizes if sizes is None else sizes):
            batch = {}
            for name, array in source.inputs.items():
                reps = -(-size // len(array))
                batch[name] = np.concatenate([array] * reps)[:size] if reps > 1 else array[:size]
            batches[size] = batch
        return batches

    @property
    def benchmark_threads(self) -> int:
        return self.spec.benchmark.threads or self.threads

    # --- shared per-job files -----------------------------------------------------------
    def load_space(self) -> TuningSpace:
        return codec.load(TuningSpace, json.loads((self.workspace / SPACE_FILE).read_text()))

    def load_baseline(self) -> Baseline:
        return codec.load(Baseline, json.loads((self.workspace / BASELINE_FILE).read_text()))

    def trial_dir(self, index: int | str) -> Path:
        return self.workspace / "trials" / str(index)
