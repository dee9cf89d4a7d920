"""measure_against_fp32 on a busy machine, with a real ONNX CNN and its static int8 QDQ: a synthetic
always-busy probe, then a real CPU hog process. Either way a multi-threaded figure must not be
claimed as if the machine were quiet: it is measured again with one thread by CPU time and says so."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

HERE = Path(__file__).resolve().parent
if str(HERE / "onnxrt") not in sys.path:
    sys.path.insert(0, str(HERE / "onnxrt"))

import onnx_builders as builders  # noqa: E402

from qtune.runner import benchmark  # noqa: E402
from qtune.runner import contention as c  # noqa: E402
from qtune.runner.context import JobContext  # noqa: E402
from qtune.spec.load import load_job  # noqa: E402

CPUS = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> JobContext:
    folder = tmp_path_factory.mktemp("contention")
    builders.digits_cnn_with_int8(folder, calib_count=64, eval_count=16)
    threads = max(CPUS, 2)
    spec = {
        "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "busy"},
        "spec": {
            "model": {"framework": "onnxruntime", "path": "cnn.onnx"},
            "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz", "metric": "top1"}},
            "tuning": {"objective": "latency"},
            "benchmark": {"batchSizes": [8, 16], "warmupRuns": 3, "runs": 20, "minRounds": 5, "maxSeconds": 2,
                          "threads": threads},
            "output": {"path": str(folder / "out")},
        },
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return JobContext(load_job(folder / "job.yaml"), folder, folder / "workspace", threads=threads)


def _always_busy() -> c.CpuSample:
    """A synthetic signal: our threads always waited for a CPU half the window."""
    now = time.perf_counter()
    return c.CpuSample(wall=now, run_delay_ns=int(now * 1e9), involuntary_switches=0, pressure_us=None,
                       throttled_periods=None, steal_ticks=None)


def _assert_fell_back(measured: benchmark.SpeedMeasurement, threads: int) -> None:
    assert measured.busy, measured.describe()
    assert measured.threads == 1 and measured.cpu_clock and measured.requested_threads == threads
    assert measured.trusted and measured.fell_back
    assert measured.speedup == measured.fp32_p50_ms / measured.p50_ms and measured.low <= measured.speedup
    assert "instead of" in measured.describe()


def test_a_busy_signal_makes_a_multi_threaded_measurement_fall_back(job: JobContext,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch size falls back on its own: a fallback at the first size does not make the second size's
    wall-clock figure pass for a CPU-time one (it did: labelled CPU time, contended rounds kept, trusted)."""
    monkeypatch.setattr(benchmark, "default_probe", lambda: _always_busy)
    result = benchmark.measure_against_fp32(job, {"int8": job.base_dir / "cnn_int8.onnx"})
    assert sorted(result["int8"]) == ["16", "8"]
    for size in ("8", "16"):
        _assert_fell_back(result["int8"][size], job.benchmark_threads)


@pytest.mark.skipif(CPUS < 2 or not c.CpuProbe().has_run_delay, reason="needs 2 CPUs and per-thread schedstat")
def test_a_real_cpu_hog_is_noticed(job: JobContext) -> None:
    """One hog process beside a measurement using every CPU: our threads wait for a CPU, the figure is
    not claimed as a quiet one (a few seconds: a 2 s budget and the fallback's own)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        result = benchmark.measure_against_fp32(job, {"int8": job.base_dir / "cnn_int8.onnx"})
    finally:
        hog.terminate()
        hog.wait()
    for size in ("8", "16"):
        _assert_fell_back(result["int8"][size], job.benchmark_threads)
