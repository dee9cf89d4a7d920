"""The operator's own Prometheus metrics, served on /metrics (prometheus_client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from qtune.operator import status as st

STATES = (st.PENDING, st.BASELINE, st.RUNNING, st.SUCCEEDED_STATE, st.FAILED_STATE)


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs = Gauge("qtune_operator_jobs", "QuantizationJobs by state", ["state"], registry=r)
        self.trials_started = Counter("qtune_operator_trials_started", "trial pods created", registry=r)
        self.trials_finished = Counter("qtune_operator_trials_finished", "trials recorded, by status",
                                       ["status"], registry=r)
        self.trials_failed = Counter("qtune_operator_trials_failed", "failed trials, by reason", ["reason"],
                                     registry=r)
        self.dispatch_latency = Histogram(
            "qtune_operator_dispatch_latency_seconds",
            "from a trial result being read from Prometheus to the next trial pod of the job being created",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.step_seconds = Histogram("qtune_operator_step_seconds", "duration of one job loop step",
                                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=r)
        self.errors = Counter("qtune_operator_step_errors", "job loop steps that raised", ["kind"], registry=r)
        self.results_rejected = Counter(
            "qtune_operator_results_rejected", "results ignored for lack of proof of origin (no finished pod of "
            "the unit, bad signature, wrong unit)", ["reason"], registry=r)
        self._states: dict[str, str] = {}
        for state in STATES:
            self.jobs.labels(state=state).set(0)

    def job_state(self, uid: str, state: str | None) -> None:
        """Record a job's state (None: the job is gone)."""
        old = self._states.pop(uid, None)
        if old is not None:
            self.jobs.labels(state=old).dec()
        if state is not None:
            self._states[uid] = state
            self.jobs.labels(state=state).inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on addr:port in a thread; returns the server (its server_address, shutdown())."""
        self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self.server
