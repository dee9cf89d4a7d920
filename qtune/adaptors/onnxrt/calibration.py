"""Calibration statistics, computed once per job and shared by every trial (and process).

Key of one statistics file: (optimised-model hash, calibration-data fingerprint, algorithm, sample
count). Files live in `<workspace>/calibration/` as ORT `TensorsData` JSON (`save_tensors_data`,
which writes atomically); an inter-process lock per key makes a concurrent second trial wait for
the first instead of measuring again. A trial then merges, per tensor, the range measured by the
algorithm its owning op asked for into one MinMax-labelled `TensorsData` and hands it to
`quantize_static(calibration_cache_path=...)`, so ORT itself never recalibrates.

Memory. ORT's calibrators hold what one `collect_data` call produces: MinMax a few scalars per
tensor, the histogram calibrators (KL, percentile) every calibrated intermediate tensor of every
sample of the call (PP-OCRv4 det at 320x640: 343 MB per sample, so 100 samples in one call would
need ~35 GB). And ORT's default execution order runs the inserted ReduceMin/ReduceMax nodes late,
keeping every activation of a MinMax run alive (one run of 16 such samples: 5.7 GB; 100 samples in
runs of 16, qtune's MinMax before: 11.9 GB peak; in priority order, which `_lean_session` selects,
0.7 GB for a run of 16). So one probe sample measures what a sample in flight costs,
the samples are collected in chunks that keep chunk x that under the memory budget
(`spec.data.calibration.memoryLimit`, `memory_budget`), and the process's peak RSS during the
calibration is reported. Chunking does not change the ranges: MinMax merges min/max exactly, and
the histograms are seeded with the MinMax range of the same samples (`_seed_histograms`), so
every chunk adds its counts to the very bins one call over all samples would use.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtune.adaptors.memory import PeakWindow, container_memory_limit, human_bytes, rss_bytes
from qtune.adaptors.onnxrt.budget import (
    CALIBRATION_BATCH,
    ChunkPlan,
    MemoryBudget,
    memory_budget,
    plan_chunks,
)
from qtune.adaptors.onnxrt.capability import ORT_ALGORITHM_NAMES, range_problem
from qtune.adaptors.onnxrt.workspace import file_lock, private_model_path

logger = logging.getLogger(__name__)

HISTOGRAM_OPTIONS: dict[str, dict[str, Any]] = {
    # Non-symmetric percentile: activations after ReLU would waste half of an asymmetric range.
    "percentile": {"symmetric": False, "percentile": 99.999, "num_bins": 2048},
    # KL searches thresholds from num_quantized_bins/2 to num_bins/2 bins around zero: with 128 bins (ORT's
    # default) over the whole range there is one candidate, the MinMax range. 512 bins: thresholds from a
    # quarter of max|x| up, at 0.14 s per tensor in ORT's search (2048 as TensorRT: 1.1 s per tensor).
    "kl": {"symmetric": False, "num_bins": 512, "num_quantized_bins": 128},
}
HISTOGRAM_RECIPE = 2
"""Part of a histogram algorithm's cache file name: bump when HISTOGRAM_OPTIONS or the collection change
(2: one-call-equal chunks seeded with the MinMax range, KL over 512 bins)."""


@dataclass
class CalibrationSet:
    """The first `count` samples of the calibration data, re-batched for the model."""

    inputs: dict[str, np.ndarray]
    count: int
    fingerprint: str

    def batches(self, batch_size: int = CALIBRATION_BATCH, start: int = 0,
                stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most `batch_size` samples over samples [start, stop)."""
        stop = self.count if stop is None else min(stop, self.count)
        for first in range(start, stop, batch_size):
            yield {name: array[first:min(first + batch_size, stop)] for name, array in self.inputs.items()}


def collect_samples(dataloader: Iterable[Any], count: int | None) -> CalibrationSet:
    """Take up to `count` samples from a loader of (inputs dict, labels) batches."""
    parts: dict[str, list[np.ndarray]] = {}
    taken = 0
    for batch in dataloader:
        inputs = batch[0] if isinstance(batch, tuple | list) else batch
        size = len(next(iter(inputs.values())))
        keep = size if count is None else min(size, count - taken)
        for name, array in inputs.items():
            parts.setdefault(name, []).append(np.asarray(array)[:keep])
        taken += keep
        if count is not None and taken >= count:
            break
    arrays = {name: np.ascontiguousarray(np.concatenate(chunks)) for name, chunks in parts.items()}
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + str(arrays[name].shape).encode() + str(arrays[name].dtype).encode())
        digest.update(arrays[name].tobytes())
    return CalibrationSet(arrays, taken, digest.hexdigest()[:16])


