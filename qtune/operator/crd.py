"""Generate the QuantizationJob CRD from the pydantic spec models, so the two cannot drift.

    python -m qtune.operator.crd > crds/quantizationjob.yaml
    python -m qtune.operator.crd --peering > crds/kopf-peering.yaml

Pydantic's JSON schema is converted into a Kubernetes *structural* schema: `$defs` are inlined,
Optional fields lose their `null` branch (nulls are pruned by the API server), Literal becomes
`enum`, `dict[str, X]` becomes `additionalProperties`, `dict[str, Any]` keeps unknown fields,
`int | str` becomes `x-kubernetes-int-or-string`, a list that also takes one bare value (`dtype:
fp32`) keeps its value as written and is checked by CEL, and exclusive bounds use the OpenAPI v3.0
boolean form. Defaults come from the models (default factories included). Rules that pydantic
checks in Python (cross-field rules, patterns, immutability) are added as CEL
`x-kubernetes-validations` with messages a person can act on.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from qtune.operator import constants as c
from qtune.spec import cel, models
from qtune.spec.reference import model_classes

# --------------------------------------------------------------------------------------------
# CEL rules that mirror a pydantic validator live beside it in qtune/spec/models.py (qtune/spec/cel.py);
# here only what the cluster adds: immutability of a running job's model and data.
# --------------------------------------------------------------------------------------------
_cel = cel.cel


def _unchanged(name: str) -> str:
    """CEL transition rule: the optional string field `name` of the object is as it was (unset stays unset)."""
    return f"(has(self.{name}) ? self.{name} : '') == (has(oldSelf.{name}) ? oldSelf.{name} : '')"


EXTRAS: dict[str, dict[str, Any]] = {
    "model": {
        "x-kubernetes-validations": [
            _cel("self == oldSelf", "spec.model is immutable: create a new QuantizationJob to tune another model"),
        ],
    },
    "data": {
        "x-kubernetes-validations": [
            _cel("self == oldSelf", "spec.data is immutable: create a new QuantizationJob to use other data"),
        ],
    },
    # the image and the workspace claim are what the operator admitted (qtune/operator/admission.py): an edit
    # would run the job's next pods from another image or volume. Rules on the parent objects (defaulted to {})
    # so that setting an unset field is refused too (a transition rule on the field runs only when both exist).
    "trial": {
        "x-kubernetes-validations": [
            _cel(_unchanged("image"), "spec.trial.image is immutable: create a new QuantizationJob to use "
                                      "another image", field_path=".image"),
        ],
    },
    "workspace": {
        "x-kubernetes-validations": [
            _cel(_unchanged("persistentVolumeClaim"), "spec.workspace.persistentVolumeClaim is immutable: "
                                                      "create a new QuantizationJob to use another PVC",
                 field_path=".persistentVolumeClaim"),
        ],
    },
    "workspace.persistentVolumeClaim": {"maxLength": 253},
    "workspace.mountPath": {"pattern": "^/", "maxLength": 1024},
}
"""Keyed by camelCase path below spec; a unit test checks every path exists in the schema."""

ROOT_RULES = [
    _cel("size(self.metadata.name) <= 63",
         "metadata.name must be at most 63 characters: it is used in pod labels"),
]

INT_OR_STRING_PATHS = {"trial.resources.cpu"}
"""Fields typed int in Python that users write as Kubernetes quantities ("4")."""

# --------------------------------------------------------------------------------------------
# pydantic JSON schema -> structural schema
# --------------------------------------------------------------------------------------------


class SchemaError(ValueError):
    """The models use a construct the converter cannot express structurally."""


def _model_classes(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every pydantic model reachable from `root`, by class name ($defs keys), first reached wins."""
    found: dict[str, type[BaseModel]] = {}
    for cls in model_classes(root):
        found.setdefault(cls.__name__, cls)
    return found


def _factory_defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """JSON defaults of fields with a default_factory (pydantic leaves them out of the schema).

    A nested model's default is `{}` so that the API server applies the nested defaults."""
    out: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        if field.default_factory is None:
            continue
        alias = field.alias or name
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            out[alias] = {}
        else:
            out[alias] = _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _one_or_many_fields(cls: type[BaseModel] | None) -> set[str]:
    """camelCase names of `cls`'s list fields that also take one bare value (`dtype: fp32` as well as
    `dtype: [fp32]`: the models' `_as_list` before-validator)."""
    if cls is None:
        return set()
    out = set()
    for name, field in cls.model_fields.items():
        if any(getattr(meta, "func", None) is models._as_list for meta in field.metadata):
            out.add(field.alias or name)
    return out


NOT_A_SCALAR = {"minLength": 1, "maxLength": 0, "minimum": 1, "maximum": 0, "minProperties": 1, "maxProperties": 0}
"""Value validations no string, number or object can meet (each keyword applies to one JSON type only)."""


