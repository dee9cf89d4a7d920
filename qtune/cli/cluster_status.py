"""`qtune status --cluster`: the same summary as for a local run, read from a QuantizationJob."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

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
    status = job.get("status") or {}
    console = Console()
    console.print(f"[bold]{namespace}/{name}[/bold]: {status.get('state', 'Pending')}")
    for condition in status.get("conditions", []):
        console.print(f"  {condition.get('type')}={condition.get('status')} "
                      f"{condition.get('reason', '')}: {condition.get('message', '')}")
    baseline = status.get("baseline") or {}
    if baseline:
        console.print(f"baseline accuracy {baseline.get('accuracy')}")
    best = status.get("best") or {}
    if best:
        console.print(f"best: trial {best.get('trial')}, accuracy {best.get('accuracy')}, "
                      f"speedup {best.get('speedup')}, model {best.get('modelPath')}")
    trials = status.get("recentTrials") or status.get("trials") or []
    if trials:
        table = Table(title="recent trials")
        columns = sorted({key for trial in trials for key in trial if not isinstance(trial[key], dict | list)})
        for column in columns:
            table.add_column(column)
        for trial in trials:
            table.add_row(*(str(trial.get(column, "")) for column in columns))
        console.print(table)
    return 0
