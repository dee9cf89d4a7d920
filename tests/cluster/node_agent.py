"""A small process-based node agent: plays the kubelet for the test plane's nodes.

There is no container engine on the test machines, so a pod's first container runs as a
local process on this machine, in the host Python environment (the image is ignored, so
``python -m qtune.runner ...`` works). What it does, per node it is given:

* keeps the Node Ready: node status conditions and Lease heartbeats in ``kube-node-lease``;
* for every pod bound to the node: runs the container's command+args with its env
  (plain values, ``$(VAR)`` references, fieldRef, resourceFieldRef, configMap/secret refs,
  envFrom) and workingDir; volumes become host folders (emptyDir: per pod; PVC:
  ``<state>/pvc/<namespace>/<claim>``; configMap, secret, downwardAPI and projected volumes,
  including the service-account token, are written as files); the process runs in a private
  mount namespace where those folders are bind-mounted on the container's mountPaths
  (fallback when that is not permitted: mountPath prefixes are rewritten to the host folders);
* CPU limit -> ``OMP_NUM_THREADS`` and ``taskset``; memory limit -> the process group's RSS is
  watched and the pod is killed with reason OOMKilled past it;
* pod status Pending -> Running -> Succeeded/Failed with exit code, reason
  (Completed/Error/OOMKilled) and termination message (the terminationMessagePath file,
  or the log tail with ``FallbackToLogsOnError``); stdout+stderr go to
  ``<state>/pods/<namespace>/<pod>/<uid>/<container>.log``;
* a deleted pod's process group gets SIGTERM (only when a process of it has a SIGTERM handler:
  a container's PID 1 gets no signal it does not handle), SIGKILL after the grace period
  (capped at 10s), then the pod is deleted with grace period 0;
* a tiny dynamic provisioner for the plane's host-path StorageClass: a PersistentVolume per
  claim pointing at ``<state>/pvc/<namespace>/<claim>``, deleted with its folder once released.

Only ``restartPolicy: Never`` semantics are implemented (a pod runs once). Init containers,
probes, securityContext users and the kubelet HTTP API (logs, exec) are not: a pod's process
runs as the agent's user (root on the test machines), so file permissions do not stop it; what a
pod may not write is enforced only by read-only bind mounts (``readOnly: true``; ``subPath``
mounts a subfolder of the volume, created as the kubelet does, see make_subpath).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from kubernetes import client, config, watch
from kubernetes.utils import parse_quantity

log = logging.getLogger("qtune.node_agent")

MERGE_PATCH = "application/merge-patch+json"
HEARTBEAT_SECONDS = 5.0
LEASE_SECONDS = 40
MAX_GRACE_SECONDS = 10.0
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
Obj = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def get(obj: Any, *path: str, default: Any = None) -> Any:
    """``get(pod, "spec", "nodeName")``: nested dict lookup tolerant of missing keys/None."""
    for key in path:
        if not isinstance(obj, dict) or obj.get(key) is None:
            return default
        obj = obj[key]
    return obj


class Retry(Exception):
    """A pod cannot start yet (e.g. a referenced ConfigMap does not exist yet)."""


# --------------------------------------------------------------------------- host paths


#: Mount points created on the host, shared by every node agent on this machine (several
#: planes may run at once): the last agent to stop removes them, never while another agent
#: runs, since its pods may have them mounted in their namespaces.
MOUNTPOINT_REGISTRY = Path(tempfile.gettempdir()) / "qtune-node-agent-mountpoints.txt"


@contextlib.contextmanager
def _registry() -> Iterator[TextIO]:
    with open(MOUNTPOINT_REGISTRY, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def host_python_paths() -> list[str]:
    """Folders the pod's process needs from the host: the interpreter, site-packages, sys.path
    entries, and this checkout (an editable install of qtune points into it)."""
    candidates = {sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[2]), *sys.path}
    return sorted(p for p in candidates if p and os.path.isabs(p) and os.path.isdir(p))


def hidden_host_paths(targets: list[str]) -> list[str]:
    """The host_python_paths() that mounting on `targets` would hide (outermost only)."""
    roots = [t.rstrip("/") or "/" for t in targets]
    hidden = [p for p in host_python_paths()
              if any(p == t or p.startswith(t.rstrip("/") + "/") for t in roots)]
    return [p for p in hidden if not any(p != o and p.startswith(o.rstrip("/") + "/") for o in hidden)]


def ensure_mount_target(target: Path, is_file: bool) -> None:
    """Create a missing mount point on the host, recording what was created for cleanup."""
    if target.exists():
        return
    with _registry() as record:
        missing = []
        p = target
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            if p == target and is_file:
                p.touch()
            else:
                p.mkdir()
            record.write(f"{p}\n")


def other_agents_running() -> bool:
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"node_agent.py") for a in argv[:3]):
            return True
    return False


def cleanup_created_paths() -> None:
    """Remove the (still empty) mount points agents created, unless another agent runs."""
    if not MOUNTPOINT_REGISTRY.exists():
        return
    with _registry() as record:
        if other_agents_running():
            return
        record.seek(0)
        for line in reversed(record.read().splitlines()):
            p = Path(line)
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                elif p.is_file() and p.stat().st_size == 0:
                    p.unlink()
        record.truncate(0)


def rss_by_session() -> dict[int, int]:
    """Resident memory (bytes) per session id, over all processes (one /proc scan)."""
    page = os.sysconf("SC_PAGE_SIZE")
    totals: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            sid = int(fields[3])  # fields after the name: state ppid pgrp session ...
            rss = int(fields[21]) * page  # rss in pages
        except (OSError, IndexError, ValueError):
            continue
        totals[sid] = totals.get(sid, 0) + rss
    return totals


def _die_with_agent() -> None:
    """preexec_fn: SIGKILL the pod process if the agent dies without stopping it (Linux).

    Pods are only started from the agent's long-lived threads (watch, reaper), so the
    "parent thread exited" trigger of PR_SET_PDEATHSIG means the agent is gone.
    """
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _catches_sigterm(pgid: int) -> bool:
    """Whether a process of the pod's group has a SIGTERM handler (SigCgt). On a real node the
    container's process is PID 1 of its pid namespace, and Linux delivers no signal to a namespace's
    init that it has no handler for (pid_namespaces(7)): the kubelet's SIGTERM on deletion is lost
    and the process runs on until SIGKILL at the end of the grace period. The agent does the same."""
    bit = 1 << (signal.SIGTERM - 1)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            caught = next(line for line in (proc / "status").read_text().splitlines()
                          if line.startswith("SigCgt:"))
        except (OSError, ValueError, IndexError, StopIteration):
            continue
        if int(caught.split()[1], 16) & bit:
            return True
    return False


# --------------------------------------------------------------------------- the agent


@dataclass
class Run:
    """One pod's process."""

    namespace: str
    name: str
    uid: str
    container: str
    image: str
    proc: subprocess.Popen[bytes]
    pod_dir: Path
    log_path: Path
    message_path: Path
    message_policy: str
    started_at: str
    memory_limit: int | None = None
    terminating: bool = False
    kill_at: float | None = None
    oom_killed: bool = False
    done: bool = False
    node: str = ""
    lost: bool = False
    """Its node was lost under it: once the node is served again, the pod is reported as a rebooted
    kubelet reports a container it cannot find (``_serve_returned_nodes``)."""


