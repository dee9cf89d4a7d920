"""Kueue on the test plane: the real ``kueue`` manager, built from its Go module, installed the way a
cluster admin installs it (its CRDs, its webhook configurations, a Configuration), with the plane's
certificates.

``build_kueue.sh`` builds ``sigs.k8s.io/kueue/cmd/kueue`` at the version pinned in
``kueue-build/go.mod`` into ``~/.cache/qtune/kueue/<version>/`` (with the module's
``config/components/{crd,webhook}`` next to the binary) and is a no-op when that is there.

What differs from ``kubectl apply -k config/default`` (the release manifests), and why:

* the manager runs as a host process of the plane (like the apiserver), not as a Deployment, with a
  client certificate of the plane's CA (group ``system:masters``) instead of a ServiceAccount;
* its webhook server listens on ``127.0.0.1:<free port>`` with a serving certificate the plane signs
  (SAN ``IP:127.0.0.1``); the webhook configurations and the CRDs' conversion webhooks point at that
  URL with the plane's CA as ``caBundle``, instead of a Service and Kueue's internal certificates
  (the plane routes no Service);
* Kueue reads its metrics certificate from the fixed path ``/etc/kueue/metrics/certs`` when its
  internal certificate management is off: it runs in a private mount namespace where ``/etc`` is an
  overlay of the plane's folder on the host's ``/etc`` (the host's ``/etc`` is not touched);
* the visibility API server (an aggregated API) is off (``VisibilityOnDemand: false``).

Everything else is Kueue's: its webhooks (the pod webhook adds the ``kueue.x-k8s.io/admission``
scheduling gate to pods with the ``kueue.x-k8s.io/queue-name`` label), its controllers and scheduler.
"""

from __future__ import annotations

import base64
import copy
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

log = logging.getLogger("qtune.plane.kueue")

HERE = Path(__file__).resolve().parent
KUEUE_BUILD_DIR = HERE / "kueue-build"
BUILD_SCRIPT = HERE / "build_kueue.sh"

NAMESPACE = "kueue-system"
NAME_PREFIX = "kueue-"  # config/default's namePrefix
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ADMISSION_GATE = "kueue.x-k8s.io/admission"
FINALIZER_PREFIX = "kueue.x-k8s.io/"
#: The integrations qtune's units may use (plain pods, or a batch/v1 Job per unit).
FRAMEWORKS = ("batch/job", "pod")
METRICS_CERT_DIR = "kueue/metrics/certs"  # under /etc, fixed in cmd/kueue
#: Kueue's fair sharing (config v1beta2: the ``fairSharing`` section's presence turns it on; v1beta1's
#: ``enable: true`` is gone, and ``preemptionStrategies`` is required): its default strategies.
FAIR_SHARING = {"preemptionStrategies": ["LessThanOrEqualToFinalShare", "LessThanInitialShare"]}


class KueueError(RuntimeError):
    """Kueue could not be built, installed or started (the message says why)."""


def kueue_version() -> str:
    """The Kueue release pinned in kueue-build/go.mod (e.g. ``v0.17.0``)."""
    text = (KUEUE_BUILD_DIR / "go.mod").read_text()
    m = re.search(r"^\s*(?:require\s+)?sigs\.k8s\.io/kueue\s+(v\S+)", text, re.M)
    if not m:
        raise KueueError("cannot find the sigs.k8s.io/kueue version in kueue-build/go.mod")
    return m.group(1)


def default_kueue_dir() -> Path:
    """Where build_kueue.sh puts the binary and manifests (``$QTUNE_KUEUE_DIR`` overrides)."""
    if os.environ.get("QTUNE_KUEUE_DIR"):
        return Path(os.environ["QTUNE_KUEUE_DIR"])
    cache = Path(os.environ.get("QTUNE_CACHE_DIR") or Path.home() / ".cache" / "qtune")
    return cache / "kueue" / kueue_version()


def is_built(kdir: Path) -> bool:
    return os.access(kdir / "bin" / "kueue", os.X_OK) and (kdir / "config" / "webhook" / "manifests.yaml").is_file()


def ensure_built(kdir: Path | None = None) -> Path:
    """The Kueue folder, built first by build_kueue.sh when it is not there (minutes, once)."""
    kdir = kdir or default_kueue_dir()
    if is_built(kdir):
        return kdir
    if os.environ.get("QTUNE_KUEUE_DIR"):
        raise KueueError(f"QTUNE_KUEUE_DIR={kdir} holds no Kueue build (bin/kueue, config/)")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not is_built(kdir):
        raise KueueError(f"build_kueue.sh failed ({proc.returncode}): {proc.stderr[-3000:]}")
    log.info("built Kueue %s in %.0fs", kueue_version(), time.monotonic() - t0)
    return kdir


