"""`qtune status --cluster`: the same summary as for a local run, read from a QuantizationJob."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qtune.cli.front_table import status_front_table
from qtune.spec import QtuneError, load_job


def _name_and_namespace(target: str, namespace: str | None) -> tuple[str, str | None]:
    if Path(target).is_file():
        job = load_job(target)
        return job.name, namespace or job.metadata.namespace
    return target, namespace


def print_cluster_status(target: str, namespace: str | None) -> int:
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
    except ImportError as exc:
        raise QtuneError(f"--cluster needs the operator extra (pip install qtune[operator]): {exc}") from None
    name, namespace = _name_and_namespace(target, namespace)
    try:
        config.load_kube_config()
        namespace = namespace or config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
    except config.ConfigException:
        config.load_incluster_config()
        namespace = namespace or "default"
    try:
        job = client.CustomObjectsApi().get_namespaced_custom_object(
            "qtune.io", "v1alpha1", namespace, "quantizationjobs", name)
    except ApiException as exc:
        raise QtuneError(f"cannot read QuantizationJob {namespace}/{name}: {exc.reason}") from None
    return print_status(namespace, name, job.get("status") or {}, Console())


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Control characters (escape sequences, OSC-8 links, C1 codes): a job's text may carry any of them."""


def plain(value: Any) -> str:
    """`value` as text that prints as itself: control characters dropped and Rich markup escaped. Every
    string of a job's status is written by the operator from what a tenant supplied (names, messages, user
    errors), so none of it may style, link or move the user's terminal, or crash the print with a bad tag."""
    return escape(_CONTROL.sub("", str(value)))


def print_status(namespace: str, name: str, status: dict[str, Any], console: Console) -> int:
    """The job's status at any phase: just created (no status yet), baseline, tuning, done."""
    console.print(f"[bold]{plain(namespace)}/{plain(name)}[/bold]: {plain(status.get('state') or 'Pending')}"
                  + (f" ({plain(status['reason'])})" if status.get("reason") else ""))
    if status.get("message"):
        console.print(f"  {plain(status['message'])}")
    for condition in status.get("conditions") or []:
        console.print(f"  {plain(condition.get('type'))}={plain(condition.get('status'))} "
                      f"{plain(condition.get('reason', ''))}: {plain(condition.get('message', ''))}")
    if status.get("progress"):
        console.print(f"trials: {plain(status['progress'])}")
    baseline = status.get("baseline") or {}
    if baseline:
        console.print(f"baseline {plain(baseline.get('metric') or 'accuracy')} {plain(baseline.get('accuracy'))}")
    best = status.get("best") or {}
    if best:
        speed = best.get("speed") or {}
        line = f"best: trial {best.get('trial')}, accuracy {best.get('accuracy')}"
        if speed:
            line += (f", speedup {speed.get('speedup')} [{speed.get('low')}-{speed.get('high')}] at batch "
                     f"{speed.get('batchSize')} (fp32 {speed.get('fp32LatencyMs')} ms -> {speed.get('latencyMs')} ms)")
        console.print(f"{plain(line)}, model {plain(best.get('modelPath'))}")
    front = status.get("front")
    if isinstance(front, dict) and front.get("entries"):
        console.print(status_front_table(front))
    trials = [t for t in status.get("recentTrials") or [] if isinstance(t, dict)]
    if trials:
        table = Table(title="recent trials")
        columns = [col for col in ("index", "status", "accuracy", "speedup", "latencyMs", "modelSizeBytes", "passed",
                                   "fp32Ops", "reason") if any(col in t for t in trials)]
        for column in columns:
            table.add_column(column)
        for trial in trials:
            table.add_row(*(plain(trial.get(column, "")) for column in columns))
        console.print(table)
    return 0
