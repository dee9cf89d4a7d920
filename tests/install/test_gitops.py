"""examples/gitops: every kustomization builds, the stages are ordered, values agree, the plain
manifests are what the charts render, and the example job is a valid QuantizationJob.

`kubectl kustomize` uses the kubectl that tests/cluster/build.sh builds (skipped without it);
rendering uses the helm of tests/install/build_helm.sh (skipped without it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import ROOT, helm_binary, kubectl_binary

GITOPS = ROOT / "examples" / "gitops"
KUSTOMIZATIONS = ["namespaces", "jobs", "kueue", "flux/operator", "flux/clusters/production", "argocd",
                  "plain/crds", "plain/operator", "plain"]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def values() -> dict[str, Any]:
    return yaml.safe_load((GITOPS / "values" / "qtune.yaml").read_text())


@pytest.fixture(scope="module")
def kubectl() -> Path:
    kubectl = kubectl_binary()
    if kubectl is None:
        if os.environ.get("QTUNE_REQUIRE_CLUSTER") == "1":
            pytest.fail("kubectl not built: run bash tests/cluster/setup.sh")
        pytest.skip("kubectl not built: run bash tests/cluster/setup.sh")
    return kubectl


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_builds(kubectl: Path, path: str) -> None:
    proc = subprocess.run([str(kubectl), "kustomize", str(GITOPS / path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert objects and all("kind" in o and o["metadata"].get("name") for o in objects)


def test_flux_stages_are_ordered() -> None:
    releases = {r["metadata"]["name"]: r for r in load_all(GITOPS / "flux/operator/helmrelease-crds.yaml")
                + load_all(GITOPS / "flux/operator/helmrelease-operator.yaml")}
    assert releases["qtune-crds"]["spec"]["chart"]["spec"]["chart"] == "./charts/qtune-crds"
    operator = releases["qtune"]
    assert operator["spec"]["chart"]["spec"]["chart"] == "./charts/qtune"
    assert operator["spec"]["dependsOn"] == [{"name": "qtune-crds"}], "the operator waits for the CRDs"
    assert operator["spec"]["values"] == values(), "flux values differ from values/qtune.yaml"
    stages = {k["metadata"]["name"]: k for k in load_all(GITOPS / "flux/clusters/production/qtune.yaml")}
    assert stages["qtune-operator"]["spec"]["wait"] is True
    assert stages["qtune-jobs"]["spec"]["dependsOn"] == [{"name": "qtune-operator"}], "jobs after the operator"
    for stage in stages.values():
        assert (ROOT / stage["spec"]["path"]).is_dir(), stage["spec"]["path"]


def test_argocd_waves_are_ordered() -> None:
    apps = {a["metadata"]["name"]: a for a in load_all(GITOPS / "argocd/applications.yaml")}
    waves = {name: int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for name, a in apps.items()}
    assert waves["qtune-namespaces"] < waves["qtune-crds"] < waves["qtune-operator"] < waves["qtune-jobs"]
    for app in apps.values():
        assert (ROOT / app["spec"]["source"]["path"]).is_dir(), app["spec"]["source"]["path"]
    assert apps["qtune-operator"]["spec"]["source"]["helm"]["valuesObject"] == values()
    assert "SkipDryRunOnMissingResource=true" in apps["qtune-jobs"]["spec"]["syncPolicy"]["syncOptions"]


def test_plain_manifests_are_what_the_charts_render(tmp_path: Path) -> None:
    helm = helm_binary()
    if helm is None:
        if os.environ.get("QTUNE_REQUIRE_HELM") == "1":
            pytest.fail("helm not built: run bash tests/install/build_helm.sh")
        pytest.skip("helm not built: run bash tests/install/build_helm.sh")
    copy = tmp_path / "plain"
    subprocess.run(["cp", "-r", str(GITOPS / "plain"), str(copy)], check=True)
    # render into a copy (the script writes next to itself), then compare with the committed files
    (tmp_path / "values").symlink_to(GITOPS / "values")
    script = (GITOPS / "plain" / "render.sh").read_text().replace('root="$(cd "$here/../../.." && pwd)"',
                                                                  f'root="{ROOT}"')
    (copy / "render.sh").write_text(script)
    proc = subprocess.run(["bash", str(copy / "render.sh"), str(helm)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    for name in ("crds/qtune-crds.yaml", "operator/qtune.yaml"):
        assert (copy / name).read_text() == (GITOPS / "plain" / name).read_text(), \
            f"examples/gitops/plain/{name} is stale: run bash examples/gitops/plain/render.sh"


def test_example_job_is_a_valid_quantization_job(tmp_path: Path) -> None:
    from qtune.spec import load_job

    job = yaml.safe_load((GITOPS / "jobs" / "digits-int8.yaml").read_text())
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    loaded = load_job(path)
    assert loaded.spec.workspace.persistent_volume_claim == "qtune-work"
    pvc = yaml.safe_load((GITOPS / "jobs" / "workspace-pvc.yaml").read_text())
    assert pvc["metadata"]["name"] == "qtune-work" and pvc["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert job["metadata"]["namespace"] in values()["watch"]["namespaces"], "the job is in a served namespace"


def test_the_kueue_jobs_stage_queues_every_job_in_its_namespaces_localqueue(kubectl: Path, tmp_path: Path) -> None:
    """examples/gitops/kueue (issue 21): the jobs of ../jobs plus a LocalQueue in their namespace, which every
    job names in spec.trial.queueName, and the jobs stay valid QuantizationJobs."""
    from qtune.spec import load_job

    proc = subprocess.run([str(kubectl), "kustomize", str(GITOPS / "kueue")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    queues = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects if o["kind"] == "LocalQueue"}
    jobs = [o for o in objects if o["kind"] == "QuantizationJob"]
    assert jobs and queues
    for job in jobs:
        assert (job["metadata"]["namespace"], job["spec"]["trial"]["queueName"]) in queues
        path = tmp_path / f"{job['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(job))
        assert load_job(path).spec.trial.queue_name == job["spec"]["trial"]["queueName"]
