"""Calibration statistics, computed once per job and shared by every trial (and process).

Key of one statistics file: (optimised-model hash, calibration-data fingerprint, algorithm, sample
count). Files live in `<workspace>/calibration/` as ORT `TensorsData` JSON (`save_tensors_data`,
which writes atomically); an inter-process lock per key makes a concurrent second trial wait for
the first instead of measuring again. A trial then merges, per tensor, the range measured by the
algorithm its owning op asked for into one MinMax-labelled `TensorsData` and hands it to
`quantize_static(calibration_cache_path=...)`, so ORT itself never recalibrates.
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

from qtune.adaptors.onnxrt.capability import ORT_ALGORITHM_NAMES, range_problem
from qtune.adaptors.onnxrt.workspace import file_lock, private_model_path

logger = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
HISTOGRAM_OPTIONS: dict[str, dict[str, Any]] = {
    # Non-symmetric percentile: activations after ReLU would waste half of an asymmetric range.
    "percentile": {"symmetric": False, "percentile": 99.999, "num_bins": 2048},
    "kl": {"symmetric": False, "num_bins": 128, "num_quantized_bins": 128},
}


@dataclass
class CalibrationSet:
    """The first `count` samples of the calibration data, re-batched for the model."""

    inputs: dict[str, np.ndarray]
    count: int
    fingerprint: str

    def batches(self, batch_size: int = CALIBRATION_BATCH) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.count, batch_size):
            yield {name: array[start:start + batch_size] for name, array in self.inputs.items()}


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
    return cache_dir / f"{model_hash[:16]}-{data.fingerprint}-{algorithm}-n{data.count}.json"


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """ORT's histogram collector prints progress; keep it out of the user's terminal."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logger.debug("onnxruntime calibration: %s", buffer.getvalue().strip().replace("\n", " | "))


def calibrate(model_path: Path, model_hash: str, data: CalibrationSet, algorithm: str, cache_dir: Path,
              op_types: list[str], skip_tensors: set[str] | None = None,
              data_files: list[Path] | None = None) -> tuple[Any, float, bool]:
    """TensorsData of `algorithm` ("minmax" | "kl" | "percentile") for the model, from the cache
    when present. Returns (tensors_data, seconds spent measuring, cache_hit)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    path = cache_path(cache_dir, model_hash, data, algorithm)
    if path.is_file():
        return load_tensors_data(path), 0.0, True
    with file_lock(cache_dir / ".locks" / f"{path.stem}.lock"):
        if path.is_file():  # another process measured it while we waited
            return load_tensors_data(path), 0.0, True
        started = time.perf_counter()
        with private_model_path(model_path) as private:
            tensors = _measure(private, data, algorithm, op_types, skip_tensors or set(), bool(data_files))
        from onnxruntime.quantization.calibrate import save_tensors_data

        save_tensors_data(tensors, path)
        seconds = time.perf_counter() - started
        logger.info("calibrated %d tensors with %s on %d samples in %.2fs -> %s", len(tensors.data),
                    algorithm, data.count, seconds, path.name)
        return tensors, seconds, False


def _measure(model_path: Path, data: CalibrationSet, algorithm: str, op_types: list[str],
             skip_tensors: set[str], external_data: bool) -> Any:
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
        if algorithm == "minmax":
            calibrator.collect_data(_Reader(data.batches()))
        else:
            # Histograms crash on (or are ruined by) non-finite tensors: leave those out; their
            # range comes from MinMax. One collect per batch bounds the memory held.
            selected = getattr(calibrator, "tensors_to_calibrate", None)
            if skip_tensors and isinstance(selected, set):
                selected.difference_update(skip_tensors)
            for batch in data.batches():
                calibrator.collect_data(_Reader([batch]))
        result = calibrator.compute_data()
        del calibrator
    return result


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
