"""A real Kubernetes control plane on loopback for the cluster tests.

Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler (binaries built by
``build.sh``), registers Node objects for the test node pools, runs ``node_agent.py`` (which
plays the kubelet for those nodes: leases, node status, pods as local processes), plus a real
Prometheus scraping a real Pushgateway. Everything listens on free loopback ports and keeps its
state in one temporary folder, removed on teardown.

Use it from pytest (see ``conftest.py``) or by hand::

    python tests/cluster/plane.py up              # start, detach, print the env to export
    eval "$(python tests/cluster/plane.py env)"   # KUBECONFIG, QTUNE_PROMETHEUS_URL, ...
    python tests/cluster/plane.py down            # stop everything, remove the state

    python tests/cluster/plane.py up --foreground # stay attached; Ctrl-C tears down
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3
import yaml

if str(Path(__file__).resolve().parents[1] / "support") not in sys.path:  # run outside pytest
    sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))
import system_tools  # noqa: E402  (requirements/system.txt: what setup installs)

log = logging.getLogger("qtune.plane")

HERE = Path(__file__).resolve().parent
K8S_BUILD_DIR = HERE / "k8s-build"
NODE_AGENT = HERE / "node_agent.py"

#: Every process the plane starts (and every pod process, which inherits the agent's
#: environment) carries this variable, so teardown can sweep stragglers by marker.
PLANE_ID_ENV = "QTUNE_PLANE_ID"
DEFAULT_PLANE_DIR = Path(tempfile.gettempdir()) / f"qtune-plane-{os.getuid()}"

STORAGE_CLASS = "qtune-host-path"
PROVISIONER = "qtune.io/host-path"
SERVICE_CIDR = "10.96.0.0/24"  # ClusterIPs are only allocated, never routed to.

NFD = "feature.node.kubernetes.io"
INTEL = {f"{NFD}/cpu-model.vendor_id": "Intel"}
AMD = {f"{NFD}/cpu-model.vendor_id": "AMD"}
AVX512 = {f"{NFD}/cpu-cpuid.AVX512F": "true", f"{NFD}/cpu-cpuid.AVX512VNNI": "true"}
AMX = {f"{NFD}/cpu-cpuid.AMXINT8": "true", f"{NFD}/cpu-cpuid.AMXBF16": "true"}
AVX2 = {f"{NFD}/cpu-cpuid.AVX2": "true", f"{NFD}/cpu-cpuid.FMA3": "true"}
DEDICATED_TAINT = {"key": "qtune.io/dedicated", "value": "tuning", "effect": "NoSchedule"}
OPERATOR_USER = "qtune-operator"
"""The user of ``operator.kubeconfig`` (group system:masters); with ``Plane(audit=True)`` the
apiserver records every request of this user (and only of it) in ``audit_log``."""


@dataclass(frozen=True)
class NodeSpec:
    """One fake node: its pool, labels (as Node Feature Discovery sets them) and taints."""

    name: str
    pool: str
    labels: dict[str, str]
    taints: tuple[dict[str, str], ...] = ()
    cpu: str = "8"
    memory: str = "32Gi"
    pods: str = "110"


#: The node pools. Note the AMD Zen 4 node also has AVX512VNNI, as real ones do: selecting on
#: the ISA label alone is not enough to land on the Intel pool.
NODES: tuple[NodeSpec, ...] = (
    NodeSpec("xeon-0", "xeon", {**INTEL, **AVX2, **AVX512, **AMX}),  # Sapphire Rapids
    NodeSpec("xeon-1", "xeon", {**INTEL, **AVX2, **AVX512}),  # Ice Lake
    NodeSpec("amd-0", "amd", {**AMD, **AVX2}),  # Zen 3
    NodeSpec("amd-1", "amd", {**AMD, **AVX2, **AVX512}),  # Zen 4
    NodeSpec(
        "xeon-dedicated-0",
        "dedicated",
        {**INTEL, **AVX2, **AVX512, **AMX, "qtune.io/dedicated": "tuning"},
        taints=(DEDICATED_TAINT,),
    ),
)


class PlaneError(RuntimeError):
    """The plane could not be started (the message says which component and why)."""


def k8s_version() -> str:
    """The Kubernetes release pinned in k8s-build/go.mod (e.g. ``v1.35.4``)."""
    text = (K8S_BUILD_DIR / "go.mod").read_text()
    m = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v1\.\S+)", text, re.M)
    if not m:
        raise PlaneError("cannot find the k8s.io/kubernetes version in k8s-build/go.mod")
    return m.group(1)


def default_bin_dir() -> Path:
    """Where build.sh puts the binaries (``$QTUNE_K8S_BIN_DIR`` overrides)."""
    if os.environ.get("QTUNE_K8S_BIN_DIR"):
        return Path(os.environ["QTUNE_K8S_BIN_DIR"])
    cache = Path(os.environ.get("QTUNE_CACHE_DIR") or Path.home() / ".cache" / "qtune")
    return cache / "k8s" / k8s_version() / "bin"


def missing_binaries(bin_dir: Path | None = None) -> list[str]:
    """Names of the programs the plane needs that are not installed/built."""
    bin_dir = bin_dir or default_bin_dir()
    missing = [
        f"{bin_dir}/{b}"
        for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
        if not os.access(bin_dir / b, os.X_OK)
    ]
    return missing + system_tools.missing("etcd", "prometheus", "prometheus-pushgateway", "openssl", "unshare")


PUSHGATEWAY_PERSISTENCE_INTERVAL = "1s"


def pushgateway_argv(state_dir: Path, port: int) -> list[str]:
    """The plane's Pushgateway: its OWN persistence file in the plane's state dir, written every second
    and on a graceful stop, so a restart within the plane keeps the pushed groups (as a production
    Pushgateway with persistence does). Never the packaged default file (Debian's binary defaults to
    /var/lib/prometheus/pushgateway.data, which every plane on the machine would share: a new plane
    would start with stale groups)."""
    folder = state_dir / "pushgateway"
    folder.mkdir(parents=True, exist_ok=True)
    return [
        "prometheus-pushgateway",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--persistence.file={folder / 'pushgateway.data'}",
        f"--persistence.interval={PUSHGATEWAY_PERSISTENCE_INTERVAL}",
        "--log.level=warn",
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PlaneError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


# --------------------------------------------------------------------------- certificates


def make_pki(pki: Path) -> None:
    """A CA, the apiserver serving cert, client certs and the service-account key (openssl)."""
    pki.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(
        ["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
         "-subj", "/CN=qtune-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"],
        pki,
    )
    sans = ",".join(
        ["IP:127.0.0.1", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes",
         "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
         "DNS:kubernetes.default.svc.cluster.local"]
    )
    certs = {
        # name: (subject, extended key usage, subjectAltName)
        "apiserver": ("/CN=kube-apiserver", "serverAuth", sans),
        "admin": ("/O=system:masters/CN=qtune-admin", "clientAuth", None),
        # a distinct user for an operator under test, so its API requests can be told apart (audit)
        "operator": (f"/O=system:masters/CN={OPERATOR_USER}", "clientAuth", None),
        "controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", None),
        "scheduler": ("/CN=system:kube-scheduler", "clientAuth", None),
        "node-agent": ("/O=system:masters/CN=qtune-node-agent", "clientAuth", None),
        "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client",
                                     "clientAuth", None),
    }
    for name, (subject, eku, san) in certs.items():
        ext = [f"extendedKeyUsage={eku}", "keyUsage=critical,digitalSignature,keyEncipherment",
               "basicConstraints=CA:FALSE"]
        if san:
            ext.append(f"subjectAltName={san}")
        argv = ["openssl", "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt",
                "-days", "365", "-subj", subject, "-CA", "ca.crt", "-CAkey", "ca.key"]
        for e in ext:
            argv += ["-addext", e]
        _run(argv, pki)
    # The aggregation layer's front proxy has its own CA (requestheader authentication).
    _run(
        ["openssl", "req", "-x509", *ec, "-keyout", "front-proxy-ca.key", "-out",
         "front-proxy-ca.crt", "-days", "3650", "-subj", "/CN=qtune-front-proxy-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"],
        pki,
    )
    _run(
        ["openssl", "req", "-x509", *ec, "-keyout", "front-proxy-client.key", "-out",
         "front-proxy-client.crt", "-days", "365", "-subj", "/CN=front-proxy-client",
         "-CA", "front-proxy-ca.crt", "-CAkey", "front-proxy-ca.key",
         "-addext", "extendedKeyUsage=clientAuth", "-addext", "basicConstraints=CA:FALSE",
         "-addext", "keyUsage=critical,digitalSignature,keyEncipherment"],
        pki,
    )
    _run(["openssl", "genrsa", "-out", "sa.key", "2048"], pki)
    _run(["openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], pki)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "qtune-test",
                      "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate": str(pki / f"{user}.crt"),
                                          "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "qtune-test", "context": {"cluster": "qtune-test", "user": user}}],
        "current-context": "qtune-test",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


# --------------------------------------------------------------------------- processes


@dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop_groups(pgids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each process group (in order), then SIGKILL what is left after ``grace``."""
    for pgid in pgids:
        _kill_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _pid_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill_group(pgid, signal.SIGKILL)