class NodeAgent:
    def __init__(
        self,
        kubeconfig: str,
        state_dir: Path,
        nodes: list[str],
        provisioner: str | None = None,
        workdir: str | None = None,
        use_mount_namespace: bool | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.nodes = set(nodes)
        self.provisioner = provisioner
        self.workdir = workdir or os.getcwd()
        self.stop_event = threading.Event()
        self.lock = threading.RLock()
        self.runs: dict[str, Run] = {}
        self.retry: dict[str, Obj] = {}
        self.broken: set[str] = set()  # pods that failed to start for good (not retried)
        self._local = threading.local()
        self._cpu_offset = 0
        self._transition: dict[tuple[str, str], str] = {}
        self._lost_before: set[str] = set()
        """The lost nodes as the reaper last saw them (one that leaves the set is resynced)."""
        if use_mount_namespace is None:
            use_mount_namespace = mount_namespace_available()
        self.use_mount_namespace = use_mount_namespace
        api = config.new_client_from_config(config_file=kubeconfig)
        self.api_host = api.configuration.host
        m = re.match(r"https?://([^/:]+|\[[^\]]+\]):(\d+)", self.api_host)
        self.service_host, self.service_port = (m.group(1), m.group(2)) if m else ("127.0.0.1", "443")
        self.server_version = client.VersionApi(api).get_code().git_version
        api.close()

    # ---- API access (one client per thread)
    @property
    def core(self) -> client.CoreV1Api:
        if not hasattr(self._local, "api"):
            self._local.api = config.new_client_from_config(config_file=self.kubeconfig)
        return client.CoreV1Api(self._local.api)

    def raw(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        """Call a client method and return the JSON body as plain dicts (camelCase keys)."""
        resp = call(*args, _preload_content=False, **kwargs)
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()

    # ---- main loop
    def run(self) -> None:
        log.info("node agent for %s (mount namespace: %s)", sorted(self.nodes),
                 self.use_mount_namespace)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "agent.json").write_text(json.dumps({
            "pid": os.getpid(), "nodes": sorted(self.nodes),
            "mount_namespace": self.use_mount_namespace}))
        threads = [threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
                   threading.Thread(target=self._reaper_loop, name="reaper", daemon=True)]
        if self.provisioner:
            threads += [
                threading.Thread(target=self._watch_forever, daemon=True, name="pvc",
                                 args=("persistentvolumeclaims", self._on_pvc)),
                threading.Thread(target=self._watch_forever, daemon=True, name="pv",
                                 args=("persistentvolumes", self._on_pv)),
            ]
        for t in threads:
            t.start()
        try:
            self._watch_forever("pods", self._on_pod)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stop_event.set()
        with self.lock:
            alive = [r for r in self.runs.values() if r.proc.poll() is None]
        for r in alive:
            _kill_group(r.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for r in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            _kill_group(r.proc.pid, signal.SIGKILL)
        cleanup_created_paths()
        log.info("node agent stopped (%d pod process(es) killed)", len(alive))

    def _watch_forever(self, resource: str, handler: Callable[[str, Obj], None]) -> None:
        """List then watch ``resource`` across namespaces, forever; relist on any error."""
        lister = {
            "pods": lambda: self.core.list_pod_for_all_namespaces,
            "persistentvolumeclaims":
                lambda: self.core.list_persistent_volume_claim_for_all_namespaces,
            "persistentvolumes": lambda: self.core.list_persistent_volume,
        }[resource]
        while not self.stop_event.is_set():
            try:
                listing = self.raw(lister())
                rv = listing["metadata"]["resourceVersion"]
                for item in listing["items"]:
                    self._handle(handler, "SYNC", item)
                while not self.stop_event.is_set():
                    w = watch.Watch()
                    for ev in w.stream(lister(), resource_version=rv, timeout_seconds=60,
                                       allow_watch_bookmarks=True, deserialize=False):
                        obj = ev["object"]
                        rv = get(obj, "metadata", "resourceVersion", default=rv)
                        if ev["type"] == "ERROR":
                            raise RuntimeError(f"watch error: {obj}")
                        if ev["type"] != "BOOKMARK":
                            self._handle(handler, ev["type"], obj)
                        if self.stop_event.is_set():
                            w.stop()
            except Exception as e:  # noqa: BLE001 - expired watch, apiserver restart, ...
                log.debug("%s watch restarts: %r", resource, e)
                self.stop_event.wait(1.0)

    @staticmethod
    def _handle(handler: Callable[[str, Obj], None], event: str, obj: Obj) -> None:
        try:
            handler(event, obj)
        except Exception:  # noqa: BLE001 - one bad object must not stop the watch
            meta = obj.get("metadata") or {}
            log.exception("%s %s/%s failed", event, meta.get("namespace"), meta.get("name"))

    # ---- node heartbeats
    def _heartbeat_loop(self) -> None:
        coord = None
        while not self.stop_event.is_set():
            try:
                if coord is None:
                    coord = client.CoordinationV1Api(
                        config.new_client_from_config(config_file=self.kubeconfig))
                lost = self.lost_nodes()
                for node in sorted(self.nodes - lost):
                    self._renew_lease(coord, node)
                    self._post_node_status(node)
            except Exception:  # noqa: BLE001 - keep beating
                log.exception("heartbeat failed")
            self.stop_event.wait(HEARTBEAT_SECONDS)

    def _renew_lease(self, coord: client.CoordinationV1Api, node: str) -> None:
        spec = {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": micro_now()}
        try:
            coord.patch_namespaced_lease(node, "kube-node-lease", {"spec": spec},
                                         _content_type=MERGE_PATCH)
        except client.ApiException as e:
            if e.status != 404:
                raise
            uid = self.raw(self.core.read_node, node)["metadata"]["uid"]
            coord.create_namespaced_lease("kube-node-lease", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node, "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}]},
                "spec": spec,
            })

    def _post_node_status(self, node: str) -> None:
        ts = now()
        conds = []
        for ctype, status, reason, message in (
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "sufficient memory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "sufficient PIDs"),
            ("Ready", "True", "KubeletReady", "qtune node agent is posting ready status"),
        ):
            since = self._transition.setdefault((node, ctype), ts)
            conds.append({"type": ctype, "status": status, "reason": reason, "message": message,
                          "lastHeartbeatTime": ts, "lastTransitionTime": since})
        uname = os.uname()
        status = {
            "conditions": conds,
            "nodeInfo": {
                "machineID": node, "systemUUID": node, "bootID": node,
                "kernelVersion": uname.release, "osImage": "qtune node agent",
                "containerRuntimeVersion": "qtune-node-agent://1",
                "kubeletVersion": self.server_version, "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": "amd64",
            },
        }
        self.core.patch_node_status(node, {"status": status}, _content_type=MERGE_PATCH)

    # ---- pods
    def lost_nodes(self) -> set[str]:
        """Nodes made to vanish (``<state>/lost-nodes``, one name a line; see ``lose_node``): no
        heartbeat, their pods' processes killed, their pods never touched again (as if the
        machine were unplugged)."""
        try:
            return set((self.state_dir / LOST_NODES).read_text().split())
        except OSError:
            return set()

    def _on_pod(self, event: str, pod: Obj) -> None:
        if get(pod, "spec", "nodeName") not in self.nodes - self.lost_nodes():
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            run = self.runs.get(uid)
            if event == "DELETED":
                self.retry.pop(uid, None)
                if run and run.proc.poll() is None:
                    log.info("pod %s/%s gone: killing", run.namespace, run.name)
                    run.terminating = True
                    _kill_group(run.proc.pid, signal.SIGKILL)
                elif run and run.done:
                    del self.runs[uid]
                self.broken.discard(uid)
                return
            if get(pod, "metadata", "deletionTimestamp"):
                self.retry.pop(uid, None)
                self._terminate(pod, run)
                return
            if run or uid in self.broken or get(pod, "status", "phase") in ("Succeeded",
                                                                            "Failed"):
                return
            if get(pod, "status", "phase") == "Running":
                # Started by an agent that is gone: its process is gone too.
                self._patch_terminated(pod, exit_code=137, reason=CONTAINER_UNKNOWN,
                                       message=CONTAINER_UNKNOWN_MESSAGE, started_at=None)
                return
            self._start(pod)

    def _terminate(self, pod: Obj, run: Run | None) -> None:
        if run and run.proc.poll() is None:
            if not run.terminating:
                grace = get(pod, "metadata", "deletionGracePeriodSeconds", default=30)
                run.terminating = True
                run.kill_at = time.monotonic() + min(float(grace), MAX_GRACE_SECONDS)
                if _catches_sigterm(run.proc.pid):
                    log.info("pod %s/%s deleted: SIGTERM", run.namespace, run.name)
                    _kill_group(run.proc.pid, signal.SIGTERM)
                else:  # as a container's PID 1 it would never see the kubelet's SIGTERM
                    log.info("pod %s/%s deleted: no SIGTERM handler, SIGKILL after the grace period",
                             run.namespace, run.name)
            return  # the reaper finalizes once the process is gone
        self._finalize_delete(pod["metadata"]["namespace"], pod["metadata"]["name"],
                              pod["metadata"]["uid"])

    def _finalize_delete(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
        except client.ApiException as e:
            if e.status not in (404, 409):
                raise

    def _start(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        c = spec["containers"][0]
        if spec.get("restartPolicy", "Always") != "Never":
            log.warning("pod %s/%s: restartPolicy %s treated as Never", ns, name,
                        spec.get("restartPolicy"))
        if spec.get("initContainers"):
            log.warning("pod %s/%s: init containers are ignored", ns, name)
        pod_dir = self.state_dir / "pods" / ns / name / uid
        pod_dir.mkdir(parents=True, exist_ok=True)
        try:
            volumes = self._prepare_volumes(pod, pod_dir)
            env = self._container_env(pod, c)
        except Retry as e:
            if uid not in self.retry:
                log.info("pod %s/%s waits: %s", ns, name, e)
            self.retry[uid] = pod
            return
        except Exception as e:  # noqa: BLE001 - surface it on the pod, like the kubelet
            log.exception("pod %s/%s cannot start", ns, name)
            self.retry.pop(uid, None)
            self.broken.add(uid)
            self._patch_status(pod, {"containerStatuses": [{
                "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                "restartCount": 0, "state": {"waiting": {
                    "reason": "CreateContainerConfigError", "message": repr(e)}}}]})
            return
        self.retry.pop(uid, None)

        message_path = pod_dir / "termination-log"
        message_path.write_bytes(b"")
        log_path = pod_dir / f"{c['name']}.log"
        defined = {e["name"]: env[e["name"]] for e in c.get("env", []) if e["name"] in env}
        argv = [expand(a, defined) for a in (c.get("command") or []) + (c.get("args") or [])]
        workdir = c.get("workingDir") or self.workdir
        mounts = []  # (host source, container path, read only)
        for vm in c.get("volumeMounts", []):
            src = volumes.get(vm["name"])
            if src is None:
                continue
            if vm.get("subPath"):
                try:
                    src = make_subpath(src, vm["subPath"])
                except (OSError, ValueError) as e:  # the kubelet: the container is not created
                    log.warning("pod %s/%s: volumeMount %s: %s", ns, name, vm["name"], e)
                    self.broken.add(uid)
                    self._patch_status(pod, {"containerStatuses": [{
                        "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                        "restartCount": 0, "state": {"waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": f"failed to prepare subPath for volumeMount {vm['name']!r}"}}}]})
                    return
            mounts.append((src, vm["mountPath"], bool(vm.get("readOnly"))))
        mounts.append((message_path, c.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH,
                       False))

        cpu = get(c, "resources", "limits", "cpu")
        if cpu is not None:
            threads = max(1, math.floor(parse_quantity(cpu)))
            env.setdefault("OMP_NUM_THREADS", str(threads))
        memory = get(c, "resources", "limits", "memory")

        if not argv:
            self._patch_terminated(pod, exit_code=128, reason="StartError",
                                   message="no command: images are not run here", started_at=None)
            return
        if self.use_mount_namespace:
            argv, cwd = self._namespaced(argv, mounts, workdir)
        else:
            argv, env, cwd = self._rewritten(argv, env, mounts, volumes, workdir)
        if cpu is not None and (n := max(1, math.ceil(parse_quantity(cpu)))) < (os.cpu_count() or 1):
            with self.lock:
                cpus = [(self._cpu_offset + i) % (os.cpu_count() or 1) for i in range(n)]
                self._cpu_offset += n
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]

        started_at = now()
        try:
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                        start_new_session=True, preexec_fn=_die_with_agent)
        except OSError as e:
            self._patch_terminated(pod, exit_code=128, reason="StartError", message=str(e),
                                   started_at=None)
            return
        self.runs[uid] = Run(
            namespace=ns, name=name, uid=uid, container=c["name"], image=c.get("image", ""),
            proc=proc, pod_dir=pod_dir, log_path=log_path, message_path=message_path,
            message_policy=c.get("terminationMessagePolicy", "File"), started_at=started_at,
            memory_limit=int(parse_quantity(memory)) if memory is not None else None, node=spec["nodeName"],
        )
        log.info("pod %s/%s started on %s: pid %d", ns, name, spec["nodeName"], proc.pid)
        self._patch_running(pod, c, proc.pid, started_at)

    def _namespaced(self, argv: list[str], mounts: list[tuple[Path, str, bool]],
                    workdir: str) -> tuple[list[str], str]:
        """Run in a private mount namespace with the volumes bind-mounted on their paths.

        Every source is opened first and mounted from ``/proc/self/fd/N`` (without
        canonicalizing), so a mount on e.g. /tmp cannot hide the sources of later mounts.
        """
        q = shlex.quote
        lines = ["set -e"]
        mounted: list[str] = []
        for i, (src, path, read_only) in enumerate(sorted(mounts, key=lambda m: len(m[1]))):
            fd = 10 + i
            lines.insert(1, f"exec {fd}<{q(str(src))}")
            if not any(path.startswith(p.rstrip("/") + "/") for p in mounted):
                ensure_mount_target(Path(path), src.is_file())
            elif src.is_file():
                lines.append(f"[ -e {q(path)} ] || : > {q(path)}")
            else:
                lines.append(f"mkdir -p {q(path)}")
            lines.append(f"mount --no-canonicalize --bind /proc/self/fd/{fd} {q(path)}")
            if read_only:
                lines.append(f"mount -o remount,bind,ro {q(path)}")
            lines.append(f"exec {fd}<&-")
            mounted.append(path)
        # The pod's process runs in the host's Python: where a volume (e.g. an emptyDir on /tmp)
        # covers the interpreter, the checkout or site-packages, bind those back on top of it.
        for j, path in enumerate(hidden_host_paths([p for src, p, _ in mounts if not src.is_file()])):
            fd = 10 + len(mounts) + j
            lines.insert(1, f"exec {fd}<{q(path)}")
            lines += [f"mkdir -p {q(path)}", f"mount --no-canonicalize --bind /proc/self/fd/{fd} {q(path)}",
                      f"exec {fd}<&-"]
        if not any(workdir.startswith(p.rstrip("/") + "/") or workdir == p for p in mounted):
            ensure_mount_target(Path(workdir), is_file=False)  # as the runtime would
        lines += [f"mkdir -p {q(workdir)}", f"cd {q(workdir)}", 'exec "$@"']
        script = "\n".join(lines)
        return ["unshare", "--mount", "--propagation", "private", "--",
                "/bin/bash", "-c", script, "pod", *argv], "/"

    def _rewritten(self, argv: list[str], env: dict[str, str],
                   mounts: list[tuple[Path, str, bool]], volumes: dict[str, Path],
                   workdir: str) -> tuple[list[str], dict[str, str], str]:
        """Fallback without mount namespaces: rewrite mountPath prefixes to host folders."""
        table = sorted(((path.rstrip("/"), str(src)) for src, path, _ in mounts),
                       key=lambda m: -len(m[0]))
        pattern = re.compile("|".join(rf"(?<![\w.-]){re.escape(p)}(?=/|$|[^\w.-])"
                                      for p, _ in table))
        lookup = dict(table)

        def rewrite(s: str) -> str:
            return pattern.sub(lambda m: lookup[m.group(0)], s) if table else s

        env = {k: (rewrite(v) if k not in os.environ or os.environ[k] != v else v)
               for k, v in env.items()}
        for name, src in volumes.items():
            env[f"QTUNE_VOLUME_{re.sub(r'[^A-Z0-9]', '_', name.upper())}"] = str(src)
        env["QTUNE_TERMINATION_MESSAGE_PATH"] = str(mounts[-1][0])
        return [rewrite(a) for a in argv], env, rewrite(workdir)

    # ---- pod inputs
    def _prepare_volumes(self, pod: Obj, pod_dir: Path) -> dict[str, Path]:
        ns = pod["metadata"]["namespace"]
        out: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes", []):
            name = vol["name"]
            target = pod_dir / "volumes" / name
            if "persistentVolumeClaim" in vol:
                path = self.state_dir / "pvc" / ns / vol["persistentVolumeClaim"]["claimName"]
                path.mkdir(parents=True, exist_ok=True)
                out[name] = path
            elif "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if get(vol, "hostPath", "type") == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
                out[name] = path
            elif "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
                out[name] = target
            else:
                files: dict[str, bytes] = {}
                if "configMap" in vol:
                    files = self._config_files(ns, vol["configMap"], secret=False)
                elif "secret" in vol:
                    src = dict(vol["secret"], name=vol["secret"].get("secretName"))
                    files = self._config_files(ns, src, secret=True)
                elif "downwardAPI" in vol:
                    files = self._downward_files(pod, vol["downwardAPI"].get("items", []))
                elif "projected" in vol:
                    for source in vol["projected"].get("sources", []):
                        files.update(self._projected(pod, source))
                else:
                    log.warning("volume %s: unsupported type, using an empty folder", name)
                target.mkdir(parents=True, exist_ok=True)
                for rel, data in files.items():
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    (target / rel).write_bytes(data)
                out[name] = target
        return out

    def _read(self, kind: str, ns: str, name: str, optional: bool) -> Obj | None:
        reader = self.core.read_namespaced_secret if kind == "secret" else \
            self.core.read_namespaced_config_map
        try:
            return self.raw(reader, name, ns)
        except client.ApiException as e:
            if e.status == 404 and optional:
                return None
            if e.status == 404:
                raise Retry(f"{kind} {ns}/{name} not found") from e
            raise

    def _data(self, obj: Obj | None, secret: bool) -> dict[str, bytes]:
        if obj is None:
            return {}
        if secret:
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _config_files(self, ns: str, src: Obj, secret: bool) -> dict[str, bytes]:
        data = self._data(self._read("secret" if secret else "configmap", ns, src["name"],
                                     bool(src.get("optional"))), secret)
        items = src.get("items")
        if not items:
            return data
        return {i["path"]: data[i["key"]] for i in items if i["key"] in data}

    def _downward_files(self, pod: Obj, items: Iterable[Obj]) -> dict[str, bytes]:
        return {i["path"]: field_value(pod, i["fieldRef"]["fieldPath"]).encode()
                for i in items if "fieldRef" in i}

    def _projected(self, pod: Obj, source: Obj) -> dict[str, bytes]:
        meta, ns = pod["metadata"], pod["metadata"]["namespace"]
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            spec: Obj = {
                "expirationSeconds": sat.get("expirationSeconds", 3600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                   "uid": meta["uid"]},
            }
            if sat.get("audience"):
                spec["audiences"] = [sat["audience"]]
            sa = pod["spec"].get("serviceAccountName", "default")
            tr = self.raw(self.core.create_namespaced_service_account_token, sa, ns,
                          {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                           "spec": spec})
            return {sat["path"]: tr["status"]["token"].encode()}
        if "configMap" in source:
            return self._config_files(ns, source["configMap"], secret=False)
        if "secret" in source:
            return self._config_files(ns, source["secret"], secret=True)
        if "downwardAPI" in source:
            return self._downward_files(pod, source["downwardAPI"].get("items", []))
        return {}

    def _container_env(self, pod: Obj, c: Obj) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        # The host environment (so the host Python and PATH work), minus the agent's admin
        # credentials: in-cluster clients use the service-account token like in a real pod.
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
        defined: dict[str, str] = {
            "KUBERNETES_SERVICE_HOST": self.service_host,
            "KUBERNETES_SERVICE_PORT": self.service_port,
            "KUBERNETES_SERVICE_PORT_HTTPS": self.service_port,
            "KUBERNETES_PORT": f"tcp://{self.service_host}:{self.service_port}",
            "HOSTNAME": pod["metadata"]["name"],
        }
        for ef in c.get("envFrom", []):
            ref = ef.get("configMapRef") or ef.get("secretRef")
            kind = "configmap" if "configMapRef" in ef else "secret"
            data = self._data(self._read(kind, ns, ref["name"], bool(ref.get("optional"))),
                              secret=kind == "secret")
            defined.update({ef.get("prefix", "") + k: v.decode() for k, v in data.items()})
        for e in c.get("env", []):
            if "valueFrom" not in e:
                defined[e["name"]] = expand(e.get("value", ""), defined)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                defined[e["name"]] = field_value(pod, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                defined[e["name"]] = resource_value(c, vf["resourceFieldRef"])
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                kind = "configmap" if "configMapKeyRef" in vf else "secret"
                ref = vf.get("configMapKeyRef") or vf["secretKeyRef"]
                data = self._data(self._read(kind, ns, ref["name"], bool(ref.get("optional"))),
                                  secret=kind == "secret")
                if ref["key"] in data:
                    defined[e["name"]] = data[ref["key"]].decode()
                elif not ref.get("optional"):
                    raise Retry(f"key {ref['key']} not in {kind} {ns}/{ref['name']}")
        env.update(defined)
        return env

    # ---- pod status
    def _conditions(self, pod: Obj, **states: str) -> list[Obj]:
        ts = now()
        conds = {c["type"]: c for c in get(pod, "status", "conditions", default=[])}
        for ctype, status in states.items():
            old = conds.get(ctype, {})
            cond = {"type": ctype, "status": status, "lastProbeTime": None,
                    "lastTransitionTime": old.get("lastTransitionTime") if
                    old.get("status") == status else ts}
            if ctype in ("Ready", "ContainersReady") and status == "False":
                cond["reason"] = "PodCompleted"
            conds[ctype] = cond
        return list(conds.values())

    def _patch_status(self, pod: Obj, status: Obj) -> None:
        try:
            self.core.patch_namespaced_pod_status(
                pod["metadata"]["name"], pod["metadata"]["namespace"], {"status": status},
                _content_type=MERGE_PATCH)
        except client.ApiException as e:
            if e.status != 404:
                raise

    def _patch_running(self, pod: Obj, c: Obj, pid: int, started_at: str) -> None:
        self._patch_status(pod, {
            "phase": "Running",
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": get(pod, "status", "startTime") or started_at,
            "conditions": self._conditions(pod, PodReadyToStartContainers="True",
                                           Initialized="True", ContainersReady="True",
                                           Ready="True"),
            "containerStatuses": [{
                "name": c["name"], "image": c.get("image", ""), "imageID": "",
                "containerID": f"qtune://{pid}", "ready": True, "started": True,
                "restartCount": 0, "state": {"running": {"startedAt": started_at}},
            }],
        })

    def _patch_terminated(self, pod: Obj, exit_code: int, reason: str, message: str,
                          started_at: str | None, container_id: str = "") -> None:
        c = pod["spec"]["containers"][0]
        finished = now()
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started_at or finished,
                      "finishedAt": finished}
        if message:
            terminated["message"] = message
        if container_id:
            terminated["containerID"] = container_id
        self._patch_status(pod, {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": get(pod, "status", "startTime") or started_at or finished,
            "conditions": self._conditions(pod, PodReadyToStartContainers="False",
                                           Initialized="True", ContainersReady="False",
                                           Ready="False"),
            "containerStatuses": [{
                "name": c["name"], "image": c.get("image", ""), "imageID": "",
                "containerID": container_id or None, "ready": False, "started": False,
                "restartCount": 0, "state": {"terminated": terminated},
            }],
        })

    # ---- reaping
    def _reaper_loop(self) -> None:
        last_retry = last_memory = 0.0
        while not self.stop_event.wait(0.1):
            try:
                with self.lock:
                    runs = [r for r in self.runs.values() if not r.done]
                rss: dict[int, int] = {}
                if any(r.memory_limit for r in runs) and time.monotonic() - last_memory > 0.5:
                    last_memory = time.monotonic()
                    rss = rss_by_session()
                for run in runs:
                    self._check(run, rss)
                self._serve_returned_nodes()
                if time.monotonic() - last_retry > 1.0:
                    last_retry = time.monotonic()
                    with self.lock:
                        for uid, pod in list(self.retry.items()):
                            if uid in self.retry:
                                self._start(pod)
            except Exception:  # noqa: BLE001 - keep reaping
                log.exception("reaper")

    def _serve_returned_nodes(self) -> None:
        """Nodes served again after ``lose_node(lost=False)``: resync their pods as a kubelet back from a
        reboot does. A pod that ran there is Failed, its container terminated with ContainerStatusUnknown
        (exit 137: the container was running and is gone); a pod bound there that never started starts
        now. Until the node is back its pods are never touched (they say Running or Pending), as on a
        real unplugged node."""
        lost_nodes = self.lost_nodes()
        back = self._lost_before - lost_nodes
        if back:
            with self.lock:
                for uid, run in list(self.runs.items()):
                    if run.lost and run.node in back:
                        del self.runs[uid]  # so its pod reads as started by an agent that is gone
            for node in sorted(back):
                log.info("node %s is served again: resyncing its pods", node)
                listing = self.raw(self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node}")
                for pod in listing["items"]:
                    self._handle(self._on_pod, "SYNC", pod)
        self._lost_before = lost_nodes  # only once resynced: a failed listing is tried again next time

    def _check(self, run: Run, rss: dict[int, int]) -> None:
        with self.lock:
            self._check_locked(run, rss)

    def _check_locked(self, run: Run, rss: dict[int, int]) -> None:
        if run.node in self.lost_nodes():  # the machine is gone: so are its processes, silently
            _kill_group(run.proc.pid, signal.SIGKILL)
            run.done = run.lost = True
            return
        rc = run.proc.poll()
        if rc is None:
            if run.kill_at is not None and time.monotonic() > run.kill_at:
                _kill_group(run.proc.pid, signal.SIGKILL)
            elif run.memory_limit and rss.get(run.proc.pid, 0) > run.memory_limit:
                log.info("pod %s/%s over its memory limit: killed", run.namespace, run.name)
                run.oom_killed = True
                _kill_group(run.proc.pid, signal.SIGKILL)
            return
        _kill_group(run.proc.pid, signal.SIGKILL)  # no stragglers in the pod's group
        run.done = True
        if run.terminating:
            log.info("pod %s/%s stopped (%s): deleting", run.namespace, run.name, rc)
            self._finalize_delete(run.namespace, run.name, run.uid)
            return
        exit_code = rc if rc >= 0 else 128 - rc
        reason = "OOMKilled" if run.oom_killed else ("Completed" if rc == 0 else "Error")
        message = run.message_path.read_bytes()[:MAX_MESSAGE_BYTES].decode(errors="replace")
        if not message and rc != 0 and run.message_policy == "FallbackToLogsOnError":
            message = log_tail(run.log_path)
        log.info("pod %s/%s exited %d (%s)", run.namespace, run.name, exit_code, reason)
        try:
            pod = self.raw(self.core.read_namespaced_pod, run.name, run.namespace)
        except client.ApiException as e:
            if e.status == 404:
                return
            raise
        if pod["metadata"]["uid"] == run.uid:
            self._patch_terminated(pod, exit_code, reason, message, run.started_at,
                                   container_id=f"qtune://{run.proc.pid}")

    # ---- storage provisioner
    def _on_pvc(self, event: str, pvc: Obj) -> None:
        meta = pvc["metadata"]
        ann = meta.get("annotations") or {}
        wanted = ann.get("volume.kubernetes.io/storage-provisioner") or \
            ann.get("volume.beta.kubernetes.io/storage-provisioner")
        if (event == "DELETED" or wanted != self.provisioner or get(pvc, "spec", "volumeName")
                or get(pvc, "status", "phase") != "Pending" or meta.get("deletionTimestamp")):
            return
        path = self.state_dir / "pvc" / meta["namespace"] / meta["name"]
        path.mkdir(parents=True, exist_ok=True)
        # World-writable (as local-path provisioners make them): on a real node (realnode.py)
        # the kubelet bind-mounts this hostPath as is, and fsGroup does not chown hostPath, so
        # non-root pods (runAsUser 65532) could not write to their claim otherwise.
        path.chmod(0o777)
        spec = pvc["spec"]
        pv = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"pvc-{meta['uid']}",
                         "annotations": {PROVISIONED_BY: self.provisioner}},
            "spec": {
                "capacity": {"storage": get(spec, "resources", "requests", "storage",
                                            default="1Gi")},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": spec.get("storageClassName"),
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                             "namespace": meta["namespace"], "name": meta["name"],
                             "uid": meta["uid"]},
            },
        }
        try:
            self.core.create_persistent_volume(pv)
            log.info("provisioned %s for %s/%s", pv["metadata"]["name"], meta["namespace"],
                     meta["name"])
        except client.ApiException as e:
            if e.status != 409:
                raise

    def _on_pv(self, event: str, pv: Obj) -> None:
        meta = pv["metadata"]
        if (event == "DELETED" or (meta.get("annotations") or {}).get(PROVISIONED_BY)
                != self.provisioner or get(pv, "status", "phase") != "Released"
                or meta.get("deletionTimestamp")):
            return
        path = Path(get(pv, "spec", "hostPath", "path", default=""))
        if path.is_relative_to(self.state_dir / "pvc"):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(client.ApiException):
            self.core.delete_persistent_volume(meta["name"])
        log.info("reclaimed %s", meta["name"])


# --------------------------------------------------------------------------- helpers

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, value)