def _one_or_many(node: dict[str, Any], path: str) -> dict[str, Any]:
    """A field that takes one value or a list of values (`dtype: fp32` or `dtype: [fp32, int8]`).

    A structural schema has no "string or list" type (only int-or-string), and CEL cannot check it
    either: the API server gives no CEL type to an untyped node. So the leaf keeps its value as
    written (`x-kubernetes-preserve-unknown-fields`, no type) and value validations check it: one
    allowed value, or a list whose items are allowed values (NOT_A_SCALAR keeps strings, numbers and
    objects out of the list branch; `not` keeps booleans out of a string field). Junctors carry no
    type, so the schema stays structural. The operator hands the value on as stored and pydantic
    turns one value into a list, as `qtune tune` does."""
    items = node.get("items") or {}
    if node.get("type") != "array" or not items:
        raise SchemaError(f"spec.{path}: a one-or-many field must be a list")
    if "enum" in items:
        values: list[Any] = list(items["enum"])
    elif items.get("type") == "boolean":
        values = [True, False]
    else:
        raise SchemaError(f"spec.{path}: one-or-many of {items} is not supported")
    out: dict[str, Any] = {"description": node["description"]} if node.get("description") else {}
    out["x-kubernetes-preserve-unknown-fields"] = True
    out["anyOf"] = [{"enum": values}, {"items": {"enum": list(values)}, **NOT_A_SCALAR}]
    if not all(isinstance(v, bool) for v in values):
        out["not"] = {"enum": [True, False]}
    return out


def _is_null(node: dict[str, Any]) -> bool:
    return node.get("type") == "null"


def _convert(node: dict[str, Any], defs: dict[str, Any], classes: dict[str, type[BaseModel]],
             path: str) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        target = dict(defs[name])
        target.update({k: v for k, v in node.items() if k in ("description", "default")})
        return _convert(target, defs, classes, path)
    if "anyOf" in node:
        return _convert_any_of(node, defs, classes, path)
    if "allOf" in node or "oneOf" in node:
        raise SchemaError(f"spec.{path}: allOf/oneOf are not supported")

    out: dict[str, Any] = {}
    if "description" in node:
        out["description"] = node["description"].strip()
    if "const" in node:
        node.setdefault("enum", [node.pop("const")])
    kind = node.get("type")
    if kind is None and "enum" in node:
        kind = "string"
    if kind is not None:
        out["type"] = kind
    if "enum" in node:
        out["enum"] = list(node["enum"])
    for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "pattern",
                "format"):
        if key in node:
            out[key] = node[key]
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:
            value = node[key]
            if isinstance(value, bool):
                out[key] = value
            else:
                out[bound] = value
                out[key] = True
    if node.get("default") is not None:
        out["default"] = _jsonable(node["default"])
    out.update({k: copy.deepcopy(v) for k, v in node.items() if k.startswith("x-kubernetes-")})

    if kind == "object":
        props = node.get("properties")
        additional = node.get("additionalProperties")
        if props is not None:
            out["properties"] = _convert_properties(props, classes.get(node.get("title") or ""), defs, classes, path)
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(additional, dict) and additional:
            out["additionalProperties"] = _convert(additional, defs, classes, f"{path}.*")
        else:  # dict[str, Any]: free-form (affinity, tolerations)
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        items = node.get("items")
        if not items:
            raise SchemaError(f"spec.{path}: arrays need an item type")
        out["items"] = _convert(items, defs, classes, f"{path}[]")
    elif kind is None:
        raise SchemaError(f"spec.{path}: no type")
    return out


def _convert_any_of(node: dict[str, Any], defs: dict[str, Any], classes: dict[str, type[BaseModel]],
                    path: str) -> dict[str, Any]:
    """`X | None` is X; `int | str` is int-or-string; any other union has no structural schema."""
    branches = [b for b in node.pop("anyOf") if not _is_null(b)]
    outer = {k: v for k, v in node.items() if k in ("description", "default", "format", "pattern", "maxLength")
             or k.startswith("x-kubernetes-")}
    if len(branches) == 1:
        merged = dict(branches[0])
        for key, value in outer.items():
            merged.setdefault(key, value)
        return _convert(merged, defs, classes, path)
    kinds = {b.get("type") for b in branches}
    if kinds <= {"integer", "string"} and all(set(b) <= {"type"} for b in branches):
        out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
        if "description" in outer:
            out["description"] = outer["description"]
        if outer.get("default") is not None:
            out["default"] = outer["default"]
        return out
    words = [w for b in branches if b.get("type") == "string" for w in b.get("enum") or [b.get("const")]]
    if sorted(b.get("type") for b in branches) == ["number", "string"] and None not in words:  # alpha: 0.5|auto
        return _number_or_words(node, words)
    raise SchemaError(f"spec.{path}: cannot express anyOf {branches} in a structural schema")


