"""The controller in local mode (no Knative): it consumes system.ML itself, stores step configurations in a
directory and runs the local event plane. Real broker, real HTTP receiver standing in for the Wrapper."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from confluent_kafka import Producer

from controller_test_support import (
    TEST_SECRET_ACCESS_KEY,
    RecordingReceiver,
    read_topic,
    unique,
    wait_until,
    workflow_message,
)
from services.controller.local_event_plane import LocalSourceDriver
from services.controller.notifications import KafkaNotifier
from services.controller.reconciler import WorkflowController
from services.controller.settings import ControllerSettings
from services.controller.system_consumer import SystemTopicConsumer
from services.controller.wiring import DeliveryPolicy
from services.core.kafka import admin_config, encode_json, ensure_topics, producer_config, publish_json
from services.core.step_config import LocalStepConfigStore, step_config_name


@pytest.fixture
def receiver() -> Iterator[RecordingReceiver]:
    recording = RecordingReceiver().start()
    yield recording
    recording.stop()


def local_controller(kafka_broker, receiver: RecordingReceiver, root: Path, notify_topic: str = "",
                     store: LocalStepConfigStore | None = None) -> tuple[WorkflowController, ControllerSettings]:
    settings = ControllerSettings(bootstrap_servers=kafka_broker.bootstrap_servers, source_driver="local",
                                  store="local", store_root=str(root), wrapper_urls={"ssl-features": receiver.url},
                                  delivery_backoff_delay_s=0.05, delivery_retry=2)
    notifier = KafkaNotifier(kafka_broker.bootstrap_servers, notify_topic) if notify_topic else None
    controller = WorkflowController(store or LocalStepConfigStore(root), LocalSourceDriver(settings),
                                    kafka_broker.bootstrap_servers, notifier=notifier, create_topics=ensure_topics)
    return controller, settings


def topics_of(kafka_broker) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient(admin_config(kafka_broker.bootstrap_servers)).list_topics(timeout=10).topics)


def step_message(folder: str) -> dict:
    return {"previous_component_end": "True", "S3_bucket_desc": {"folder": folder, "filename": ""},
            "meta_information": {"from": "test"}}


def test_consume_mode_wires_delivers_and_stops(kafka_broker, receiver, tmp_path: Path) -> None:
    controller, settings = local_controller(kafka_broker, receiver, tmp_path / "store")
    system_topic = unique("system.ML")
    consumer = SystemTopicConsumer(controller, kafka_broker.bootstrap_servers, system_topic, unique("controller"),
                                   DeliveryPolicy.from_settings(settings)).start()
    producer = Producer(producer_config(kafka_broker.bootstrap_servers))
    topic_in = unique("wf.local.in")
    config_name = step_config_name(topic_in)
    store = LocalStepConfigStore(tmp_path / "store")
    try:
        # A malformed record first: it must not stop the consumer.
        producer.produce(system_topic, value=b"{definitely not json")
        publish_json(producer, system_topic, workflow_message("wf-local", topic_in, namespace="local"))
        wait_until(lambda: any(c.config_name == config_name for c in store.list("local")), timeout_s=60)
        config, credentials = store.get("local", config_name)
        assert credentials.aws_secret_access_key.get_secret_value() == TEST_SECRET_ACCESS_KEY
        assert TEST_SECRET_ACCESS_KEY not in (tmp_path / "store" / "local" / f"{config_name}.json").read_text()

        publish_json(producer, topic_in, step_message("patches/"))
        (delivered,) = receiver.wait_for(lambda seen: len(seen) >= 1)
        assert delivered.path == f"/{config_name}" and delivered.json == step_message("patches/")
        assert controller.workflow_status("wf-local")["steps"][0]["live"]["delivered"] == 1

        stop = {"workflow_status": "stopping", "workflow_name": "wf-local", "Topics": {"in": topic_in},
                "ML": {"Namespace": "local"}}
        publish_json(producer, system_topic, stop)
        wait_until(lambda: store.list("local") == [], timeout_s=60)
        assert controller.workflow_status("wf-local", live=False)["state"] == "stopped"
        assert not controller.driver._dispatchers  # type: ignore[attr-defined]
        # handled counts after the commit, which follows the store update the wait above saw
        wait_until(lambda: consumer.handled == 3, timeout_s=30)
    finally:
        consumer.stop()
        controller.driver.close()


def test_restarted_controller_resumes_dispatching_from_the_store(kafka_broker, receiver, tmp_path: Path) -> None:
    producer = Producer(producer_config(kafka_broker.bootstrap_servers))
    topic_in = unique("wf.resume.in")
    first, _ = local_controller(kafka_broker, receiver, tmp_path / "store")
    try:
        assert first.handle(encode_json(workflow_message("wf-resume", topic_in, namespace="local"))).action == "wired"
        publish_json(producer, topic_in, step_message("one/"))
        receiver.wait_for(lambda seen: len(seen) >= 1)
    finally:
        first.driver.close()  # the controller process ends; the store and the group's offsets remain
    publish_json(producer, topic_in, step_message("two/"))
    second, _ = local_controller(kafka_broker, receiver, tmp_path / "store")
    try:
        assert second.resume() == 1
        seen = receiver.wait_for(lambda s: len(s) >= 2)
    finally:
        second.driver.close()
    # Nothing lost and nothing replayed: the first record was committed before the restart.
    assert [json.loads(r.body)["S3_bucket_desc"]["folder"] for r in seen] == ["one/", "two/"]


def test_unknown_wrapper_is_rejected_and_nothing_is_stored(kafka_broker, receiver, tmp_path: Path) -> None:
    controller, _ = local_controller(kafka_broker, receiver, tmp_path / "store")
    try:
        result = controller.handle(encode_json(workflow_message("wf-x", unique("x.in"), service="cfactor",
                                                                namespace="local")))
    finally:
        controller.driver.close()
    assert (result.action, result.answer) == ("rejected", {"msg": "There was a problem ignoring"})
    assert "no Wrapper for ML.ServiceName 'cfactor'" in result.reason
    assert LocalStepConfigStore(tmp_path / "store").list() == []
    assert controller.workflow_status("wf-x", live=False)["state"] == "failed"


def test_failures_go_to_monitoring_notify_and_dead_letter_topics_exist_before_any_delivery(
        kafka_broker, receiver, tmp_path: Path) -> None:
    notify_topic = unique("monitoring.notify")
    ensure_topics(kafka_broker.bootstrap_servers, [notify_topic])
    controller, _ = local_controller(kafka_broker, receiver, tmp_path / "store", notify_topic=notify_topic)
    topic_in = unique("wf.dlq.in")
    try:
        assert controller.handle(encode_json(workflow_message("wf-ok", topic_in, namespace="local"))).action == "wired"
        # Created by an admin call when the step was wired, not by a broker's auto-creation on a first write.
        assert f"{topic_in}.dlq" in topics_of(kafka_broker)
        refused = controller.handle(encode_json(workflow_message("wf-refused", unique("x.in"), service="cfactor",
                                                                 namespace="local")))
        assert refused.action == "rejected"
        (record,) = read_topic(kafka_broker.bootstrap_servers, notify_topic, 1)
    finally:
        controller.driver.close()
    notification = json.loads(record.value())
    assert set(notification) == {"component_name", "workflow_name", "status", "description", "timestamp",
                                 "optional", "overwrite"}
    assert (notification["status"], notification["workflow_name"]) == ("CRITICAL", "wf-refused")
    assert "no Wrapper for ML.ServiceName 'cfactor'" in notification["description"]
    assert TEST_SECRET_ACCESS_KEY not in record.value().decode()


class UnreachableStore(LocalStepConfigStore):
    """The local store, with writes failing as an unreachable API server's would (a temporary failure)."""

    def put(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionError("store unreachable")


def test_consume_mode_dead_letters_a_message_it_gave_up_on(kafka_broker, receiver, tmp_path: Path) -> None:
    notify_topic = unique("monitoring.notify")
    system_topic = unique("system.ML")
    ensure_topics(kafka_broker.bootstrap_servers, [notify_topic, system_topic, f"{system_topic}.dlq"])
    controller, settings = local_controller(kafka_broker, receiver, tmp_path / "store", notify_topic=notify_topic,
                                            store=UnreachableStore(tmp_path / "store"))
    producer = Producer(producer_config(kafka_broker.bootstrap_servers))

    def write(topic: str, value: bytes, headers: list) -> None:
        producer.produce(topic, value=value, headers=headers)
        assert producer.flush(10) == 0

    consumer = SystemTopicConsumer(controller, kafka_broker.bootstrap_servers, system_topic, unique("controller"),
                                   DeliveryPolicy.from_settings(settings), dead_letter_writer=write).start()
    try:
        publish_json(producer, system_topic, workflow_message("wf-given-up", unique("g.in"), namespace="local"))
        (dead,) = read_topic(kafka_broker.bootstrap_servers, f"{system_topic}.dlq", 1)
        notifications = [json.loads(r.value()) for r in read_topic(kafka_broker.bootstrap_servers, notify_topic, 4)]
    finally:
        consumer.stop()
        controller.driver.close()
    record = json.loads(dead.value())
    assert record["input_message"]["workflow_name"] == "wf-given-up"
    assert record["input_message"]["S3_bucket"]["aws_secret_access_key"] == "***"  # redacted
    assert "3 attempt(s)" in record["reason"] and "store unreachable" in record["reason"]
    # One WARNING per failed attempt (the message is retried), then CRITICAL once it is given up.
    assert [n["status"] for n in notifications] == ["WARNING", "WARNING", "WARNING", "CRITICAL"]
    assert all(n["workflow_name"] == "wf-given-up" for n in notifications)
    assert TEST_SECRET_ACCESS_KEY not in dead.value().decode() + json.dumps(notifications)