def field_value(pod: Obj, path: str) -> str:
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"], "spec.nodeName": get(pod, "spec", "nodeName", default=""),
        "spec.serviceAccountName": get(pod, "spec", "serviceAccountName", default=""),
        "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
        "status.podIP": "127.0.0.1", "status.podIPs": "127.0.0.1",
    }
    return simple.get(path, "")


def resource_value(c: Obj, ref: Obj) -> str:
    kind, _, res = ref["resource"].partition(".")
    value = get(c, "resources", kind, res) or get(c, "resources", "limits", res)
    if value is None:  # the kubelet falls back to node allocatable; keep the host's
        value = str(os.cpu_count() or 1) if res == "cpu" else "32Gi"
    divisor = parse_quantity(ref.get("divisor") or "1") or 1  # the API defaults it to "0"
    q = parse_quantity(value) / divisor
    return str(math.ceil(q))


def log_tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    tail = b"\n".join(data.splitlines()[-FALLBACK_LOG_LINES:])
    return tail[-FALLBACK_LOG_BYTES:].decode(errors="replace")


LOST_NODES = "lost-nodes"
CONTAINER_UNKNOWN = "ContainerStatusUnknown"
CONTAINER_UNKNOWN_MESSAGE = "The container could not be located when the pod was terminated"


