"""Everything one process needs to work on a job: the adaptor, the fp32 model, the data sets.

Paths in the job are relative to `base_dir` (the job file's folder locally, the workspace mount
in a pod). Shared, per-job state lives in the workspace folder: the tuning space, the baseline,
the fp32 reference outputs, the adaptor's calibration cache, and one folder per trial.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from qtune.adaptors import Adaptor, get_adaptor_class
from qtune.data import DataLoader, Dataset, Metric, create_metric, load_dataset
from qtune.spec.errors import DataError, ModelLoadError
from qtune.spec.load import resolve_path
from qtune.spec.models import JobSpec, QuantizationJob
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

    @property
    def spec(self) -> JobSpec:
        return self.job.spec

    def resolve(self, value: str) -> Path:
        return resolve_path(self.base_dir / "job.yaml", value)

    @cached_property
    def adaptor(self) -> Adaptor:
        cls = get_adaptor_class(self.spec.model.framework)
        info: dict[str, Any] = {
            "workspace": str(self.workspace),
            "job_dir": str(self.base_dir),
            "inputs": [i.model_dump() for i in self.spec.model.inputs or []],
            "quantization": self.spec.quantization.model_dump(),
            "threads": self.threads,
            "random_seed": self.spec.tuning.seed,
            "output": self.spec.data.evaluation.output,
            "model": self.model_spec(),
        }
        return cls(info)

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
            raise ModelLoadError(f"model file not found: {spec['path']}")
        return self.adaptor.load_model(spec)

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
        return self._dataset("evaluation")

    def evaluation_loader(self) -> DataLoader:
        return self.evaluation_set.loader(self.spec.data.evaluation.batch_size)

    def calibration_loader(self) -> DataLoader:
        return self.calibration_set.loader(min(32, len(self.calibration_set)))

    def new_metric(self) -> Metric:
        evaluation = self.spec.data.evaluation
        return create_metric(evaluation.metric, evaluation.k, self.evaluation_set.labels is not None)

    def targets_loader(self) -> DataLoader:
        """The evaluation data whose labels are what the metric compares against: the data-set
        labels, or the fp32 model's outputs for metrics that measure drift from fp32."""
        if not self.new_metric().needs_reference:
            return self.evaluation_loader()
        reference = np.load(self.workspace / REFERENCE_FILE, allow_pickle=False)
        dataset = Dataset(self.evaluation_set.inputs, reference)
        return dataset.loader(self.spec.data.evaluation.batch_size)

    def benchmark_batches(self) -> dict[int, dict[str, np.ndarray]]:
        """One input batch per configured batch size, tiled from the evaluation data if short."""
        batches = {}
        for size in self.spec.benchmark.batch_sizes:
            batch = {}
            for name, array in self.evaluation_set.inputs.items():
                reps = -(-size // len(array))
                batch[name] = np.concatenate([array] * reps)[:size] if reps > 1 else array[:size]
            batches[size] = batch
        return batches

    @property
    def benchmark_threads(self) -> int:
        return self.spec.benchmark.threads or self.threads

    # --- shared per-job files -----------------------------------------------------------
    def load_space(self) -> TuningSpace:
        return TuningSpace.from_dict(json.loads((self.workspace / SPACE_FILE).read_text()))

    def load_baseline(self) -> Baseline:
        return Baseline(**json.loads((self.workspace / BASELINE_FILE).read_text()))

    def trial_dir(self, index: int | str) -> Path:
        return self.workspace / "trials" / str(index)
