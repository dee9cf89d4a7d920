"""The baseline step of a job, run once: fp32 accuracy and latency, the tuning space (capability
intersected with the spec, fused patterns, op sensitivity) and the fp32 reference outputs.

Its files in the workspace are what every trial and the strategy read; a resumed run or a
restarted operator finds them there and does not redo this step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from qtune.data import DataLoader, Dataset
from qtune.runner.context import BASELINE_FILE, REFERENCE_FILE, SPACE_FILE, JobContext
from qtune.runner.peaks import calibration_mark, calibration_peak, memory_text, process_peak
from qtune.spec.errors import DataError
from qtune.tuning import codec
from qtune.tuning.history import Baseline, write_json_atomic
from qtune.tuning.space import TuningSpace, build_space

logger = logging.getLogger(__name__)


def measure_latency(context: JobContext, model: object) -> tuple[dict[str, float], dict[str, float]]:
    """The fp32 model alone: p50 and p90 per batch size, in ms. Shown as such; a speedup is never
    computed from it (speedups come from interleaved measurements, qtune/runner/benchmark.py)."""
    bench = context.spec.benchmark
    p50: dict[str, float] = {}
    p90: dict[str, float] = {}
    for size, batch in context.benchmark_batches().items():
        stats = context.adaptor.benchmark(model, batch, bench.warmup_runs, bench.runs, context.benchmark_threads)
        p50[str(size)], p90[str(size)] = stats.p50_ms, stats.p90_ms
    if bench.decode is not None:  # fails now, naming spec.benchmark.decode, when the model has no KV cache
        from qtune.runner.decode_speed import decode_workloads

        for key, _size, make in decode_workloads(context):
            p50[key], p90[key] = _alone(make(model, context.benchmark_threads), bench.warmup_runs, bench.runs)
    return p50, p90


def _alone(run: Callable[[], None], warmup: int, runs: int) -> tuple[float, float]:
    """p50 and p90 in ms of `runs` calls of `run` after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(runs, 1)):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000.0)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


@contextmanager
def _blame(field: str) -> Iterator[None]:
    """Prefix data errors with the spec field whose data set caused them."""
    try:
        yield
    except DataError as exc:
        if str(exc).startswith("spec."):
            raise
        raise DataError(f"{field}: {exc}") from None


def compute_space(context: JobContext) -> TuningSpace:
    adaptor, model = context.adaptor, context.model
    # lets the adaptor find non-finite calibration ranges (e.g. attention masks) up front
    adaptor.info["calibration_data"] = context.calibration_set
    adaptor.info["calibration_sampling_size"] = len(context.calibration_set)
    capability = adaptor.query_fw_capability(model)
    patterns = adaptor.query_fused_patterns(model)
    samples = len(context.calibration_set)
    space = build_space(capability, context.spec.quantization, patterns, samples)
    started = time.perf_counter()
    sensitivity = adaptor.op_sensitivity(model, codec.dump(space.default_config()), context.calibration_set)
    space.sensitivity = {name: float(sensitivity.get(name, 0.0)) for name in space.ops}
    logger.info("op sensitivity of %d ops measured in %.1fs", len(space.ops), time.perf_counter() - started)
    # per-op time shares (fp32 and int8) at the largest benchmark batch: where the strategy spends trials
    size = max(context.spec.benchmark.measured_batch_sizes or [1])  # a decode job without batch sizes: one sample
    space.time_share = adaptor.op_time_shares(model, codec.dump(space.default_config()), context.calibration_loader(),
                                              context.benchmark_batches([size])[size], context.benchmark_threads)
    for name, note in space.notes.items():
        logger.info("capability note: %s: %s", name, note)
    return space


def run_baseline(context: JobContext) -> tuple[TuningSpace, Baseline]:
    """Compute (or reuse) the space and the baseline of a job."""
    workspace = context.workspace
    if (workspace / SPACE_FILE).exists() and (workspace / BASELINE_FILE).exists():
        return context.load_space(), context.load_baseline()
    started = time.perf_counter()
    mark = calibration_mark(context.adaptor)
    model = context.model
    with _blame("spec.data.calibration"):  # fail now, not in every trial, when data and model disagree
        first = next(iter(context.calibration_set.take(2).loader(2)))
        context.adaptor.predict(model, DataLoader(Dataset(first[0], None), 2), context.spec.data.evaluation.output)
    with _blame("spec.data.evaluation"):
        if context.needs_reference:
            reference = context.adaptor.predict(model, context.evaluation_loader(),
                                                context.spec.data.evaluation.output)
            np.save(workspace / REFERENCE_FILE, np.asarray(reference))
        accuracy = context.evaluate(model).score
    p50, p90 = measure_latency(context, model)
    space = compute_space(context)
    baseline = Baseline(
        accuracy=float(accuracy),
        latency_ms=p50,
        latency_p90_ms=p90,
        model_size_bytes=int(context.adaptor.model_size(model)),
        seconds=time.perf_counter() - started,
        metric=context.metric_name,
        peak_rss_bytes={**calibration_peak(context.adaptor, mark), **process_peak()},
    )
    write_json_atomic(workspace / SPACE_FILE, codec.dump(space))
    write_json_atomic(workspace / BASELINE_FILE, codec.dump(baseline))
    logger.info("baseline: accuracy %.4f, %d quantizable ops%s", baseline.accuracy, len(space.ops),
                memory_text(baseline.peak_rss_bytes))
    return space, baseline
