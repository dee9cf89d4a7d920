"""SmoothQuant's alpha as a tuning knob: the space, the basic strategy's defaults and neighbours, spec errors."""

from __future__ import annotations

import pytest
from simulated import capability, job_spec, run_simulated

from qtune.spec import SpecError
from qtune.spec.load import job_from_dict
from qtune.spec.models import QuantizationSpec, SmoothQuantSpec
from qtune.tuning import build_space
from qtune.tuning.config import TuneConfig
from qtune.tuning.space import SMOOTH_QUANT, TuningSpace
from qtune.tuning.strategies.neighbours import neighbours

SENSITIVE = {"op04", "op10", "op16"}


def _space(alpha: float | str | None, approach: str = "static", smooth_quant: bool = True) -> TuningSpace:
    cap = {**capability(24), "smooth_quant": smooth_quant}
    spec = QuantizationSpec(approach=approach,
                            smooth_quant=None if alpha is None else SmoothQuantSpec(alpha=alpha))
    space = build_space(cap, spec, [["MatMul", "Add"]], 100)
    space.sensitivity = {name: (5.0 + i if name in SENSITIVE else 0.001 * i) for i, name in enumerate(space.ops)}
    return space


def test_static_defaults_carry_each_alpha_and_dynamic_none() -> None:
    space = _space("auto", approach="auto")
    defaults = space.default_configs()
    assert [(c.approach, c.extras.get(SMOOTH_QUANT)) for c in defaults] == [
        ("static", 0.5), ("static", 0.3), ("static", 0.7), ("static", 0.85), ("dynamic", None)]
    assert len({c.key() for c in defaults}) == 5  # alpha is part of the config's identity
    assert _space(0.7).default_config().extras == {SMOOTH_QUANT: 0.7}
    assert _space(None).default_config().extras == {}


def test_near_miss_neighbours_try_the_other_alphas_nearest_first() -> None:
    space = _space("auto")
    config = space.default_config("static", 0.5)
    alphas = [n.extras[SMOOTH_QUANT] for n in neighbours(space, config) if n.extras[SMOOTH_QUANT] != 0.5]
    assert alphas == [0.3, 0.7, 0.85]
    assert all(SMOOTH_QUANT not in n.extras for n in neighbours(_space(None), _space(None).default_config()))


def test_basic_strategy_finds_the_alpha_that_keeps_every_op_int8() -> None:
    """Simulated: only alpha 0.7 makes the three sensitive ops harmless; without it they cost 0.10 each."""
    def accuracy(config: TuneConfig) -> float:
        fixed = config.extras.get(SMOOTH_QUANT) == 0.7
        return 0.95 - sum(0.0002 if fixed or name not in SENSITIVE else 0.10
                          for name, op in config.ops.items() if not op.is_fp32)

    spec = job_spec(parallelTrials=1, maxTrials=20, seed=0, confirmCandidates=0)
    session, _, _ = run_simulated(spec, _space("auto"), accuracy)
    passing = [t for t in session.history.trials if t.passed]
    best = max(passing, key=lambda t: len(t.tune_config.quantized_ops()))
    assert best.tune_config.extras[SMOOTH_QUANT] == 0.7 and not best.tune_config.fp32_ops()
    assert best.index < 4  # among the first trials: the search starts from every alpha's default


def test_an_adaptor_without_smooth_quant_names_the_field() -> None:
    with pytest.raises(SpecError) as info:
        _space(0.5, smooth_quant=False)
    assert info.value.field == "spec.quantization.smoothQuant" and "onnxruntime" in str(info.value)


@pytest.mark.parametrize(("value", "field", "words"), [
    ({"alpha": 1.5}, "spec.quantization.smoothQuant.alpha", "(0, 1] (e.g. 0.5), auto or per_layer"),
    ({"alpha": 0}, "spec.quantization.smoothQuant.alpha", "(0, 1]"),
    ({"alpha": "fast"}, "spec.quantization.smoothQuant.alpha", "auto or per_layer"),
    ({"beta": 0.5}, "spec.quantization.smoothQuant.beta", ""),
])
def test_spec_errors_name_the_field_and_what_is_allowed(value: dict, field: str, words: str) -> None:
    document = {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "j"},
                "spec": {**job_spec().model_dump(by_alias=True, exclude_none=True),
                         "quantization": {"approach": "static", "smoothQuant": value}}}
    with pytest.raises(SpecError) as info:
        job_from_dict(document)
    assert info.value.field == field and words in str(info.value)


def test_smooth_quant_is_refused_for_dynamic_and_weight_only() -> None:
    for approach in ("dynamic", "weight_only"):
        document = {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "j"},
                    "spec": {**job_spec().model_dump(by_alias=True, exclude_none=True),
                             "quantization": {"approach": approach, "smoothQuant": {"alpha": "auto"}}}}
        with pytest.raises(SpecError) as info:
            job_from_dict(document)
        assert info.value.field == "spec.quantization.smoothQuant" and "static" in str(info.value)


def test_alphas_travel_in_space_json() -> None:
    """The operator proposes trials from space.json: the alphas must survive it."""
    import json

    from qtune.tuning import codec

    loaded = codec.load(TuningSpace, json.loads(json.dumps(codec.dump(_space("auto")))))
    assert loaded.smooth_quant_alphas == [0.5, 0.3, 0.7, 0.85]
    assert loaded.default_config().key() == _space("auto").default_config().key()


def test_per_layer_alpha_is_one_config_in_the_space_and_the_spec() -> None:
    space = _space("per_layer")
    assert space.default_config().extras == {SMOOTH_QUANT: "per_layer"}
    assert neighbours(space, space.default_config())  # fallbacks still come; no alpha neighbour to try
    assert all(c.extras.get(SMOOTH_QUANT) == "per_layer" for c in neighbours(space, space.default_config()))
    with pytest.raises(ValueError, match="auto or per_layer"):
        SmoothQuantSpec(alpha="perlayer")
