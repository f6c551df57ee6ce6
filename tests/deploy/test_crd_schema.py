"""services.core.crd_schema: CRD openAPIV3Schema -> JSON Schema, with the API server's pruning made strict."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from deploy_test_support import REPO_ROOT
from services.core.crd_schema import crd_identity, crd_json_schema, load_crd

CRD_DIR = REPO_ROOT / "deploy" / "crds"

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.org"},
    "spec": {
        "group": "example.org",
        "names": {"kind": "Widget", "plural": "widgets"},
        "scope": "Namespaced",
        "versions": [
            {"name": "v1alpha1", "served": False, "storage": False,
             "schema": {"openAPIV3Schema": {"type": "object"}}},
            {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": {
                        "type": "object",
                        "required": ["size"],
                        "properties": {
                            "size": {"type": "integer", "minimum": 1},
                            "port": {"x-kubernetes-int-or-string": True},
                            "note": {"type": "string", "nullable": True},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            "template": {"type": "object", "x-kubernetes-embedded-resource": True,
                                         "x-kubernetes-preserve-unknown-fields": True},
                            "target": {
                                "type": "object",
                                "properties": {"uri": {"type": "string"}, "ref": {"type": "string"}},
                                # A value validation restating declared fields: must not reject them.
                                "anyOf": [{"required": ["uri"], "properties": {"uri": {}}},
                                          {"required": ["ref"], "properties": {"ref": {}}}],
                            },
                        },
                    },
                },
            }}},
        ],
    },
}


@pytest.fixture()
def widget_crd(tmp_path: Path) -> Path:
    path = tmp_path / "widgets.yaml"
    path.write_text(yaml.safe_dump(WIDGET_CRD), encoding="utf-8")
    return path


def widget(**spec: object) -> dict:
    return {"apiVersion": "example.org/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "n"},
            "spec": {"size": 1, **spec}}


def errors(schema: dict, document: dict) -> list[str]:
    return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(document)]


def test_a_valid_resource_passes(widget_crd: Path) -> None:
    schema = crd_json_schema(widget_crd, "v1")
    assert errors(schema, widget(port=8080, note=None, labels={"a": "b"}, target={"uri": "http://x"})) == []


def test_strict_rejects_fields_the_api_server_would_prune_and_lax_accepts_them(widget_crd: Path) -> None:
    document = widget(sise=3)
    strict = errors(crd_json_schema(widget_crd, "v1", strict=True), document)
    assert any("sise" in message for message in strict)
    assert errors(crd_json_schema(widget_crd, "v1", strict=False), document) == []


def test_unknown_metadata_and_top_level_fields_are_rejected(widget_crd: Path) -> None:
    schema = crd_json_schema(widget_crd, "v1")
    document = widget()
    document["metadata"]["lables"] = {"a": "b"}
    document["extra"] = 1
    found = errors(schema, document)
    assert any("lables" in message for message in found)
    assert any("extra" in message for message in found)


def test_preserved_subtrees_accept_anything(widget_crd: Path) -> None:
    schema = crd_json_schema(widget_crd, "v1")
    assert errors(schema, widget(config={"any": {"nested": [1, "x"]}})) == []


def test_int_or_string(widget_crd: Path) -> None:
    schema = crd_json_schema(widget_crd, "v1")
    assert errors(schema, widget(port=80)) == []
    assert errors(schema, widget(port="http")) == []
    assert errors(schema, widget(port=[80])) != []
    assert errors(schema, widget(port=1.5)) != []


def test_nullable_and_types(widget_crd: Path) -> None:
    schema = crd_json_schema(widget_crd, "v1")
    assert errors(schema, widget(note=None)) == []
    assert errors(schema, widget(size="3")) != []
    assert errors(schema, widget(size=0)) != []
    assert errors(schema, widget(labels={"a": 1})) != []


def test_embedded_resources_get_object_metadata(widget_crd: Path) -> None:
    schema = crd_json_schema(widget_crd, "v1")
    embedded = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {}}
    assert errors(schema, widget(template=embedded)) == []
    embedded["metadata"]["nmae"] = "typo"
    assert any("nmae" in message for message in errors(schema, widget(template=embedded)))


def test_value_validations_do_not_reject_declared_fields(widget_crd: Path) -> None:
    schema = crd_json_schema(widget_crd, "v1")
    assert errors(schema, widget(target={"ref": "svc"})) == []
    assert errors(schema, widget(target={})) != []  # neither branch of anyOf holds


def test_api_version_and_kind_must_match(widget_crd: Path) -> None:
    schema = crd_json_schema(widget_crd, "v1")
    assert errors(schema, {**widget(), "apiVersion": "example.org/v2"}) != []
    assert errors(schema, {**widget(), "kind": "Gadget"}) != []


def test_unknown_or_unserved_versions_are_refused(widget_crd: Path) -> None:
    with pytest.raises(ValueError, match="no version"):
        crd_json_schema(widget_crd, "v9")
    with pytest.raises(ValueError, match="not served"):
        crd_json_schema(widget_crd, "v1alpha1")


@pytest.mark.parametrize("crd_file", sorted(CRD_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_upstream_crd_converts_to_a_valid_schema(crd_file: Path) -> None:
    group, kind, versions = crd_identity(load_crd(crd_file))
    assert versions, f"{crd_file.name} serves no version"
    for version in versions:
        schema = crd_json_schema(crd_file, version)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["kind"] == {"const": kind}
        assert schema["properties"]["apiVersion"] == {"const": f"{group}/{version}"}
