"""`qtune operator`: run the QuantizationJob operator (Kopf).

    qtune operator [-n NAMESPACE ... | -A] [--peering NAME [--priority N]]
                   [--prometheus-url URL] [--pushgateway-url URL] [--trial-image IMAGE]
                   [--metrics-port 8000] [--health-port 8080] [--results-deadline-seconds 1800]

Peering: with `--peering NAME`, replicas of the operator elect one active instance through Kopf's
peering object (ClusterKopfPeering NAME with -A, else KopfPeering NAME in each namespace; the
CRDs are in crds/kopf-peering.yaml; the object is created on start when missing). The one with
the highest --priority acts; the others pause until it is gone, so two replicas never both act on
a job. Without --peering the operator runs standalone (run a single replica).

Endpoints: GET http://BIND_ADDRESS:HEALTH_PORT/healthz (Kopf liveness probe: 200 while the operator
is healthy), GET http://BIND_ADDRESS:METRICS_PORT/metrics (the operator's own metrics: jobs by state,
trials started/finished/failed, dispatch latency, loop step duration). --bind-address (default
0.0.0.0, as the kubelet probes the pod IP; 127.0.0.1 for a local run).

RBAC the operator needs: quantizationjobs (+/status) get/list/watch/patch/update; pods
get/list/watch/create/delete; configmaps get/create/update/patch/delete; secrets
create/delete only (each unit's result secret; the operator derives it again from QTUNE_SIGNING_KEY
and never reads Secrets); serviceaccounts,
roles, rolebindings create; events create; kopfpeerings/clusterkopfpeerings get/list/watch/patch/
create (with --peering); namespaces and customresourcedefinitions list/watch (Kopf's scanning);
nodes get (a unit's pod on a node that is gone or NotReady is replaced); quantizationjobs list
cluster-wide, optional (the sweep of Pushgateway groups of deleted jobs; without it only groups of
jobs this process saw deleted are swept).
The Role it grants each job's baseline pod (get/update/patch of that job's `<job>-baseline`
ConfigMap) requires it to hold those verbs itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import kopf

from qtune.operator import constants as c
from qtune.operator.config import OperatorConfig

logger = logging.getLogger("qtune.operator")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", default=[], metavar="NAMESPACE",
                       help="serve this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve the whole cluster (default)")
    parser.add_argument("--peering", metavar="NAME",
                        help="elect one active replica through Kopf peering object NAME (see crds/kopf-peering.yaml)")
    parser.add_argument("--priority", type=int, default=0, help="peering priority (highest acts)")
    OperatorConfig.add_arguments(parser)
    parser.add_argument("--metrics-port", type=int, default=8000, help="port of /metrics (0: off)")
    parser.add_argument("--health-port", type=int, default=8080, help="port of /healthz (0: off)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtune operator", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig.from_args(args)


class StatuslessDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Kopf's diff base (the essence of a job its field handlers compare), built without first deep-copying
    the status it then drops: every status patch comes back as a watch event, and at 100 jobs that copy of
    every job's recent trials was a large part of the operator's CPU. Same essence, same annotation."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        if extra_fields and any(str(field).startswith("status") for field in extra_fields):
            return super().build(body=body, extra_fields=extra_fields)
        return super().build(body=kopf.Body({k: v for k, v in body.items() if k != "status"}),
                             extra_fields=extra_fields)


def configure(settings: kopf.OperatorSettings, *, peering: str | None) -> None:
    """Kopf settings: peering, Events, where Kopf keeps its own state, pod watch selector."""
    # kopf.operator() already applied the name, priority, standalone and scope of the peering
    if peering:
        settings.peering.mandatory = True  # refuse to run unpeered when peering was asked for
    settings.posting.enabled = True
    settings.posting.reporting_component = "qtune-operator"
    settings.posting.level = logging.WARNING  # Events come from kopf.event(), not from log lines
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = StatuslessDiffBase(
        prefix=c.ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.watching.label_selectors["pods"] = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def run(namespaces: Sequence[str] = (), *, config: OperatorConfig | None = None, peering: str | None = None,
        priority: int = 0, metrics_port: int = 8000, health_port: int = 8080,
        stop_flag: Any = None, ready_flag: Any = None) -> None:
    """Run the operator until stopped (SIGINT/SIGTERM or `stop_flag`).

    namespaces: serve these namespaces (patterns allowed); empty: the whole cluster.
    config: operator settings (default: OperatorConfig.from_env()).
    peering: Kopf peering name (two replicas never both act); None: standalone.
    metrics_port / health_port: /metrics and /healthz (0 disables)."""
    from qtune.operator import handlers  # noqa: F401  (registers the Kopf handlers)
    from qtune.operator.metrics import OperatorMetrics

    config = config or OperatorConfig.from_env()
    if not config.signing_key:
        import dataclasses
        import secrets

        logger.warning("no signing key (QTUNE_SIGNING_KEY): using a random one; results of pods started by an "
                       "earlier operator process will not verify (set it, as the Helm chart does)")
        config = dataclasses.replace(config, signing_key=secrets.token_hex(32))
    if os.environ.get("POD_NAME") and not os.environ.get("POD_ID"):
        os.environ["POD_ID"] = os.environ["POD_NAME"]  # Kopf's peering identity: the pod's name
    clusterwide = not namespaces
    metrics = OperatorMetrics()
    if metrics_port:
        metrics.serve(metrics_port, config.bind_address)
    memo = kopf.Memo(config=config, metrics=metrics, wakeups={}, deleted=set(), kueue_stopped={}, peering=peering,
                     namespaces=list(namespaces), clusterwide=clusterwide, priority=priority)
    if not config.prometheus_url:
        logger.warning("no Prometheus URL (--prometheus-url / QTUNE_PROMETHEUS_URL): trial results cannot be "
                       "read; every succeeded trial will fail with MetricsUnavailable")
    asyncio.run(_serve(memo, namespaces, clusterwide, peering, priority, health_port, stop_flag, ready_flag,
                       config.bind_address))


async def _serve(memo: kopf.Memo, namespaces: Sequence[str], clusterwide: bool, peering: str | None,
                 priority: int, health_port: int, stop_flag: Any, ready_flag: Any,
                 bind_address: str = "0.0.0.0") -> None:
    await kopf.operator(
        clusterwide=clusterwide,
        namespaces=list(namespaces),
        standalone=not peering,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=liveness_endpoint(bind_address, health_port),
        memo=memo,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def liveness_endpoint(bind_address: str, port: int) -> str | None:
    """Kopf's liveness URL (Kopf listens on its host and port); None when the port is 0."""
    if not port:
        return None
    host = f"[{bind_address}]" if ":" in bind_address else bind_address
    return f"http://{host}:{port}/healthz"


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    import aiohttp

    from qtune.operator.kube import Kube, load_client
    from qtune.operator.prom import PrometheusClient, PushgatewayClient, ResultsPoller
    from qtune.operator.reconcile import Services

    configure(settings, peering=memo.peering)
    config: OperatorConfig = memo.config
    kube = Kube(load_client())
    if memo.peering:
        await kube.ensure_peering(memo.peering, None if memo.clusterwide else
                                  [ns for ns in memo.namespaces if not any(ch in ns for ch in "*?[]!")])
    session = aiohttp.ClientSession()
    memo.http = session
    prometheus = PrometheusClient(config.prometheus_url, session, max_bytes=config.results_max_bytes,
                                  max_series=config.results_max_series,
                                  rejected=memo.metrics.results_rejected) if config.prometheus_url else None
    poller = None
    if prometheus is not None and config.results_poll_interval > 0:
        poller = ResultsPoller(prometheus, config.results_poll_interval, memo.wakeups, memo.metrics.errors)
        memo.poller_restarts = 0
        start_poller(memo, poller)
    memo.services = Services(
        kube=kube,
        config=config,
        metrics=memo.metrics,
        prometheus=prometheus,
        pushgateway=PushgatewayClient.of_operator(config.pushgateway_url, session, config.signing_key)
        if config.pushgateway_url else None,
        poller=poller,
    )
    if memo.services.pushgateway is not None and config.sweep_interval > 0:
        from qtune.operator.sweep import GroupSweeper

        sweeper = GroupSweeper(memo.services.pushgateway, kube.job_uids, config.sweep_interval, memo.deleted,
                               memo.metrics.errors)
        memo.sweeper_task = asyncio.create_task(sweeper.run(), name="qtune Pushgateway sweep")
    logger.info("qtune operator: prometheus=%s pushgateway=%s (pods: %s) image=%s peering=%s",
                config.prometheus_url, config.pushgateway_url, config.pushgateway_for_pods, config.trial_image,
                memo.peering or "standalone")


