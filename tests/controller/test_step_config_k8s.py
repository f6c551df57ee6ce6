"""The Kubernetes StepConfigStore against a FAKE API server, through the official client."""

from __future__ import annotations

import base64
import json

import pytest

from controller_test_support import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, workflow_message
from services.core.contracts import WorkflowMessage
from services.core.step_config import StepConfigNotFound, step_config_from_message, step_config_name
from services.core.step_config_k8s import (
    BOOTSTRAP_SERVERS_KEY,
    STEP_CONFIG_KEY,
    SUPERVISER_REQUEST_KEY,
    KubernetesStepConfigStore,
    credentials_secret_name,
)


def split(topic: str = "wf.in", workflow: str = "wf", bootstrap: str = "kafka:9092", **extra):
    message = WorkflowMessage.model_validate(workflow_message(workflow, topic, **extra))
    return step_config_from_message(message, bootstrap)


@pytest.fixture
def store(kube_clients) -> KubernetesStepConfigStore:
    return KubernetesStepConfigStore(kube_clients[0])


def test_put_writes_settings_to_a_configmap_and_credentials_to_a_secret(store, fake_api) -> None:
    config, credentials = split("UC1.Step_In")
    store.put("uc1", config, credentials)

    config_map = fake_api.get_object("configmaps", "uc1", step_config_name("UC1.Step_In"))
    assert config_map is not None
    data = config_map["data"]
    request = json.loads(data[SUPERVISER_REQUEST_KEY])
    assert request["Topics"] == {"in": "UC1.Step_In", "out": "UC1.Step_In-out"}
    assert request["S3_bucket"]["s3-bucket-name"] == "workflow-bucket"
    assert "aws_access_key_id" not in request["S3_bucket"] and "aws_secret_access_key" not in request["S3_bucket"]
    assert data[BOOTSTRAP_SERVERS_KEY] == "kafka:9092"
    serialized = json.dumps(config_map)
    assert TEST_SECRET_ACCESS_KEY not in serialized and TEST_ACCESS_KEY_ID not in serialized

    secret = fake_api.get_object("secrets", "uc1", credentials_secret_name(config.config_name))
    assert secret is not None and secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["aws_secret_access_key"]).decode() == TEST_SECRET_ACCESS_KEY
    assert base64.b64decode(secret["data"]["aws_access_key_id"]).decode() == TEST_ACCESS_KEY_ID


def test_get_returns_what_was_put(store) -> None:
    config, credentials = split()
    store.put("uc1", config, credentials)
    read_config, read_credentials = store.get("uc1", config.config_name)
    assert read_config == config
    assert read_credentials.aws_secret_access_key.get_secret_value() == TEST_SECRET_ACCESS_KEY


def test_put_twice_replaces_instead_of_failing(store, fake_api) -> None:
    config, credentials = split(bootstrap="old:9092")
    store.put("uc1", config, credentials)
    updated, credentials = split(bootstrap="new:9092")
    store.put("uc1", updated, credentials)
    assert store.get("uc1", config.config_name)[0].bootstrap_servers == "new:9092"
    assert fake_api.calls("PUT", "/configmaps/") and fake_api.calls("PUT", "/secrets/")
    assert len(fake_api.objects("configmaps", "uc1")) == 1


def test_delete_removes_both_and_absent_is_fine(store, fake_api) -> None:
    config, credentials = split()
    store.put("uc1", config, credentials)
    assert store.delete("uc1", config.config_name) is True
    assert fake_api.objects("configmaps") == [] and fake_api.objects("secrets") == []
    assert store.delete("uc1", config.config_name) is False
    with pytest.raises(StepConfigNotFound):
        store.get("uc1", config.config_name)


def test_list_finds_only_step_configmaps(store, fake_api) -> None:
    for topic, namespace in (("a.in", "uc1"), ("b.in", "uc1"), ("c.in", "uc2")):
        config, credentials = split(topic, namespace=namespace)
        store.put(namespace, config, credentials)
    fake_api.seed("api/v1", "configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": "unrelated", "namespace": "uc1"}, "data": {}})
    assert [c.topic_in for c in store.list("uc1")] == ["a.in", "b.in"]
    assert sorted(c.topic_in for c in store.list()) == ["a.in", "b.in", "c.in"]


def test_a_production_configmap_is_still_readable(store, fake_api) -> None:
    # What the reference controller wrote: the verbatim message, credentials included, no Secret.
    message = workflow_message("legacy", "legacy.in")
    name = step_config_name("legacy.in")
    fake_api.seed("api/v1", "configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "uc1"},
        "data": {SUPERVISER_REQUEST_KEY: json.dumps(message), BOOTSTRAP_SERVERS_KEY: "kafka:9092"}})
    config, credentials = store.get("uc1", name)
    assert config.topic_in == "legacy.in" and config.bootstrap_servers == "kafka:9092"
    assert credentials.aws_access_key_id.get_secret_value() == TEST_ACCESS_KEY_ID


def test_step_config_key_holds_the_full_settings(store, fake_api) -> None:
    config, credentials = split()
    store.put("uc1", config, credentials)
    stored = fake_api.get_object("configmaps", "uc1", config.config_name)["data"][STEP_CONFIG_KEY]
    assert json.loads(stored)["config_name"] == config.config_name


def test_namespace_mismatch_is_refused(store) -> None:
    config, credentials = split(namespace="uc1")
    with pytest.raises(ValueError, match="belongs to namespace"):
        store.put("uc2", config, credentials)
