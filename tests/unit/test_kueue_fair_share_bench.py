"""benchmarks/kueue_fair_share.py: the Kueue objects it creates (the pool in the Cohort, weights on the
ClusterQueues), the plane's Kueue Configuration with fair sharing, and its measures (the all-busy time,
CPU-seconds inside it, the verdict against the weighted shares)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up; kueue_fair_share imports operator_fanout
    spec.loader.exec_module(module)
    return module


fanout = sys.modules.get("operator_fanout") or _load("operator_fanout", ROOT / "benchmarks" / "operator_fanout.py")
measures = _load("fair_share_measures", ROOT / "benchmarks" / "fair_share_measures.py")
bench = _load("kueue_fair_share", ROOT / "benchmarks" / "kueue_fair_share.py")
kueue = _load("qtune_plane_kueue", ROOT / "tests" / "cluster" / "kueue.py")
Life = measures.PodLife


def test_the_pool_is_the_cohorts_and_the_weights_the_cluster_queues() -> None:
    objs = bench.team_objects([("a", 1), ("c", 2)], 8, prefix="p-", strategy="StrictFIFO")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    (cohort,) = by_kind["Cohort"]
    pool = {r["name"]: r["nominalQuota"] for r in cohort["spec"]["resourceGroups"][0]["flavors"][0]["resources"]}
    assert pool["cpu"] == "8" and set(pool) == {"cpu", "memory", "ephemeral-storage"}
    cqs = {cq["metadata"]["name"]: cq["spec"] for cq in by_kind["ClusterQueue"]}
    assert {n: s["fairSharing"]["weight"] for n, s in cqs.items()} == {"a-cq": "1", "c-cq": "2"}
    for spec in cqs.values():
        assert spec["cohortName"] == cohort["metadata"]["name"] and spec["queueingStrategy"] == "StrictFIFO"
        quotas = spec["resourceGroups"][0]["flavors"][0]["resources"]
        assert {q["name"]: q["nominalQuota"] for q in quotas} == dict.fromkeys(pool, "0")
    assert {(q["metadata"]["namespace"], q["spec"]["clusterQueue"]) for q in by_kind["LocalQueue"]} == {
        ("p-a", "a-cq"), ("p-c", "c-cq")}


def test_the_plane_configures_kueues_fair_sharing_only_when_asked(tmp_path: Path) -> None:
    ports = {"kueue-health": 1, "kueue-metrics": 2, "kueue-webhook": 3}
    assert "fairSharing" not in kueue.configuration(ports, tmp_path)
    fair = kueue.configuration(ports, tmp_path, fair_sharing=True)["fairSharing"]
    # v1beta2 has no `enable`: the section turns it on; Kueue's validation requires one of these strategy lists
    assert fair == {"preemptionStrategies": ["LessThanOrEqualToFinalShare", "LessThanInitialShare"]}


def test_union_and_intersect() -> None:
    assert measures.union([(5, 6), (0, 2), (1, 3), (4, 4)]) == [(0, 3), (5, 6)]
    assert measures.intersect([(0, 3), (5, 9)], [(2, 6), (8, 10)]) == [(2, 3), (5, 6), (8, 9)]


def test_all_teams_are_busy_while_each_has_a_unit_waiting_beyond_the_grace() -> None:
    pods = [Life("a1", "a", 1, created=0, admitted=10), Life("b1", "b", 1, created=2, admitted=20),
            Life("b2", "b", 1, created=30, admitted=31),  # admitted at once: not held back
            Life("c1", "c", 1, created=5, admitted=None)]  # still waiting at the end (40)
    assert measures.all_busy(pods, ["a", "b", "c"], now=40) == [(5, 10)]
    assert measures.all_busy(pods, ["a", "b", "c"], now=40, grace=3) == [(8, 10)]
    assert measures.all_busy(pods, ["a", "b", "c", "idle"], now=40) == []


def test_cpu_seconds_count_only_inside_the_windows() -> None:
    pods = [Life("a1", "a", 1, created=0, admitted=1, started=2, finished=12),
            Life("c1", "c", 2, created=0, admitted=4, started=6, finished=30),
            Life("c2", "c", 1, created=0, admitted=None)]  # never admitted: nothing
    windows = [(0, 5), (10, 20)]
    assert measures.cpu_seconds(pods, windows) == {"a": 3 + 2, "c": 2 * 10}
    assert measures.cpu_seconds(pods, windows, held=True) == {"a": 4 + 2, "c": 2 * (1 + 10)}


def test_a_team_outside_15_percent_of_its_weighted_share_fails() -> None:
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    verdicts = measures.share_verdicts({"a": 260, "b": 230, "c": 510}, weights)
    assert verdicts["a"] == pytest.approx((0.26, 0.25, True)) and all(ok for _, _, ok in verdicts.values())
    verdicts = measures.share_verdicts({"a": 320, "b": 270, "c": 410}, weights)
    assert [team for team, (_, _, ok) in verdicts.items() if not ok] == ["a", "c"]


def test_the_fake_trial_holds_its_quota_for_the_seconds_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(fanout.time, "sleep", slept.append)
    monkeypatch.setenv("QTUNE_BENCH_TRIAL_SECONDS", "20")
    context = SimpleNamespace(spec=SimpleNamespace(benchmark=SimpleNamespace(batch_sizes=[1])))
    config = SimpleNamespace(quantized_ops=lambda: ["op0"], key=lambda: "k")
    assert fanout.fake_run_trial(context, config, 3).trial == 3
    assert slept == [20.0]


def test_freed_quota_is_timed_to_kueues_next_reservation() -> None:
    pods = [Life("a1", "a", 1, created=0, admitted=2, finished=10, reserved=1),
            Life("b1", "b", 1, created=0, admitted=14, finished=30, reserved=13),
            Life("c1", "c", 1, created=0, admitted=None, finished=None, reserved=None)]
    assert measures.freed_to_next(pods, [(5, 20)]) == [3]  # b1 finished outside; nothing after it anyway


def test_the_shares_count_once_the_units_admitted_before_all_were_busy_ended() -> None:
    pods = [Life("b1", "b", 1, created=0, admitted=1, finished=50, reserved=1),  # took the pool before a came
            Life("a1", "a", 1, created=10, admitted=50, finished=90, reserved=49.5),
            Life("b2", "b", 1, created=12, admitted=60, finished=100, reserved=60)]
    assert measures.settled([(15, 40), (45, 120)], pods) == [(50, 120)]
    assert measures.settled([], pods) == []
