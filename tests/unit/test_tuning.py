"""Tuning engine logic: space, criterion, strategies, history, best choice.

The trial outcomes here come from a small deterministic accuracy model (each quantized op costs
accuracy; a few ops cost a lot), to check the search logic itself; the real-framework runs are
in tests/integration.
"""

from __future__ import annotations

import json

import pytest

from qtune.spec import SpecError
from qtune.spec.models import AccuracyCriterion, QuantizationSpec
from qtune.tuning import Criterion, History, build_space, create_strategy, select_best
from qtune.tuning.config import TuneConfig
from qtune.tuning.history import SUCCEEDED

ACT = {"dtype": ["uint8", "int8", "fp32"], "scheme": ["asym", "sym"], "granularity": ["per_tensor"],
       "algorithm": ["minmax", "kl", "percentile"], "reduce_range": [False]}
WEIGHT = {"dtype": ["int8", "fp32"], "scheme": ["sym"], "granularity": ["per_channel", "per_tensor"],
          "algorithm": ["minmax"]}


def capability(count: int = 24) -> dict:
    opwise = {}
    for i in range(count):
        op_type = "MatMul" if i % 2 == 0 else "Add"
        entry = {"activation": dict(ACT), "approach": ["static", "dynamic"] if op_type == "MatMul" else ["static"]}
        if op_type == "MatMul":
            entry["weight"] = dict(WEIGHT)
        opwise[(f"op{i:02d}", op_type)] = entry
    return {"optypewise": {}, "opwise": opwise, "graph_order": [f"op{i:02d}" for i in range(count)]}


SENSITIVE = {"op04", "op10", "op16"}


def space_for(quantization: QuantizationSpec | None = None, count: int = 24):
    space = build_space(capability(count), quantization or QuantizationSpec(), [["MatMul", "Add"]], 100)
    # measured sensitivities: the three bad ops stand out, the rest are small and distinct
    space.sensitivity = {name: (5.0 + i if name in SENSITIVE else 0.001 * i) for i, name in enumerate(space.ops)}
    return space


def simulated_accuracy(config: TuneConfig) -> float:
    """fp32 is 0.95; each quantized sensitive op costs 0.10, any other 0.0002."""
    loss = 0.0
    for name, op in config.ops.items():
        if not op.is_fp32:
            loss += 0.10 if name in SENSITIVE else 0.0002
    return 0.95 - loss


def run(strategy_name: str, k: int, max_trials: int = 40, seed: int = 0, history: History | None = None,
        stop_after: int | None = None) -> History:
    """A wave-by-wave tuning loop with simulated results, accepted in trial order."""
    space = space_for()
    strategy = create_strategy(strategy_name, seed)
    criterion = Criterion.from_spec(AccuracyCriterion(relative=0.01))
    history = history or History(job="sim")
    while len(history.trials) < max_trials:
        if stop_after is not None and len(history.trials) >= stop_after:
            break
        configs = strategy.propose(space, history, min(k, max_trials - len(history.trials)))
        if not configs:
            break
        records = [history.add(c) for c in configs]
        for record in records:
            record.status = SUCCEEDED
            record.accuracy = simulated_accuracy(record.config)
            record.model_size_bytes = 1000 + 100 * len(record.config.fp32_ops())
            record.latency_ms = {"32": 1.0 + 0.01 * len(record.config.fp32_ops())}
            record.passed = criterion.passes(record.accuracy, 0.95)
    return history


def test_criterion_edges_are_documented_and_inclusive():
    relative = Criterion(0.01, None, True)
    assert relative.threshold(0.9) == pytest.approx(0.891)
    assert relative.passes(0.891, 0.9)
    assert not relative.passes(0.8909, 0.9)
    lower = Criterion(None, 0.5, False)  # e.g. an error metric, lower is better
    assert lower.passes(2.5, 2.0) and not lower.passes(2.5001, 2.0)
    assert not relative.passes(None, 0.9) and not relative.passes(float("nan"), 0.9)


def test_space_intersects_constraints_and_defaults_are_first_choices():
    quantization = QuantizationSpec.model_validate({
        "opTypeWise": {"MatMul": {"weight": {"granularity": "per_tensor"}}},
        "opWise": {"op03": {"activation": {"dtype": "fp32"}}},
    })
    space = space_for(quantization)
    config = space.default_config()
    assert config.ops["op00"].weight.granularity == "per_tensor"
    assert config.ops["op00"].activation.dtype == "uint8"
    assert config.ops["op03"].is_fp32
    assert space.approaches == ["static"]
    assert TuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert type(space).from_dict(json.loads(json.dumps(space.to_dict()))).to_dict() == space.to_dict()


def test_space_rejects_unknown_op_and_impossible_constraint():
    with pytest.raises(SpecError, match=r"spec.quantization.opWise.nope: no quantizable op named 'nope'"):
        space_for(QuantizationSpec.model_validate({"opWise": {"nope": {"activation": {"dtype": "fp32"}}}}))
    with pytest.raises(SpecError, match=r"opTypeWise.Add.activation.granularity: \['per_channel'\] is not supported"):
        space_for(QuantizationSpec.model_validate(
            {"opTypeWise": {"Add": {"activation": {"granularity": "per_channel"}}}}))


def test_basic_finds_exactly_the_sensitive_ops_in_a_handful_of_trials():
    history = run("basic", k=1)
    best = select_best(history, "size")
    assert best is not None
    assert set(best.config.fp32_ops()) == SENSITIVE
    assert len(history.trials) <= 12, len(history.trials)
    assert create_strategy("basic", 0).goal_reached(space_for(), history)


def test_parallel_and_sequential_runs_pick_the_same_best():
    sequential = select_best(run("basic", k=1), "latency")
    parallel = select_best(run("basic", k=4), "latency")
    assert sequential.config_key == parallel.config_key


def test_resume_from_saved_history_repeats_no_trial(tmp_path):
    partial = run("basic", k=2, stop_after=4)
    path = tmp_path / "history.json"
    partial.save(path)
    resumed = run("basic", k=2, history=History.load(path))
    keys = [t.config_key for t in resumed.trials]
    assert len(keys) == len(set(keys))
    assert select_best(resumed, "size").config_key == select_best(run("basic", k=2), "size").config_key


@pytest.mark.parametrize("name", ["exhaustive", "random"])
def test_other_strategies_are_deterministic_and_never_repeat(name):
    first, second = run(name, k=3, max_trials=12, seed=7), run(name, k=1, max_trials=12, seed=7)
    assert [t.config_key for t in first.trials] == [t.config_key for t in second.trials]
    assert len({t.config_key for t in first.trials}) == 12
    assert first.trials[0].config_key == space_for().default_config().key()


def test_random_depends_on_seed():
    assert [t.config_key for t in run("random", 1, 6, seed=1).trials] != \
        [t.config_key for t in run("random", 1, 6, seed=2).trials]


def test_best_prefers_fewer_fp32_ops_among_latency_ties():
    history = run("basic", k=1)
    best = select_best(history, "latency", objective_tolerance=0.5)
    fewest = min(len(t.config.fp32_ops()) for t in history.trials if t.passed)
    assert len(best.config.fp32_ops()) == fewest
