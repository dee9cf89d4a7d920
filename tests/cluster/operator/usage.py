"""What a job takes on the test plane while it runs, sampled in a thread: the bytes of each ConfigMap of its
namespace (a unit's inputs ConfigMap, when its inputs are too large for its pod, lives only as long as its pod, so a
look at the end would miss it), the bytes of the inputs each pod carries in its annotations, and the resident
memory of each pod's processes (the node agent runs a pod as a process session; its containerID is
`qtune://<pid of the session leader>`)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from kubernetes import client
from node_agent import rss_by_session

from qtune.operator import constants as c

log = logging.getLogger(__name__)


def configmap_bytes(body: Any) -> int:
    """The bytes a ConfigMap's payload takes: keys and values of data, and of binaryData as stored (base64)."""
    return (sum(len(k) + len(v.encode()) for k, v in (body.data or {}).items())
            + sum(len(k) + len(v) for k, v in (body.binary_data or {}).items()))


def _session_pid(pod: Any) -> int | None:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.container_id and status.container_id.startswith("qtune://"):
            return int(status.container_id.removeprefix("qtune://"))
    return None


class Usage:
    """The largest ConfigMap sizes (bytes, by name) and pod RSS (bytes, by pod name) seen in `namespace`."""

    def __init__(self, cluster: Any, namespace: str, interval: float = 0.3) -> None:
        self.core = client.CoreV1Api(cluster.api_client())
        self.namespace = namespace
        self.interval = interval
        self.configmaps: dict[str, int] = {}
        self.pod_rss: dict[str, int] = {}
        self.pod_inputs: dict[str, int] = {}
        """pod name -> bytes of the input files in its annotations (keys and values; 0: they are in a ConfigMap)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="usage")

    def __enter__(self) -> Usage:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a failed sample (API hiccup) is retried at the next tick
                log.warning("usage sample failed", exc_info=True)

    def sample(self) -> None:
        for body in self.core.list_namespaced_config_map(self.namespace).items:
            if body.metadata.name != "kube-root-ca.crt":
                self._keep(self.configmaps, body.metadata.name, configmap_bytes(body))
        pods = self.core.list_namespaced_pod(self.namespace).items
        for pod in pods:
            annotations = pod.metadata.annotations or {}
            self._keep(self.pod_inputs, pod.metadata.name, sum(len(k) + len(v.encode()) for k, v in annotations.items()
                                                               if k.startswith(c.input_annotation(""))))
        pids = {pod.metadata.name: _session_pid(pod) for pod in pods}
        if any(pids.values()):
            rss = rss_by_session()
            for name, pid in pids.items():
                if pid is not None and rss.get(pid):
                    self._keep(self.pod_rss, name, rss[pid])

    @staticmethod
    def _keep(largest: dict[str, int], name: str, value: int) -> None:
        largest[name] = max(value, largest.get(name, 0))
