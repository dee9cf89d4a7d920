"""CEL rules for the CRD, written next to the pydantic validators they mirror (qtune/spec/models.py,
data_models.py, base.py).

A model or field carries its rules as `json_schema_extra=cel.rules(...)`; the CRD generator
(qtune/operator/crd.py) copies every `x-kubernetes-validations` of the JSON schema into the
structural schema, so the API server and `qtune tune` reject the same specs (a parity test on the
real API server checks one table of specs against both).
"""

from __future__ import annotations

from typing import Any

VALIDATIONS = "x-kubernetes-validations"

# the patterns of models.py without backslashes (CEL string literals reject \w)
ENTRYPOINT_RE = "^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
NAME_RE = "^[A-Za-z_][A-Za-z0-9_-]*$"
MEMORY_RE = "^[0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"
#: a LocalQueue name that is also a label value (Kueue reads it from the pod label kueue.x-k8s.io/queue-name)
QUEUE_NAME_RE = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


def cel(rule: str, message: str | None = None, *, message_expression: str | None = None,
        field_path: str | None = None) -> dict[str, str]:
    out = {"rule": rule}
    if message:
        out["message"] = message
    if message_expression:
        out["messageExpression"] = message_expression
    if field_path:
        out["fieldPath"] = field_path
    return out


def rules(*items: dict[str, str], **schema: Any) -> dict[str, Any]:
    """json_schema_extra for a model or field: its CEL rules plus plain schema keys (pattern, maxLength)."""
    extra: dict[str, Any] = dict(schema)
    if items:
        extra[VALIDATIONS] = list(items)
    return extra


def no_default(schema: dict[str, Any]) -> None:
    """json_schema_extra of a field whose default depends on other fields (set by a model validator): its schema,
    hence the CRD, has none, or the API server would write the model's static default into every job, where the
    validator takes it for the user's choice."""
    schema.pop("default", None)


def in_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"
