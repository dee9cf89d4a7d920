"""Calibration within a memory budget: the budget (spec field, default, container share), the chunk
arithmetic, the container's memory limit, and the peak-RSS window."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from qtune.adaptors import memory
from qtune.spec import SpecError, job_from_dict
from qtune.spec.quantity import memory_bytes

GIB, MIB = 1 << 30, 1 << 20


def _job(calibration: dict) -> dict:
    return {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "j"},
            "spec": {"model": {"framework": "onnxruntime", "path": "model.onnx"},
                     "data": {"calibration": {"path": "calib.npz", **calibration}, "evaluation": {"path": "e.npz"}}}}


# --- the spec field ---------------------------------------------------------------------------------
def test_memory_limit_is_optional_and_takes_kubernetes_quantities() -> None:
    assert job_from_dict(_job({})).spec.data.calibration.memory_limit is None
    assert job_from_dict(_job({"memoryLimit": "512Mi"})).spec.data.calibration.memory_limit == "512Mi"
    assert memory_bytes("512Mi") == 512 * MIB and memory_bytes("4Gi") == 4 * GIB
    assert memory_bytes("2G") == 2 * 10**9 and memory_bytes("1.5Gi") == int(1.5 * GIB) and memory_bytes("1000") == 1000


@pytest.mark.parametrize("value", ["lots", "4GB", "-1Gi", "2 Gi", "1e9"])
def test_a_bad_memory_limit_names_the_field(value: str) -> None:
    with pytest.raises(SpecError) as caught:
        job_from_dict(_job({"memoryLimit": value}))
    message = str(caught.value)
    assert message.startswith("spec.data.calibration.memoryLimit:"), message
    assert "Kubernetes memory quantity" in message
    with pytest.raises(ValueError):
        memory_bytes(value)


def test_evaluation_data_has_no_memory_limit() -> None:
    document = _job({})
    document["spec"]["data"]["evaluation"]["memoryLimit"] = "1Gi"
    with pytest.raises(SpecError, match=r"spec\.data\.evaluation\.memoryLimit"):
        job_from_dict(document)


def test_the_runner_hands_the_limit_to_the_adaptor_in_bytes(tmp_path: Path) -> None:
    from qtune.runner.context import JobContext

    context = JobContext(job_from_dict(_job({"memoryLimit": "3Gi"})), tmp_path, tmp_path / "ws", threads=1)
    assert context.calibration_memory_limit == 3 * GIB
    assert JobContext(job_from_dict(_job({})), tmp_path, tmp_path / "ws", threads=1).calibration_memory_limit is None


# --- the budget and the chunks --------------------------------------------------------------------------
def test_budget_default_requested_and_container_share(caplog: pytest.LogCaptureFixture) -> None:
    from qtune.adaptors.onnxrt.budget import DEFAULT_MEMORY_LIMIT, MEMORY_FIELD, memory_budget

    assert memory_budget(None).limit_bytes == DEFAULT_MEMORY_LIMIT == 2 * GIB
    assert MEMORY_FIELD in memory_budget(None).source  # the default says which field changes it
    assert memory_budget(512 * MIB).limit_bytes == 512 * MIB
    # a pod of 4Gi whose process holds 1Gi: at most half of the 3Gi left
    in_pod = memory_budget(None, container_limit=4 * GIB, process_rss=GIB)
    assert in_pod.limit_bytes == int(1.5 * GIB) and "container" in in_pod.source
    assert memory_budget(GIB, container_limit=4 * GIB, process_rss=GIB).limit_bytes == GIB  # fits: as asked
    with caplog.at_level(logging.WARNING):
        lowered = memory_budget(8 * GIB, container_limit=4 * GIB, process_rss=GIB)
    assert lowered.limit_bytes == int(1.5 * GIB)
    assert MEMORY_FIELD in caplog.text and "8.00 GiB" in caplog.text
    # a container already full leaves nothing: the plan still takes one sample at a time
    assert memory_budget(None, container_limit=GIB, process_rss=2 * GIB).limit_bytes == 0


def test_chunks_keep_samples_in_flight_under_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    from qtune.adaptors.onnxrt.budget import (
        CALIBRATION_BATCH,
        HELD_OVERHEAD,
        MEMORY_FIELD,
        MemoryBudget,
        plan_chunks,
    )

    per_sample = 343 * 10**6  # PP-OCRv4 det at 320x640, KL
    plan = plan_chunks(per_sample, MemoryBudget(2 * GIB, "test"), 100)
    assert plan.chunk == 5 and plan.chunk * per_sample * HELD_OVERHEAD <= 2 * GIB
    assert plan_chunks(MIB, MemoryBudget(2 * GIB, "test"), 100).chunk == CALIBRATION_BATCH  # never above 16
    assert plan_chunks(MIB, MemoryBudget(2 * GIB, "test"), 7).chunk == 7  # never above the samples
    with caplog.at_level(logging.WARNING):
        alone = plan_chunks(per_sample, MemoryBudget(100 * MIB, "test"), 100)
    assert alone.chunk == 1
    assert MEMORY_FIELD in caplog.text and "one sample at a time" in caplog.text


def test_calibration_set_batches_cover_a_range_in_order() -> None:
    from qtune.adaptors.onnxrt.calibration import CalibrationSet

    data = CalibrationSet({"x": np.arange(10, dtype=np.float32)[:, None]}, 10, "f")
    assert [b["x"][:, 0].tolist() for b in data.batches(3, 2, 8)] == [[2, 3, 4], [5, 6, 7]]
    assert [len(b["x"]) for b in data.batches(4)] == [4, 4, 2]


# --- the container's limit ------------------------------------------------------------------------------
def _proc(root: Path, cgroup_lines: str) -> Path:
    (root / "self").mkdir(parents=True)
    (root / "self" / "cgroup").write_text(cgroup_lines)
    return root


def test_container_memory_limit_v2_v1_and_none(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    assert memory.container_memory_limit(v2, _proc(tmp_path / "p2", "0::/\n")) == 4 * GIB
    (v2 / "memory.max").write_text("max\n")
    assert memory.container_memory_limit(v2, tmp_path / "p2") is None
    # the process's own cgroup below the mount (no cgroup namespace)
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "kubepods" / "pod1" / "memory.max").write_text("1073741824")
    assert memory.container_memory_limit(v2, _proc(tmp_path / "p3", "0::/kubepods/pod1\n")) == GIB
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    proc = _proc(tmp_path / "p4", "4:memory:/job\n0::/\n")
    assert memory.container_memory_limit(v1, proc) is None
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text(str(2 * GIB))
    assert memory.container_memory_limit(v1, proc) == 2 * GIB
    assert memory.container_memory_limit(tmp_path / "absent", tmp_path / "absent") is None


# --- the peak -----------------------------------------------------------------------------------------
def _resettable() -> bool:
    return memory.rss_bytes() is not None and memory._reset_peak()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
def test_a_peak_window_sees_its_own_peak_and_keeps_it_through_inner_resets() -> None:
    if not _resettable():
        pytest.skip("the kernel refuses to reset the peak RSS here")
    size = 200 * MIB
    with memory.PeakWindow() as outer:
        block = np.ones(size // 8)  # touched: resident
        del block
        with memory.PeakWindow() as inner:  # resets the high-water mark below the block
            small = np.ones(MIB // 8)
            del small
    assert outer.exact and inner.exact
    assert outer.added_bytes is not None and outer.added_bytes >= size * 0.9
    assert inner.added_bytes is not None and inner.added_bytes < size / 2  # the block came before it
    assert (memory.process_peak_bytes() or 0) >= outer.peak_bytes  # the process-wide peak survives resets


def test_human_bytes_and_memory_text() -> None:
    from qtune.runner.peaks import calibration_peak, memory_text

    assert memory.human_bytes(int(2.5 * GIB)) == "2.50 GiB" and memory.human_bytes(300 * MIB) == "300 MiB"
    assert memory_text({"calibration": 2 * GIB, "total": 3 * GIB}) == ", calibration peak RSS 2.00 GiB"
    assert memory_text({"total": GIB}) == "" and memory_text(None) == ""

    class Measured:
        calibration_peaks = [GIB, 3 * GIB, 2 * GIB]

    assert calibration_peak(Measured()) == {"calibration": 3 * GIB}
    assert calibration_peak(Measured(), since=2) == {"calibration": 2 * GIB}
    assert calibration_peak(Measured(), since=3) == {} and calibration_peak(object()) == {}