def start_poller(memo: kopf.Memo, poller: Any) -> None:
    """Run the results poller as a task that is started again (logged, counted) if it ever ends other than by
    the operator's shutdown: the poller never dies silently."""
    task = asyncio.create_task(poller.run(), name="qtune results poller")
    memo.poller_task = task

    def ended(done: asyncio.Task[Any]) -> None:
        if getattr(memo, "stopping", False) or done.cancelled():
            return
        error = done.exception()
        logger.error("the results poller ended (%r); starting it again", error, exc_info=error)
        memo.metrics.errors.labels(kind="poller_ended").inc()
        memo.poller_restarts += 1
        start_poller(memo, poller)

    task.add_done_callback(ended)


@kopf.on.probe(id="results_poller")
def _poller_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any] | None:
    """On /healthz: the poller's state (alive, restarts, last error)."""
    task = getattr(memo, "poller_task", None)
    if task is None:
        return None
    services = getattr(memo, "services", None)
    poller = services.poller if services is not None else None
    return {"alive": not task.done(), "restarts": getattr(memo, "poller_restarts", 0),
            "lastError": poller.last_error if poller is not None else None}


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.stopping = True
    sweeper = getattr(memo, "sweeper_task", None)
    if sweeper is not None:
        sweeper.cancel()
    task = getattr(memo, "poller_task", None)
    if task is not None:
        task.cancel()
    session = getattr(memo, "http", None)
    if session is not None:
        await session.close()
    services = getattr(memo, "services", None)
    if services is not None:
        services.kube.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    run(args.namespaces, config=config, peering=args.peering, priority=args.priority,
        metrics_port=args.metrics_port, health_port=args.health_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
