"""docs/reference.md is generated from the pydantic models and must stay in sync with them."""

from __future__ import annotations

from qtune.spec import models
from qtune.spec.reference import DOC, model_classes, render


def test_reference_page_is_up_to_date() -> None:
    assert DOC.read_text() == render(), "regenerate with: python -m qtune.spec.reference --write"


def test_every_field_has_a_description_and_appears_on_the_page() -> None:
    page = render()
    for cls in model_classes(models.JobSpec):
        assert f"## {cls.__name__}" in page
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            assert f"| `{field.alias or name}` |" in page


def test_defaults_a_user_meets_are_on_the_page() -> None:
    page = render()
    for text in ("| `batchSize` | int (≥ 1) | `64` |", "| `samples` |", "first N samples in file order",
                 "| `warmupRuns` |", "| `threads` |", "CPUs the trial owns", "| `dtype` | str | `\"float32\"` |",
                 "relative to the job file's folder", "| `evalFunc` |", "| `higherIsBetter` |"):
        assert text in page, text