# --------------------------------------------------------------------------- manifests


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def crd_manifests(kdir: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """The CRDs config/components/crd installs, with its conversion-webhook patches pointing at ``url``."""
    crd_dir = kdir / "config" / "crd"
    kust = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
    crds = {(d := yaml.safe_load((crd_dir / r).read_text()))["metadata"]["name"]: d
            for r in kust["resources"]}
    for patch in kust.get("patches") or []:
        body = yaml.safe_load((crd_dir / patch["path"]).read_text())
        conversion = copy.deepcopy(body["spec"]["conversion"])
        client_config = conversion["webhook"]["clientConfig"]
        path = client_config.pop("service")["path"]
        client_config.update(url=f"{url}{path}", caBundle=ca_bundle)
        crds[body["metadata"]["name"]]["spec"]["conversion"] = conversion
    return list(crds.values())


def _merge_webhook_patch(config: dict[str, Any], patch: dict[str, Any]) -> None:
    """A strategic merge of config/components/webhook's patches: webhooks are merged by name."""
    by_name = {w["name"]: w for w in config["webhooks"]}
    for w in patch.get("webhooks") or []:
        if w["name"] in by_name:
            by_name[w["name"]].update(copy.deepcopy({k: v for k, v in w.items() if k != "name"}))


def webhook_manifests(kdir: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's Mutating/ValidatingWebhookConfigurations, calling ``url`` (the manager's webhook server)."""
    hook_dir = kdir / "config" / "webhook"
    configs = {d["metadata"]["name"]: d for d in _yaml_docs(hook_dir / "manifests.yaml")}
    kust = yaml.safe_load((hook_dir / "kustomization.yaml").read_text())
    for patch in kust.get("patches") or []:
        text = patch["patch"] if "patch" in patch else (hook_dir / patch["path"]).read_text()
        body = yaml.safe_load(text)
        if body.get("metadata", {}).get("name") in configs:
            _merge_webhook_patch(configs[body["metadata"]["name"]], body)
    for config in configs.values():
        config["metadata"] = {"name": NAME_PREFIX + config["metadata"]["name"]}
        for hook in config["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": ca_bundle}
    return list(configs.values())


def configuration(ports: dict[str, int], cert_dir: Path, fair_sharing: bool = False) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for the plane; ``fair_sharing``: with
    :data:`FAIR_SHARING` (ClusterQueues and Cohorts then share their cohort's unused quota by their
    ``spec.fairSharing.weight``)."""
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['kueue-health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['kueue-metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["kueue-webhook"], "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "clientConnection": {"qps": 50, "burst": 100},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "featureGates": {"VisibilityOnDemand": False},
    }
    if fair_sharing:
        config["fairSharing"] = copy.deepcopy(FAIR_SHARING)
    return config


def queue_objects(prefix: str, namespace: str, quota: dict[str, str], local_queue: str,
                  version: str = "v1beta2", preemption: dict[str, Any] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A ResourceFlavor ``<prefix>-flavor``, a ClusterQueue ``<prefix>-cq`` with ``quota`` (resource ->
    nominalQuota, all covered in one group; ``preemption`` = its spec.preemption) and a LocalQueue
    ``local_queue`` in ``namespace`` pointing at it."""
    api = f"kueue.x-k8s.io/{version}"
    flavor, cq = f"{prefix}-flavor", f"{prefix}-cq"
    return (
        {"apiVersion": api, "kind": "ResourceFlavor", "metadata": {"name": flavor}},
        {"apiVersion": api, "kind": "ClusterQueue", "metadata": {"name": cq},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": list(quota),
             "flavors": [{"name": flavor, "resources": [{"name": r, "nominalQuota": q} for r, q in quota.items()]}],
         }], **({"preemption": preemption} if preemption else {})}},
        {"apiVersion": api, "kind": "LocalQueue", "metadata": {"name": local_queue, "namespace": namespace},
         "spec": {"clusterQueue": cq}},
    )


def create_queues(api_client: Any, namespace: str, quota: dict[str, str], local_queue: str,
                  timeout: float = 60.0, preemption: dict[str, Any] | None = None) -> Callable[[], None]:
    """Create :func:`queue_objects` (prefix = the namespace), wait until the ClusterQueue is Active; returns
    what deletes the two cluster-scoped objects (the LocalQueue goes with its namespace)."""
    from kubernetes import client

    custom, g, v = client.CustomObjectsApi(api_client), "kueue.x-k8s.io", "v1beta2"
    flavor, cq, lq = queue_objects(namespace, namespace, quota, local_queue, v, preemption)
    custom.create_cluster_custom_object(g, v, "resourceflavors", flavor)
    custom.create_cluster_custom_object(g, v, "clusterqueues", cq)
    custom.create_namespaced_custom_object(g, v, namespace, "localqueues", lq)
    deadline = time.monotonic() + timeout
    while True:
        conditions = custom.get_cluster_custom_object(g, v, "clusterqueues", cq["metadata"]["name"]).get(
            "status", {}).get("conditions", [])
        if any(c["type"] == "Active" and c["status"] == "True" for c in conditions):
            break
        if time.monotonic() > deadline:
            raise KueueError(f"ClusterQueue {cq['metadata']['name']} not Active after {timeout:.0f}s: {conditions}")
        time.sleep(0.2)

    def delete() -> None:
        _ignore_404(custom.delete_cluster_custom_object, g, v, "clusterqueues", cq["metadata"]["name"])
        _ignore_404(custom.delete_cluster_custom_object, g, v, "resourceflavors", flavor["metadata"]["name"])
    return delete


# --------------------------------------------------------------------------- certificates


def make_certs(pki: Path, run: Callable[[list[str], Path], None]) -> None:
    """kueue-webhook.{crt,key} (serving, SAN 127.0.0.1) and kueue.{crt,key} (client, system:masters),
    signed by the plane's CA in ``pki`` (``run`` = plane._run)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    certs = {
        "kueue-webhook": ("/CN=kueue-webhook", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
        "kueue": ("/O=system:masters/CN=kueue-controller-manager", "clientAuth", None),
    }
    for name, (subject, eku, san) in certs.items():
        argv = ["openssl", "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt",
                "-days", "365", "-subj", subject, "-CA", "ca.crt", "-CAkey", "ca.key",
                "-addext", f"extendedKeyUsage={eku}", "-addext", "basicConstraints=CA:FALSE",
                "-addext", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if san:
            argv += ["-addext", f"subjectAltName={san}"]
        run(argv, pki)


def _link_cert(pki: Path, name: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for src, dst in ((f"{name}.crt", "tls.crt"), (f"{name}.key", "tls.key")):
        (folder / dst).write_bytes((pki / src).read_bytes())
        (folder / dst).chmod(0o600)


def manager_argv(binary: Path, config: Path, etc_overlay: Path) -> list[str]:
    """Kueue in a private mount namespace whose /etc shows ``etc_overlay`` over the host's /etc."""
    script = ('mount -t overlay qtune-kueue-etc -o "lowerdir=$1:/etc" /etc && shift && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "kueue-etc",
            str(etc_overlay), str(binary), f"--config={config}", "--zap-log-level=info"]


# --------------------------------------------------------------------------- the running Kueue


@dataclass
class Kueue:
    """Kueue installed on a running plane (``plane.Plane.start_kueue``); stop() uninstalls it."""

    plane: Any
    kdir: Path = field(default_factory=default_kueue_dir)
    fair_sharing: bool = False
    startup_seconds: float = field(default=0.0, init=False)

    @property
    def folder(self) -> Path:
        assert self.plane.state_dir
        return Path(self.plane.state_dir) / "kueue"

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.plane.ports['kueue-webhook']}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.plane.ports['kueue-health']}"

    @property
    def log_path(self) -> Path:
        return Path(self.plane.state_dir) / "logs" / "kueue.log"

    def start(self, timeout: float = 120.0) -> Kueue:
        """Install the CRDs, start the manager, wait until it is ready, register its webhooks."""
        pm = _plane_module(self.plane)
        t0 = time.monotonic()
        deadline = t0 + timeout
        self.kdir = ensure_built(self.kdir)
        for name in ("kueue-webhook", "kueue-health", "kueue-metrics"):
            self.plane.ports[name] = pm.free_port()
        pki = self.plane.pki
        make_certs(pki, pm._run)
        pm.write_kubeconfig(self.plane.state_dir / "kueue.kubeconfig", self.plane.api_url, pki, "kueue")
        _link_cert(pki, "kueue-webhook", self.folder / "webhook-certs")
        _link_cert(pki, "kueue-webhook", self.folder / "etc" / METRICS_CERT_DIR)
        config = self.folder / "config.yaml"
        config.write_text(yaml.safe_dump(configuration(self.plane.ports, self.folder / "webhook-certs",
                                                       self.fair_sharing),
                                         sort_keys=False))
        ca = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
        self._install_crds(ca, deadline)
        self.plane._spawn("kueue", manager_argv(self.kdir / "bin" / "kueue", config, self.folder / "etc"),
                          env={"KUBECONFIG": str(self.plane.state_dir / "kueue.kubeconfig")})
        self.plane._wait("kueue readyz", lambda: requests.get(f"{self.health_url}/readyz", timeout=5).ok,
                         deadline)
        self._apply(webhook_manifests(self.kdir, self.webhook_url, ca))
        self.plane._wait("kueue's pod webhook", self._pod_webhook_active, deadline)
        self.startup_seconds = time.monotonic() - t0
        log.info("Kueue %s up in %.1fs (webhooks at %s)", kueue_version(), self.startup_seconds,
                 self.webhook_url)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Uninstall: webhook configurations first (their failurePolicy is Fail: no pod could be created
        without the manager), then the manager, then Kueue's finalizers on what is left, then the CRDs."""
        from kubernetes import client

        ca = base64.b64encode((self.plane.pki / "ca.crt").read_bytes()).decode()
        with self.plane.api_client() as api:
            admission = client.AdmissionregistrationV1Api(api)
            for config in webhook_manifests(self.kdir, self.webhook_url, ca):
                delete = (admission.delete_mutating_webhook_configuration if config["kind"].startswith("Mutating")
                          else admission.delete_validating_webhook_configuration)
                _ignore_404(delete, config["metadata"]["name"])
        if any(c.name == "kueue" for c in self.plane.components):
            self.plane.stop_component("kueue")
            self.plane._stopped_components.pop("kueue", None)
        self._drop_finalizers(ca)
        self._delete_crds(ca, time.monotonic() + timeout)

    # ---- API helpers
    def _kubectl(self, *args: str, stdin: str | None = None) -> str:
        argv = [self.plane._bin("kubectl"), f"--kubeconfig={self.plane.kubeconfig}", *args]
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KueueError(f"kubectl {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def _apply(self, docs: list[dict[str, Any]]) -> None:
        """``kubectl apply --server-side`` (the CRDs are too big for client-side apply's annotation)."""
        self._kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=qtune-plane",
                      "-f", "-", stdin=yaml.safe_dump_all(docs, sort_keys=False))

    def _install_crds(self, ca: str, deadline: float) -> None:
        crds = crd_manifests(self.kdir, self.webhook_url, ca)
        self._apply([*crds, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
        names = [f"crd/{c['metadata']['name']}" for c in crds]
        wait = max(1, int(deadline - time.monotonic()))
        self._kubectl("wait", "--for=condition=Established", f"--timeout={wait}s", *names)

    def _pod_webhook_active(self) -> bool:
        """A dry-run pod with the queue-name label comes back with Kueue's scheduling gate."""
        from kubernetes import client

        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": "kueue-probe-", "labels": {QUEUE_LABEL: "probe"}},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        with self.plane.api_client() as api:
            made = client.CoreV1Api(api).create_namespaced_pod("default", pod, dry_run="All")
        return any(g.name == ADMISSION_GATE for g in made.spec.scheduling_gates or [])

    def _drop_finalizers(self, ca: str) -> None:
        """Kueue's finalizers (pods, Workloads, ClusterQueues, ResourceFlavors, ...) would keep those objects,
        their namespaces and the CRDs forever once the manager is gone."""
        from kubernetes import client

        with self.plane.api_client() as api:
            core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
            for pod in core.list_pod_for_all_namespaces(label_selector=QUEUE_LABEL).items:
                keep = [f for f in pod.metadata.finalizers or [] if not f.startswith(FINALIZER_PREFIX)]
                if keep != (pod.metadata.finalizers or []):
                    _ignore_404(core.patch_namespaced_pod, pod.metadata.name, pod.metadata.namespace,
                                {"metadata": {"finalizers": keep or None}})
            for crd in crd_manifests(self.kdir, self.webhook_url, ca):
                group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
                version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
                try:
                    items = custom.list_cluster_custom_object(group, version, plural)["items"]
                except client.ApiException as e:
                    if e.status != 404:
                        raise
                    continue
                for obj in (o for o in items if o["metadata"].get("finalizers")):
                    meta, patch = obj["metadata"], {"metadata": {"finalizers": None}}
                    if meta.get("namespace"):
                        _ignore_404(custom.patch_namespaced_custom_object, group, version, meta["namespace"],
                                    plural, meta["name"], patch)
                    else:
                        _ignore_404(custom.patch_cluster_custom_object, group, version, plural, meta["name"], patch)

    def _delete_crds(self, ca: str, deadline: float) -> None:
        names = [c["metadata"]["name"] for c in crd_manifests(self.kdir, self.webhook_url, ca)]
        self._kubectl("delete", "--ignore-not-found", "--wait=false", *[f"crd/{n}" for n in names])
        wait = max(1, int(deadline - time.monotonic()))
        self._kubectl("wait", "--for=delete", f"--timeout={wait}s", *[f"crd/{n}" for n in names])


def _ignore_404(call: Callable[..., Any], *args: Any) -> None:
    from kubernetes import client

    try:
        call(*args)
    except client.ApiException as e:
        if e.status != 404:
            raise


def _plane_module(plane: Any) -> Any:
    """plane.py's module (``__main__`` when it runs as a script): its helpers, without a second import."""
    return sys.modules[type(plane).__module__]
