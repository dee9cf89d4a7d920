"""The hostile tenant of the multi-tenant test: what a user who may create QuantizationJobs and pods in
one namespace (and reach the Pushgateway, which has no authentication) can try against the operator.

Every attack is done the way such a user could: plain HTTP to the Pushgateway, ConfigMap edits and
Secret reads in the tenant's own namespace, and code of its own that runs inside its baseline pod."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qtune import protocol

UNITS = ("baseline", *(protocol.trial_unit(i) for i in range(6)), "confirm")
"""The units of a victim job the poison covers (the digits jobs run at most 6 trials)."""

JUNK_SERIES = f"{protocol.METRIC_PREFIX}poison 1\n"
"""The series of a junk group, or of a victim's group replaced: of the result's prefix (the operator's queries
return it with the genuine series), of a family of its own. The Pushgateway refuses (400) a push whose series
clash with those it holds (same family, other label names), so each kind of poison has its own family."""
SIBLING_SERIES = f"{protocol.METRIC_PREFIX}sibling 1\n"
"""The series of a sibling group (the victim's grouping labels plus `x`): merged into the genuine result by the
old decoder."""
CLASH_SERIES = f'{protocol.INFO_METRIC}{{kind="trial"}} 1\n'
"""A series of the results' own info family with other label names: while the Pushgateway holds it, it refuses
every genuine result push (400), of every tenant."""


def _request(method: str, url: str, body: bytes | None = None, authorization: str | None = None) -> int:
    headers = {"Authorization": authorization} if authorization else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def group_path(gateway: str, job_uid: str, unit: str, *extra: tuple[str, str]) -> str:
    tail = "".join(f"/{key}/{value}" for key, value in extra)
    return f"{gateway}/metrics/job/{protocol.PUSH_JOB}/job_uid/{job_uid}/unit/{unit}{tail}"


def push_junk_groups(gateway: str, count: int, workers: int = 8) -> int:
    """`count` groups of well-formed but meaningless series under qtune's push job, each its own job
    uid (what the operator-wide poller used to read and parse every 0.25 s). Returns how many took."""
    def one(index: int) -> bool:
        return _request("PUT", group_path(gateway, f"junk-{index:05d}", "trial-0"), JUNK_SERIES.encode()) < 300

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, range(count)))


class Poisoner:
    """While running: for every victim job, a sibling group under the victim's (job_uid, unit) plus one
    more label (which the Pushgateway keeps apart and Prometheus returns with the genuine series), a
    malformed group under the victim's exact key (a PUT replaces a genuine result), and DELETEs of it."""

    def __init__(self, gateway: str, victims: Callable[[], list[str]], period: float = 0.5) -> None:
        self.gateway = gateway
        self.victims = victims
        self.period = period
        self.rounds = 0
        self.clash_uid: str | None = None
        """Once set: each round also tries `block_every_push` under this (the tenant's own) job uid until it lands
        (the Pushgateway takes it only while it holds no genuine result group)."""
        self.clash_landed_round: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poisoner", daemon=True)

    def __enter__(self) -> Poisoner:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.clash_uid is not None and self.clash_landed_round is None and \
                    block_every_push(self.gateway, self.clash_uid) < 300:
                self.clash_landed_round = self.rounds
            for uid in self.victims():
                for unit in UNITS:
                    _request("PUT", group_path(self.gateway, uid, unit, ("x", "1")), SIBLING_SERIES.encode())
                    if self.rounds % 2:
                        _request("PUT", group_path(self.gateway, uid, unit), JUNK_SERIES.encode())
                    else:
                        _request("DELETE", group_path(self.gateway, uid, unit))
            self.rounds += 1
            self._stop.wait(self.period)


def block_every_push(gateway: str, own_job_uid: str) -> int:
    """The clash, under the tenant's own live job (no sweep of deleted jobs removes it): while it is there, every
    genuine result push of every tenant is refused (400). The Pushgateway refuses the clash itself while it holds
    a genuine result group, so those are deleted first (anyone who reaches it may). Returns the clash's status."""
    with urllib.request.urlopen(f"{gateway}/api/v1/metrics", timeout=10) as response:
        groups = json.load(response).get("data") or []
    for group in groups:
        labels = dict(group.get("labels") or {})
        if labels.get("job") != protocol.PUSH_JOB or protocol.INFO_METRIC not in group:
            continue
        extra = sorted((k, v) for k, v in labels.items() if k not in ("job", "job_uid", "unit"))
        _request("DELETE", group_path(gateway, labels.get("job_uid", ""), labels.get("unit", ""), *extra))
    return _request("PUT", group_path(gateway, own_job_uid, "trial-99"), CLASH_SERIES.encode())


def clear_results(gateway: str) -> int:
    """Delete every group of qtune's push job the Pushgateway holds (the clash would refuse the pushes of the
    tests that run after this one). Returns how many."""
    with urllib.request.urlopen(f"{gateway}/api/v1/metrics", timeout=30) as response:
        groups = json.load(response).get("data") or []
    doomed = [dict(g.get("labels") or {}) for g in groups if (g.get("labels") or {}).get("job") == protocol.PUSH_JOB]
    for labels in doomed:
        extra = sorted((k, v) for k, v in labels.items() if k not in ("job", "job_uid", "unit"))
        _request("DELETE", group_path(gateway, labels.get("job_uid", ""), labels.get("unit", ""), *extra))
    return len(doomed)


def forged_trial(index: int, accuracy: float) -> protocol.TrialResult:
    """A trial result nobody measured: a config key no trial has, and the accuracy the forger wants."""
    return protocol.TrialResult(trial=index, status="succeeded", config_key="forged", accuracy=accuracy,
                                model_size_bytes=1)


def through_the_gateway(gateway: str, victims: list[str]) -> list[int]:
    """What a pod of a cluster whose Pushgateway only the results gateway reaches may try against other tenants'
    groups: push without or with a made-up credential, delete, list. Returns each answer's HTTP status."""
    answers = []
    for uid in victims:
        for unit in ("baseline", "trial-0"):
            path = group_path(gateway, uid, unit)
            answers.append(_request("PUT", path, JUNK_SERIES.encode()))
            answers.append(_request("PUT", path, JUNK_SERIES.encode(), "Bearer 0:" + "0" * 64))
            answers.append(_request("DELETE", path))
            answers.append(_request("PUT", group_path(gateway, uid, unit, ("x", "1")), JUNK_SERIES.encode()))
    answers.append(_request("GET", f"{gateway}/api/v1/metrics"))
    answers.append(_request("GET", f"{gateway}/metrics"))
    return answers