def live_plane_ids() -> set[str]:
    """Plane ids carried by running processes (see :data:`PLANE_ID_ENV`)."""
    ids = set()
    prefix = f"{PLANE_ID_ENV}=".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        for var in env.split(b"\0"):
            if var.startswith(prefix):
                ids.add(var[len(prefix):].decode(errors="replace"))
    return ids


def sweep_stale_etcd_dirs(min_age: float = 120.0) -> None:
    """Remove /dev/shm etcd folders of planes that died without teardown (SIGKILL)."""
    shm = Path("/dev/shm")
    stale = [d for d in shm.glob("qtune-etcd-*-*")
             if time.time() - d.stat().st_mtime > min_age]
    if not stale:
        return
    live = live_plane_ids()
    for d in stale:
        if d.name.split("-")[2] not in live:
            log.info("removing stale %s", d)
            shutil.rmtree(d, ignore_errors=True)


def sweep_marked(plane_id: str) -> list[int]:
    """SIGKILL every process whose environment carries this plane's marker; returns pids."""
    marker = f"{PLANE_ID_ENV}={plane_id}".encode() + b"\0"
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


# --------------------------------------------------------------------------- the plane


@dataclass
class Plane:
    """A control plane + node agent + Prometheus/Pushgateway, started by :meth:`start`."""

    state_dir: Path | None = None
    bin_dir: Path | None = None
    prometheus: bool = True
    node_agent: bool = True
    keep_state: bool = False
    nodes: tuple[NodeSpec, ...] = NODES
    #: None: bind-mount volumes in a private mount namespace when possible; False: rewrite
    #: mountPaths instead (QTUNE_NODE_AGENT_MOUNT_NS=0 sets False).
    mount_namespace: bool | None = None
    #: Audit the requests of OPERATOR_USER (Metadata level) to ``audit_log`` (a benchmark counts them).
    audit: bool = False
    #: How many REAL nodes (kubelet + containerd in a network namespace, see realnode.py)
    #: to start after the plane is up; more can be added with :meth:`add_real_node`.
    real_nodes: int = 0
    #: Install and run Kueue (kueue.py: built from its Go module, its CRDs and webhooks) once the
    #: plane is up; or later with :meth:`start_kueue` / :meth:`stop_kueue`.
    kueue: bool = False
    #: Kueue with fair sharing on (its Configuration's ``fairSharing``; kueue.FAIR_SHARING).
    kueue_fair_sharing: bool = False
    plane_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    components: list[Component] = field(default_factory=list, init=False)
    ports: dict[str, int] = field(default_factory=dict, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    real: list[Any] = field(default_factory=list, init=False)  # realnode.RealNode objects
    kueue_install: Any = field(default=None, init=False)  # kueue.Kueue while Kueue runs
    _own_state_dir: bool = field(default=False, init=False)
    _etcd_dir: Path | None = field(default=None, init=False)
    _stopped: bool = field(default=False, init=False)
    _stopped_components: dict[str, Component] = field(default_factory=dict, init=False)
    _tie_to_parent: bool = field(default=True, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    # ---- paths and urls
    @property
    def pki(self) -> Path:
        assert self.state_dir
        return self.state_dir / "pki"

    @property
    def operator_kubeconfig(self) -> Path:
        """Kubeconfig of OPERATOR_USER (cluster admin, a user of its own)."""
        assert self.state_dir
        return self.state_dir / "operator.kubeconfig"

    @property
    def audit_log(self) -> Path:
        """JSON lines, one audit event per stage of each request of OPERATOR_USER (``audit=True``)."""
        assert self.state_dir
        return self.state_dir / "audit" / "audit.log"

    @property
    def kubeconfig(self) -> Path:
        assert self.state_dir
        return self.state_dir / "admin.kubeconfig"

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def prometheus_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ports['prometheus']}" if self.prometheus else None

    @property
    def pushgateway_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ports['pushgateway']}" if self.prometheus else None

    def node_names(self) -> dict[str, list[str]]:
        pools: dict[str, list[str]] = {}
        for n in self.nodes:
            pools.setdefault(n.pool, []).append(n.name)
        for rn in self.real:
            pools.setdefault(rn.spec.pool, []).append(rn.name)
        return pools

    def env(self) -> dict[str, str]:
        """The variables a test (or a shell) needs to reach this plane."""
        assert self.state_dir
        env = {"KUBECONFIG": str(self.kubeconfig), "QTUNE_PLANE_STATE_DIR": str(self.state_dir),
               "QTUNE_K8S_BIN_DIR": str(self.bin_dir or default_bin_dir())}
        if self.prometheus:
            env["QTUNE_PROMETHEUS_URL"] = str(self.prometheus_url)
            env["QTUNE_PUSHGATEWAY_URL"] = str(self.pushgateway_url)
            if self.real:  # what pods on a real node use (through the node's forwarders)
                env["QTUNE_POD_PROMETHEUS_URL"] = str(self.real[0].pod_prometheus_url)
                env["QTUNE_POD_PUSHGATEWAY_URL"] = str(self.real[0].pod_pushgateway_url)
        return env

    def add_real_node(self, spec: Any = None) -> Any:
        """Start one more REAL node (``realnode.RealNode``) on this running plane."""
        sys.path.insert(0, str(HERE))
        try:
            import realnode
        finally:
            sys.path.remove(str(HERE))
        rn = realnode.RealNode(self, spec or realnode.RealNodeSpec(
            name=f"xeon-real-{len(self.real)}"), index=len(self.real))
        self.real.append(rn)
        try:
            rn.start()
        except BaseException:
            self.real.remove(rn)
            raise
        if self.state_dir and (self.state_dir / "plane.env").exists():
            self._write_env_file()
        self._save()
        return rn

    def start_kueue(self, timeout: float = 120.0) -> Any:
        """Install Kueue on this running plane and start its manager (``kueue.Kueue``; built first
        by build_kueue.sh when its cache folder is empty). Idempotent."""
        if self.kueue_install is None:
            kueue = _import_here("kueue")
            inst = kueue.Kueue(self, fair_sharing=self.kueue_fair_sharing)
            try:
                inst.start(timeout)
            except BaseException:
                with contextlib.suppress(Exception):
                    inst.stop()
                raise
            self.kueue_install = inst
            self._save()
        return self.kueue_install

    def stop_kueue(self) -> None:
        """Uninstall Kueue (webhooks, manager, CRDs): the plane is as before :meth:`start_kueue`."""
        if self.kueue_install is not None:
            inst, self.kueue_install = self.kueue_install, None
            inst.stop()
            self._save()

    # ---- lifecycle
    def start(self, timeout: float = 180.0, *, detach: bool = False) -> Plane:
        """Start every component and wait until the plane is usable.

        Unless ``detach`` is set, the plane is also stopped at interpreter exit and on SIGTERM.
        """
        t0 = time.monotonic()
        if missing := missing_binaries(self.bin_dir):
            raise PlaneError(
                "missing: " + ", ".join(missing) + " (run tests/cluster/setup.sh)"
            )
        self.bin_dir = self.bin_dir or default_bin_dir()
        if self.kueue:  # a cold build takes minutes: not part of the start's timeout
            _import_here("kueue").ensure_built()
            t0 = time.monotonic()
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="qtune-plane-"))
            self._own_state_dir = True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self._tie_to_parent = not detach
        if not detach:
            atexit.register(self.stop)
            _install_sigterm_handler()
        try:
            self._start(timeout, t0)
        except BaseException:
            log.error("plane start failed; tearing down (state in %s)", self.state_dir)
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info("plane up in %.1fs: %s", self.startup_seconds, self.api_url)
        return self

    def _start(self, timeout: float, t0: float) -> None:
        assert self.state_dir and self.bin_dir
        deadline = t0 + timeout
        for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler",
                     "prometheus", "pushgateway"):
            self.ports[name] = free_port()
        self._save()
        make_pki(self.pki)
        for user in ("admin", "controller-manager", "scheduler", "node-agent", "operator"):
            write_kubeconfig(self.state_dir / f"{user}.kubeconfig", self.api_url, self.pki, user)

        self._start_etcd()
        if self.prometheus:
            self._start_monitoring()
        self._start_apiserver()
        self._wait_http("kube-apiserver", f"{self.api_url}/readyz", deadline, client=True)
        self._register_nodes()
        self._start_controller_manager()
        self._start_scheduler()
        if self.node_agent:
            self._start_node_agent()
        self._wait_http("kube-controller-manager",
                        f"https://127.0.0.1:{self.ports['controller-manager']}/healthz", deadline)
        self._wait_http("kube-scheduler",
                        f"https://127.0.0.1:{self.ports['scheduler']}/healthz", deadline)
        self._wait_cluster_ready(deadline)
        if self.prometheus:
            self._wait_monitoring(deadline)
        for _ in range(self.real_nodes):
            self.add_real_node()
        if self.kueue:
            self.start_kueue(timeout=max(30.0, deadline - time.monotonic()))
        self._write_env_file()

    def stop(self) -> None:
        """Stop everything (idempotent). Safe to call from atexit and signal handlers."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        for rn in self.real:  # kubelet, containers, containerd, namespaces, cgroups
            with contextlib.suppress(Exception):
                rn.stop()
        # The agent first (it stops its pods), then the consumers of the apiserver, then etcd.
        order = ["kueue", "node-agent", "prometheus", "pushgateway", "kube-scheduler",
                 "kube-controller-manager", "kube-apiserver", "etcd"]
        comps = sorted(self.components, key=lambda c: order.index(c.name) if c.name in order else 0)
        stop_groups([c.proc.pid for c in comps])
        for c in comps:
            with contextlib.suppress(Exception):
                c.proc.wait(timeout=5)
        if killed := sweep_marked(self.plane_id):
            log.warning("killed %d leftover process(es) of plane %s", len(killed), self.plane_id)
        if self.state_dir:
            _cleanup_agent_paths()
        if self._etcd_dir:
            shutil.rmtree(self._etcd_dir, ignore_errors=True)
        if self.state_dir and not self.keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        elif self.state_dir:
            log.info("plane stopped; state kept in %s", self.state_dir)

    # ---- faults (tests stop and start components, or lose a node)
    def stop_component(self, name: str) -> None:
        """Stop one component (e.g. "prometheus", "pushgateway") until start_component(name)."""
        comp = next(c for c in self.components if c.name == name)
        stop_groups([comp.proc.pid], grace=5.0)
        with contextlib.suppress(Exception):
            comp.proc.wait(timeout=5)
        self.components.remove(comp)
        self._stopped_components[name] = comp
        self._save()

    def start_component(self, name: str, argv: list[str] | None = None, timeout: float = 60.0) -> None:
        """Start a stopped component again, with its earlier command line and port; for
        Prometheus and the Pushgateway, wait until they are ready (and scrape) again. (The
        Pushgateway comes back with the groups it persisted: stop_component stops it gracefully.)"""
        stopped = self._stopped_components.pop(name, None) if argv is None else None
        if stopped is None and argv is None:
            raise KeyError(f"{name} was not stopped by stop_component")
        self._spawn(name, argv or stopped.argv, None if argv or stopped is None else stopped.env)
        deadline = time.monotonic() + timeout
        if name == "pushgateway":
            self._wait_http("pushgateway", f"{self.pushgateway_url}/-/ready", deadline)
            if "prometheus" in self._stopped_components:
                return  # Prometheus is down too (an outage under test): nothing scrapes yet
        if name in ("prometheus", "pushgateway"):
            self._wait_monitoring(deadline)

    def restart_pushgateway(self, timeout: float = 60.0) -> None:
        """Stop the Pushgateway gracefully (SIGTERM: it writes its persistence file) and start it again on
        the same port; the pushed groups survive (its own persistence file, see pushgateway_argv)."""
        self.stop_component("pushgateway")
        self.start_component("pushgateway", timeout=timeout)

    def restart_prometheus(self, timeout: float = 60.0) -> None:
        """Stop Prometheus and start it again (same port and TSDB folder); returns once it scrapes again."""
        self.stop_component("prometheus")
        self.start_component("prometheus", timeout=timeout)

    def lose_node(self, node: str, lost: bool = True) -> None:
        """The node agent stops serving `node` (no heartbeat, its pods' processes gone, its pods
        never updated again), as if the machine were unplugged; lost=False serves it again."""
        assert self.state_dir
        sys.path.insert(0, str(HERE))
        try:
            import node_agent
        finally:
            sys.path.remove(str(HERE))
        node_agent.lose_node(self.state_dir / "agent", node, lost)

    def __enter__(self) -> Plane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- components
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Component:
        assert self.state_dir
        log_path = self.state_dir / "logs" / f"{name}.log"
        full_env = {**os.environ, **(env or {}), PLANE_ID_ENV: self.plane_id}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=full_env, start_new_session=True, cwd=self.state_dir,
                preexec_fn=_die_with_parent if self._tie_to_parent else None,
            )
        comp = Component(name, proc, log_path, list(argv), env)
        self.components.append(comp)
        self._save()
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return comp

    def _bin(self, name: str) -> str:
        assert self.bin_dir
        return str(self.bin_dir / name)

    def _start_etcd(self) -> None:
        assert self.state_dir
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK):  # memory-backed: no fsync stalls
            sweep_stale_etcd_dirs()
            self._etcd_dir = Path(tempfile.mkdtemp(prefix=f"qtune-etcd-{self.plane_id}-", dir=shm))
            self._save()
            data_dir = self._etcd_dir
        else:
            data_dir = self.state_dir / "etcd"
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn("etcd", [
            "etcd", "--name", "qtune", "--data-dir", str(data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"qtune={peer}", "--initial-cluster-state", "new",
            "--quota-backend-bytes", str(2 * 1024**3), "--logger", "zap", "--log-level", "warn",
        ])

    def _start_apiserver(self) -> None:
        pki = self.pki
        self._spawn("kube-apiserver", [
            self._bin("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Endpoints may not hold loopback addresses: nothing routes to the Service anyway.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            *self._audit_flags(),
            "--v=1",
        # busybox wget's TLS (the real node's test image) sends no signature_algorithms
        # extension, i.e. SHA-1 only, which Go refuses in TLS 1.2 since 1.25 unless told to.
        ], env={"GODEBUG": "tlssha1=1"})

    def _audit_flags(self) -> list[str]:
        """apiserver flags auditing OPERATOR_USER's requests at Metadata level (none without ``audit``)."""
        if not self.audit:
            return []
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        policy = self.audit_log.parent / "policy.yaml"
        policy.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}],
        }, sort_keys=False))
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json", "--audit-log-maxsize=0"]

    def _start_controller_manager(self) -> None:
        assert self.state_dir
        kc = self.state_dir / "controller-manager.kubeconfig"
        pki = self.pki
        self._spawn("kube-controller-manager", [
            self._bin("kube-controller-manager"),
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['controller-manager']}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--controllers=*",
            # React quickly to the node agent going away (defaults: 5s / 50s).
            "--node-monitor-period=2s", "--node-monitor-grace-period=20s",
            "--profiling=false",
            "--v=1",
        ])

    def _start_scheduler(self) -> None:
        assert self.state_dir
        kc = self.state_dir / "scheduler.kubeconfig"
        self._spawn("kube-scheduler", [
            self._bin("kube-scheduler"),
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['scheduler']}",
            "--leader-elect=false", "--profiling=false", "--v=1",
        ])

    def _start_node_agent(self) -> None:
        assert self.state_dir
        mount_ns = self.mount_namespace
        if mount_ns is None and os.environ.get("QTUNE_NODE_AGENT_MOUNT_NS") == "0":
            mount_ns = False
        self._spawn("node-agent", [
            sys.executable, str(NODE_AGENT),
            "--kubeconfig", str(self.state_dir / "node-agent.kubeconfig"),
            "--state-dir", str(self.state_dir / "agent"),
            "--nodes", ",".join(n.name for n in self.nodes),
            "--provisioner", PROVISIONER,
            "--workdir", os.getcwd(),
            *(["--no-mount-namespace"] if mount_ns is False else []),
        ], env={"PYTHONUNBUFFERED": "1"})

    def _start_monitoring(self) -> None:
        assert self.state_dir
        prom_dir = self.state_dir / "prometheus"
        prom_dir.mkdir(exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "pushgateway",
                "honor_labels": True,
                "scrape_interval": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{self.ports['pushgateway']}"]}],
            }],
        }
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn("pushgateway", pushgateway_argv(self.state_dir, self.ports["pushgateway"]))
        self._spawn("prometheus", [
            "prometheus",
            f"--config.file={prom_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
            "--log.level=warn",
        ])

    # ---- cluster objects
    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` authenticated as cluster admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def _register_nodes(self) -> None:
        from kubernetes import client

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            for n in self.nodes:
                body = node_manifest(n)
                try:
                    core.create_node(body)
                except client.ApiException as e:
                    if e.status != 409:
                        raise
                core.patch_node_status(n.name, {"status": body["status"]},
                                       _content_type="application/merge-patch+json")
            storage = client.StorageV1Api(api)
            try:
                storage.create_storage_class({
                    "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                    "metadata": {"name": STORAGE_CLASS, "annotations": {
                        "storageclass.kubernetes.io/is-default-class": "true"}},
                    "provisioner": PROVISIONER, "reclaimPolicy": "Delete",
                    "volumeBindingMode": "Immediate",
                })
            except client.ApiException as e:
                if e.status != 409:
                    raise

    def _wait_cluster_ready(self, deadline: float) -> None:
        from kubernetes import client

        with self.api_client() as api:
            core = client.CoreV1Api(api)

            def nodes_ready() -> bool:
                if not self.node_agent:
                    return True
                for node in core.list_node().items:
                    conds = {c.type: c.status for c in (node.status.conditions or [])}
                    taints = [t.key for t in (node.spec.taints or [])
                              if t.key.startswith("node.kubernetes.io/")]
                    if conds.get("Ready") != "True" or taints:
                        return False
                return True

            def default_sa() -> bool:
                try:
                    core.read_namespaced_service_account("default", "default")
                    core.read_namespaced_config_map("kube-root-ca.crt", "default")
                except client.ApiException as e:
                    if e.status == 404:
                        return False
                    raise
                return True

            self._wait("default ServiceAccount and kube-root-ca.crt", default_sa, deadline)
            self._wait("nodes Ready and untainted", nodes_ready, deadline)

    def _wait_monitoring(self, deadline: float) -> None:
        self._wait_http("pushgateway", f"{self.pushgateway_url}/-/ready", deadline)
        self._wait_http("prometheus", f"{self.prometheus_url}/-/ready", deadline)

        def target_up() -> bool:
            r = requests.get(f"{self.prometheus_url}/api/v1/query",
                             params={"query": 'up{job="pushgateway"}'}, timeout=5)
            res = r.json()["data"]["result"]
            return bool(res) and res[0]["value"][1] == "1"

        self._wait("Prometheus scraping the Pushgateway", target_up, deadline)

    # ---- waiting helpers
    def _check_alive(self) -> None:
        for c in self.components:
            if c.proc.poll() is not None:
                raise PlaneError(
                    f"{c.name} exited with {c.proc.returncode}; last log lines "
                    f"({c.log_path}):\n{_tail(c.log_path)}"
                )

    def _wait(self, what: str, ok: Callable[[], bool], deadline: float) -> None:
        last: Exception | None = None
        t0 = time.monotonic()
        while True:
            self._check_alive()
            try:
                if ok():
                    log.debug("%s after %.1fs", what, time.monotonic() - t0)
                    return
            except Exception as e:  # noqa: BLE001 - not up yet; keep the last reason
                last = e
            if time.monotonic() > deadline:
                raise PlaneError(f"timed out waiting for {what}" + (f": {last}" if last else ""))
            time.sleep(0.2)

    def _wait_http(self, what: str, url: str, deadline: float, client: bool = False) -> None:
        # verify/cert go on each request: a Session's verify loses to $REQUESTS_CA_BUNDLE.
        kwargs: dict[str, Any] = {"timeout": 5}
        if client:
            kwargs["cert"] = (str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            kwargs["verify"] = str(self.pki / "ca.crt")
        else:
            kwargs["verify"] = False  # controller-manager/scheduler serve self-signed certs
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._wait(what, lambda: requests.get(url, **kwargs).status_code == 200, deadline)

    # ---- state files
    def _save(self) -> None:
        if not self.state_dir:
            return
        info = {
            "plane_id": self.plane_id,
            "state_dir": str(self.state_dir),
            "own_state_dir": self._own_state_dir,
            "etcd_dir": str(self._etcd_dir) if self._etcd_dir else None,
            "ports": self.ports,
            "pgids": {c.name: c.proc.pid for c in self.components},
            "nodes": self.node_names(),
        }
        (self.state_dir / "plane.json").write_text(json.dumps(info, indent=2))

    def _write_env_file(self) -> None:
        assert self.state_dir
        lines = [f"export {k}={v}" for k, v in self.env().items()]
        (self.state_dir / "plane.env").write_text("\n".join(lines) + "\n")


def node_manifest(n: NodeSpec) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": n.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "qtune.io/pool": n.pool,
        **n.labels,
    }
    resources = {"cpu": n.cpu, "memory": n.memory, "pods": n.pods, "ephemeral-storage": "100Gi"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": n.name, "labels": labels},
        "spec": {"taints": [dict(t) for t in n.taints]} if n.taints else {},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": n.name}],
        },
    }


def _import_here(name: str) -> Any:
    """A module of this folder (kueue, realnode, node_agent) when plane.py runs as a script too."""
    sys.path.insert(0, str(HERE))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(HERE))


def _cleanup_agent_paths() -> None:
    """Remove mount points the node agent created on the host (see node_agent.py)."""
    sys.path.insert(0, str(HERE))
    try:
        import node_agent
    finally:
        sys.path.remove(str(HERE))
    node_agent.cleanup_created_paths()


_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Turn SIGTERM into KeyboardInterrupt so pytest tears fixtures down and atexit runs."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    _sigterm_installed = True


def teardown_from_state(state_dir: Path) -> bool:
    """Stop a plane started elsewhere (``plane.py up``) from its plane.json. True if found."""
    info_path = state_dir / "plane.json"
    if not info_path.exists():
        return False
    info = json.loads(info_path.read_text())
    if (state_dir / "realnode").is_dir():
        sys.path.insert(0, str(HERE))
        try:
            import realnode
        finally:
            sys.path.remove(str(HERE))
        realnode.teardown_all(state_dir)
    order = ["kueue", "node-agent", "prometheus", "pushgateway", "kube-scheduler",
             "kube-controller-manager", "kube-apiserver", "etcd"]
    pgids = info.get("pgids", {})
    stop_groups([pgids[n] for n in order if n in pgids] +
                [p for n, p in pgids.items() if n not in order])
    sweep_marked(info["plane_id"])
    _cleanup_agent_paths()
    if info.get("etcd_dir"):
        shutil.rmtree(info["etcd_dir"], ignore_errors=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return True


@contextlib.contextmanager
def running_plane(**kwargs: Any) -> Iterator[Plane]:
    plane = Plane(**kwargs)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "env", "status"])
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("QTUNE_PLANE_DIR", DEFAULT_PLANE_DIR)),
                        help="where the plane keeps its state (default %(default)s)")
    parser.add_argument("--foreground", action="store_true",
                        help="up: stay attached and tear down on Ctrl-C/SIGTERM")
    parser.add_argument("--no-prometheus", action="store_true")
    parser.add_argument("--no-node-agent", action="store_true")
    parser.add_argument("--real-node", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="up: also start N (default 1) real kubelet nodes (realnode.py)")
    parser.add_argument("--kueue", action="store_true",
                        help="up: also install and run Kueue (kueue.py; built on first use)")
    parser.add_argument("--kueue-fair-sharing", action="store_true",
                        help="up --kueue: with Kueue's fair sharing on (its Configuration's fairSharing)")
    parser.add_argument("--audit", action="store_true",
                        help=f"audit the requests of user {OPERATOR_USER} (operator.kubeconfig) to audit/audit.log")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state: Path = args.state_dir

    if args.command == "down":
        found = teardown_from_state(state)
        print("plane stopped" if found else f"no plane in {state}")
        return 0
    if args.command in ("env", "status"):
        env_file = state / "plane.env"
        if not env_file.exists():
            print(f"no plane in {state}", file=sys.stderr)
            return 1
        print(env_file.read_text(), end="")
        if args.command == "status":
            info = json.loads((state / "plane.json").read_text())
            for name, pid in info["pgids"].items():
                print(f"# {name:24s} pid {pid:7d} {'up' if _pid_alive(pid) else 'DOWN'}")
        return 0

    if (state / "plane.json").exists():
        print(f"a plane already uses {state}; run `plane.py down` first", file=sys.stderr)
        return 1
    plane = Plane(state_dir=state, prometheus=not args.no_prometheus,
                  node_agent=not args.no_node_agent, audit=args.audit,
                  real_nodes=args.real_node, kueue=args.kueue or args.kueue_fair_sharing,
                  kueue_fair_sharing=args.kueue_fair_sharing)
    plane.start(detach=not args.foreground)
    print(textwrap.dedent(f"""\
        # plane up in {plane.startup_seconds:.1f}s; state in {state}
        # nodes: {json.dumps(plane.node_names())}"""))
    print((state / "plane.env").read_text(), end="")
    if not args.foreground:
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
