"""examples/decoder_lm through the operator on the test plane (issue 22, part 5): a decoder language model of
322 MB (fp32 ONNX, ~80 M parameters) tuned weight-only with the decode objective, its model and data on the
workspace PVC. Records what it takes (the unit pods' peak RSS, each ConfigMap's size, the wall time) and checks
the outcome against `qtune tune` on the same job file.

Run on demand, not by the suite (its name does not match test_*.py: the build trains the model, ~10 min on 2
cores, and the job then runs some minutes on the cluster and again locally, ~10 min):

    python examples/decoder_lm/build.py --threads 2
    QTUNE_REQUIRE_CLUSTER=1 python3 -m pytest -q tests/cluster/operator/run_decoder_lm_e2e.py

The suite runs the same path on a tiny decoder (test_weight_only_e2e.py). Without the build this test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import opcluster
import pytest
import yaml
from clusterlib import wait_for
from kubernetes.utils import parse_quantity
from usage import Usage

from qtune.operator import constants as c

pytestmark = pytest.mark.slow

EXAMPLE = opcluster.ROOT / "examples" / "decoder_lm"
FILES = ("decoder_lm.onnx", "calib.npz", "eval.npz")
CONFIGMAP_LIMIT = 64 * 1024
"""Bytes of any ConfigMap of the job: job document, tune configs and figures of 15 ops, a gzipped history of a few
trials. Under a thousandth of the int4 model (50 MB), a few % of what one ConfigMap may hold (1 MiB)."""


def _place(workspace: Path) -> None:
    """The build's files under build/ on the PVC (hard links when the file systems allow: 322 MB)."""
    (workspace / "build").mkdir()
    for name in FILES:
        try:
            os.link(EXAMPLE / "build" / name, workspace / "build" / name)
        except OSError:
            shutil.copy2(EXAMPLE / "build" / name, workspace / "build" / name)


def _manifest() -> dict[str, Any]:
    manifest = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    spec = manifest["spec"]
    spec.pop("output", None)  # the job's trial resources stay: what the example asks of a cluster
    spec["workspace"] = {"persistentVolumeClaim": opcluster.CLAIM}
    return manifest


def _local(tmp_path: Path) -> Any:
    from qtune.local import tune
    from qtune.spec import load_job

    job_file = EXAMPLE / "job.yaml"
    return tune(load_job(job_file), job_file, output_dir=tmp_path / "out", workspace=tmp_path / "ws")


def test_the_decoder_lm_example_runs_through_the_operator(cluster: Any, op_namespace: str, workspace: Path,
                                                          start_operator: Any, tmp_path: Path) -> None:
    missing = [name for name in FILES if not (EXAMPLE / "build" / name).is_file()]
    assert not missing, f"examples/decoder_lm/build/ lacks {missing}: python examples/decoder_lm/build.py --threads 2"
    ns = op_namespace
    manifest = _manifest()
    name = manifest["metadata"]["name"]
    _place(workspace)
    start_operator([ns])
    seen: dict[str, Any] = {}

    def finished() -> bool:
        seen.clear()
        seen.update(opcluster.job_status(cluster, ns, name))
        return seen.get("state") in ("Succeeded", "Failed")

    started = time.monotonic()
    with Usage(cluster, ns, interval=0.5) as usage:
        opcluster.create_job(cluster, ns, manifest)
        wait_for(finished, 1800, "the decoder_lm job finished", detail=lambda: json.dumps(seen)[:3000], interval=1)
    status, seconds = dict(seen), time.monotonic() - started
    history = opcluster.job_history(cluster, ns, name)
    best = status.get("best") or {}
    mb = {k: v >> 20 for k, v in history.baseline.peak_rss_bytes.items()}
    report = [f"decoder_lm on the cluster: {status.get('state')}/{status.get('reason')} in {seconds:.0f}s; "
              f"baseline ppl {status.get('baseline', {}).get('accuracy')}, best trial {best.get('trial')} ppl "
              f"{best.get('accuracy')} speedup {best.get('speedupInterval')} size {best.get('modelSizeBytes')}",
              f"  baseline latency (ms) {status.get('baseline', {}).get('latencyMs')}, best speed {best.get('speed')}",
              f"  ConfigMaps (largest bytes seen): {usage.configmaps}",
              f"  inputs in the pods' annotations (largest bytes seen): {max(usage.pod_inputs.values(), default=0)}",
              f"  pods' peak RSS, sampled (MB): { {k: v >> 20 for k, v in usage.pod_rss.items()} }",
              f"  baseline peak RSS, its own (MB): {mb}"]
    for t in history.trials:
        report.append(f"  trial {t.index} {t.status} ppl {t.accuracy} passed {t.passed} decode "
                      f"{t.speed.get('decode') and t.speed['decode'].speedup} peak RSS (MB) "
                      f"{ {k: v >> 20 for k, v in t.peak_rss_bytes.items()} } {round(t.timings.get('total', 0))}s")
    sys.stderr.write("\n".join(report) + "\n")
    text = "\n".join(report)
    assert status["state"] == "Succeeded", text
    assert not status.get("rejectedResults"), text
    assert max(usage.configmaps.values()) < CONFIGMAP_LIMIT, text
    limit = parse_quantity(manifest["spec"]["trial"]["resources"]["memory"])  # the job's own: under it, no OOMKill
    assert usage.pod_rss and max(usage.pod_rss.values()) < limit, text
    assert {c.history_configmap(name), c.baseline_configmap(name)} <= set(usage.configmaps), text
    saved = opcluster.host_path(best["modelPath"], "/workspace", workspace)
    assert "MatMulNBits" in opcluster.op_types(saved), text
    sys.stderr.write(f"  winner file {opcluster.onnx_file(saved).stat().st_size >> 20} MB\n")

    started = time.monotonic()
    local = _local(tmp_path)
    winner = local.best
    sys.stderr.write(f"qtune tune: {local.outcome} in {time.monotonic() - started:.0f}s, best trial "
                     f"{winner and winner.index} ({winner and winner.config_key}) ppl {winner and winner.accuracy} "
                     f"{local.speed and local.speed.describe()}\n")
    assert local.best is not None and best["configKey"] == local.best.config_key, text
    assert status["reason"] == local.outcome, text
