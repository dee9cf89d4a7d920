"""Running a model: evaluation, prediction and the latency benchmark."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from qtune.adaptors.base import LatencyStats
from qtune.adaptors.pytorch.model import flat_outputs, runnable, to_tensors
from qtune.data import Metric
from qtune.data.metrics import TopK
from qtune.spec.errors import DataError


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Fix torch's intra-op thread count for the block, then restore it."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def output_index(output: str | int | None, count: int) -> int:
    if output is None:
        return 0
    if isinstance(output, str) and output.startswith("output_"):
        output = output.removeprefix("output_")
    if isinstance(output, int) or (isinstance(output, str) and output.isdigit()):
        index = int(output)
        if not 0 <= index < count:
            raise DataError(f"model output index {index} out of range; the model has {count} outputs")
        return index
    raise DataError(f"model output {output!r} does not exist; torch outputs are addressed by index "
                    f"(0..{count - 1}) or as output_<index>")


def run(model: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    module, names = runnable(model, inputs)
    with torch.inference_mode():
        result = module(*to_tensors(inputs, names))
    return [t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
            for t in flat_outputs(result)]


def evaluate(model: Any, dataloader: Iterable[Any], metric: Metric | None, postprocess: Any,
             output: str | int | None, iteration: int, thread_count: int | None) -> float:
    metric = metric if metric is not None else TopK(1)
    with threads(thread_count):
        for step, (inputs, labels) in enumerate(dataloader):
            if 0 <= iteration <= step:
                break
            outputs = run(model, inputs)
            if postprocess is not None:
                prediction = postprocess(outputs)
            else:
                prediction = outputs[output_index(output, len(outputs))]
            metric.update(np.asarray(prediction), labels)
    return float(metric.result())


def predict(model: Any, dataloader: Iterable[Any], output: str | int | None, thread_count: int | None) -> np.ndarray:
    parts = []
    with threads(thread_count):
        for inputs, _labels in dataloader:
            outputs = run(model, inputs)
            parts.append(outputs[output_index(output, len(outputs))])
    return np.concatenate(parts) if parts else np.empty((0,))


def make_runner(model: Any, inputs: dict[str, Any], thread_count: int) -> Callable[[], None]:
    """One inference per call, module and input tensors prepared once. torch's thread count is
    process-wide: it is set here and re-set by a call only if something changed it in between."""
    module, names = runnable(model, inputs)
    tensors = to_tensors({k: np.asarray(v) for k, v in inputs.items()}, names)
    count = int(thread_count) if thread_count else torch.get_num_threads()
    torch.set_num_threads(count)

    def infer() -> None:
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        with torch.inference_mode():
            module(*tensors)

    return infer


def benchmark(model: Any, inputs: dict[str, Any], warmup: int, runs: int, thread_count: int) -> LatencyStats:
    module, names = runnable(model, inputs)
    tensors = to_tensors({k: np.asarray(v) for k, v in inputs.items()}, names)
    batch_size = len(tensors[0]) if tensors else 0
    times: list[float] = []
    with threads(thread_count), torch.inference_mode():
        for _ in range(max(warmup, 0)):
            module(*tensors)
        for _ in range(max(runs, 1)):
            started = time.perf_counter()
            module(*tensors)
            times.append((time.perf_counter() - started) * 1000.0)
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return LatencyStats(batch_size=batch_size, p50_ms=float(statistics.median(times)), p90_ms=float(p90),
                        mean_ms=float(statistics.fmean(times)), runs=len(times), threads=int(thread_count))
