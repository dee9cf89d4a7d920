"""The cluster fakes honour label selectors as the API server does, so a test cannot pass on a query the real
cluster would answer differently."""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import pytest
from opfakes import FakeKube, job_body, make_config, matches_labels

from qtune.operator import constants as c
from qtune.operator import handlers
from qtune.operator.metrics import OperatorMetrics

LABELS = {"app": "qtune", "qtune.io/job": "digits", "tier": "trial"}


@pytest.mark.parametrize(("selector", "selected"), [
    ("", True),
    ("app=qtune", True),
    ("app==qtune,tier=trial", True),
    ("app=qtune,tier=baseline", False),
    ("qtune.io/job", True),
    ("qtune.io/job,missing", False),
    ("!missing", True),
    ("!app", False),
    ("tier!=baseline", True),
    ("tier!=trial", False),
    ("tier in (trial, confirm)", True),
    ("tier in (baseline),app=qtune", False),
    ("tier notin (baseline)", True),
    ("missing notin (x)", True),
    ("tier notin (trial,x)", False),
])
def test_label_selectors(selector: str, selected: bool) -> None:
    assert matches_labels(LABELS, selector) is selected


def _pod(name: str, uid: str, namespace: str = "ml") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": {c.LABEL_JOB_UID: uid},
                         "ownerReferences": [{"uid": uid}]}}


def test_list_pods_selects_by_label_and_namespace() -> None:
    kube = FakeKube()
    for pod in (_pod("a-0", "uid-a"), _pod("a-1", "uid-a"), _pod("b-0", "uid-b"), _pod("a-x", "uid-a", "other")):
        kube.pods[pod["metadata"]["name"]] = pod

    listed = asyncio.run(kube.list_pods("ml", f"{c.LABEL_JOB_UID}=uid-a"))
    assert sorted(p["metadata"]["name"] for p in listed) == ["a-0", "a-1"]


def test_a_deleted_job_deletes_its_own_pods_only() -> None:
    kube = FakeKube()
    for pod in (_pod("a-0", "uid-a"), _pod("b-0", "uid-b")):
        kube.pods[pod["metadata"]["name"]] = pod
    services = types.SimpleNamespace(kube=kube, metrics=OperatorMetrics(), pushgateway=None, config=make_config())
    memo = types.SimpleNamespace(services=services, deleted=set(), wakeups={})

    # (a uid of no real job: its folder name is refused, so no folder cleanup pod either)
    body = job_body(uid="uid-a")
    asyncio.run(handlers.job_deleted(type="DELETED", body=body, meta=body["metadata"], memo=memo,
                                     logger=logging.getLogger(__name__)))
    assert kube.deleted_pods == ["a-0"] and sorted(kube.pods) == ["b-0"]
    assert memo.deleted == {"uid-a"}