def _number_or_words(node: dict[str, Any], words: list[str]) -> dict[str, Any]:
    """`float | Literal["auto"]` (smoothQuant.alpha) kept as written like `_one_or_many`: a word or a bounded number."""
    number = {**{k: v for k, v in NOT_A_SCALAR.items() if k not in ("minimum", "maximum")}, "minItems": 1,
              "maxItems": 0, **{k: node[k] for k in ("minimum", "maximum", "exclusiveMinimum") if k in node}}
    kept = {k: node[k] for k in ("description", "default") if node.get(k) is not None}
    return {**kept, "x-kubernetes-preserve-unknown-fields": True, "anyOf": [{"enum": list(words)}, number],
            "not": {"enum": [True, False]}}


def _convert_properties(props: dict[str, Any], cls: type[BaseModel] | None, defs: dict[str, Any],
                        classes: dict[str, type[BaseModel]], path: str) -> dict[str, Any]:
    """An object's properties, with the defaults of default_factory fields and the one-or-many fields."""
    factory = _factory_defaults(cls) if cls else {}
    one_or_many = _one_or_many_fields(cls)
    out = {}
    for name, sub in props.items():
        child = _convert(sub, defs, classes, f"{path}.{name}" if path else name)
        if name in one_or_many:
            child = _one_or_many(child, f"{path}.{name}" if path else name)
        if name in factory and "default" not in child:
            child["default"] = factory[name]
        out[name] = child
    return out


def _walk(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.split("."):
        node = node["properties"][part]
    return node


def _apply_extras(spec_schema: dict[str, Any]) -> None:
    for path in INT_OR_STRING_PATHS:
        node = _walk(spec_schema, path)
        keep = {k: v for k, v in node.items() if k in ("description", "default", "maxLength")
                or k.startswith("x-kubernetes-")}
        node.clear()
        node.update({"x-kubernetes-int-or-string": True, **keep})
    for path, extra in EXTRAS.items():
        node = _walk(spec_schema, path)
        for key, value in extra.items():
            if key == "x-kubernetes-validations":
                node.setdefault(key, []).extend(copy.deepcopy(value))
            else:
                node[key] = value


def spec_schema() -> dict[str, Any]:
    """The structural openAPIV3Schema of `spec`."""
    raw = models.JobSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    classes = _model_classes(models.JobSpec)
    schema = _convert(raw, defs, classes, "")
    schema["description"] = ("What to tune and how: the same document runs locally (`qtune tune`) and "
                             "on the cluster.")
    _apply_extras(schema)
    return schema


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------

def status_schema() -> dict[str, Any]:
    """The structural schema of `status`, generated from the JobStatus model (qtune/operator/status.py)."""
    from qtune.operator.status import JobStatus

    raw = JobStatus.model_json_schema(by_alias=True, mode="serialization")
    defs = raw.pop("$defs", {})
    schema = _convert(raw, defs, _model_classes(JobStatus), "status")
    schema["description"] = ("Written by the operator. The full trial history is in the ConfigMap named in "
                             "status.history.configMap.")
    return schema


PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Trials", "type": "string", "jsonPath": ".status.progress", "description": "finished/max"},
    {"name": "Best-Accuracy", "type": "number", "jsonPath": ".status.best.accuracy"},
    {"name": "Speedup", "type": "string", "jsonPath": ".status.best.speedupInterval",
     "description": "the winner's speedup over fp32 [confidence interval], one interleaved measurement"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{c.PLURAL}.{c.GROUP}",
            "labels": {"app.kubernetes.io/name": "qtune", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": c.KIND,
                "listKind": f"{c.KIND}List",
                "plural": c.PLURAL,
                "singular": c.SINGULAR,
                "shortNames": list(c.SHORT_NAMES),
                "categories": list(c.CATEGORIES),
            },
            "versions": [{
                "name": c.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "An accuracy-driven int8 quantization tuning job.",
                    "required": ["spec"],
                    "x-kubernetes-validations": copy.deepcopy(ROOT_RULES),
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


def peering_crds() -> list[dict[str, Any]]:
    """Kopf's peering resources (kopf.dev/v1), needed for `qtune operator --peering NAME`."""
    out = []
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        plural = kind.lower() + "s"
        out.append({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {
                "scope": scope,
                "group": "kopf.dev",
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [{
                    "name": "v1", "served": True, "storage": True,
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "properties": {"status": {"type": "object",
                                                  "x-kubernetes-preserve-unknown-fields": True}},
                    }},
                }],
            },
        })
    return out


HEADER = ("# Generated by `python -m qtune.operator.crd{args}` (qtune/operator/crd.py; the QuantizationJob\n"
          "# schema comes from the models in qtune/spec/models.py): do not edit.\n"
          "# tests/operator/test_crd.py fails when this file and the models disagree.\n")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &anchors: every node written out
        return True


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_presenter)


def render(peering: bool = False) -> str:
    documents = peering_crds() if peering else [crd()]
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
                        for d in documents)
    return HEADER.format(args=" --peering" if peering else "") + "---\n" + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtune.operator.crd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peering", action="store_true", help="print Kopf's peering CRDs instead")
    args = parser.parse_args(argv)
    sys.stdout.write(render(peering=args.peering))
    return 0


if __name__ == "__main__":
    sys.exit(main())
