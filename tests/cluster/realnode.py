"""A REAL Kubernetes node for the test plane: kubelet + containerd + runc + CNI bridge.

Everything of the node lives in its own network namespace AND its own (private) mount
namespace, held by a small ``unshare`` process; containerd, the kubelet and the in-node
forwarder enter both with ``nsenter``. So:

* no link, address, route or iptables rule ever touches the host's network namespace: the
  node has loopback, a bridge ``cni0`` (the pods' gateway, also the node's InternalIP) and the
  pods' veths; the ``kubernetes`` Service ClusterIP is REDIRECTed (iptables, node netns only) to
  the forwarder in front of the API server;
* every mount the kubelet and containerd make (container rootfs overlays, projected/emptyDir
  tmpfs, pod netns bind mounts, hostPath bind mounts) disappears with the node's mount
  namespace; ``/run``, ``/var/lib`` and ``/var/log`` are private tmpfs in there (containerd's
  shim sockets, libcni's cache and the kubelet's ``/var/log/containers`` links land there);
* the kubelet's kernel tunables (``vm.overcommit_memory``, ``kernel.panic``,
  ``kernel.panic_on_oops``, ...) are bind-mounted over with files holding the values it wants,
  and ``protectKernelDefaults: true`` makes it fail rather than write to the host's sysctls;
* the services on the host's loopback (API server, Prometheus, Pushgateway) are reached through
  ``netfwd.py`` pairs over unix sockets (a socket file crosses network namespaces).

Cgroups: cgroup v1 with the cgroupfs driver (``failCgroupV1: false``), under a dedicated
``/qtune-<plane id>-<node>`` parent in every hierarchy, removed on teardown.

Use it through :class:`plane.Plane` (``Plane(real_nodes=1)``, ``plane.add_real_node()``,
``plane.py up --real-node``); images: ``build_images.sh`` builds the pause and busybox images as
OCI archives, :meth:`RealNode.import_image` loads any OCI/docker archive (e.g. the qtune image).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import system_tools
import yaml

if TYPE_CHECKING:
    from plane import Plane

log = logging.getLogger("qtune.realnode")

HERE = Path(__file__).resolve().parent
NETFWD = HERE / "netfwd.py"
BUILD_IMAGES = HERE / "build_images.sh"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
CGROUP_ROOT = Path("/sys/fs/cgroup")

NFD = "feature.node.kubernetes.io"
#: The real node's labels: the same NFD labels as the plane's Sapphire Rapids ``xeon-0``.
XEON_LABELS = {
    f"{NFD}/cpu-model.vendor_id": "Intel",
    f"{NFD}/cpu-cpuid.AVX2": "true", f"{NFD}/cpu-cpuid.FMA3": "true",
    f"{NFD}/cpu-cpuid.AVX512F": "true", f"{NFD}/cpu-cpuid.AVX512VNNI": "true",
    f"{NFD}/cpu-cpuid.AMXINT8": "true", f"{NFD}/cpu-cpuid.AMXBF16": "true",
}
REAL_POOL = "real"
REAL_NODE_LABEL = "qtune.io/real-node"
#: Pods land on a real node only when they tolerate this (the fake Xeon nodes' pods run
#: ``python -m ...`` on the host and ignore images: they must not land here by accident).
REAL_TAINT = {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}

#: What the kubelet wants these sysctls to be (pkg/kubelet/cm setupKernelTunables).
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": 1, "vm/panic_on_oom": 0, "kernel/panic": 10,
    "kernel/panic_on_oops": 1, "kernel/keys/root_maxkeys": 1000000,
    "kernel/keys/root_maxbytes": 25000000,
}


class RealNodeError(RuntimeError):
    """The real node could not be started (the message says why)."""


@dataclass(frozen=True)
class RealNodeSpec:
    """A real node: name, pool, labels set by the plane (as NFD would), taints."""

    name: str = "xeon-real-0"
    pool: str = REAL_POOL
    labels: dict[str, str] = field(default_factory=lambda: dict(XEON_LABELS))
    taints: tuple[dict[str, str], ...] = (REAL_TAINT,)


@dataclass(frozen=True)
class Image:
    name: str
    archive: Path
    ref: str


def cni_bin_dir() -> str | None:
    for d in CNI_BIN_DIRS:
        if all(os.access(f"{d}/{p}", os.X_OK) for p in ("bridge", "host-local", "loopback")):
            return d
    return None


def missing_tools(bin_dir: Path) -> list[str]:
    """What a real node needs and this machine lacks (run tests/cluster/setup.sh)."""
    missing = system_tools.missing("containerd", "containerd-shim-runc-v2", "runc", "ctr", "buildah", "gcc",
                                   "iptables", "unshare", "nsenter", "ip", "mount")
    if not os.access(bin_dir / "kubelet", os.X_OK):
        missing.append(str(bin_dir / "kubelet"))
    if cni_bin_dir() is None:
        missing.append("CNI plugins bridge/host-local/loopback (containernetworking-plugins)")
    if not os.access("/bin/busybox", os.X_OK):
        missing.append("/bin/busybox (busybox-static)")
    return missing


def build_images() -> dict[str, Image]:
    """Build (or find cached) the pause and busybox OCI archives; ``{name: Image}``."""
    proc = subprocess.run(["bash", str(BUILD_IMAGES)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RealNodeError(f"build_images.sh failed: {proc.stderr.strip()[-2000:]}")
    images = {}
    for line in proc.stdout.splitlines():
        name, archive, ref = line.split()
        images[name] = Image(name, Path(archive), ref)
    return images


def _cgroup_hierarchies(v1_only: bool = False) -> list[Path]:
    """The mounted cgroup hierarchies: v1 (cpu, memory, ..., name=systemd) and, on a hybrid
    host, the v2 one (/sys/fs/cgroup/unified), where runc creates the same paths."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup" or (fields[sep + 1] == "cgroup2" and not v1_only):
            out.append(Path(fields[4]))
    return out


