"""Kueue fair sharing between three teams tuning on one pool (issue 21 part 5; a benchmark, not a test).

Starts the test plane with Kueue (tests/cluster/kueue.py) and its fair sharing on (the Configuration's
``fairSharing`` section), then three teams: a namespace, a LocalQueue and a ClusterQueue each, the three
ClusterQueues in one Cohort that holds the pool (``--pool-cpu`` CPUs) and ``fairSharing.weight`` 1, 1, 2.
Each team submits QuantizationJobs through the real operator whose units want more than the pool; the
pods run operator_fanout.py's fake runner (the real runner, fake ONNX Runtime work) and each trial sleeps
``--trial-seconds`` so that it holds its CPU of quota that long.

    nice -n 19 python benchmarks/kueue_fair_share.py [--pool-cpu 8] [--trial-seconds 40] [--trials 10]

Why the pool is the Cohort's and the ClusterQueues' nominal quotas are 0: Kueue's fair sharing divides
only what is above a ClusterQueue's nominal quota (a ClusterQueue always gets its nominal quota first,
whatever its weight); with the pool in nominal quotas of the ClusterQueues each team would simply get its
nominal quota once all are busy, and the weights would decide nothing.

The ClusterQueues use ``queueingStrategy: StrictFIFO`` (--queueing-strategy): with Kueue's default
BestEffortFIFO a head that did not fit is set aside until Kueue requeues it, and in the meantime a team's
newer pods (or another team's) are admitted first; the first runs saw single pods wait 230 s behind
later ones of the same team, and the shares drift by the timing of those requeues.

Reports, over the time when every team has a unit pod waiting for admission longer than --busy-grace
("all busy"), from when the units admitted before that have ended ("settled": without preemption a late
team waits until the others' running units end): each team's share of the unit pods' CPU-seconds (CPU
request x time from the pod seen Running to seen Succeeded/Failed) against its weight's share, the pool's
use, admissions per minute per ClusterQueue, admission wait (pod created -> Kueue's scheduling gate
removed) p50/p90, Kueue's own latency (a pod finished -> Kueue's next quota reservation; reservation ->
gate removed), result -> next pod created / admitted, and every trial recorded once. Exit 1 if a team is
outside +-15% (relative) of its weighted share, the settled time is shorter than --min-busy-seconds, a job
did not succeed, or a trial was lost or recorded twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import fair_share_measures as fsm
import operator_fanout as fanout
from fair_share_measures import TOLERANCE, PodLife, all_busy, cpu_seconds, inside, share_verdicts

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("kueue_fair_share")
TEAMS = (("team-a", 1), ("team-b", 1), ("team-c", 2))
"""(name, fairSharing weight) of each team."""
LOCAL_QUEUE = "tuning"
COHORT = "bench-pool"
FLAVOR = "bench-flavor"
KUEUE = ("kueue.x-k8s.io", "v1beta2")

# ---- Kueue's objects and what is measured (pure functions)


def _group(resources: dict[str, str]) -> list[dict[str, Any]]:
    quotas = [{"name": r, "nominalQuota": q} for r, q in resources.items()]
    return [{"coveredResources": list(resources), "flavors": [{"name": FLAVOR, "resources": quotas}]}]


def team_objects(teams: Iterable[tuple[str, float]], pool_cpu: int, prefix: str = "",
                 strategy: str = "StrictFIFO") -> list[dict[str, Any]]:
    """The ResourceFlavor, the Cohort holding the pool (CPU: ``pool_cpu``; memory and ephemeral storage
    ample, so that CPU is every team's dominant resource), per team a ClusterQueue (queueingStrategy
    ``strategy``) of nominal quota 0 in the Cohort with its fairSharing weight, and a LocalQueue in the
    team's namespace (``prefix`` + name)."""
    api = "/".join(KUEUE)
    pool = {"cpu": str(pool_cpu), "memory": "1000Gi", "ephemeral-storage": "1000Gi"}
    out: list[dict[str, Any]] = [
        {"apiVersion": api, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
        {"apiVersion": api, "kind": "Cohort", "metadata": {"name": COHORT}, "spec": {"resourceGroups": _group(pool)}},
    ]
    for name, weight in teams:
        out.append({"apiVersion": api, "kind": "ClusterQueue", "metadata": {"name": f"{name}-cq"}, "spec": {
            "cohortName": COHORT, "namespaceSelector": {}, "fairSharing": {"weight": str(weight)},
            "queueingStrategy": strategy,
            "resourceGroups": _group({r: "0" for r in pool})}})
        out.append({"apiVersion": api, "kind": "LocalQueue",
                    "metadata": {"name": LOCAL_QUEUE, "namespace": prefix + name},
                    "spec": {"clusterQueue": f"{name}-cq"}})
    return out


# ---- the watch


def _cpu(pod: Any) -> float:
    from kubernetes.utils import parse_quantity

    return float(sum(parse_quantity(((c.resources.requests if c.resources else None) or {}).get("cpu", "0"))
                     for c in pod.spec.containers))


class LifeObserver(fanout.Observer):
    """operator_fanout's Observer (unit pods, results in Prometheus) over the teams' namespaces, also noting
    each unit pod's life (PodLife)."""

    def __init__(self, core: Any, prometheus: str, namespaces: Iterable[str]) -> None:
        super().__init__(core, prometheus)
        self.namespaces = set(namespaces)
        self.lives: dict[str, PodLife] = {}
        self.reserved: dict[str, float] = {}
        """namespace/pod -> when the watch first saw the pod's Workload QuotaReserved=True."""
        self.threads.append(threading.Thread(target=self._watch_workloads, daemon=True))

    def _watch_workloads(self) -> None:
        from kubernetes import client, watch

        custom = client.CustomObjectsApi(self.core.api_client)
        while not self.stop.is_set():
            try:
                for event in watch.Watch().stream(custom.list_cluster_custom_object, *KUEUE, "workloads"):
                    obj, now = event["object"], time.time()
                    reserved = any(cond.get("type") == "QuotaReserved" and cond.get("status") == "True"
                                   for cond in (obj.get("status") or {}).get("conditions") or [])
                    for owner in obj["metadata"].get("ownerReferences") or []:
                        if reserved and owner.get("kind") == "Pod":
                            self.reserved.setdefault(f"{obj['metadata']['namespace']}/{owner['name']}", now)
                    if self.stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - a cut stream: watch again
                time.sleep(0.2)

    def finish(self) -> list[PodLife]:
        """Stop watching; every unit pod's life, with its Workload's reservation."""
        self.stop.set()
        for key, life in self.lives.items():
            life.reserved = self.reserved.get(key)
        return list(self.lives.values())

    def _life(self, pod: Any, kind: str, when: float) -> None:
        meta = pod.metadata
        if meta.namespace not in self.namespaces or "qtune.io/unit" not in (meta.labels or {}):
            return
        key = f"{meta.namespace}/{meta.name}"
        life = self.lives.setdefault(key, PodLife(meta.name, meta.namespace, _cpu(pod), when))
        gated = any(g.name == "kueue.x-k8s.io/admission" for g in pod.spec.scheduling_gates or [])
        phase = pod.status.phase if pod.status else None
        if life.admitted is None and not gated:
            life.admitted = when
        if life.started is None and phase in ("Running", "Succeeded", "Failed"):
            life.started = when
        if life.finished is None and (phase in ("Succeeded", "Failed") or kind == "DELETED"):
            life.finished = when

    def _watch(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces(label_selector="qtune.io/unit")
                for pod in listed.items:
                    self._add(pod, pod.metadata.creation_timestamp.timestamp())
                    self._life(pod, "LISTED", pod.metadata.creation_timestamp.timestamp())
                stream = watch.Watch()
                for event in stream.stream(self.core.list_pod_for_all_namespaces, label_selector="qtune.io/unit",
                                           resource_version=listed.metadata.resource_version):
                    now, pod = time.time(), event["object"]
                    if event["type"] == "ADDED":
                        self._add(pod, now)
                    self._admitted(pod, now)
                    self._finished(pod, now)
                    self._life(pod, event["type"], now)
                    if self.stop.is_set():
                        stream.stop()
            except Exception:  # noqa: BLE001 - e.g. 410 Gone, a cut stream: list and watch again
                time.sleep(0.2)


# ---- the run


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-cpu", type=int, default=8, help="CPUs of the Cohort's pool (each unit asks 1)")
    parser.add_argument("--trial-seconds", type=float, default=40.0, help="how long each fake trial sleeps")
    parser.add_argument("--jobs", type=int, default=2, help="QuantizationJobs per team")
    parser.add_argument("--trials", type=int, default=10,
                        help="maxTrials of a weight-1 team's job (x the weight: teams end together)")
    parser.add_argument("--parallel", type=int, default=4, help="parallelTrials of each job")
    parser.add_argument("--min-busy-seconds", type=float, default=120.0,
                        help="the all-busy time must be at least this long for a verdict")
    parser.add_argument("--busy-grace", type=float, default=5.0,
                        help="a team is busy while a unit of it has waited for admission longer than this")
    parser.add_argument("--queueing-strategy", default="StrictFIFO", choices=("StrictFIFO", "BestEffortFIFO"),
                        help="the ClusterQueues' queueingStrategy (Kueue's default: BestEffortFIFO)")
    parser.add_argument("--dump", type=Path, help="write every unit pod's life (JSON) here")
    parser.add_argument("--pod-nice", type=int, default=19, help="niceness of the pods' processes")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds to wait for every job to end")
    args = parser.parse_args(argv)
    if args.trials * max(w for _, w in TEAMS) > fanout.MAX_TRIALS:
        parser.error(f"--trials x the largest weight must be at most {fanout.MAX_TRIALS}")
    return args


def start_plane(pool_cpu: int) -> Any:
    import plane as plane_mod

    state = Path(tempfile.mkdtemp(prefix="qtune-fairshare-plane-", dir="/var/tmp"))
    cpu = str(max(64, 4 * pool_cpu))  # the scheduler never makes a unit wait: Kueue's quota is the limit
    nodes = tuple(replace(n, cpu=cpu, memory="256Gi", pods="1000") for n in plane_mod.NODES)
    return plane_mod.Plane(state_dir=state, nodes=nodes, kueue=True, kueue_fair_sharing=True).start()


def setup_teams(api: Any, pool_cpu: int, prefix: str, strategy: str) -> None:
    """The teams' namespaces (with the operator's workspace claim) and Kueue's objects (team_objects)."""
    import opcluster
    from kubernetes import client

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    opcluster.install_crds(api)
    for team, _ in TEAMS:
        core.create_namespace({"metadata": {"name": prefix + team}})
        core.create_namespaced_persistent_volume_claim(prefix + team, {
            "metadata": {"name": fanout.CLAIM, "labels": dict(opcluster.WORKSPACE_LABELS)},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    plurals = {"ResourceFlavor": "resourceflavors", "Cohort": "cohorts", "ClusterQueue": "clusterqueues",
               "LocalQueue": "localqueues"}
    for obj in team_objects(TEAMS, pool_cpu, prefix, strategy):
        plural, namespace = plurals[obj["kind"]], obj["metadata"].get("namespace")
        if namespace:
            custom.create_namespaced_custom_object(*KUEUE, namespace, plural, obj)
        else:
            custom.create_cluster_custom_object(*KUEUE, plural, obj)
    deadline = time.monotonic() + 60
    for team, _ in TEAMS:
        while not any(c["type"] == "Active" and c["status"] == "True" for c in custom.get_cluster_custom_object(
                *KUEUE, "clusterqueues", f"{team}-cq").get("status", {}).get("conditions", [])):
            if time.monotonic() > deadline:
                raise RuntimeError(f"ClusterQueue {team}-cq not Active after 60s")
            time.sleep(0.2)


def start_operator(plane: Any, namespaces: list[str], args: argparse.Namespace) -> tuple[subprocess.Popen, Path]:
    """The operator serving the teams' namespaces, its pods running the fake runner (trials sleep)."""
    import opcluster

    pod_env = {"QTUNE_BENCH_POD_NICE": str(args.pod_nice), "QTUNE_BENCH_TRIAL_SECONDS": str(args.trial_seconds)}
    env = {**os.environ, "KUBECONFIG": str(plane.operator_kubeconfig), "QTUNE_PROMETHEUS_URL": plane.prometheus_url,
           "QTUNE_PUSHGATEWAY_URL": plane.pushgateway_url, "QTUNE_SIGNING_KEY": fanout.SIGNING_KEY,
           "QTUNE_RUNNER_COMMAND": f"{sys.executable} {Path(fanout.__file__).resolve()} fake-runner",
           "QTUNE_POD_ENV": json.dumps(pod_env)}
    log_path = Path(tempfile.gettempdir()) / f"qtune-fairshare-operator-{os.getpid()}.log"
    health = opcluster.free_port()
    scope = [arg for ns in namespaces for arg in ("-n", ns)]
    with open(log_path, "wb") as out:
        operator = subprocess.Popen([sys.executable, "-m", "qtune.operator.main", *scope, "--metrics-port", "0",
                                     "--health-port", str(health)], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=ROOT)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2):
                return operator, log_path
        except OSError:
            if operator.poll() is not None:
                break
            time.sleep(0.2)
    raise RuntimeError(f"the operator did not become healthy; log: {log_path}")


def submit_and_wait(custom: Any, prefix: str, args: argparse.Namespace, operator: subprocess.Popen
                    ) -> tuple[dict[str, tuple[str, str, int]], dict[str, dict[str, Any]], float]:
    """Create every team's jobs at once; wait until all ended. Returns job name -> (namespace, uid,
    maxTrials), job name -> status, and the elapsed seconds."""
    jobs: dict[str, tuple[str, str, int]] = {}
    for team, weight in TEAMS:
        for i in range(args.jobs):
            name, trials = f"{team}-{i}", int(args.trials * weight)
            made = custom.create_namespaced_custom_object("qtune.io", "v1alpha1", prefix + team, "quantizationjobs",
                                                          fanout.job(name, trials, args.parallel, LOCAL_QUEUE))
            jobs[name] = (prefix + team, made["metadata"]["uid"], trials)
    started, done, last = time.time(), {}, time.time()
    while len(done) < len(jobs) and time.time() - started < args.timeout and operator.poll() is None:
        for name, (namespace, _, _) in jobs.items():
            status = custom.get_namespaced_custom_object("qtune.io", "v1alpha1", namespace, "quantizationjobs",
                                                         name).get("status") or {}
            if status.get("state") in ("Succeeded", "Failed"):
                done[name] = status
        if time.time() - last > 30:
            last = time.time()
            log.info("... %d/%d jobs ended after %.0fs, load %.1f", len(done), len(jobs), last - started,
                     os.getloadavg()[0])
        time.sleep(2)
    return jobs, done, time.time() - started


# ---- the report


def check_trials(api: Any, jobs: dict[str, tuple[str, str, int]], done: dict[str, dict[str, Any]],
                 pods: list[fanout.PodSeen]) -> tuple[int, list[str]]:
    """Every job's history against its pods (operator_fanout.check_job): trials recorded, violations."""
    from kubernetes import client

    from qtune.operator.constants import history_configmap
    from qtune.operator.store import decode_history

    core, recorded, violations = client.CoreV1Api(api), 0, []
    for name, (namespace, uid, trials) in jobs.items():
        history = None
        try:
            body = api.sanitize_for_serialization(core.read_namespaced_config_map(history_configmap(name), namespace))
            history = decode_history(body)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
        check = fanout.check_job(name, (done.get(name) or {}).get("state"), history, trials,
                                 [p for p in pods if p.job_uid == uid], confirm=True)
        recorded += check.recorded
        violations += [f"{name}: {text}" for text in check.violations]
    return recorded, violations


def _pct(values: list[float]) -> str:
    return (f"p50 {fanout.percentile(values, 0.5):.2f}s, p90 {fanout.percentile(values, 0.9):.2f}s, "
            f"max {max(values, default=float('nan')):.2f}s ({len(values)})")


def report_shares(lives: list[PodLife], prefix: str, args: argparse.Namespace, end: float) -> list[str]:
    """Print the all-busy time, the teams' shares and admissions; returns the verdict's failures."""
    weights = {prefix + team: float(weight) for team, weight in TEAMS}
    busy_windows = all_busy(lives, weights, end, args.busy_grace)
    windows, first = fsm.settled(busy_windows, lives), min(p.created for p in lives)
    busy = sum(b - a for a, b in windows)
    used, held = cpu_seconds(lives, windows), cpu_seconds(lives, windows, held=True)
    print(f"  all teams busy (each with a unit waiting > {args.busy_grace:g}s for admission): "
          f"{sum(b - a for a, b in busy_windows):.0f}s; settled (the units admitted before then ended): {busy:.0f}s"
          + (f", +{windows[0][0] - first:.0f}s .. +{windows[-1][1] - first:.0f}s after the first pod, "
             f"{len(windows)} spans" if windows else ""))
    total, total_held = sum(used.values()), sum(held.values())
    print(f"  pool use while all busy (settled): running {total:.0f} CPU-s, quota held (reserved -> finished) "
          f"{total_held:.0f} CPU-s, of {args.pool_cpu * busy:.0f} "
          f"({100 * total_held / (args.pool_cpu * busy) if busy else 0:.1f}%)")
    failures = [] if busy >= args.min_busy_seconds else [
        f"all-busy time {busy:.0f}s < --min-busy-seconds {args.min_busy_seconds:.0f}s"]
    held_shares = share_verdicts(held, weights)
    for team, (share, want, ok) in share_verdicts(used, weights).items():
        admitted = [p for p in lives if p.team == team and p.admitted is not None and inside(p.admitted, windows)]
        waits = [p.admitted - p.created for p in lives if p.team == team and p.admitted is not None]
        print(f"    {team}: weight {weights[team]:g}, running {used.get(team, 0.0):.0f} CPU-s = {100 * share:.1f}% "
              f"(weighted share {100 * want:.1f}%, {100 * (share / want - 1):+.1f}%: {'OK' if ok else 'OUTSIDE'}"
              f" +-{100 * TOLERANCE:.0f}%); quota held {100 * held_shares[team][0]:.1f}%; admitted "
              f"{60 * len(admitted) / busy if busy else 0:.1f}/min; admission wait {_pct(waits)}")
        if not ok:
            failures.append(f"{team}: share {100 * share:.1f}% vs weighted {100 * want:.1f}%")
    waits = [p.admitted - p.created for p in lives if p.admitted is not None]
    print(f"  admission wait (pod created -> Kueue's gate removed), all teams: {_pct(waits)}")
    lag = [p.admitted - p.reserved for p in lives if p.admitted is not None and p.reserved is not None]
    print(f"  Kueue: quota reserved -> gate removed {_pct(lag)}; a pod finished while all wait -> Kueue's next "
          f"reservation {_pct(fsm.freed_to_next(lives, windows))}")
    if args.dump:
        args.dump.write_text(json.dumps({"windows": windows, "pods": [vars(p) for p in lives]}, indent=1))
    return failures


def report_latency(observer: LifeObserver) -> None:
    pods = list(observer.pods.values())
    pairs = fanout.dispatch_pairs(observer.result_seen, pods)
    created = [pod.created - seen for _, seen, pod in pairs]
    admitted = [observer.admitted[pod.name] - seen for _, seen, pod in pairs if pod.name in observer.admitted]
    print(f"  result -> the job's next unit pod created (the operator): {_pct(created)}")
    print(f"  result -> that pod admitted (may start; includes waiting for the team's share): {_pct(admitted)}")


def report(api: Any, observer: LifeObserver, jobs: dict[str, tuple[str, str, int]], done: dict[str, dict[str, Any]],
           args: argparse.Namespace, prefix: str, elapsed: float) -> list[str]:
    """Print the figures; returns what failed (empty: exit 0)."""
    lives = list(observer.lives.values())
    states = {name: (done.get(name) or {}).get("state") for name in jobs}
    print(f"  jobs: {sum(s == 'Succeeded' for s in states.values())}/{len(jobs)} Succeeded in {elapsed:.0f}s "
          f"({states if any(s != 'Succeeded' for s in states.values()) else 'all'}); unit pods: {len(lives)}")
    failures = report_shares(lives, prefix, args, time.time()) if lives else ["no pods"]
    report_latency(observer)
    recorded, violations = check_trials(api, jobs, done, list(observer.pods.values()))
    expected = sum(trials for _, _, trials in jobs.values())
    print(f"  trials recorded: {recorded} of {expected}; "
          + ("every trial recorded exactly once, succeeded, with its pod: OK" if not violations
             else f"VIOLATIONS: {violations[:20]}"))
    print(f"  load average at end: {fanout.loadavg()}")
    return failures + violations


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    sys.path[:0] = [str(ROOT / "tests" / "cluster"), str(ROOT / "tests" / "cluster" / "operator")]
    from kubernetes import client, config

    prefix = f"fs{os.getpid()}-"
    plane = start_plane(args.pool_cpu)
    operator = None
    try:
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        setup_teams(api, args.pool_cpu, prefix, args.queueing_strategy)
        namespaces = [prefix + team for team, _ in TEAMS]
        operator, log_path = start_operator(plane, namespaces, args)
        observer = LifeObserver(client.CoreV1Api(api), plane.prometheus_url, namespaces)
        observer.start()
        print(f"kueue_fair_share: teams {TEAMS} (name, weight), pool {args.pool_cpu} CPUs in Cohort {COHORT}, "
              f"{args.jobs} jobs per team x {args.trials} x weight trials ({args.parallel} at once, 1 CPU each), "
              f"trials sleep {args.trial_seconds:g}s; load {fanout.loadavg()}", flush=True)
        jobs, done, elapsed = submit_and_wait(client.CustomObjectsApi(api), prefix, args, operator)
        time.sleep(2)  # the watch catches up
        observer.finish()
        failures = report(api, observer, jobs, done, args, prefix, elapsed)
        print(f"  operator log: {log_path}")
        for text in failures:
            print(f"  FAILED: {text}")
        return 1 if failures else 0
    finally:
        fanout.stop_operator(operator)
        plane.stop()


if __name__ == "__main__":
    sys.exit(main())
