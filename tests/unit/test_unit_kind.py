"""UnitKind (qtune/protocol.py): one vocabulary of unit kinds whose values are exactly the strings the wire,
the pods, the runner's commands and stored histories carried before it existed."""

from __future__ import annotations

import json

from simulated import job_spec, simulated_space

from qtune import protocol
from qtune.protocol import UnitKind, unit_kind
from qtune.tuning.history import Baseline, History
from qtune.tuning.session import TuningSession, WorkUnit


def test_the_values_are_the_old_strings():
    assert [kind.value for kind in UnitKind] == ["baseline", "trial", "confirm", "cleanup"]
    assert all(kind == kind.value and f"{kind}" == kind.value and json.dumps(kind) == f'"{kind.value}"'
               for kind in UnitKind)
    assert {"baseline": 1}[UnitKind.BASELINE] == 1  # a str key: the same hash


def test_unit_ids_and_their_kinds():
    assert unit_kind("trial-12") is UnitKind.TRIAL and protocol.trial_unit(12) == "trial-12"
    assert [unit_kind(u) for u in ("baseline", "confirm", "cleanup")] == \
        [UnitKind.BASELINE, UnitKind.CONFIRM, UnitKind.CLEANUP]
    assert unit_kind("trial-x") is None and unit_kind("other") is None
    baseline = WorkUnit.baseline()
    assert type(baseline.id) is str and baseline.id == "baseline" and baseline.kind is UnitKind.BASELINE


def test_the_wire_carries_the_plain_kind():
    samples = protocol.encode_result(protocol.TrialResult(trial=3, status="succeeded", accuracy=0.9), None)
    info = next(s for s in samples if s.name == protocol.INFO_METRIC)
    assert type(info.labels[protocol.KIND_LABEL]) is str and info.labels[protocol.KIND_LABEL] == "trial"
    decoded, _ = protocol.decode_result(samples)
    assert isinstance(decoded, protocol.TrialResult) and decoded.trial == 3


def test_the_session_starts_units_of_each_kind():
    history = History(job="kinds", baseline=Baseline(accuracy=0.95))
    session = TuningSession(job_spec(), history, simulated_space())
    unit = session.advance(frozenset(), 1).start[0]
    assert unit.kind is UnitKind.TRIAL and unit.id == "trial-0"
    assert TuningSession(job_spec(), History(job="new")).advance(frozenset(), 1).start[0].kind is UnitKind.BASELINE
