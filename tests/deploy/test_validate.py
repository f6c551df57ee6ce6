"""deploy/validate.py bites: broken manifests fail, with the field and the reason; good ones pass."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from deploy_test_support import documents
from deploy.validate import Document, main, validate_documents

GOOD_KAFKA_SOURCE = {
    "apiVersion": "sources.knative.dev/v1beta1",
    "kind": "KafkaSource",
    "metadata": {"name": "step", "namespace": "uc5"},
    "spec": {
        "bootstrapServers": ["kafka:9092"],
        "topics": ["uc5.in"],
        "consumerGroup": "eoml-uc5",
        "initialOffset": "earliest",
        "sink": {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "classify"},
                 "uri": "/json-config-uc5-in"},
    },
}

SECURE_CONTAINER = {
    "name": "app",
    "image": "registry.example.org/app:1",
    "securityContext": {
        "runAsNonRoot": True, "runAsUser": 10001, "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
}

GOOD_DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "app", "namespace": "eoml"},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app": "x"}},
        "template": {
            "metadata": {"labels": {"app": "x"}},
            "spec": {"containers": [SECURE_CONTAINER], "volumes": [{"name": "tmp", "emptyDir": {}}]},
        },
    },
}


def check(*bodies: dict) -> list[str]:
    return [str(problem) for problem in validate_documents([Document("test.yaml", body) for body in bodies])]


def test_good_documents_pass() -> None:
    assert check(GOOD_KAFKA_SOURCE, GOOD_DEPLOYMENT) == []


def test_unknown_field_in_a_kafka_source_fails() -> None:
    broken = copy.deepcopy(GOOD_KAFKA_SOURCE)
    broken["spec"]["consumerGruop"] = "typo"
    problems = check(broken)
    assert len(problems) == 1
    assert "KafkaSource/step at spec" in problems[0] and "consumerGruop" in problems[0]


def test_wrong_type_in_a_kafka_source_fails() -> None:
    broken = copy.deepcopy(GOOD_KAFKA_SOURCE)
    broken["spec"]["consumers"] = "two"
    problems = check(broken)
    assert len(problems) == 1
    assert "spec.consumers" in problems[0] and "integer" in problems[0]


def test_missing_required_field_of_a_custom_kind_fails() -> None:
    broken = copy.deepcopy(GOOD_KAFKA_SOURCE)
    del broken["spec"]["topics"]
    assert any("'topics' is a required property" in p for p in check(broken))


def test_a_kafka_source_of_an_unserved_version_fails() -> None:
    broken = copy.deepcopy(GOOD_KAFKA_SOURCE)
    broken["apiVersion"] = "sources.knative.dev/v1alpha1"
    assert any("no schema" in p for p in check(broken))


def test_unknown_field_and_wrong_type_in_core_kinds_fail() -> None:
    unknown = copy.deepcopy(GOOD_DEPLOYMENT)
    unknown["spec"]["replicaz"] = 2
    wrong_type = copy.deepcopy(GOOD_DEPLOYMENT)
    wrong_type["spec"]["replicas"] = "two"
    assert any("replicaz" in p for p in check(unknown))
    assert any("spec.replicas" in p for p in check(wrong_type))


def test_unknown_kinds_fail_instead_of_passing_silently() -> None:
    assert any("no schema for example.org/v1 Widget" in p
               for p in check({"apiVersion": "example.org/v1", "kind": "Widget", "metadata": {"name": "w"}}))


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("runAsNonRoot", False, "runAsNonRoot: must be true"),
    ("readOnlyRootFilesystem", False, "readOnlyRootFilesystem: must be true"),
    ("allowPrivilegeEscalation", True, "allowPrivilegeEscalation: must be false"),
    ("capabilities", {"drop": ["NET_RAW"]}, "capabilities.drop: must contain ALL"),
    ("seccompProfile", {"type": "Unconfined"}, "seccompProfile.type: must be RuntimeDefault"),
])
def test_insecure_containers_fail_the_policy(field: str, value: object, expected: str) -> None:
    insecure = copy.deepcopy(GOOD_DEPLOYMENT)
    insecure["spec"]["template"]["spec"]["containers"][0]["securityContext"][field] = value
    problems = check(insecure)
    assert any(expected in p for p in problems), problems


def test_unbounded_containers_and_missing_tmp_fail_the_policy() -> None:
    unbounded = copy.deepcopy(GOOD_DEPLOYMENT)
    container = unbounded["spec"]["template"]["spec"]["containers"][0]
    del container["resources"]["limits"]
    container["volumeMounts"] = []
    problems = check(unbounded)
    assert any("resources.limits.cpu: must be set" in p for p in problems)
    assert any("emptyDir mounted on /tmp" in p for p in problems)


def test_cluster_wide_and_wildcard_rbac_fail_the_policy() -> None:
    cluster_role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "c"},
                    "rules": []}
    wildcard = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "r", "namespace": "n"},
                "rules": [{"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}]}
    assert any("cluster-wide RBAC" in p for p in check(cluster_role))
    assert any("rules[0].resources: wildcards" in p for p in check(wildcard))


def test_the_same_object_twice_fails() -> None:
    assert any("also defined in" in p for p in check(GOOD_KAFKA_SOURCE, GOOD_KAFKA_SOURCE))


def test_the_cli_exits_1_on_a_broken_file_and_0_on_a_good_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = copy.deepcopy(GOOD_KAFKA_SOURCE)
    broken["spec"]["initialOffset"] = 5
    good_file, broken_file = tmp_path / "good.yaml", tmp_path / "broken.yaml"
    good_file.write_text(yaml.safe_dump_all([GOOD_KAFKA_SOURCE, GOOD_DEPLOYMENT]), encoding="utf-8")
    broken_file.write_text(yaml.safe_dump(broken), encoding="utf-8")
    assert main([str(good_file)]) == 0
    assert main([str(broken_file)]) == 1
    assert "spec.initialOffset" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2


def test_multi_document_streams_skip_empty_documents() -> None:
    text = "---\n" + yaml.safe_dump(GOOD_KAFKA_SOURCE) + "---\n# only a comment\n---\n"
    assert [d.kind for d in documents(text)] == ["KafkaSource"]
