"""A deleted job's folder leaves its workspace claim: the operator starts one ownerless, labelled pod that
mounts only the claim's `.qtune` folder and deletes exactly the job's folder (the name the operator assigned,
checked by the operator and by the runner); the operator deletes that pod once it succeeded. A setting turns
it off."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from opfakes import UID, FakeKube, job_body, make_config

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator import folders, handlers
from qtune.operator.config import OperatorConfig
from qtune.operator.layout import JobRef, workspace_dir
from qtune.operator.metrics import OperatorMetrics
from qtune.operator.reconcile import validate
from qtune.runner.cleanup import remove_job_folder

FOLDER = f"digits-{UID[:8]}"


@pytest.mark.parametrize("folder", ["digits-0b6c7f5e", "a-00000000", "my.job-2-abcdef01"])
def test_a_job_folder_name_is_accepted(folder: str) -> None:
    assert protocol.is_job_folder(folder)


@pytest.mark.parametrize("folder", ["", ".", "..", "../digits-0b6c7f5e", "x/digits-0b6c7f5e", "digits-0b6c7f5",
                                    "digits", "Digits-0b6c7f5e", "a..b-0b6c7f5e", "-0b6c7f5e", "/digits-0b6c7f5e",
                                    "digits-uid-a", "digits-0b6c7f5e/..", "a" * 64 + "-0b6c7f5e"])
def test_anything_else_is_refused(folder: str) -> None:
    assert not protocol.is_job_folder(folder)


def _pod(body: dict[str, Any] | None = None, config: OperatorConfig | None = None) -> dict[str, Any]:
    body = body or job_body()
    return folders.folder_cleanup_pod(JobRef.from_body(body), validate(body)[0], config or make_config())


def test_the_pod_deletes_exactly_the_folder_the_operator_assigned_the_job() -> None:
    body = job_body()
    pod = _pod(body)
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["cleanup", "--jobs-root", folders.JOBS_MOUNT, "--remove-job-folder", FOLDER]
    # the folder the job's units wrote to (their read-write subPath), seen from the claim's .qtune folder
    spec = validate(body)[0]
    assert workspace_dir(spec, JobRef.from_body(body)) == f"/workspace/.qtune/{FOLDER}"
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"},
                                         {"name": "workspace", "mountPath": folders.JOBS_MOUNT, "subPath": ".qtune"}]
    claim = [v for v in pod["spec"]["volumes"] if v["name"] == "workspace"]
    assert claim == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "qtune-work"}}]


def test_the_pod_is_ownerless_labelled_unprivileged_and_runs_the_operators_image() -> None:
    body = job_body()
    body["spec"]["trial"]["image"] = "evil.example/anything:latest"
    pod = _pod(body)
    meta, spec = pod["metadata"], pod["spec"]
    assert "ownerReferences" not in meta  # the job is gone: the garbage collector would delete it at once
    assert meta["name"] == f"qtune-folder-cleanup-{UID}" and meta["namespace"] == "ml"
    assert meta["labels"][c.LABEL_ROLE] == folders.ROLE_FOLDER_CLEANUP
    assert meta["labels"][folders.LABEL_DELETED_JOB_UID] == UID and meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY
    assert c.LABEL_JOB_UID not in meta["labels"]  # not a pod of a live job: the job loops' index ignores it
    container = spec["containers"][0]
    assert container["image"] == "qtune:test"  # the chart's image, never the job's
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] == folders.DEADLINE_SECONDS
    assert container["resources"]["requests"] == container["resources"]["limits"]


def test_a_folder_name_the_operator_would_not_assign_starts_no_pod() -> None:
    with pytest.raises(ValueError, match="not a job folder"):
        _pod(job_body(uid="../../etc"))
    assert folders.deleted_job_cleanup(job_body(uid="uid-a"), make_config()) is None


def test_the_decision() -> None:
    config = make_config()
    assert folders.deleted_job_cleanup(job_body(), config)["metadata"]["name"] == f"qtune-folder-cleanup-{UID}"
    off = dataclasses.replace(config, cleanup_deleted_job_folders=False)
    assert folders.deleted_job_cleanup(job_body(), off) is None
    no_claim = job_body()
    del no_claim["spec"]["workspace"]
    assert folders.deleted_job_cleanup(no_claim, config) is None  # its units never ran: no folder


def test_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QTUNE_CLEANUP_DELETED_JOB_FOLDERS", raising=False)
    assert OperatorConfig.from_env().cleanup_deleted_job_folders is True
    monkeypatch.setenv("QTUNE_CLEANUP_DELETED_JOB_FOLDERS", "false")
    assert OperatorConfig.from_env().cleanup_deleted_job_folders is False


def _deleted(kube: FakeKube, config: OperatorConfig) -> None:
    services = types.SimpleNamespace(kube=kube, metrics=OperatorMetrics(), pushgateway=None, config=config)
    memo = types.SimpleNamespace(services=services, deleted=set(), wakeups={})
    body = job_body()
    asyncio.run(handlers.job_deleted(type="DELETED", body=body, meta=body["metadata"], memo=memo,
                                     logger=logging.getLogger(__name__)))


def test_deleting_a_job_starts_its_folder_cleanup_pod_once_the_setting_allows() -> None:
    kube = FakeKube()
    _deleted(kube, make_config())
    assert kube.created_pods == [f"qtune-folder-cleanup-{UID}"]
    kube = FakeKube()
    _deleted(kube, dataclasses.replace(make_config(), cleanup_deleted_job_folders=False))
    assert kube.created_pods == []


@pytest.mark.parametrize(("phase", "deleted"), [("Pending", False), ("Running", False), ("Succeeded", True),
                                                ("Failed", False)])
def test_the_operator_deletes_the_pod_once_it_succeeded(phase: str, deleted: bool) -> None:
    kube = FakeKube()
    pod = _pod()
    pod["status"] = {"phase": phase}
    kube.pods[pod["metadata"]["name"]] = pod
    memo = types.SimpleNamespace(services=types.SimpleNamespace(kube=kube))
    asyncio.run(handlers.folder_cleanup_pod_changed(type="MODIFIED", body=pod, memo=memo,
                                                    logger=logging.getLogger(__name__)))
    assert (kube.deleted_pods == [pod["metadata"]["name"]]) is deleted


def _claim(tmp_path: Path) -> Path:
    """A claim's .qtune folder: the deleted job's folder, another job's, and a link out of the job's folder."""
    root = tmp_path / "claim" / ".qtune"
    (root / FOLDER / "trials" / "0" / "model").mkdir(parents=True)
    (root / FOLDER / "trials" / "0" / "model" / "model.onnx").write_bytes(b"x" * 10)
    (root / "other-12345678").mkdir()
    (root / "other-12345678" / "keep.txt").write_text("other job")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    (root / FOLDER / "link").symlink_to(precious, target_is_directory=True)
    return root


def test_the_runner_deletes_the_folder_only(tmp_path: Path) -> None:
    root = _claim(tmp_path)
    done = subprocess.run([sys.executable, "-m", "qtune.runner", "cleanup", "--jobs-root", str(root),
                           "--remove-job-folder", FOLDER], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in root.iterdir()) == ["other-12345678"]
    assert (tmp_path / "precious" / "keep.txt").exists() and (root / "other-12345678" / "keep.txt").exists()
    assert remove_job_folder(root, FOLDER) == 0  # gone already: nothing to do


@pytest.mark.parametrize("folder", ["..", ".", "other-12345678/..", "../claim"])
def test_the_runner_refuses_a_parent_or_a_path(tmp_path: Path, folder: str) -> None:
    root = _claim(tmp_path)
    with pytest.raises(ValueError, match="not a job folder"):
        remove_job_folder(root, folder)
    done = subprocess.run([sys.executable, "-m", "qtune.runner", "cleanup", "--jobs-root", str(root),
                           "--remove-job-folder", folder], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "not a job folder" in done.stderr
    assert (root / FOLDER).is_dir() and (root / "other-12345678").is_dir()