class _Reader:
    """An ORT CalibrationDataReader over a list of feeds (duck-typed: get_next)."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._iterator = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)

    def __iter__(self) -> _Reader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def cache_path(cache_dir: Path, model_hash: str, data: CalibrationSet, algorithm: str) -> Path:
    label = algorithm if algorithm == "minmax" else f"{algorithm}.r{HISTOGRAM_RECIPE}"
    return cache_dir / f"{model_hash[:16]}-{data.fingerprint}-{label}-n{data.count}.json"


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """ORT's histogram collector prints progress; keep it out of the user's terminal."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logger.debug("onnxruntime calibration: %s", buffer.getvalue().strip().replace("\n", " | "))


@dataclass
class Calibration:
    """The statistics of one algorithm, and what measuring them took (nothing on a cache hit)."""

    tensors: Any
    seconds: float = 0.0
    cache_hit: bool = False
    peak_rss_bytes: int | None = None
    """The process's peak resident set while it calibrated."""
    peak_exact: bool = False
    """False: the kernel refused to reset the peak, so `peak_rss_bytes` is the process's peak so far."""
    plan: ChunkPlan | None = None
    budget: MemoryBudget | None = None

    def describe(self) -> str:
        if self.cache_hit or self.plan is None or self.budget is None:
            return "cached"
        peak = human_bytes(self.peak_rss_bytes) if self.peak_exact else f"at most {human_bytes(self.peak_rss_bytes)}"
        return (f"{self.plan.chunk} samples per call ({human_bytes(self.plan.sample_bytes)} per sample, budget "
                f"{self.budget.describe()}), peak RSS {peak}")


def calibrate(model_path: Path, model_hash: str, data: CalibrationSet, algorithm: str, cache_dir: Path,
              op_types: list[str], skip_tensors: set[str] | None = None,
              data_files: list[Path] | None = None, memory_limit: int | None = None,
              seed_ranges: Any = None) -> Calibration:
    """TensorsData of `algorithm` ("minmax" | "kl" | "percentile") for the model, from the cache when
    present, else measured within `memory_limit` bytes (None: the default budget). `seed_ranges`: the
    MinMax TensorsData of the same samples, which makes chunked histograms equal one-call ones."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    path = cache_path(cache_dir, model_hash, data, algorithm)
    if path.is_file():
        return Calibration(load_tensors_data(path), cache_hit=True)
    with file_lock(cache_dir / ".locks" / f"{path.stem}.lock"):
        if path.is_file():  # another process measured it while we waited
            return Calibration(load_tensors_data(path), cache_hit=True)
        started = time.perf_counter()
        with PeakWindow() as window:
            budget = memory_budget(memory_limit, container_memory_limit(), rss_bytes())
            with private_model_path(model_path) as private:
                tensors, plan = _measure(private, data, algorithm, op_types, skip_tensors or set(), bool(data_files),
                                         budget, seed_ranges)
        from onnxruntime.quantization.calibrate import save_tensors_data

        save_tensors_data(tensors, path)
        result = Calibration(tensors, time.perf_counter() - started, False, window.peak_bytes, window.exact,
                             plan, budget)
        logger.info("calibrated %d tensors with %s on %d samples in %.2fs, %s -> %s", len(tensors.data),
                    algorithm, data.count, result.seconds, result.describe(), path.name)
        return result


def _measure(model_path: Path, data: CalibrationSet, algorithm: str, op_types: list[str],
             skip_tensors: set[str], external_data: bool, budget: MemoryBudget,
             seed_ranges: Any) -> tuple[Any, ChunkPlan]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    method = CalibrationMethod[ORT_ALGORITHM_NAMES[algorithm]]
    with tempfile.TemporaryDirectory(prefix="qtune-calib-") as tmp, _quiet_stdout():
        calibrator = create_calibrator(
            Path(model_path), op_types,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method,
            use_external_data_format=external_data,
            extra_options=HISTOGRAM_OPTIONS.get(algorithm, {}),
        )
        _lean_session(calibrator)
        if algorithm != "minmax":
            # Histograms crash on (or are ruined by) non-finite tensors: leave those out; their
            # range comes from MinMax.
            selected = getattr(calibrator, "tensors_to_calibrate", None)
            if skip_tensors and isinstance(selected, set):
                selected.difference_update(skip_tensors)
            _seed_histograms(calibrator, seed_ranges)
        plan = plan_chunks(probe_sample_bytes(calibrator.infer_session, next(data.batches(1))), budget, data.count)
        for start in range(0, data.count, plan.chunk):
            calibrator.collect_data(_Reader(data.batches(plan.chunk, start, start + plan.chunk)))
        result = calibrator.compute_data()
        del calibrator
    return result, plan


def _lean_session(calibrator: Any) -> None:
    """Replace the calibrator's session by one that runs the same augmented model in ORT's priority-based
    order. ORT's default order runs the inserted ReduceMin/ReduceMax nodes late, so every activation of
    a run stays alive until the end (PP-OCRv4 det, one run of 16 samples of 320x640: 5.7 GB peak; in priority
    order 0.7 GB).
    The order changes when ops run, not what they compute."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's calibrators
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    calibrator.infer_session = None  # free the first session before building the second
    calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, sess_options=options,
                                                    providers=calibrator.execution_providers)


