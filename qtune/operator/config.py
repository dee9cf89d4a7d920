"""Operator settings: command-line options with environment defaults, one frozen dataclass."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any

from qtune.operator import constants as c

DEFAULT_IMAGE = "qtune:0.1.0"
"""Trial image when neither spec.trial.image nor QTUNE_TRIAL_IMAGE says otherwise."""


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class OperatorConfig:
    prometheus_url: str | None = None
    """Prometheus HTTP API the operator reads trial results from."""
    pushgateway_url: str | None = None
    """Pushgateway the operator deletes groups from."""
    pod_pushgateway_url: str | None = None
    """Pushgateway address as trial pods reach it (default: pushgateway_url)."""
    trial_image: str = DEFAULT_IMAGE
    runner_command: tuple[str, ...] = ("python", "-m", "qtune.runner")
    """What pods run before `baseline|trial ...`; replaced only by benchmarks/tests (fake trials)."""
    poll_interval: float = 1.0
    """Seconds between two steps of a job's loop when nothing wakes it earlier."""
    metrics_poll_interval: float = 0.25
    """Loop period while a finished trial's metrics are awaited in Prometheus."""
    results_poll_interval: float = 0.25
    """Period of the operator-wide query of every job's results (0: off, each job queries alone)."""
    metrics_timeout: float = 60.0
    """A succeeded pod whose metrics are not queryable after this long fails: MetricsUnavailable."""
    trial_grace_seconds: float = 60.0
    """A trial pod still running this long after spec.tuning.trialTimeoutSeconds is deleted."""
    recent_trials: int = 20
    """Trials kept in status.recentTrials (the full history is in the ConfigMap)."""
    vendor: str = "Intel"
    isa_label: str = c.DEFAULT_ISA_LABEL
    """NFD label (value "true") the default node affinity requires besides the vendor."""
    keep_succeeded_pods: bool = False
    """Keep trial pods that succeeded (their results are in the history); failed pods are kept."""
    pod_env: dict[str, str] = field(default_factory=dict)
    """Extra environment of every pod the operator creates."""
    default_tolerations: tuple[dict[str, Any], ...] = ()
    """Tolerations of trial pods of jobs that set no spec.trial.tolerations (e.g. a dedicated pool's taint)."""
    trial_service_account: str | None = None
    """ServiceAccount of trial pods of jobs that set no spec.trial.serviceAccountName."""
    history_plain_limit: int = 256 * 1024
    """History JSON larger than this is stored gzip-compressed (binaryData)."""
    signing_key: str = ""
    """The key every unit's result secret is derived from (env QTUNE_SIGNING_KEY; the chart keeps it
    in a Secret, stable across upgrades). Empty: a random key per process (results of pods started
    by an earlier process then fail verification)."""
    api_retries: int = 5
    """A step failing with the same API 4xx answer this many times in a row fails the job."""

    @property
    def pushgateway_for_pods(self) -> str | None:
        return self.pod_pushgateway_url or self.pushgateway_url

    @classmethod
    def from_env(cls, **overrides: object) -> OperatorConfig:
        """Defaults from QTUNE_* environment variables; keyword arguments that are not None win."""
        command = os.environ.get("QTUNE_RUNNER_COMMAND")
        tolerations = json.loads(os.environ.get("QTUNE_TRIAL_TOLERATIONS") or "[]") or []
        pod_env = json.loads(os.environ.get("QTUNE_POD_ENV") or "{}") or {}
        values: dict[str, object] = {
            "vendor": os.environ.get("QTUNE_TRIAL_VENDOR") or "Intel",
            "default_tolerations": tuple(dict(t) for t in tolerations),
            "trial_service_account": os.environ.get("QTUNE_TRIAL_SERVICE_ACCOUNT") or None,
            "pod_env": {str(k): str(v) for k, v in pod_env.items()},
            "prometheus_url": os.environ.get("QTUNE_PROMETHEUS_URL"),
            "pushgateway_url": os.environ.get("QTUNE_PUSHGATEWAY_URL"),
            "pod_pushgateway_url": os.environ.get("QTUNE_POD_PUSHGATEWAY_URL"),
            "trial_image": os.environ.get("QTUNE_TRIAL_IMAGE") or DEFAULT_IMAGE,
            "metrics_timeout": _env_float("QTUNE_METRICS_TIMEOUT", 60.0),
            "poll_interval": _env_float("QTUNE_POLL_INTERVAL", 1.0),
            "signing_key": os.environ.get("QTUNE_SIGNING_KEY") or "",
        }
        if command:
            values["runner_command"] = tuple(shlex.split(command))
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("runner_command"), list):
            values["runner_command"] = tuple(values["runner_command"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]
