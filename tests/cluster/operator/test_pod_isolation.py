"""What a job's pods can touch, on the test plane (issue 12): the account they run as, and the files.

The node agent runs a pod's command as a process of its own user (root here), so file permissions
stop nothing; what it does enforce, as the kubelet does, are read-only bind mounts and subPath
mounts. The file test therefore checks both the pod spec the API server stored (what a real kubelet
enforces) and, after a real run of user code that tries, the files on the PVC."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import opcluster
from clusterlib import wait_for
from kubernetes import client
from metric_modules import TOP1

from qtune.operator import constants as c
from qtune.operator.folders import ROLE_FOLDER_CLEANUP

INTRUDER = textwrap.dedent('''
    """A metric module (the job's own code, on the PVC root) that tries to write where it must not."""
    import errno
    import json
    import os
    import sys

    import numpy as np

    ROOT = "/workspace"
    OTHER = ROOT + "/.qtune/other-12345678"


    def _try(what, action):
        try:
            action()
            return "written"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))


    def _write(path, mode="w"):
        def action():
            with open(path, mode) as f:
                f.write("pwned")
        return action


    attempts = {
        "root_file": _try("root", _write(ROOT + "/pwned.txt")),
        "root_module": _try("module", _write(ROOT + "/yaml.py")),
        "model_append": _try("model", _write(ROOT + "/model.onnx", "a")),
        "other_job_overwrite": _try("other", _write(OTHER + "/result.txt")),
        "other_job_new_file": _try("other new", _write(OTHER + "/planted.py")),
        "new_job_folder": _try("mkdir", lambda: os.makedirs(ROOT + "/.qtune/forged-00000000")),
        "own_folder": _try("own", _write(os.path.join(os.getcwd(), "own.txt"))),
        "tmp": _try("tmp", _write("/tmp/scratch.txt")),
    }
    record = {"cwd": os.getcwd(), "safe_path": sys.flags.safe_path, "attempts": attempts}
    with open(os.path.join(os.getcwd(), f"attempts-{os.getpid()}.json"), "w") as f:
        json.dump(record, f)

''') + TOP1

SHADOW = textwrap.dedent('''
    """A module shadowing an installed one, dropped at the PVC root: it must never be imported."""
    import os

    open(os.path.join(os.getcwd(), "shadow-yaml-imported"), "w").close()
    raise ImportError("the PVC root's yaml.py was imported")