def probe_sample_bytes(session: Any, feed: dict[str, np.ndarray]) -> int:
    """What one sample in flight adds to the process: the larger of what its run returns (a histogram
    calibrator keeps every output until its collection call ends) and how far the run raised the peak
    RSS (a MinMax run's activations; ORT's arena keeps them, so the RSS after the run shows them where
    the peak cannot be reset). One-off costs of a first run make it an over-estimate, never an under-."""
    with PeakWindow() as window:
        outputs = session.run(None, feed)
        held = sum(int(getattr(output, "nbytes", 0)) for output in outputs)
        after = rss_bytes()
        del outputs
    if window.exact:
        raised = window.added_bytes or 0
    else:
        raised = max(0, (after or 0) - (window.start_bytes or 0))
    return max(held, raised, 1)


def _seed_histograms(calibrator: Any, seed_ranges: Any) -> int:
    """Start every histogram at the MinMax range of the same samples (returns how many were seeded).

    ORT's collector sizes a tensor's bins from the first collection call and widens them with bins of
    the same width when a later call goes further, so chunked histograms differ from one call's
    (PP-OCRv4 det, 8 samples one per call against one call: KL thresholds off by up to 76% of a
    tensor's range, percentile by 0.1%; benchmarks/calibration_memory.py). A
    histogram that starts empty over the final range [-max|x|, max|x|] (what one call over all samples
    would build) takes every chunk's counts into the same bins: the same histogram, the same KL or
    percentile thresholds, whatever the chunk size. Only for histograms of values (ORT's entropy,
    distribution and asymmetric percentile); a symmetric percentile keeps ORT's own merging."""
    if seed_ranges is None:
        return 0
    try:
        from onnxruntime.quantization.calibrate import HistogramCollector

        method = calibrator.method
        if method not in ("entropy", "distribution", "percentile") or (method == "percentile" and calibrator.symmetric):
            return 0
        collector = HistogramCollector(method=method, symmetric=calibrator.symmetric, num_bins=calibrator.num_bins,
                                       num_quantized_bins=calibrator.num_quantized_bins,
                                       percentile=calibrator.percentile, scenario=calibrator.scenario)
        for name in calibrator.tensors_to_calibrate:
            if name not in seed_ranges:
                continue
            low, high = (np.asarray(value, dtype=np.float32).reshape(-1) for value in seed_ranges[name].range_value)
            if low.size != 1 or high.size != 1 or not (np.isfinite(low[0]) and np.isfinite(high[0])):
                continue
            low_value, high_value = low[0], high[0]
            threshold = np.array(max(abs(low_value), abs(high_value)), dtype=np.float32)
            hist, edges = np.histogram(np.empty(0, dtype=np.float32), calibrator.num_bins,
                                       range=(-threshold, threshold))
            collector.histogram_dict[name] = (hist, edges, low_value, high_value, threshold)
        calibrator.collector = collector
        return len(collector.histogram_dict)
    except (AttributeError, TypeError) as exc:  # another ORT version: its own merging applies
        logger.debug("histograms not seeded (%s): chunked ranges may differ slightly from one call's", exc)
        return 0


def tensor_range(tensors: Any, name: str) -> tuple[float, float] | None:
    if tensors is None or name not in tensors:
        return None
    low, high = tensors[name].range_value
    return float(np.asarray(low).min()), float(np.asarray(high).max())


def problem_tensors(minmax: Any) -> dict[str, str]:
    """Tensors whose MinMax range is non-finite or absurd → reason."""
    problems: dict[str, str] = {}
    for name in minmax.keys():
        bounds = tensor_range(minmax, name)
        if bounds is None:
            continue
        why = range_problem(*bounds)
        if why:
            problems[name] = why
    return problems


def merged_tensors_data(minmax: Any, by_algorithm: dict[str, Any], owner_algorithm: dict[str, str],
                        sanitize: bool = True) -> Any:
    """One MinMax-labelled TensorsData: per tensor the range of the algorithm its owner chose
    (MinMax when the owner chose MinMax, has no preference, or that algorithm lacks the tensor)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    merged: dict[str, Any] = {}
    big = np.float32(np.finfo(np.float32).max / 4)
    for name in minmax.keys():
        algorithm = owner_algorithm.get(name, "minmax")
        bounds = tensor_range(by_algorithm.get(algorithm), name) or tensor_range(minmax, name)
        low, high = bounds
        if sanitize and not (np.isfinite(low) and np.isfinite(high)):
            low = float(np.nan_to_num(low, nan=0.0, neginf=-big, posinf=big))
            high = float(np.nan_to_num(high, nan=0.0, neginf=-big, posinf=big))
        merged[name] = TensorData(lowest=np.array(low, dtype=np.float32), highest=np.array(high, dtype=np.float32))
    return TensorsData(CalibrationMethod.MinMax, merged)
