"""JSON Schemas from Kubernetes CustomResourceDefinitions, to validate custom resources without a cluster.

A CRD's ``openAPIV3Schema`` is almost JSON Schema. What differs, and what this module translates:

- ``x-kubernetes-preserve-unknown-fields: true``: the API server keeps fields the schema does not list. Everywhere
  else it *prunes* them silently, so a misspelt field simply vanishes on a real cluster. ``strict=True`` turns that
  silent loss into an error: object nodes that do not preserve unknown fields get ``additionalProperties: false``.
- ``x-kubernetes-int-or-string: true``: integer or string (the node usually has no ``type``).
- ``nullable: true``: ``null`` is accepted as well.
- ``x-kubernetes-embedded-resource: true``: a nested object with its own apiVersion/kind/metadata.
- ``metadata`` at the root (and in embedded resources) is ObjectMeta, which CRDs describe only as ``type: object``.
- ``pattern`` is Go (RE2) syntax, which allows inline flags after an anchor (``^(?i)abort$``, prometheus-operator's
  PrometheusRule); Python wants them first, so they are moved to the front (same meaning for a global flag).

Value validations (``anyOf``/``allOf``/``oneOf``/``not``) may only restate fields declared beside them in a structural
schema, so their branches never get ``additionalProperties: false`` (that would reject the declared fields).
CEL rules (``x-kubernetes-validations``) and admission webhooks are not evaluated: what they enforce needs a cluster.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# Keywords whose values are themselves schemas (or lists/maps of schemas) in a structural position.
_VALUE_VALIDATION_KEYWORDS = ("anyOf", "allOf", "oneOf")

_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
_ANCHORED_INLINE_FLAGS = re.compile(r"^\^\(\?([a-zA-Z]+)\)")


def _python_pattern(pattern: str) -> str:
    """A Go regular expression with its global inline flags where Python accepts them: ``^(?i)x`` -> ``(?i)^x``."""
    return _ANCHORED_INLINE_FLAGS.sub(lambda match: f"(?{match.group(1)})^", pattern, count=1)


def _object_meta_schema(strict: bool) -> dict[str, Any]:
    """The ObjectMeta fields a client may write (the API server sets the rest; they are accepted too)."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "generateName": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": _STRING_MAP,
            "annotations": _STRING_MAP,
            "finalizers": {"type": "array", "items": {"type": "string"}},
            "ownerReferences": {"type": "array", "items": {"type": "object"}},
            "uid": {"type": "string"},
            "resourceVersion": {"type": "string"},
            "generation": {"type": "integer"},
            "creationTimestamp": {"type": ["string", "null"]},
            "deletionTimestamp": {"type": ["string", "null"]},
            "deletionGracePeriodSeconds": {"type": "integer"},
            "managedFields": {"type": "array", "items": {"type": "object"}},
            "selfLink": {"type": "string"},
        },
    }
    if strict:
        schema["additionalProperties"] = False
    return schema


def _convert(node: Any, *, strict: bool, structural: bool) -> Any:
    """Translate one openAPIV3Schema node; ``structural`` is False inside value validations."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    preserves_unknown = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    embedded = bool(node.get("x-kubernetes-embedded-resource"))

    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out["properties"] = {
                name: _convert(child, strict=strict, structural=structural) for name, child in value.items()
            }
        elif key == "items":
            out["items"] = _convert(value, strict=strict, structural=structural)
        elif key == "additionalProperties":
            out["additionalProperties"] = (
                value if isinstance(value, bool) else _convert(value, strict=strict, structural=structural)
            )
        elif key in _VALUE_VALIDATION_KEYWORDS:
            out[key] = [_convert(branch, strict=strict, structural=False) for branch in value]
        elif key == "not":
            out["not"] = _convert(value, strict=strict, structural=False)
        elif key == "pattern" and isinstance(value, str):
            out["pattern"] = _python_pattern(value)
        else:
            out[key] = copy.deepcopy(value)

    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        int_or_string = [{"type": "integer"}, {"type": "string"}]
        if "anyOf" in out:
            # The CRD's own anyOf (usually the same two types) must hold as well: keep both.
            out["allOf"] = [*out.get("allOf", []), {"anyOf": out.pop("anyOf")}]
        out["anyOf"] = int_or_string

    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"] if "null" not in types else types

    if embedded:
        properties = out.setdefault("properties", {})
        properties.setdefault("apiVersion", {"type": "string"})
        properties.setdefault("kind", {"type": "string"})
        properties["metadata"] = _object_meta_schema(strict)

    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"])
    if (
        strict
        and structural
        and is_object
        and not preserves_unknown
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def load_crd(crd_yaml_path: str | Path) -> dict[str, Any]:
    """The CustomResourceDefinition document of a file (the first one of that kind)."""
    # libyaml's loader when present: upstream CRDs run to megabytes (KServe's InferenceService: 2 MB).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(crd_yaml_path, encoding="utf-8") as stream:
        for document in yaml.load_all(stream, Loader=loader):
            if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                return document
    raise ValueError(f"{crd_yaml_path}: no CustomResourceDefinition document")


def crd_identity(crd: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(group, kind, served version names) of a CRD document."""
    spec = crd["spec"]
    served = [version["name"] for version in spec["versions"] if version.get("served", True)]
    return spec["group"], spec["names"]["kind"], served


def crd_json_schema_from_document(crd: dict[str, Any], version: str, strict: bool = True) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one served version of an already loaded CRD document."""
    group, kind, served = crd_identity(crd)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            break
    else:
        raise ValueError(f"CRD {kind}.{group} has no version {version!r} (versions: {', '.join(served)})")
    if entry["name"] not in served:
        raise ValueError(f"CRD {kind}.{group} version {version!r} is not served")
    openapi = (entry.get("schema") or crd["spec"].get("validation") or {}).get("openAPIV3Schema")
    if openapi is None:
        raise ValueError(f"CRD {kind}.{group} version {version!r} has no openAPIV3Schema")

    schema = _convert(openapi, strict=strict, structural=True)
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema.setdefault("type", "object")
    properties = schema.setdefault("properties", {})
    # The API server routes by apiVersion and kind, so a document for another version is not this schema's.
    properties["apiVersion"] = {"const": f"{group}/{version}"}
    properties["kind"] = {"const": kind}
    properties["metadata"] = _object_meta_schema(strict)
    required = list(schema.get("required", []))
    schema["required"] = required + [field for field in ("apiVersion", "kind", "metadata") if field not in required]
    if strict and "x-kubernetes-preserve-unknown-fields" not in openapi:
        schema["additionalProperties"] = False
    return schema


def crd_json_schema(crd_yaml_path: str | Path, version: str, strict: bool = True) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) for custom resources of ``version`` described by a CRD file.

    ``strict=True`` rejects fields that the API server would prune; ``strict=False`` accepts them.
    """
    return crd_json_schema_from_document(load_crd(crd_yaml_path), version, strict=strict)
