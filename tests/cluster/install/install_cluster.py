"""What the install tests on the test control plane share: the release handle, token kubeconfigs,
the operator run as a local process with the chart's arguments and environment."""

from __future__ import annotations

import base64
import logging
import re
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from clusterlib import Cluster
from helm_support import OPERATOR_CHART, operator_container, run_helm, set_args

log = logging.getLogger("qtune.tests.install")


def api_server_values(cluster: Cluster) -> dict[str, Any]:
    """The chart values naming the test plane's API server (`networkPolicy.apiServer.cidrs`: the chart refuses
    to render without them unless waived): the addresses of the `kubernetes` Endpoints when the API server
    publishes them (`kubectl get endpoints kubernetes -n default`), else those of the server the kubeconfig
    names (`kubectl cluster-info`; the test plane's API server runs without its endpoint reconciler)."""
    import socket
    from urllib.parse import urlsplit

    from kubernetes import client

    api = cluster.api_client()
    try:
        endpoints = client.CoreV1Api(api).read_namespaced_endpoints("kubernetes", "default")
        ips = sorted({a.ip for subset in endpoints.subsets or [] for a in subset.addresses or []})
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        ips = []
    if not ips:
        host = urlsplit(api.configuration.host).hostname or ""
        ips = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
    assert ips, "no address of the API server found"
    return {"networkPolicy.apiServer.cidrs": [f"{ip}/128" if ":" in ip else f"{ip}/32" for ip in ips]}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Release:
    """The installed charts and what the tests need to act as (or check) the operator."""

    cluster: Cluster
    helm: Path
    operator_namespace: str
    served: str
    unserved: str
    values: dict[str, Any]
    release: str = "qtune"
    tmp: Path = field(default_factory=Path)

    @property
    def service_account(self) -> str:
        return self.release  # fullname of release "qtune" of chart "qtune"

    def helm_args(self, *args: str) -> list[str]:
        return [*args, "--kubeconfig", str(self.cluster.kubeconfig)]

    def rendered(self, **overrides: Any) -> list[dict[str, Any]]:
        """The chart's manifests for this release's values (plus overrides), as helm renders them."""
        proc = run_helm(self.helm, ["template", self.release, str(OPERATOR_CHART), "--namespace",
                                    self.operator_namespace, *set_args({**self.values, **overrides})])
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    def token(self, account: str | None = None, namespace: str | None = None, seconds: int = 3600) -> str:
        """A token of the ServiceAccount from the TokenRequest API (what `kubectl create token` does)."""
        core = self.cluster.core()
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"expirationSeconds": seconds}}
        response = core.create_namespaced_service_account_token(
            account or self.service_account, namespace or self.operator_namespace, request)
        return str(response.status.token)

    def token_kubeconfig(self, account: str | None = None, namespace: str | None = None) -> Path:
        """A kubeconfig that authenticates with a ServiceAccount token only (no client certificate)."""
        admin = yaml.safe_load(self.cluster.kubeconfig.read_text())
        admin_cluster = admin["clusters"][0]["cluster"]
        cluster: dict[str, Any] = {"server": admin_cluster["server"]}
        if "certificate-authority-data" in admin_cluster:
            cluster["certificate-authority-data"] = admin_cluster["certificate-authority-data"]
        else:
            ca = Path(admin_cluster["certificate-authority"])
            if not ca.is_absolute():
                ca = self.cluster.kubeconfig.parent / ca
            cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
        user = f"{namespace or self.operator_namespace}-{account or self.service_account}"
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "plane", "cluster": cluster}],
            "users": [{"name": user, "user": {"token": self.token(account, namespace)}}],
            "contexts": [{"name": user, "context": {"cluster": "plane", "user": user,
                                                    "namespace": namespace or self.operator_namespace}}],
            "current-context": user,
        }
        path = self.tmp / f"{user}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    health_port: int
    metrics_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def chart_command(release: Release, health_port: int, metrics_port: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the chart's operator container (replicas forced to 1 to render it),
    with the ports of this machine's free ones (pods share the host network on the test plane)."""
    container = operator_container(release.rendered(**{"replicaCount": 1, "health.port": health_port,
                                                       "metrics.port": metrics_port}))
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # $(VAR) in args expands from the container's environment, as the kubelet does
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in container["args"]]
    assert container["command"] == ["qtune"]
    return args, env


