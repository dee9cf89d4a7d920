"""The operator's Kopf diff base: the same essence as Kopf's own, built without deep-copying the status."""

from __future__ import annotations

import copy

import kopf
import pytest

from qtune.operator import constants as c
from qtune.operator.main import StatuslessDiffBase

KEY = "last-handled-configuration"


def _job() -> dict:
    return {
        "apiVersion": f"{c.GROUP}/{c.VERSION}", "kind": "QuantizationJob",
        "metadata": {"name": "digits", "namespace": "ml", "uid": "u-1", "resourceVersion": "7",
                     "labels": {"team": "vision"},
                     "annotations": {"note": "x", f"{c.ANNOTATION_PREFIX}/{KEY}": '{"spec": {}}',
                                     "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                     "ownerReferences": [{"kind": "Thing", "name": "t", "uid": "o-1"}]},
        "spec": {"tuning": {"maxTrials": 8}, "model": {"path": "m.onnx"}},
        "status": {"state": "Running", "recentTrials": [{"index": i, "accuracy": 0.9} for i in range(20)]},
    }


@pytest.mark.parametrize("extra", [None, []])
def test_the_essence_is_kopfs_own(extra: list | None) -> None:
    body = _job()
    ours = StatuslessDiffBase(prefix=c.ANNOTATION_PREFIX, key=KEY).build(body=kopf.Body(body), extra_fields=extra)
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix=c.ANNOTATION_PREFIX, key=KEY).build(
        body=kopf.Body(copy.deepcopy(body)), extra_fields=extra)
    assert ours == kopfs
    assert "status" not in ours and ours["spec"]["tuning"]["maxTrials"] == 8
    ours["spec"]["tuning"]["maxTrials"] = 9
    assert body["spec"]["tuning"]["maxTrials"] == 8, "the essence is a copy"


def test_a_status_field_asked_for_is_kept() -> None:
    body = _job()
    ours = StatuslessDiffBase(prefix=c.ANNOTATION_PREFIX, key=KEY).build(body=kopf.Body(body),
                                                                         extra_fields=["status.state"])
    assert ours["status"] == {"state": "Running"}
