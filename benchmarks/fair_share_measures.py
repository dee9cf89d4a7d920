"""What benchmarks/kueue_fair_share.py measures (pure functions): when every team was held back by
Kueue ("all busy"), each team's CPU-seconds inside that time, and the verdict against the weighted shares."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TOLERANCE = 0.15
"""A team's share must be within this (relative) of its weighted share."""

Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same time (empty ones dropped)."""
    out: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """The time in both (each a sorted, disjoint list)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlap(interval: Interval, windows: list[Interval]) -> float:
    return sum(max(0.0, min(interval[1], end) - max(interval[0], start)) for start, end in windows)


def inside(when: float, windows: list[Interval]) -> bool:
    return any(start <= when < end for start, end in windows)


@dataclass
class PodLife:
    """A unit pod as the watches saw it: its team (namespace), CPU request and when it was created, admitted
    (Kueue's gate gone), Running, and Succeeded/Failed (or deleted); `reserved`: when its Workload got its
    quota (QuotaReserved=True; Kueue removes the gate after that)."""

    name: str
    team: str
    cpu: float
    created: float
    admitted: float | None = None
    started: float | None = None
    finished: float | None = None
    reserved: float | None = None


def all_busy(pods: Iterable[PodLife], teams: Iterable[str], now: float, grace: float = 0.0) -> list[Interval]:
    """When every team had a unit pod waiting for admission (created, gate not yet removed) for more
    than `grace` seconds (a pod admitted within Kueue's usual latency is no sign of a team held back)."""
    by_team: dict[str, list[Interval]] = {team: [] for team in teams}
    for pod in pods:
        if pod.team in by_team:
            by_team[pod.team].append((pod.created + grace, pod.admitted if pod.admitted is not None else now))
    windows: list[Interval] | None = None
    for intervals in by_team.values():
        merged = union(intervals)
        windows = merged if windows is None else intersect(windows, merged)
    return windows or []


def cpu_seconds(pods: Iterable[PodLife], windows: list[Interval], held: bool = False) -> dict[str, float]:
    """team -> CPU request x running time (Running -> finished; `held`: the quota held, reserved (else
    admitted) -> finished) of its pods inside `windows`."""
    out: dict[str, float] = {}
    for pod in pods:
        start = (pod.reserved or pod.admitted) if held else pod.started
        if start is not None:
            end = pod.finished if pod.finished is not None else start
            out[pod.team] = out.get(pod.team, 0.0) + pod.cpu * overlap((start, end), windows)
    return out


def share_verdicts(used: dict[str, float], weights: dict[str, float], tolerance: float = TOLERANCE
                   ) -> dict[str, tuple[float, float, bool]]:
    """team -> (its share of the CPU-seconds, its weighted share, within `tolerance` relative)."""
    total, weight_sum = sum(used.values()), sum(weights.values())
    out = {}
    for team, weight in weights.items():
        share = used.get(team, 0.0) / total if total else 0.0
        want = weight / weight_sum
        out[team] = (share, want, abs(share - want) <= tolerance * want)
    return out


def freed_to_next(pods: list[PodLife], windows: list[Interval]) -> list[float]:
    """For each pod finished inside `windows` (its quota freed while every team waited): the time until Kueue
    next reserved quota for any Workload (what Kueue's admission leaves idle of the pool)."""
    reserved = sorted(p.reserved for p in pods if p.reserved is not None)
    out = []
    for pod in pods:
        if pod.finished is not None and inside(pod.finished, windows):
            later = [t for t in reserved if t >= pod.finished]
            if later:
                out.append(later[0] - pod.finished)
    return out


def settled(windows: list[Interval], pods: Iterable[PodLife]) -> list[Interval]:
    """`windows` from when every unit admitted before the first of them had finished: without preemption a
    team that came late waits until the others' running units end (up to a unit's run time), so the shares
    Kueue's fair sharing chooses show only after that."""
    if not windows:
        return []
    first = windows[0][0]
    earlier = [p.finished if p.finished is not None else float("inf") for p in pods
               if (p.reserved or p.admitted) is not None and (p.reserved or p.admitted) < first]  # type: ignore[operator]
    return intersect(windows, [(max([first, *earlier]), float("inf"))])
