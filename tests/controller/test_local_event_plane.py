"""The local event plane against a real broker (tansu) and a real recording HTTP receiver on loopback."""

from __future__ import annotations

import json
import time
from typing import Iterator

import pytest
from confluent_kafka import Producer

from controller_test_support import RecordingReceiver, read_topic, unique, wait_until, workflow_message
from services.controller.local_event_plane import LocalSourceDriver, ensure_topic
from services.controller.messages import parse_workflow_message
from services.controller.settings import ControllerSettings
from services.controller.wiring import StepRejected, kafka_source_name
from services.core.kafka import producer_config, publish_json
from services.core.step_config import StepConfig, step_config_from_message


def step_message(n: int, **extra: object) -> dict:
    return {"previous_component_end": "True", "S3_bucket_desc": {"folder": f"input/{n}", "filename": ""},
            "meta_information": {"n": n, **extra}}


@pytest.fixture
def receiver() -> Iterator[RecordingReceiver]:
    recording = RecordingReceiver().start()
    yield recording
    recording.stop()


@pytest.fixture
def producer(kafka_broker) -> Producer:
    return Producer(producer_config(kafka_broker.bootstrap_servers))


def new_topic(kafka_broker, prefix: str) -> str:
    """A fresh topic with one partition (created up front: a topic auto-created by the first write gets the
    broker's default partition count, and these tests look at offsets of one partition)."""
    topic = unique(prefix)
    ensure_topic(kafka_broker.bootstrap_servers, topic)
    return topic


def make_step(kafka_broker, topic: str, workflow: str = "wf-local", service: str = "ssl-features") -> StepConfig:
    message = parse_workflow_message(workflow_message(workflow, topic, service=service, namespace="local"))
    return step_config_from_message(message, kafka_broker.bootstrap_servers)[0]


def make_driver(kafka_broker, receiver: RecordingReceiver, retry: int = 2,
                ordering: str = "ordered") -> LocalSourceDriver:
    """A driver whose sources are ``ordering`` (these tests look at the order of deliveries of one partition)."""
    settings = ControllerSettings(bootstrap_servers=kafka_broker.bootstrap_servers,
                                  wrapper_urls={"ssl-features": receiver.url}, delivery_retry=retry,
                                  delivery_backoff_delay_s=0.05, delivery_timeout_s=5, source_ordering=ordering)
    return LocalSourceDriver(settings)


def test_records_arrive_as_knative_binary_cloudevents(kafka_broker, receiver, producer) -> None:
    topic = new_topic(kafka_broker, "plane.ce")
    step = make_step(kafka_broker, topic)
    driver = make_driver(kafka_broker, receiver)
    try:
        driver.wire(step)
        publish_json(producer, topic, step_message(1), headers={"trace-ID": "abc-123"})
        (request,) = receiver.wait_for(lambda seen: len(seen) >= 1)
    finally:
        driver.close()
    assert request.path == f"/{step.config_name}"
    headers = request.headers
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-type"] == "dev.knative.kafka.event"
    assert headers["ce-id"] == "partition:0/offset:0"
    assert headers["ce-subject"] == "partition:0#0"
    assert headers["ce-source"] == f"/apis/v1/namespaces/local/kafkasources/{kafka_source_name(topic)}#{topic}"
    assert headers["ce-kafkaheadertraceid"] == "abc-123"
    assert request.json == step_message(1)


def test_non_2xx_is_retried_then_the_next_record_follows(kafka_broker, producer) -> None:
    # The first record fails twice (503, 500), then succeeds; the second record is delivered after it, in order.
    def responder(request, index: int) -> int:
        return (503, 500)[index] if index < 2 else 202

    receiver = RecordingReceiver(responder=responder).start()
    topic = new_topic(kafka_broker, "plane.retry")
    driver = make_driver(kafka_broker, receiver, retry=3)
    try:
        driver.wire(make_step(kafka_broker, topic))
        publish_json(producer, topic, step_message(1))
        publish_json(producer, topic, step_message(2))
        seen = receiver.wait_for(lambda s: len(s) >= 4)
        described = driver.describe(make_step(kafka_broker, topic))
    finally:
        driver.close()
        receiver.stop()
    assert [r.headers["ce-id"] for r in seen[:4]] == ["partition:0/offset:0"] * 3 + ["partition:0/offset:1"]
    assert [r.status for r in seen[:4]] == [503, 500, 202, 202]
    assert described["delivered"] == 2 and described["dead_lettered"] == 0 and described["failed_attempts"] == 2


