"""ONNX Runtime sessions: creation (cached per model file and thread count), input checks, runs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qtune.adaptors.base import LatencyStats, StepModel
from qtune.spec.errors import DataError, ModelLoadError

logger = logging.getLogger(__name__)

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_,
}


SPINNING = "stop"
"""How intra-op worker threads wait for work, with more than one thread:
- "stop" (qtune's choice): they spin during a run, as by default, and stop spinning when the run
  returns (`session.force_spinning_stop`);
- "on": ONNX Runtime's default, they keep spinning after a run;
- "off": they never spin (`session.intra_op.allow_spinning=0`).
Measured (docs/speed.md, 2 threads, a CNN at batch 16, fp32 and int8 interleaved in one process vs each
alone in its own process with ORT's defaults: 2.19×): "on" read 2.64× (the idle session's workers keep
spinning and take a core from the measured one: our threads waited for a CPU half the time), "off"
1.76× (int8's many small ops pay a wake-up each), "stop" 2.15×. One thread has no workers."""


def spinning_entries(threads: int | None, spinning: str | None = None) -> dict[str, str]:
    """The session config entries for `threads` intra-op threads (0/None: ORT's choice, several)."""
    spinning = spinning or SPINNING
    if threads == 1 or spinning == "on":
        return {}
    if spinning == "off":
        return {"session.intra_op.allow_spinning": "0"}
    return {"session.force_spinning_stop": "1"}


class SessionCache:
    """One InferenceSession per (model file, its mtime, thread count) for the adaptor's lifetime."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int, int], Any] = {}

    def get(self, path: Path, threads: int | None) -> Any:
        import onnxruntime as ort

        stat = Path(path).stat()
        key = (str(path), stat.st_mtime_ns, int(threads or 0))
        session = self._sessions.get(key)
        if session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = int(threads or 0)
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.log_severity_level = 3
            for key, value in spinning_entries(threads).items():
                options.add_session_config_entry(key, value)
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                lines = str(exc).strip().splitlines()
                raise ModelLoadError(f"onnxruntime cannot load {path}: {lines[0] if lines else exc}") from None
            self._sessions = {k: v for k, v in self._sessions.items() if k[0] != key[0] or k[1] == key[1]}
            self._sessions[key] = session
        return session

    def clear(self) -> None:
        self._sessions.clear()


def check_feed(session: Any, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The feed for `session`, or a DataError naming the input, the expected and the given shape."""
    feed: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        if spec.name not in inputs:
            raise DataError(
                f"input {spec.name!r} is missing from the data (it has {sorted(inputs)}); the model "
                f"expects {spec.name!r} of shape {_shape_text(spec.shape)} {spec.type}"
            )
        array = np.asarray(inputs[spec.name])
        expected_dtype = _ORT_TO_NUMPY.get(spec.type)
        problem = None
        if len(array.shape) != len(spec.shape):
            problem = "rank"
        else:
            for want, got in zip(spec.shape, array.shape, strict=True):
                if isinstance(want, int) and want > 0 and want != got:
                    problem = "shape"
                    break
        if problem is None and expected_dtype is not None and array.dtype != expected_dtype:
            problem = "dtype"
        if problem:
            raise DataError(
                f"input {spec.name!r}: the model expects shape {_shape_text(spec.shape)} "
                f"{np.dtype(expected_dtype).name if expected_dtype else spec.type}, "
                f"got {tuple(array.shape)} {array.dtype.name}"
            )
        feed[spec.name] = array
    return feed


def _shape_text(shape: list[Any]) -> str:
    return "[" + ", ".join(str(dim) if isinstance(dim, int) and dim > 0 else str(dim or "?") for dim in shape) + "]"


def output_index(session: Any, output: str | int | None) -> int:
    names = [value.name for value in session.get_outputs()]
    if output is None:
        return 0
    if isinstance(output, int) or (isinstance(output, str) and output.isdigit()):
        index = int(output)
        if not 0 <= index < len(names):
            raise DataError(f"model output index {index} out of range; the model has {len(names)} outputs {names}")
        return index
    if output not in names:
        raise DataError(f"model output {output!r} does not exist; outputs are {names}")
    return names.index(output)


def make_runner(session: Any, feed: dict[str, np.ndarray]) -> Callable[[], None]:
    """One inference per call, with the session and the (checked) feed bound once."""
    run = session.run

    def infer() -> None:
        run(None, feed)

    return infer


def step_model(session: Any) -> StepModel:
    """The session as a StepModel: its inputs' names, shapes (a dynamic dimension as its name or None) and numpy
    dtypes, its output names, and a run returning every output."""
    inputs = [(spec.name, list(spec.shape), _ORT_TO_NUMPY.get(spec.type, np.float32)) for spec in session.get_inputs()]
    run = session.run

    def step(feed: dict[str, Any]) -> list[Any]:
        return run(None, feed)

    return StepModel(inputs, [spec.name for spec in session.get_outputs()], step)


def benchmark(session: Any, feed: dict[str, np.ndarray], warmup: int, runs: int, threads: int) -> LatencyStats:
    for _ in range(max(warmup, 0)):
        session.run(None, feed)
    times: list[float] = []
    for _ in range(max(runs, 1)):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1000.0)
    values = np.asarray(times)
    batch = len(next(iter(feed.values()))) if feed else 1
    return LatencyStats(batch_size=int(batch), p50_ms=float(np.percentile(values, 50)),
                        p90_ms=float(np.percentile(values, 90)), mean_ms=float(values.mean()),
                        runs=len(times), threads=int(threads or os.cpu_count() or 1))
