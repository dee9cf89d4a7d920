"""A weight-only job on the cluster, as any other job (issue 22): the decode objective (spec.benchmark.decode) and
the perplexity metric on the tiny KV-cache decoder of tests/support/tiny_decoder.py, through the operator on the
test plane: the same session and winner as `qtune tune` (qtune.local) on the same job file, results signed by the
unit pods and verified by the operator, the decode figure in the status, the winner saved on the workspace PVC
with MatMulNBits nodes, and the job's ConfigMaps small (configs and figures, never model bytes)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import opcluster
import pytest
import yaml
from clusterlib import wait_for
from kubernetes import client

from qtune.operator import constants as c
from qtune.operator.builders import INLINE_INPUTS_LIMIT

pytest.importorskip("onnxruntime")

from tiny_decoder import decoder, write_job  # noqa: E402
from usage import Usage  # noqa: E402

TERMINAL = {"Succeeded", "Failed"}
FILES = ("decoder.onnx", "data.npz")
CONFIGMAP_LIMIT = 16 * 1024
"""The most bytes (data and binaryData as stored) any ConfigMap of the job may hold. What they carry grows with
the model's op count, not its parameters: the job document and one unit's tune config (4 ops here), the published
space with the baseline's per-op sensitivities, the gzipped history of a few trials: a few KiB each. The fp32
decoder file is 54 KB, so a ConfigMap carrying the model (the baseline's, or a trial's weights as fp32 or int8)
would cross this bound; run_decoder_lm_e2e.py holds a 322 MB model's ConfigMaps to 64 KiB."""


def _space(cluster: Any, namespace: str, name: str) -> Any:
    from qtune.operator.store import decode_published
    from qtune.tuning import codec
    from qtune.tuning.space import TuningSpace

    body = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(c.baseline_configmap(name), namespace)
    return codec.load(TuningSpace, decode_published({"data": body.data, "binaryData": body.binary_data},
                                                    c.SPACE_KEY))


def decode_job(folder: Path) -> Path:
    """The tiny decoder, its data and its job file in `folder`: weight-only, perplexity within 50% of fp32 (int4
    everywhere passes: the mixed_bits ladder's first level wins, a winner that does not hang on timing noise),
    speed = time per new token."""
    folder.mkdir(parents=True, exist_ok=True)
    decoder(folder / "decoder.onnx")
    return write_job(folder, "decoder.onnx", {"decode": {"promptTokens": 8, "newTokens": 4}},
                     quantization={"approach": "weight_only"},
                     tuning={"objective": "latency", "maxTrials": 2, "parallelTrials": 1, "seed": 0,
                             "accuracyCriterion": {"relative": 0.5}, "minSpeedup": 0.01, "confirmCandidates": 1})


def cluster_manifest(job_file: Path, name: str) -> dict[str, Any]:
    """The job file as a QuantizationJob of the namespace: the workspace PVC holds its model and data (same
    relative paths), 1-CPU units; its local output folder means nothing on the cluster."""
    manifest = yaml.safe_load(job_file.read_text())
    manifest["metadata"] = {"name": name}
    spec = manifest["spec"]
    spec.pop("output", None)
    spec["trial"] = {"resources": {"cpu": 1, "memory": "2Gi"}}
    spec["workspace"] = {"persistentVolumeClaim": opcluster.CLAIM}
    return manifest


def _run_on_cluster(cluster: Any, ns: str, name: str, manifest: dict[str, Any]) -> tuple[dict[str, Any], float,
                                                                                          Usage]:
    seen: dict[str, Any] = {}

    def finished() -> bool:
        seen.clear()
        seen.update(opcluster.job_status(cluster, ns, name))
        return seen.get("state") in TERMINAL

    started = time.monotonic()
    with Usage(cluster, ns) as usage:
        opcluster.create_job(cluster, ns, copy.deepcopy(manifest))
        wait_for(finished, 240, "the weight-only job finished", detail=lambda: json.dumps(seen)[:3000], interval=0.3)
    return dict(seen), time.monotonic() - started, usage