def test_poison_record_goes_to_the_dead_letter_topic_and_the_next_is_delivered(kafka_broker, producer) -> None:
    receiver = RecordingReceiver(responder=lambda req, _n: 500 if req.json["meta_information"]["n"] == 1 else 202)
    receiver.start()
    topic = new_topic(kafka_broker, "plane.dlq")
    driver = make_driver(kafka_broker, receiver, retry=2)
    try:
        driver.wire(make_step(kafka_broker, topic))
        publish_json(producer, topic, step_message(1))
        publish_json(producer, topic, step_message(2))
        seen = receiver.wait_for(lambda s: any(r.json["meta_information"]["n"] == 2 for r in s))
        (dead,) = read_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", 1)
    finally:
        driver.close()
        receiver.stop()
    poison_attempts = [r for r in seen if r.json["meta_information"]["n"] == 1]
    assert len(poison_attempts) == 3  # 1 + retry 2: bounded
    record = json.loads(dead.value())
    assert record["input_message"] == step_message(1)
    assert record["topic_in"] == topic and record["event_id"] == "partition:0/offset:0"
    assert record["delivery"] == {"attempts": 3, "http_status": 500}
    assert "HTTP 500" in record["reason"]
    headers = dict(dead.headers())
    assert headers["knativeerrorcode"] == b"500"


def test_unreachable_wrapper_counts_as_failed_attempts(kafka_broker, producer) -> None:
    from services.local_platform.infra import free_port

    topic = new_topic(kafka_broker, "plane.down")
    settings = ControllerSettings(bootstrap_servers=kafka_broker.bootstrap_servers, delivery_retry=1,
                                  delivery_backoff_delay_s=0.05, delivery_timeout_s=2, source_ordering="ordered",
                                  wrapper_urls={"ssl-features": f"http://127.0.0.1:{free_port()}"})
    driver = LocalSourceDriver(settings)
    try:
        driver.wire(make_step(kafka_broker, topic))
        publish_json(producer, topic, step_message(7))
        (dead,) = read_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", 1)
    finally:
        driver.close()
    record = json.loads(dead.value())
    assert record["delivery"]["http_status"] is None and "ConnectionRefusedError" in record["reason"]


def test_offset_is_committed_only_after_a_2xx(kafka_broker, producer) -> None:
    # The controller stops (close: the sources and their consumer groups stay) and starts again; unwire would
    # delete the group (test_event_plane_dispatch.py).
    # Phase 1: the Wrapper keeps failing and the controller stops while the record is being retried.
    failing = RecordingReceiver(responder=lambda _r, _n: 503).start()
    topic = new_topic(kafka_broker, "plane.commit")
    step = make_step(kafka_broker, topic)
    driver = make_driver(kafka_broker, failing, retry=30)
    try:
        driver.wire(step)
        publish_json(producer, topic, step_message(1))
        failing.wait_for(lambda s: len(s) >= 2)
    finally:
        driver.close()
        failing.stop()
    # Phase 2: wired again (same consumer group): the unacknowledged record comes again, and is acknowledged.
    healthy = RecordingReceiver().start()
    driver = make_driver(kafka_broker, healthy)
    try:
        driver.wire(step)
        first = healthy.wait_for(lambda s: len(s) >= 1)[0]
        assert first.headers["ce-id"] == "partition:0/offset:0"
        wait_until(lambda: driver.describe(step).get("delivered") == 1)
    finally:
        driver.close()
    # Phase 3: after a 2xx the offset is committed: a new record is the next thing delivered, not the old one.
    driver = make_driver(kafka_broker, healthy)
    try:
        publish_json(producer, topic, step_message(2))
        driver.wire(step)
        healthy.wait_for(lambda s: len(s) >= 2)
        time.sleep(1.0)  # a wrongly uncommitted offset 0 would come again meanwhile
        seen = healthy.snapshot()
    finally:
        driver.close()
        healthy.stop()
    assert [r.headers["ce-id"] for r in seen] == ["partition:0/offset:0", "partition:0/offset:1"]


