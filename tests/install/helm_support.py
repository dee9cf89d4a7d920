"""Helpers of the install tests: find the helm built by build_helm.sh, render the charts.

Used by tests/install (no cluster) and tests/cluster/install (on the test control plane).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("qtune.tests.helm")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHARTS = ROOT / "charts"
CRD_CHART = CHARTS / "qtune-crds"
OPERATOR_CHART = CHARTS / "qtune"
BUILD_HELM = HERE / "build_helm.sh"

Manifest = dict[str, Any]


def pinned_helm_version() -> str:
    """The Helm release build_helm.sh builds (``v3.x.y``)."""
    m = re.search(r'QTUNE_HELM_VERSION:-(v\d+\.\d+\.\d+)', BUILD_HELM.read_text())
    if not m:
        raise RuntimeError(f"cannot read the pinned Helm version from {BUILD_HELM}")
    return m.group(1)


def helm_binary() -> Path | None:
    """``$QTUNE_HELM``, else the cache folder build_helm.sh writes to; None when not built."""
    if os.environ.get("QTUNE_HELM"):
        return Path(os.environ["QTUNE_HELM"])
    cache = Path(os.environ.get("QTUNE_CACHE_DIR") or Path.home() / ".cache" / "qtune")
    helm = cache / "helm" / pinned_helm_version() / "helm"
    return helm if os.access(helm, os.X_OK) else None


def kubectl_binary() -> Path | None:
    """The kubectl tests/cluster/build.sh builds (any cached version), if any."""
    if os.environ.get("QTUNE_K8S_BIN_DIR"):
        candidate = Path(os.environ["QTUNE_K8S_BIN_DIR"]) / "kubectl"
        return candidate if os.access(candidate, os.X_OK) else None
    cache = Path(os.environ.get("QTUNE_CACHE_DIR") or Path.home() / ".cache" / "qtune")
    found = sorted(cache.glob("k8s/*/bin/kubectl"))
    return found[-1] if found else None


def set_args(values: dict[str, Any] | None) -> list[str]:
    """``--set-json key=<json>`` per value (exact types, lists included)."""
    import json

    out: list[str] = []
    for key, value in (values or {}).items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def run_helm(helm: Path, args: Sequence[str], *, check: bool = True, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # Keep helm's own state (repositories, cache, config) out of the user's home.
    base = {**os.environ, **(env or {})}
    state = Path(base.get("TMPDIR", "/tmp")) / f"qtune-helm-{os.getuid()}"
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
        base.setdefault(var, str(state / sub))
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, env=base, timeout=timeout,
                          check=False)
    log.info("helm %s -> %d", " ".join(args[:3]), proc.returncode)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def template(helm: Path, chart: Path, *, release: str = "qtune", namespace: str = "qtune-system",
             values: dict[str, Any] | None = None, extra: Iterable[str] = ()) -> list[Manifest]:
    """``helm template`` of a chart, parsed (empty documents dropped)."""
    proc = run_helm(helm, ["template", release, str(chart), "--namespace", namespace, *set_args(values), *extra])
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(manifests: Iterable[Manifest], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[Manifest]:
    return [m for m in manifests if m.get("kind") == kind
            and (name is None or m["metadata"]["name"] == name)
            and (namespace is None or m["metadata"].get("namespace") == namespace)]


def one(manifests: Iterable[Manifest], kind: str, name: str | None = None, namespace: str | None = None) -> Manifest:
    found = find(manifests, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, got {len(found)}"
    return found[0]


def operator_container(manifests: Iterable[Manifest]) -> Manifest:
    workloads = [m for m in manifests if m.get("kind") in ("Deployment", "StatefulSet")
                 and m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "operator"]
    assert len(workloads) == 1, f"expected one operator workload, got {[w['kind'] for w in workloads]}"
    containers = workloads[0]["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "operator")


def crd_documents(path: Path) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