''')


def _status(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    return (opcluster.get_job(cluster, namespace, name) or {}).get("status") or {}


def _wait_terminal(cluster: Any, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.clear()
        seen.update(_status(cluster, namespace, name))
        return seen.get("state") in ("Succeeded", "Failed")

    wait_for(done, timeout, f"job {namespace}/{name} finished", detail=lambda: repr(seen), interval=0.5)
    return dict(seen)


def test_a_named_account_without_the_opt_in_label_fails_the_job(cluster: Any, op_namespace: str,
                                                                  workspace: Path, start_operator: Any) -> None:
    ns, name = op_namespace, "borrowed"
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_service_account(ns, {"metadata": {"name": "web-sa", "labels": {"app": "web"}}})
    start_operator([ns])
    manifest = opcluster.job_manifest(name, maxTrials=1, parallelTrials=1)
    manifest["spec"]["trial"]["serviceAccountName"] = "web-sa"
    opcluster.create_job(cluster, ns, manifest)

    status = _wait_terminal(cluster, ns, name, 60)
    assert status["state"] == "Failed" and status["reason"] == "InvalidSpec", status
    assert status["message"].startswith("spec.trial.serviceAccountName: ServiceAccount 'web-sa' is not opted in")
    assert f'{c.JOB_ACCOUNT_LABEL}="true"' in status["message"]
    assert not core.list_namespaced_pod(ns).items
    # the operator neither changed the named account nor created the job's own one or any binding
    account = core.read_namespaced_service_account("web-sa", ns)
    assert account.metadata.labels == {"app": "web"} and not account.metadata.owner_references
    assert [a.metadata.name for a in core.list_namespaced_service_account(ns).items
            if a.metadata.name != "default"] == ["web-sa"]
    assert not client.RbacAuthorizationV1Api(cluster.api_client()).list_namespaced_role_binding(ns).items


def test_a_jobs_pods_write_only_in_their_own_folder(cluster: Any, op_namespace: str, workspace: Path,
                                                    start_operator: Any) -> None:
    ns, name = op_namespace, "contained"
    (workspace / "intruder.py").write_text(INTRUDER)
    (workspace / "yaml.py").write_text(SHADOW)
    other = workspace / ".qtune" / "other-12345678"
    other.mkdir(parents=True)
    (other / "result.txt").write_text("the other job's result")
    model_bytes = (workspace / "model.onnx").read_bytes()
    before = sorted(p.name for p in workspace.iterdir())

    start_operator([ns], "--keep-succeeded-pods")
    manifest = opcluster.job_manifest(name, maxTrials=1, parallelTrials=1)
    manifest["spec"]["data"]["evaluation"]["metric"] = "intruder:Top1"
    opcluster.create_job(cluster, ns, manifest)
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]
    status = _wait_terminal(cluster, ns, name, 300)
    # the whole job (baseline, trial: calibration cache, quantized model) worked in its own folder
    assert status["state"] == "Succeeded", status

    # the pod spec the API server stored: what a kubelet enforces
    folder = f"/workspace/.qtune/{name}-{uid[:8]}"
    core = client.CoreV1Api(cluster.api_client())
    pods = core.list_namespaced_pod(ns, label_selector=f"{c.LABEL_JOB_UID}={uid}").items
    assert {p.metadata.labels[c.LABEL_UNIT] for p in pods} >= {"baseline", "trial-0"}
    for pod in pods:
        container = pod.spec.containers[0]
        mounts = [(m.name, m.mount_path, m.sub_path, bool(m.read_only)) for m in container.volume_mounts]
        assert ("workspace", "/workspace", None, True) in mounts
        assert ("workspace", folder, f".qtune/{name}-{uid[:8]}", False) in mounts
        assert [m for m in mounts if m[0] == "workspace"] == [("workspace", "/workspace", None, True),
                                                              ("workspace", folder, f".qtune/{name}-{uid[:8]}",
                                                               False)]
        assert container.working_dir == folder
        assert container.command[:2] == ["python", "-P"]
        assert pod.spec.service_account_name == f"{name}-runner"

    # what the job's code managed to do on the PVC, after the real run
    own = workspace / ".qtune" / f"{name}-{uid[:8]}"
    records = [json.loads(p.read_text()) for p in sorted(own.glob("attempts-*.json"))]
    assert len(records) >= 2, sorted(p.name for p in own.iterdir())  # the baseline's and the trial's
    for record in records:
        assert record["cwd"] == folder and record["safe_path"] is True
        attempts = record["attempts"]
        assert attempts["own_folder"] == "written" and attempts["tmp"] == "written"
        for key in ("root_file", "root_module", "model_append", "other_job_overwrite", "other_job_new_file",
                    "new_job_folder"):
            assert attempts[key] == "EROFS", (key, attempts)
    assert sorted(p.name for p in workspace.iterdir()) == before
    assert (workspace / "model.onnx").read_bytes() == model_bytes
    assert sorted(p.name for p in other.iterdir()) == ["result.txt"]
    assert (other / "result.txt").read_text() == "the other job's result"
    assert sorted(p.name for p in (workspace / ".qtune").iterdir()) == sorted(["other-12345678", own.name])
    assert not (own / "shadow-yaml-imported").exists()  # no import from the PVC root by accident
    assert (own / "own.txt").read_text() == "pwned"

    # deleting the job deletes its folder from the PVC (a short pod of the operator), nothing else; the
    # operator deletes that pod once it succeeded (issue 20)
    opcluster.custom(cluster).delete_namespaced_custom_object(opcluster.GROUP, opcluster.VERSION, ns,
                                                              opcluster.PLURAL, name)
    cleaners = f"{c.LABEL_ROLE}={ROLE_FOLDER_CLEANUP}"
    wait_for(lambda: not own.exists(), 120, "the deleted job's folder is gone",
             detail=lambda: repr([(p.metadata.name, p.status.phase)
                                  for p in core.list_namespaced_pod(ns, label_selector=cleaners).items]))
    assert sorted(p.name for p in (workspace / ".qtune").iterdir()) == ["other-12345678"]
    assert (other / "result.txt").read_text() == "the other job's result"
    assert sorted(p.name for p in workspace.iterdir()) == before
    wait_for(lambda: not core.list_namespaced_pod(ns, label_selector=cleaners).items, 60,
             "the folder cleanup pod deleted once it succeeded")