def test_republishing_an_unchanged_step_keeps_its_dispatcher(kafka_broker, receiver) -> None:
    driver = make_driver(kafka_broker, receiver)
    step = make_step(kafka_broker, unique("plane.same"))
    try:
        driver.wire(step)
        first = driver._dispatchers[(step.namespace, step.config_name)]
        driver.wire(step)
        assert driver._dispatchers[(step.namespace, step.config_name)] is first
        assert driver.unwire(step, step.namespace, step.topic_in) is True
        assert not first.running
        assert driver.unwire(step, step.namespace, step.topic_in) is False
    finally:
        driver.close()


def test_unknown_service_is_rejected_before_anything_starts(kafka_broker, receiver) -> None:
    driver = make_driver(kafka_broker, receiver)
    with pytest.raises(StepRejected, match="no Wrapper for ML.ServiceName 'cfactor'"):
        driver.check(make_step(kafka_broker, unique("plane.unknown"), service="cfactor"))


def test_a_refused_event_is_dead_lettered_without_retries(kafka_broker, producer) -> None:
    # 400: the Wrapper says the event itself is wrong; retrying cannot help (Knative does not retry it either).
    receiver = RecordingReceiver(responder=lambda req, _n: 400 if req.json["meta_information"]["n"] == 1 else 202)
    receiver.start()
    topic = new_topic(kafka_broker, "plane.refused")
    driver = make_driver(kafka_broker, receiver, retry=5)
    try:
        driver.wire(make_step(kafka_broker, topic))
        publish_json(producer, topic, step_message(1))
        publish_json(producer, topic, step_message(2))
        seen = receiver.wait_for(lambda s: any(r.json["meta_information"]["n"] == 2 for r in s))
        (dead,) = read_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", 1)
    finally:
        driver.close()
        receiver.stop()
    assert [r.json["meta_information"]["n"] for r in seen] == [1, 2]
    assert json.loads(dead.value())["delivery"] == {"attempts": 1, "http_status": 400}


def test_a_changed_consumer_group_stops_the_old_dispatcher_before_rewiring(kafka_broker, receiver) -> None:
    driver = make_driver(kafka_broker, receiver)
    topic = new_topic(kafka_broker, "plane.renamed")
    old, renamed = make_step(kafka_broker, topic, workflow="wf-old"), make_step(kafka_broker, topic, workflow="wf-new")
    try:
        driver.wire(old)
        first = driver._dispatchers[(old.namespace, old.config_name)]
        assert driver.release_conflicting(old) is False  # same step: keeps running
        assert driver.release_conflicting(renamed) is True
        assert not first.running and (old.namespace, old.config_name) not in driver._dispatchers
        driver.wire(renamed)
        assert driver._dispatchers[(renamed.namespace, renamed.config_name)].target.consumer_group \
            != first.target.consumer_group
    finally:
        driver.close()


def test_dead_letter_topic_is_created_when_the_dispatcher_starts(kafka_broker, receiver) -> None:
    from confluent_kafka.admin import AdminClient

    from services.core.kafka import admin_config

    driver = make_driver(kafka_broker, receiver)
    topic = unique("plane.dlqtopic")
    step = make_step(kafka_broker, topic)
    try:
        driver.wire(step)
        admin = AdminClient(admin_config(kafka_broker.bootstrap_servers))
        wait_until(lambda: f"{topic}.dlq" in admin.list_topics(timeout=10).topics, timeout_s=30)
    finally:
        driver.close()

