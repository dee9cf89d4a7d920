"""The adaptor contract (after the LPOT adaptor design) and its registry.

An adaptor is the only place that knows a framework. The tuning engine sees capabilities and
tune configs (plain data); the runner calls the methods below. Third-party adaptors subclass
`Adaptor` in their own package and register with `@adaptor_registry`; a job names them by the
registered name or as `package.module:ClassName`.

Capability (returned by `query_fw_capability`), LPOT-shaped::

    {
      "optypewise": {"Conv": {"activation": {...}, "weight": {...}, "approach": ["static"]}},
      "opwise": {("conv1", "Conv"): {"activation": {"dtype": ["uint8", "int8", "fp32"],
                                                    "scheme": ["asym", "sym"],
                                                    "granularity": ["per_tensor"],
                                                    "algorithm": ["minmax", "kl", "percentile"],
                                                    "reduce_range": [False, True]},
                                     "weight": {"dtype": ["int8", "fp32"], "scheme": ["sym"],
                                                "granularity": ["per_channel", "per_tensor"],
                                                "algorithm": ["minmax"]},
                                     "approach": ["static"]}},
      "graph_order": ["conv1", ...],                 # quantizable op names in topological order
      "notes": {"conv1": "why an op was restricted"}, # optional, shown to the user
    }

The first value of each list is the adaptor's preferred (default) choice. `fp32` must be the
last dtype; ops without weights have no "weight" entry. Everything is JSON-friendly except the
tuple keys of "opwise" (kept for LPOT compatibility; `qtune.tuning.space` flattens them).
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qtune.data import DataLoader, Dataset, Metric
from qtune.spec.entrypoints import load_entrypoint
from qtune.spec.errors import SpecError

logger = logging.getLogger(__name__)

ADAPTORS: dict[str, type[Adaptor]] = {}

# Built-in adaptors are imported lazily so that, e.g., the operator never imports torch.
_BUILTIN_MODULES = {"onnxruntime": "qtune.adaptors.onnxrt", "pytorch": "qtune.adaptors.pytorch"}


def adaptor_registry(cls: type[Adaptor]) -> type[Adaptor]:
    """Class decorator registering an adaptor under `cls.name` (default: the class name)."""
    name = getattr(cls, "name", None) or cls.__name__
    if name in ADAPTORS and ADAPTORS[name] is not cls:
        raise ValueError(f"adaptor name {name!r} is already registered by {ADAPTORS[name].__qualname__}")
    ADAPTORS[name] = cls
    return cls


FRAMEWORK_FIELD = "spec.model.framework"


def get_adaptor_class(framework: str, base_dir: str | Path | None = None) -> type[Adaptor]:
    """Resolve `framework` from a job: a registered name, a built-in, or `module:Class` (imported from
    the job's folder `base_dir`, see qtune.spec.entrypoints, or the Python path).
    Raises SpecError naming spec.model.framework when it cannot."""
    if framework in ADAPTORS:
        return ADAPTORS[framework]
    if framework in _BUILTIN_MODULES:
        try:
            importlib.import_module(_BUILTIN_MODULES[framework])
        except ImportError as exc:
            extra = "torch" if framework == "pytorch" else "onnxruntime"
            raise SpecError(
                FRAMEWORK_FIELD, f"framework {framework!r} needs packages that are not installed ({exc.name}); "
                f"install qtune[{extra}]"
            ) from None
        return ADAPTORS[framework]
    if ":" in framework:
        allowed = "a registered adaptor name or module:Class of a qtune Adaptor subclass"
        cls = load_entrypoint(framework, FRAMEWORK_FIELD, base_dir, kind="class", allowed=allowed)
        if not issubclass(cls, Adaptor):
            raise SpecError(FRAMEWORK_FIELD, f"{framework} is not a qtune Adaptor subclass; allowed: {allowed}")
        return cls
    known = sorted(set(ADAPTORS) | set(_BUILTIN_MODULES))
    raise SpecError(FRAMEWORK_FIELD, f"unknown framework {framework!r}; allowed: {', '.join(known)} or module:Class")


@dataclass(frozen=True)
class StepModel:
    """A model run step by step with its own outputs fed back (a decoder's KV cache, qtune.runner.decode_speed):
    its inputs as (name, shape, numpy dtype) with None or a name for a dynamic dimension, its output names, and
    `run(feed)`: every output, in that order."""

    inputs: list[tuple[str, list[int | str | None], Any]]
    outputs: list[str]
    run: Callable[[dict[str, Any]], list[Any]]


@dataclass(frozen=True)
class LatencyStats:
    """One benchmark: per-batch latency in milliseconds."""

    batch_size: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "runs": self.runs,
            "threads": self.threads,
        }


class Adaptor(ABC):
    """Bridge to one framework. Instances are cheap; one per job (or per trial process).

    `framework_specific_info` keys used by the built-in adaptors:
      workspace (str): folder for caches shared by all trials of a job (calibration statistics,
          optimised models); job_dir (str): folder that relative paths are resolved against;
      inputs (list of {name, shape, dtype}); quantization (the spec's quantization section as a
          dict); threads (int); random_seed (int); output (name or index of the model output the
          metric reads); calibration_data (a qtune Dataset, set before query_fw_capability so an
          adaptor can spot non-finite ranges up front) and calibration_sampling_size (int);
      calibration_memory_limit (int bytes or None: spec.data.calibration.memoryLimit, None = the default).
    """

    name: ClassVar[str] = ""

    def __init__(self, framework_specific_info: dict[str, Any]) -> None:
        self.info = dict(framework_specific_info)
        self.workspace = Path(self.info.get("workspace") or ".qtune-workspace")
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        """Seconds spent in the last quantize(), split as {"calibration": s, "quantize": s}."""

    # --- model I/O ------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, model_spec: dict[str, Any]) -> Any:
        """Load the fp32 model named by the job's `spec.model` (a dict, camelCase keys).

        Raises qtune.spec.ModelLoadError with a one-line reason when it cannot."""

    @abstractmethod
    def save_model(self, model: Any, path: Path) -> Path:
        """Write a model (fp32 or quantized) so that a user can load it for inference."""

    @abstractmethod
    def model_size(self, model: Any) -> int:
        """Serialized size in bytes."""

    @abstractmethod
    def input_names(self, model: Any) -> list[str]:
        """Names of the model inputs, in order; data sets are keyed by these."""

    # --- the LPOT contract ------------------------------------------------------------------
    @abstractmethod
    def query_fw_capability(self, model: Any) -> dict[str, Any]:
        """Pre-optimise the fp32 graph where the framework can, then describe per op type and per
        op what can be quantized and how (see the module docstring)."""

    @abstractmethod
    def query_fused_patterns(self, model: Any) -> list[list[str]]:
        """Op-type sequences the backend fuses, e.g. [["Conv", "Relu"], ["MatMul", "Add"]]."""

    @abstractmethod
    def quantize(self, tune_cfg: dict[str, Any], model: Any, dataloader: DataLoader,
                 q_func: Any = None) -> Any:
        """Calibrate (cached per job and algorithm) and convert. `tune_cfg` is a TuneConfig dict;
        every per-op choice is honoured, `fp32` meaning the op is left unquantized."""

    @abstractmethod
    def evaluate(self, model: Any, dataloader: DataLoader, postprocess: Any = None,
                 metric: Metric | None = None, measurer: Any = None, iteration: int = -1,
                 tensorboard: bool = False) -> float:
        """Run the model over `dataloader` and return `metric`'s result. `postprocess`, when
        given, maps the model's raw outputs (list of arrays) to the array the metric reads;
        targets are the batch labels."""

    # --- qtune extensions ---------------------------------------------------------------------
    def run(self, model: Any, inputs: dict[str, Any]) -> list[Any]:
        """All outputs (numpy arrays, in the model's output order) of one run on a batch of named
        inputs: what a user's evalFunc calls. The default runs `predict` (the metric's output only);
        the built-in adaptors return every output."""
        return [self.predict(model, DataLoader(Dataset(dict(inputs), None), 1 << 30))]

    @abstractmethod
    def predict(self, model: Any, dataloader: DataLoader, output: str | int | None = None) -> Any:
        """Concatenated outputs of one model output over the data (numpy array)."""

    @abstractmethod
    def benchmark(self, model: Any, inputs: dict[str, Any], warmup: int, runs: int,
                  threads: int) -> LatencyStats:
        """Latency of one batch `inputs`: warm-up, then `runs` timed runs with a fixed thread count."""

    def make_runner(self, model: Any, inputs: dict[str, Any], threads: int) -> Callable[[], None]:
        """A closure running ONE inference of `model` on the batch `inputs` with `threads` threads.

        Everything that is not the inference (session or module, input checks and conversion) is
        prepared here, once, so that `qtune.runner.benchmark` times only the model. Built-in adaptors
        override this; the default calls `benchmark(model, inputs, 0, 1, threads)`, whose per-call
        overhead then weighs on fp32 and the candidate alike."""
        def run() -> None:
            self.benchmark(model, inputs, 0, 1, threads)

        return run

    def step_model(self, model: Any, threads: int) -> StepModel:
        """`model` as a StepModel with `threads` threads, for a decode measurement (spec.benchmark.decode).
        Adaptors that cannot run one raise NotImplementedError (the runner names the field)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run a model step by step")

    def op_sensitivity(self, model: Any, tune_cfg: dict[str, Any], dataset: Dataset) -> dict[str, float]:
        """How much each op, quantized alone as in `tune_cfg`, perturbs its own output against fp32
        (e.g. relative MSE) on a few calibration samples; higher = more sensitive. Must be cheap: no
        full trial per op. Adaptors that cannot measure it return {} (the strategy then walks the
        graph backwards)."""
        return {}

    def op_time_shares(self, model: Any, tune_cfg: dict[str, Any], dataloader: DataLoader,
                       inputs: dict[str, Any], threads: int) -> dict[str, dict[str, float]]:
        """Per-op share of the fp32 model's time on the batch `inputs`, in fp32 and quantized as in
        `tune_cfg` (calibrated with `dataloader`): {"fp32": {op: share}, "int8": {op: share}} (see
        qtune.tuning.space.TuningSpace.time_share). Adaptors without a per-op profiler return {}
        (the strategy then uses a prior by op type)."""
        return {}