def lose_node(state_dir: Path, node: str, lost: bool = True) -> None:
    """Make the agent of `state_dir` stop serving `node` (or serve it again): a node lost."""
    path = Path(state_dir) / LOST_NODES
    names = set(path.read_text().split()) if path.exists() else set()
    names = names | {node} if lost else names - {node}
    path.write_text("".join(f"{n}\n" for n in sorted(names)))


def make_subpath(volume: Path, sub_path: str) -> Path:
    """The host folder of a volumeMount's subPath, as the kubelet makes it (kubelet_pods.go makeMounts,
    volume/util/subpath SafeMakeDir): an absolute subPath or one with `..` is refused; a missing one
    is created component by component, each with the mode of the volume's root (setgid included,
    not narrowed by the umask). Owner: this agent's user (the kubelet's: root; group inherited from a
    setgid parent)."""
    if sub_path.startswith("/") or ".." in Path(sub_path).parts:
        raise ValueError(f"subPath {sub_path!r} must be a relative path without '..'")
    mode = volume.stat().st_mode & 0o7777
    current = volume
    for part in Path(sub_path).parts:
        current = current / part
        if current.is_symlink():
            raise ValueError(f"subPath {sub_path!r}: {part} is a symbolic link")
        if not current.exists():
            current.mkdir()
            os.chmod(current, mode)
    return current


def mount_namespace_available() -> bool:
    """Whether ``unshare --mount`` and bind mounts work here (root, no seccomp block)."""
    if shutil.which("unshare") is None:
        return False
    probe_dir = tempfile.mkdtemp(prefix="qtune-mount-probe-")
    try:
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private",
             "mount", "--bind", "/", probe_dir],
            capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.rmdir(probe_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="process-based node agent for the test plane")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--nodes", required=True, help="comma-separated node names")
    p.add_argument("--provisioner", help="serve this StorageClass provisioner name")
    p.add_argument("--workdir", help="working directory of pods without workingDir")
    p.add_argument("--no-mount-namespace", action="store_true",
                   help="rewrite mountPaths instead of bind-mounting them")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s node-agent %(levelname)s %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = NodeAgent(args.kubeconfig, args.state_dir, args.nodes.split(","),
                      provisioner=args.provisioner, workdir=args.workdir,
                      use_mount_namespace=False if args.no_mount_namespace else None)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
