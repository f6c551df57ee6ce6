"""Names and the KafkaSource body: deterministic, DNS-1123, collision-free, valid against the upstream CRD."""

from __future__ import annotations

import copy
import re

import pytest

from controller_test_support import workflow_message
from fake_kubernetes import schema_errors
from services.controller.messages import parse_workflow_message
from services.controller.settings import ControllerSettings
from services.controller.wiring import (
    DeliveryPolicy,
    consumer_group,
    iso8601_seconds,
    kafka_source_body,
    kafka_source_name,
    topic_from_cloudevent_source,
)
from services.core.step_config import step_config_from_message

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def step(topic_in: str, workflow: str = "uc5-test", **settings_overrides):
    message = parse_workflow_message(workflow_message(workflow, topic_in, service="cfactor", namespace="uc5"))
    config, _ = step_config_from_message(message, "kafka-0.kafka:9092,kafka-1.kafka:9092")
    return config


@pytest.mark.parametrize("topic", ["uc5.in", "UC5_IN", "uc5-in", "a" * 240, "x.y-z_Q"])
def test_source_names_are_dns1123_labels(topic: str) -> None:
    assert DNS1123_LABEL.match(kafka_source_name(topic))


def test_topics_that_sanitise_alike_do_not_collide() -> None:
    topics = ["uc5.in", "uc5_in", "uc5-in", "UC5-IN", "uc5..in"]
    assert len({kafka_source_name(t) for t in topics}) == len(topics)
    long_a, long_b = "t" * 200 + "a", "t" * 200 + "b"
    assert kafka_source_name(long_a) != kafka_source_name(long_b)


def test_consumer_group_is_deterministic_per_workflow_step() -> None:
    assert consumer_group("wf", "t1") == consumer_group("wf", "t1")
    assert consumer_group("wf", "t1").startswith("eoml-wf-")
    assert consumer_group("wf", "t1") != consumer_group("wf", "t2")
    assert consumer_group("wf-a", "t1") != consumer_group("wf-b", "t1")


def test_kafka_source_body_passes_the_upstream_crd_schema(kafka_source_schema: dict) -> None:
    config = step("Workflow_42.Topic.IN")
    body = kafka_source_body(config, ControllerSettings())
    assert schema_errors(body, kafka_source_schema) == []


def test_schema_check_is_strict_enough_to_catch_a_typo(kafka_source_schema: dict) -> None:
    body = kafka_source_body(step("t1"), ControllerSettings())
    broken = copy.deepcopy(body)
    broken["spec"]["delivery"]["retries"] = broken["spec"]["delivery"].pop("retry")
    assert any("'retries' was unexpected" in e for e in schema_errors(broken, kafka_source_schema))
    wrong_type = copy.deepcopy(body)
    wrong_type["spec"]["bootstrapServers"] = "kafka:9092"
    assert schema_errors(wrong_type, kafka_source_schema)


def test_kafka_source_body_wires_the_step_as_specified() -> None:
    settings = ControllerSettings(delivery_retry=4, delivery_backoff_delay_s=0.5, delivery_timeout_s=45)
    config = step("uc5.Input")
    body = kafka_source_body(config, settings)
    spec = body["spec"]
    assert body["apiVersion"] == "sources.knative.dev/v1beta1" and body["kind"] == "KafkaSource"
    assert body["metadata"] == {**body["metadata"], "name": kafka_source_name("uc5.Input"), "namespace": "uc5"}
    assert spec["topics"] == ["uc5.Input"]
    assert spec["bootstrapServers"] == ["kafka-0.kafka:9092", "kafka-1.kafka:9092"]
    assert spec["initialOffset"] == "earliest"
    assert spec["consumerGroup"] == consumer_group("uc5-test", "uc5.Input")
    assert spec["sink"] == {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "cfactor",
                                    "namespace": "uc5"}, "uri": f"/{config.config_name}"}
    assert spec["delivery"]["retry"] == 4
    assert spec["delivery"]["backoffPolicy"] == "exponential"
    assert spec["delivery"]["backoffDelay"] == "PT0.5S"
    assert spec["delivery"]["timeout"] == "PT45S"
    assert spec["delivery"]["deadLetterSink"]["uri"] == "/dead-letter"
    assert spec["delivery"]["deadLetterSink"]["ref"]["name"] == settings.controller_service_name


def test_absolute_dead_letter_uri_replaces_the_controller_ref() -> None:
    settings = ControllerSettings(dead_letter_uri="http://dlq.example.svc.cluster.local/")
    sink = kafka_source_body(step("t1"), settings)["spec"]["delivery"]["deadLetterSink"]
    assert sink == {"uri": "http://dlq.example.svc.cluster.local/"}


@pytest.mark.parametrize("seconds, text", [(1, "PT1S"), (30.0, "PT30S"), (0.5, "PT0.5S"), (1.25, "PT1.25S")])
def test_iso8601_durations(seconds: float, text: str) -> None:
    assert iso8601_seconds(seconds) == text


def test_backoff_follows_knative_policies() -> None:
    exponential = DeliveryPolicy(retry=3, backoff_policy="exponential", backoff_delay_s=0.5, timeout_s=1)
    linear = DeliveryPolicy(retry=3, backoff_policy="linear", backoff_delay_s=0.5, timeout_s=1)
    assert [exponential.backoff_s(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert [linear.backoff_s(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]
    assert exponential.attempts == 4


def test_topic_is_read_back_from_the_cloudevent_source() -> None:
    assert topic_from_cloudevent_source("/apis/v1/namespaces/uc5/kafkasources/s-1#uc5.in") == "uc5.in"
    assert topic_from_cloudevent_source("/no/topic") is None
