"""The built-in perplexity metric (issue 22, part 4): exp(mean NLL) of labelled next tokens, lower is better."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qtune.data.metrics import Perplexity, create_metric
from qtune.spec.errors import DataError
from qtune.spec.load import job_from_dict
from qtune.tuning.criterion import Criterion


def _reference(logits: np.ndarray, labels: np.ndarray) -> float:
    """Plain float64 perplexity, no chunks."""
    rows, chosen = logits.reshape(-1, logits.shape[-1]).astype(np.float64), labels.reshape(-1)
    keep = chosen >= 0
    rows, chosen = rows[keep], chosen[keep]
    top = rows.max(1, keepdims=True)
    log_probs = rows - top - np.log(np.exp(rows - top).sum(1, keepdims=True))
    return math.exp(-float(np.mean(log_probs[np.arange(len(chosen)), chosen])))


def test_a_uniform_model_has_the_vocabulary_size_as_its_perplexity() -> None:
    metric = create_metric("perplexity")
    metric.update(np.zeros((3, 7, 50), np.float32), np.random.default_rng(0).integers(0, 50, (3, 7)))
    assert metric.result() == pytest.approx(50.0, rel=1e-6)
    assert not metric.higher_is_better and metric.name == "perplexity"


def test_it_matches_a_plain_computation_over_batches_and_chunks() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 3.0, (6, 9, 31)).astype(np.float32)
    labels = rng.integers(0, 31, (6, 9))
    labels[:, :2] = -100  # a prompt that is not scored
    labels[5, 4:] = -1  # padding
    metric = Perplexity()
    metric.CHUNK_ROWS = 5  # several chunks per batch
    metric.update(logits[:4], labels[:4])
    metric.update(logits[4:], labels[4:])
    assert metric.result() == pytest.approx(_reference(logits, labels), rel=1e-5)
    assert metric.count == int((labels >= 0).sum())
    better = Perplexity()  # a model that puts more weight on the right tokens scores lower
    sharper = logits.copy()
    flat = labels.reshape(-1)
    rows = sharper.reshape(-1, 31)
    rows[np.flatnonzero(flat >= 0), flat[flat >= 0]] += 2.0
    better.update(sharper, labels)
    assert better.result() < metric.result()


def test_one_position_per_sample_is_accepted() -> None:
    metric = Perplexity()
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], np.float32))
    metric.update(logits, np.array([0, 1]))
    assert metric.result() == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.8)) / 2), rel=1e-6)


@pytest.mark.parametrize(("logits", "labels", "words"), [
    (np.zeros((2, 3, 5)), np.zeros((2, 3)), ("integer token ids", "float64")),
    (np.zeros((2, 3, 5)), np.zeros((2, 4), np.int64), ("one token id per output position", "(2, 4)")),
    (np.zeros((2, 3, 5)), np.full((2, 3), 5), ("token id 5", "vocabulary of 5")),
])
def test_bad_labels_name_the_field_and_what_is_wrong(logits: np.ndarray, labels: np.ndarray,
                                                      words: tuple[str, ...]) -> None:
    with pytest.raises(DataError) as error:
        Perplexity().update(logits, labels)
    assert "spec.data.evaluation.labels" in str(error.value)
    for word in words:
        assert word in str(error.value)


def _job(**criterion: object) -> dict:
    return {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "lm"},
            "spec": {"model": {"framework": "onnxruntime", "path": "model.onnx"},
                     "data": {"calibration": {"path": "calib.npz"},
                              "evaluation": {"path": "eval.npz", "metric": "perplexity"}},
                     "tuning": {"accuracyCriterion": {"relative": 0.02, **criterion}}}}


def test_a_job_scored_by_perplexity_passes_at_most_the_allowed_rise() -> None:
    spec = job_from_dict(_job()).spec
    criterion = Criterion.from_spec(spec.tuning.accuracy_criterion)
    assert not criterion.higher_is_better  # follows the metric
    assert criterion.threshold(20.0) == pytest.approx(20.4)
    assert criterion.passes(20.3, 20.0) and not criterion.passes(20.5, 20.0)
    with pytest.raises(Exception, match="higherIsBetter.*perplexity"):
        job_from_dict(_job(higherIsBetter=True))