def test_a_weight_only_decode_job_runs_through_the_operator(cluster: Any, op_namespace: str, workspace: Path,
                                                            start_operator: Any, tmp_path: Path) -> None:
    from qtune.local import tune
    from qtune.runner.trial import model_sha256
    from qtune.spec import load_job
    from qtune.tuning.objective import confirmed_speed
    from qtune.tuning.session import TuningSession

    ns, name = op_namespace, "decoder-wo"
    job_file = decode_job(tmp_path / "local")
    for file in FILES:
        shutil.copy2(tmp_path / "local" / file, workspace / file)
    manifest = cluster_manifest(job_file, name)
    start_operator([ns])
    status, seconds, usage = _run_on_cluster(cluster, ns, name, manifest)
    history = opcluster.job_history(cluster, ns, name)
    space = _space(cluster, ns, name)

    # `qtune tune` on the same job file, after the cluster run (the two never compete for the CPUs)
    started = time.monotonic()
    local = tune(load_job(job_file), job_file, output_dir=tmp_path / "out", workspace=tmp_path / "ws")
    local_seconds = time.monotonic() - started
    report = [f"weight-only decode: cluster {status.get('state')}/{status.get('reason')} in {seconds:.0f}s, "
              f"local {local.outcome} in {local_seconds:.0f}s",
              f"  cluster best {status.get('best', {}).get('configKey')} speed {status.get('best', {}).get('speed')}",
              f"  local   best {local.best and local.best.config_key}",
              f"  ConfigMaps (largest bytes seen): {usage.configmaps}",
              f"  pods' peak RSS (MB, sampled): { {k: v >> 20 for k, v in usage.pod_rss.items()} }"]
    for t in history.trials:
        report.append(f"  cluster trial {t.index} {t.config_key} {t.status} ppl {t.accuracy} passed {t.passed} "
                      f"decode {t.speed.get('decode') and t.speed['decode'].speedup} peak RSS {t.peak_rss_bytes}")
    sys.stderr.write("\n".join(report) + "\n")
    text = "\n".join(report)

    # the same session as any job: Succeeded, every unit's result accepted (signed with the unit's secret, verified
    # by the operator: none rejected), the winner that `qtune tune` chose
    assert status["state"] == "Succeeded", text
    assert status["reason"] == local.outcome, text
    assert not status.get("rejectedResults"), text
    events = client.CoreV1Api(cluster.api_client()).list_namespaced_event(ns).items
    assert not [e.message for e in events if e.reason == "ResultRejected"]
    assert history.trials and all(t.status == "succeeded" for t in history.trials), text
    assert local.best is not None and status["best"]["configKey"] == local.best.config_key, text
    assert status["best"]["trial"] == local.best.index
    assert [t.config_key for t in history.trials] == [t.config_key for t in local.history.trials], text
    assert all(op.weight is not None and op.weight.dtype == "int4"
               for op in local.best.tune_config.ops.values() if op.weight is not None)

    # the decode figures, measured in the pods: prefill and decode (no batch size), the objective the time per token
    assert set(history.baseline.latency_ms) == {"prefill", "decode"}
    assert set(status["baseline"]["latencyMs"]) == {"prefill", "decode"}
    assert all(set(t.speed) == {"prefill", "decode"} for t in history.trials if t.speed)
    judged = TuningSession(load_job(job_file).spec, copy.deepcopy(history), space)
    winner = next(t for t in history.trials if t.index == status["best"]["trial"])
    expected = confirmed_speed(history, winner.index, "decode") or winner.speed["decode"]
    assert judged.batch_size == "decode" and judged.best_speed() == expected, text
    assert status["best"]["speed"]["latencyMs"] == round(expected.p50_ms, 5), text
    assert status["best"]["speedup"] == round(expected.speedup, 4), text

    # the winner's model on the PVC: weights in MatMulNBits, the bytes its signed result named
    mount_path = load_job(job_file).spec.workspace.mount_path
    saved = opcluster.host_path(status["best"]["modelPath"], mount_path, workspace)
    assert saved.exists(), saved
    assert "MatMulNBits" in opcluster.op_types(saved), opcluster.op_types(saved)
    assert winner.model_sha256 == model_sha256(opcluster.onnx_file(saved)), text

    # the ConfigMaps: the history and the published baseline, both small; each unit's inputs travel in its pod
    assert set(usage.configmaps) == {c.history_configmap(name), c.baseline_configmap(name)}, usage.configmaps
    assert max(usage.configmaps.values()) < CONFIGMAP_LIMIT, text
    units = {pod: size for pod, size in usage.pod_inputs.items() if "-cleanup" not in pod}
    assert units and all(0 < size <= INLINE_INPUTS_LIMIT for size in units.values()), usage.pod_inputs