def _cgroup_procs(rel: str) -> set[int]:
    pids: set[int] = set()
    for h in _cgroup_hierarchies():
        base = h / rel.lstrip("/")
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(p) for p in procs.read_text().split()}
    return pids


def _remove_cgroup(rel: str) -> None:
    for h in _cgroup_hierarchies():
        base = h / rel.lstrip("/")
        if not base.is_dir():
            continue
        dirs = sorted((d for d in base.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
        for d in [*dirs, base]:
            with contextlib.suppress(OSError):
                d.rmdir()


def _kill_pids(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _pids_with_cmdline(needle: bytes) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
    return pids


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4].replace("\\040", " ")
        if mnt.startswith(prefix) or mnt == str(path):
            out.append(mnt)
    return out


def _write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path) -> None:
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "qtune-test",
                      "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "kubelet",
                   "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "qtune-test", "context": {"cluster": "qtune-test",
                                                        "user": "kubelet"}}],
        "current-context": "qtune-test",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@dataclass
class RealNode:
    """One real node of a :class:`plane.Plane` (started by :meth:`start`)."""

    plane: Plane
    spec: RealNodeSpec = field(default_factory=RealNodeSpec)
    index: int = 0

    images: dict[str, Image] = field(default_factory=dict, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    holder_pid: int = field(default=0, init=False)
    _components: dict[str, Any] = field(default_factory=dict, init=False)
    _stopped: bool = field(default=False, init=False)

    # ---- names, paths, addresses
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dir(self) -> Path:
        assert self.plane.state_dir
        return self.plane.state_dir / "realnode" / self.name

    @property
    def cgroup_parent(self) -> str:
        return f"/qtune-{self.plane.plane_id}-{self.name}"

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    @property
    def pod_subnet(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def node_ip(self) -> str:
        """The node's InternalIP: the bridge (the pods' gateway) in the node netns."""
        return f"10.244.{self.index}.1"

    @property
    def pod_prometheus_url(self) -> str | None:
        port = self.plane.ports.get("prometheus")
        return f"http://{self.node_ip}:{port}" if self.plane.prometheus and port else None

    @property
    def pod_pushgateway_url(self) -> str | None:
        port = self.plane.ports.get("pushgateway")
        return f"http://{self.node_ip}:{port}" if self.plane.prometheus and port else None

    @property
    def pod_logs_dir(self) -> Path:
        return self.dir / "pod-logs"

    def nsenter(self, *argv: str) -> list[str]:
        """argv run inside the node's network and mount namespaces."""
        return ["nsenter", f"--target={self.holder_pid}", "--net", "--mount", "--", *argv]

    # ---- lifecycle
    def start(self, timeout: float = 120.0) -> RealNode:
        t0 = time.monotonic()
        deadline = t0 + timeout
        assert self.plane.bin_dir
        if missing := missing_tools(self.plane.bin_dir):
            raise RealNodeError("missing: " + ", ".join(missing)
                                + " (run tests/cluster/setup.sh)")
        sweep_stale()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.images = build_images()
        self._save()
        try:
            self._make_certs()
            self._make_cgroup_parent()
            self._start_holder(deadline)
            self._start_forwarders(deadline)
            self._start_containerd(deadline)
            for img in self.images.values():
                self.import_image(img.archive)
            self._start_kubelet()
            self._wait_registered(deadline)
        except BaseException:
            log.error("real node %s failed to start; logs in %s", self.name,
                      self.plane.state_dir / "logs")
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info("real node %s Ready in %.1fs", self.name, self.startup_seconds)
        return self

    def stop(self) -> None:
        """Stop the kubelet, every container, containerd and the namespaces (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        teardown(self.dir)
        comps = {id(c) for c in self._components.values()}
        self.plane.components[:] = [c for c in self.plane.components if id(c) not in comps]
        for c in self._components.values():
            with contextlib.suppress(Exception):
                c.proc.wait(timeout=5)
        self.plane._save()

    # ---- images
    def import_image(self, archive: Path | str) -> list[str]:
        """Load an OCI (or docker) image archive into the node's containerd; its image refs."""
        out = self._ctr("images", "import", "--no-unpack=false", "--snapshotter", "overlayfs",
                        str(archive), timeout=300)
        refs = [line.split()[1] for line in out.splitlines()
                if line.startswith("unpacking ") and len(line.split()) > 1]
        log.info("imported %s into %s: %s", archive, self.name, refs)
        return refs

    def image_refs(self) -> list[str]:
        return self._ctr("images", "list", "-q").split()

    def _ctr(self, *args: str, timeout: float = 60) -> str:
        # ctr only talks to the socket: it can run in the host namespaces.
        proc = subprocess.run(["ctr", "--address", str(self.containerd_socket),
                               "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RealNodeError(f"ctr {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    # ---- pods (host side)
    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        """A pod's container output from the kubelet's log files (CRI format, stripped)."""
        runs = sorted(self.pod_logs_dir.glob(f"{namespace}_{pod}_*/{container or '*'}/*.log"),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            return ""
        lines = []
        for line in runs[-1].read_text(errors="replace").splitlines():
            parts = line.split(" ", 3)  # <time> <stream> <P|F> <text>
            lines.append(parts[3] if len(parts) == 4 else "")
        return "\n".join(lines)

    # ---- pieces
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
        comp = self.plane._spawn(f"realnode-{self.name}-{name}", argv, env=env)
        self._components[name] = comp
        self._save()
        return comp

    def _save(self) -> None:
        info = {"name": self.name, "plane_id": self.plane.plane_id, "dir": str(self.dir),
                "cgroup_parent": self.cgroup_parent, "holder_pid": self.holder_pid,
                "containerd_socket": str(self.containerd_socket),
                "pids": {n: c.proc.pid for n, c in self._components.items()}}
        (self.dir / "node.json").write_text(json.dumps(info, indent=2))

    def _make_certs(self) -> None:
        """Kubelet client cert (system:node:<name>, system:nodes), signed by the plane's CA."""
        pki = self.plane.pki
        d = self.dir / "pki"
        d.mkdir(exist_ok=True)
        argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "kubelet.key"),
                "-out", str(d / "kubelet.crt"), "-days", "365",
                "-subj", f"/O=system:nodes/CN=system:node:{self.name}",
                "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
                "-addext", "extendedKeyUsage=clientAuth",
                "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
                "-addext", "basicConstraints=CA:FALSE"]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RealNodeError(f"openssl failed: {proc.stderr.strip()}")
        _write_kubeconfig(self.dir / "kubelet.kubeconfig", self.plane.api_url,
                          pki / "ca.crt", d / "kubelet.crt", d / "kubelet.key")

    def _make_cgroup_parent(self) -> None:
        """The kubelet's cgroupRoot must exist in every hierarchy (cpuset: with cpus/mems)."""
        for h in _cgroup_hierarchies(v1_only=True):
            path = h / self.cgroup_parent.lstrip("/")
            path.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (path / f).exists() and not (path / f).read_text().strip():
                    (path / f).write_text((h / f).read_text())

    def _start_holder(self, deadline: float) -> None:
        fake = self.dir / "sysctl"
        fake.mkdir(exist_ok=True)
        ready = self.dir / "netns.ready"
        ready.unlink(missing_ok=True)
        api_port = self.plane.ports["apiserver"]
        lines = ["set -eu", "ip link set lo up",
                 "ip link add cni0 type bridge",
                 f"ip addr add {self.node_ip}/24 dev cni0",
                 "ip link set cni0 up",
                 # In-cluster clients: the kubernetes Service -> the API server forwarder.
                 "iptables -w -t nat -A PREROUTING -d 10.96.0.1/32 -p tcp --dport 443 "
                 f"-j REDIRECT --to-ports {api_port}",
                 "iptables -w -t nat -A OUTPUT -d 10.96.0.1/32 -p tcp --dport 443 "
                 f"-j REDIRECT --to-ports {api_port}"]
        for rel, value in KUBELET_SYSCTLS.items():
            f = fake / rel.replace("/", ".")
            f.write_text(f"{value}\n")
            lines.append(f"mount --bind {f} /proc/sys/{rel}")
        for d in ("/run", "/var/lib", "/var/log"):
            lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {d}")
        lines += [f"touch {ready}", "exec sleep infinity"]
        (self.dir / "netns.sh").write_text("\n".join(lines) + "\n")
        comp = self._spawn("netns", ["unshare", "--net", "--mount", "--propagation", "private",
                                     "--", "/bin/sh", str(self.dir / "netns.sh")])
        self.holder_pid = comp.proc.pid
        self._save()
        self.plane._wait(f"{self.name} network namespace", ready.exists, deadline)

    def _start_forwarders(self, deadline: float) -> None:
        fwd = self.dir / "fwd"
        fwd.mkdir(exist_ok=True)
        targets = {"apiserver": self.plane.ports["apiserver"]}
        if self.plane.prometheus:
            targets["prometheus"] = self.plane.ports["prometheus"]
            targets["pushgateway"] = self.plane.ports["pushgateway"]
        host_pairs = [f"unix:{fwd}/{n}.sock=tcp:127.0.0.1:{p}" for n, p in targets.items()]
        node_pairs = [f"tcp:0.0.0.0:{p}=unix:{fwd}/{n}.sock" for n, p in targets.items()]
        env = {"PYTHONUNBUFFERED": "1"}
        for side, pairs in (("host", host_pairs), ("node", node_pairs)):
            ready = fwd / f"{side}.ready"
            argv = [sys.executable, str(NETFWD), "--ready", str(ready), *pairs]
            self._spawn(f"fwd-{side}", self.nsenter(*argv) if side == "node" else argv, env=env)
            self.plane._wait(f"{self.name} {side} forwarder", ready.exists, deadline)

    def _start_containerd(self, deadline: float) -> None:
        d = self.dir / "containerd"
        (d / "root").mkdir(parents=True, exist_ok=True)
        (d / "state").mkdir(exist_ok=True)
        cni_conf = self.dir / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0", "name": "qtune",
            "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(self.dir / "cni" / "ipam"),
                         "ranges": [[{"subnet": self.pod_subnet, "gateway": self.node_ip}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            }],
        }
        (cni_conf / "10-qtune.conflist").write_text(json.dumps(conflist, indent=2))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""\
version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{d / 'containerd.sock.ttrpc'}"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"

[{cri}]
  sandbox_image = "{self.images['pause'].ref}"
  # The sandbox has no CAP_SYS_RESOURCE: without this runc fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{cni_bin_dir()}"
  conf_dir = "{cni_conf}"
"""
        (d / "config.toml").write_text(config)
        self._spawn("containerd", self.nsenter("containerd", "--config", str(d / "config.toml")))

        def up() -> bool:
            self._ctr("version", timeout=10)
            return True

        self.plane._wait(f"{self.name} containerd", up, deadline)

    def _start_kubelet(self) -> None:
        assert self.plane.bin_dir
        d = self.dir
        kubelet_root = d / "kubelet"
        (d / "manifests").mkdir(exist_ok=True)
        self.pod_logs_dir.mkdir(exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # cgroup v1 host (the kubelet refuses it by default since v1.35).
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_parent,
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "podLogsDir": str(self.pod_logs_dir),
            "staticPodPath": str(d / "manifests"),
            "address": "0.0.0.0", "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "authentication": {"anonymous": {"enabled": False},
                               "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.plane.pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            # Never write the host's sysctls: error out if they are not as wanted (they are
            # bind-mounted over in the node's mount namespace, see KUBELET_SYSCTLS).
            "protectKernelDefaults": True,
            "makeIPTablesUtilChains": False,
            "failSwapOn": False,
            "kernelMemcgNotification": False,
            "resolvConf": "",
            "registerNode": True,
            "registerWithTaints": [dict(t) for t in self.spec.taints],
            # The test machine's disk and memory are shared: never evict or GC test images.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "5s",
            "shutdownGracePeriod": "0s",
            "rotateCertificates": False, "serverTLSBootstrap": False,
            "maxPods": 110,
        }
        (d / "kubelet.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn("kubelet", self.nsenter(
            str(self.plane.bin_dir / "kubelet"),
            f"--config={d / 'kubelet.yaml'}",
            f"--kubeconfig={d / 'kubelet.kubeconfig'}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.node_ip}",
            f"--root-dir={kubelet_root}",
            f"--cert-dir={d / 'pki'}",
            "--v=2",
        ))

    def _wait_registered(self, deadline: float) -> None:
        """Node Ready; then the plane labels it as NFD would (the kubelet may not)."""
        from kubernetes import client

        with self.plane.api_client() as api:
            core = client.CoreV1Api(api)

            def registered() -> bool:
                core.read_node(self.name)
                return True

            self.plane._wait(f"{self.name} registered", registered, deadline)
            labels = {**self.spec.labels, "qtune.io/pool": self.spec.pool,
                      REAL_NODE_LABEL: "true"}
            core.patch_node(self.name, {"metadata": {"labels": labels}})

            def ready() -> bool:
                node = core.read_node(self.name)
                conds = {c.type: c.status for c in (node.status.conditions or [])}
                taints = [t.key for t in (node.spec.taints or [])
                          if t.key.startswith("node.kubernetes.io/")]
                return conds.get("Ready") == "True" and not taints

            self.plane._wait(f"{self.name} Ready", ready, deadline)


def teardown(node_dir: Path, grace: float = 10.0) -> None:
    """Stop a real node from its ``node.json``: works for a live object or a detached plane."""
    info_path = node_dir / "node.json"
    if not info_path.exists():
        return
    info = json.loads(info_path.read_text())
    by_name: dict[str, int] = info.get("pids", {})
    t0 = time.monotonic()
    # 1. the kubelet (SIGTERM, then SIGKILL)
    if "kubelet" in by_name:
        _stop_pid(by_name["kubelet"], grace)
    log.debug("%s: kubelet stopped after %.1fs", info["name"], time.monotonic() - t0)
    # 2. every container and pause process: all processes in the node's cgroup parent
    rel = info["cgroup_parent"]
    for _ in range(50):
        left = _cgroup_procs(rel)
        if not left:
            break
        _kill_pids(left)
        time.sleep(0.1)
    log.debug("%s: containers killed after %.1fs", info["name"], time.monotonic() - t0)
    # 3. containerd, then its shims (they outlive it)
    if "containerd" in by_name:
        _stop_pid(by_name["containerd"], grace)
    sock = info["containerd_socket"].encode()
    for _ in range(20):
        shims = _pids_with_cmdline(sock)
        if not shims:
            break
        _kill_pids(shims)
        time.sleep(0.1)
    log.debug("%s: containerd and shims stopped after %.1fs", info["name"],
              time.monotonic() - t0)
    # 4. forwarders and the namespace holder: the node's netns and mount ns die with them,
    # and with the mount ns every mount the kubelet and containerd made.
    for p in by_name.values():
        _stop_pid(p, 2.0)
    _remove_cgroup(rel)
    # 5. belt and braces: nothing of ours may stay mounted in the host's mount namespace.
    for mnt in sorted(_mounts_under(node_dir), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    info["pids"] = {}
    log.info("real node %s torn down in %.1fs", info["name"], time.monotonic() - t0)
    info_path.write_text(json.dumps(info, indent=2))


def _stop_pid(pid: int, grace: float) -> None:
    """SIGTERM a process group leader's group, SIGKILL after ``grace``."""
    from plane import _pid_alive, stop_groups

    if _pid_alive(pid):
        stop_groups([pid], grace=grace)


def sweep_stale(min_age: float = 120.0) -> None:
    """Clean up after real nodes whose plane was SIGKILLed: their containers and shims live on
    (runc containers do not die with containerd or the kubelet), and so do their cgroups."""
    from plane import PLANE_ID_ENV

    stale = sorted({d.name for h in _cgroup_hierarchies() for d in h.glob("qtune-*-*")
                    if re.fullmatch(r"qtune-[0-9a-f]{12}-.+", d.name) and d.is_dir()
                    and time.time() - d.stat().st_mtime > min_age})
    if not stale:
        return
    live_kubelets = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path((entry / "cmdline").read_bytes().split(b"\0")[0].decode()).name != "kubelet":
                continue
            for var in (entry / "environ").read_bytes().split(b"\0"):
                if var.startswith(f"{PLANE_ID_ENV}=".encode()):
                    live_kubelets.add(var.split(b"=", 1)[1].decode())
    for name in stale:
        plane_id = name.split("-")[1]
        if plane_id in live_kubelets:
            continue
        log.warning("removing the leftovers of real node cgroup /%s", name)
        for _ in range(50):
            if not (left := _cgroup_procs(name)):
                break
            _kill_pids(left)
            time.sleep(0.1)
        marker = f"{PLANE_ID_ENV}={plane_id}".encode() + b"\0"
        for pid in _pids_with_cmdline(b"containerd-shim"):
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/environ").read_bytes():
                    _kill_pids({pid})
        _remove_cgroup(name)


def teardown_all(state_dir: Path) -> None:
    """Tear down every real node of a plane's state folder (``plane.py down``)."""
    for node_dir in sorted((state_dir / "realnode").glob("*")):
        teardown(node_dir)
