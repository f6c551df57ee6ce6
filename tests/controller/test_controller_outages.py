"""The controller without loss windows (issue 17, item 8): Kubernetes API 409/429/5xx storms are retried (bounded)
against the FAKE API server, a message refused for good is kept on ``system.ML.dlq`` with its credentials removed
(real tansu), every dead-letter write is bounded, and ``consume`` mode survives being killed while messages are
published (real processes, real broker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from controller_test_support import (
    TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY,
    RecordingReceiver,
    read_topic,
    unique,
    wait_until,
    workflow_message,
)
from services.controller.api_retry import ApiRetryPolicy, RetryingApi
from services.controller.dead_letters import DeadLetterNotWritten, KafkaDeadLetterWriter
from services.controller.kubernetes_driver import KubernetesSourceDriver
from services.controller.notifications import NullNotifier
from services.controller.reconciler import FAILED, REJECTED, UNWIRED, WIRED, WorkflowController
from services.controller.settings import ControllerSettings
from services.controller.system_consumer import SystemTopicConsumer, attempt_bound_s, max_poll_interval_ms
from services.controller.wiring import DeliveryPolicy, consumer_group, kafka_source_name
from services.core.kafka import encode_json, ensure_topics, producer_config, publish_json
from services.core.step_config import LocalStepConfigStore, step_config_name
from services.core.step_config_k8s import KubernetesStepConfigStore
from services.local_platform.infra import free_port

SOURCES = "/kafkasources"


def retrying_controller(fake_api, notifier: NullNotifier | None = None, dead_letter_writer: Any = None,
                        system_topic: str = "system.ML", positions: Any = None) -> WorkflowController:
    """Built like ``cli.build_controller``: every API client behind the bounded retry (no real sleeping)."""
    from kubernetes import client

    api_client = client.ApiClient(client.Configuration(host=fake_api.url))
    no_wait = ApiRetryPolicy(attempts=6, backoff_s=0.5, request_timeout_s=10)
    core = RetryingApi(client.CoreV1Api(api_client), no_wait, sleep=lambda _s: None)
    custom = RetryingApi(client.CustomObjectsApi(api_client), no_wait, sleep=lambda _s: None)
    driver = KubernetesSourceDriver(custom, ControllerSettings(bootstrap_servers="kafka:9092"), sleep=lambda _s: None)
    return WorkflowController(KubernetesStepConfigStore(core, custom), driver, "kafka:9092", notifier=notifier,
                              dead_letter_writer=dead_letter_writer, system_topic=system_topic, positions=positions)


def test_a_kubernetes_409_storm_wires_the_step_once(fake_api) -> None:
    controller = retrying_controller(fake_api)
    message = encode_json(workflow_message("wf-storm", "storm.in", namespace="uc1"))
    # Creates racing a deletion (409 without an object), throttling (429) and an API server restarting (500, 503).
    fake_api.fail("POST", 409, times=4, path_contains=SOURCES)
    fake_api.fail("GET", 429, times=2)
    fake_api.fail("POST", 500, times=2, path_contains="/configmaps")
    result = controller.handle(message)
    assert (result.action, result.retryable) == (WIRED, False), result.reason
    (source,) = fake_api.objects("kafkasources", "uc1")
    assert source["metadata"]["name"] == kafka_source_name("storm.in")
    assert source["spec"]["consumerGroup"] == consumer_group("wf-storm", "storm.in")
    assert [c.config_name for c in controller.store.list("uc1")] == [step_config_name("storm.in")]
    assert len(fake_api.calls("POST", SOURCES)) == 5  # 4 refused, 1 created
    # A re-publish through stale resourceVersions (concurrent writers): replaced once, still one source.
    fake_api.fail("PUT", 409, times=3, path_contains=SOURCES)
    assert controller.handle(message).action == WIRED
    assert len(fake_api.objects("kafkasources", "uc1")) == 1
    assert len([c for c in fake_api.calls("PUT", SOURCES)]) == 4
    assert controller.workflow_status("wf-storm", live=False)["state"] == "running"
    # A stop while the API server restarts: the source and the configuration still go.
    fake_api.fail("DELETE", 503, times=2)
    stop = {"workflow_status": "stopping", "workflow_name": "wf-storm", "Topics": {"in": "storm.in"},
            "ML": {"Namespace": "uc1"}}
    assert controller.handle(encode_json(stop)).action == UNWIRED
    assert fake_api.objects("kafkasources", "uc1") == [] and controller.store.list("uc1") == []
    assert fake_api.fail_next == []


def test_kafka_failing_while_positions_are_kept_is_retried_not_dropped(fake_api) -> None:
    """The positions are read and committed through Kafka: Kafka away then is temporary (the sender retries the
    message), never a refused message (dead letter, 200, the publish lost)."""
    from services.controller.consumer_positions import ConsumerPositions

    controller = retrying_controller(fake_api, positions=ConsumerPositions(f"127.0.0.1:{free_port()}", timeout_s=1.0))
    result = controller.handle(encode_json(workflow_message("wf-pos", "pos.in", namespace="uc1")))
    assert result.retryable and not result.dead_lettered and result.action != REJECTED, result
    assert "consumer positions" in result.reason
    assert fake_api.objects("kafkasources", "uc1") == []  # not wired before its positions are known


def test_a_storm_beyond_the_budget_is_retried_by_the_sender_not_dropped(fake_api) -> None:
    controller = retrying_controller(fake_api)
    message = encode_json(workflow_message("wf-long-storm", "long-storm.in", namespace="uc1"))
    fake_api.fail("POST", 409, times=100, path_contains=SOURCES)
    result = controller.handle(message)
    # Bounded: answered 503 (serve) / retried with backoff (consume), never "valid" for a step not wired.
    assert (result.action, result.retryable) == (FAILED, True)
    assert "409" in result.reason and fake_api.objects("kafkasources", "uc1") == []
    fake_api.fail_next.clear()
    assert controller.handle(message).action == WIRED  # the sender's retry, once the storm is over


def test_a_permanent_403_is_one_dead_letter_without_credentials_and_critical(fake_api, kafka_broker) -> None:
    system_topic = unique("system.ML")
    ensure_topics(kafka_broker.bootstrap_servers, [f"{system_topic}.dlq"])
    notifier = NullNotifier()
    writer = KafkaDeadLetterWriter(kafka_broker.bootstrap_servers, timeout_s=10)
    controller = retrying_controller(fake_api, notifier, writer, system_topic)
    fake_api.fail("POST", 403, times=1, path_contains=SOURCES)
    message = workflow_message("wf-forbidden", "forbidden.in", service="cfactor", namespace="uc1")
    result = controller.handle(encode_json(message), event_id="partition:0/offset:41")
    assert (result.action, result.retryable, result.dead_lettered) == (FAILED, False, True)
    assert result.answer == {"msg": "There was a problem ignoring"}
    (notification,) = notifier.sent
    assert (notification.status, notification.workflow_name) == ("CRITICAL", "wf-forbidden")
    assert "403" in notification.description
    records = read_topic(kafka_broker.bootstrap_servers, f"{system_topic}.dlq", 2, timeout_s=8)
    assert len(records) == 1
    raw = records[0].value()
    assert TEST_SECRET_ACCESS_KEY.encode() not in raw and TEST_ACCESS_KEY_ID.encode() not in raw
    record = json.loads(raw)
    assert record["workflow_name"] == "wf-forbidden" and record["event_id"] == "partition:0/offset:41"
    assert record["topic_in"] == system_topic and "403" in record["reason"]
    # Replayable once the cause is fixed: the message itself, credentials removed.
    assert record["input_message"]["Topics"] == message["Topics"]
    assert record["input_message"]["ML"] == message["ML"]


def test_an_invalid_message_is_kept_too(kafka_broker, fake_api) -> None:
    system_topic = unique("system.ML")
    ensure_topics(kafka_broker.bootstrap_servers, [f"{system_topic}.dlq"])
    writer = KafkaDeadLetterWriter(kafka_broker.bootstrap_servers, timeout_s=10)
    controller = retrying_controller(fake_api, dead_letter_writer=writer, system_topic=system_topic)
    broken = workflow_message("wf-broken", "broken.in")
    broken["ML"]["Namespace"] = "Not A Namespace"
    result = controller.handle(encode_json(broken))
    assert (result.action, result.dead_lettered) == (REJECTED, True)
    (record,) = read_topic(kafka_broker.bootstrap_servers, f"{system_topic}.dlq", 1, timeout_s=15)
    assert TEST_SECRET_ACCESS_KEY.encode() not in record.value()
    assert json.loads(record.value())["workflow_name"] == "wf-broken"


def test_the_dead_letter_write_is_bounded_when_the_broker_is_unreachable(fake_api) -> None:
    writer = KafkaDeadLetterWriter(f"127.0.0.1:{free_port()}", timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(DeadLetterNotWritten):
        writer("system.ML.dlq", b"{}", [])
    assert time.monotonic() - started < 3.0
    # A refused message whose dead letter cannot be written is not answered "handled": the sender retries it.
    controller = retrying_controller(fake_api, dead_letter_writer=writer)
    started = time.monotonic()
    result = controller.handle(b"{not json")
    assert (result.action, result.retryable, result.dead_lettered) == (REJECTED, True, False)
    assert "dead-letter write failed" in result.reason and time.monotonic() - started < 3.0


def test_consume_mode_polls_within_its_worst_case_handling(kafka_broker) -> None:
    settings = ControllerSettings(bootstrap_servers=kafka_broker.bootstrap_servers)
    policy = DeliveryPolicy.from_settings(settings)
    consumer = SystemTopicConsumer(None, settings.bootstrap_servers, "system.ML", "g", policy,  # type: ignore[arg-type]
                                   max_poll_interval_ms=max_poll_interval_ms(settings))
    configured = consumer.consumer_settings()["max.poll.interval.ms"]
    backoffs_s = sum(policy.backoff_s(n) for n in range(1, policy.attempts))
    assert backoffs_s == 510  # 8 retries from 1 s: waits 2 ... 256 s
    # Above the retries (which alone exceed librdkafka's default 300 s) plus every attempt at its bound.
    assert configured > 300_000
    assert configured >= (backoffs_s + policy.attempts * attempt_bound_s(settings)
                          + settings.dead_letter_write_timeout_s) * 1000
    # Settings librdkafka could not honour (over 24 h) are refused (``eo-controller consume`` exits 2).
    with pytest.raises(ValueError, match="max.poll.interval.ms"):
        max_poll_interval_ms(ControllerSettings(delivery_retry=30, delivery_backoff_delay_s=60))


def _wired_lines(log_text: str) -> list[str]:
    return [json.loads(line).get("workflow", "") for line in log_text.splitlines()
            if line.startswith("{") and '"workflow step wired"' in line]


def test_consume_mode_killed_while_messages_are_published_loses_nothing(kafka_broker, tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    system_topic, group = unique("system.ML"), unique("eoml-controller")
    receiver = RecordingReceiver().start()
    store_root = tmp_path / "store"
    env = {**os.environ, "EOML_CONTROLLER_HTTP_HOST": "127.0.0.1", "EOML_CONTROLLER_HTTP_PORT": "0",
           "EOML_CONTROLLER_BOOTSTRAP_SERVERS": bootstrap, "EOML_CONTROLLER_SYSTEM_TOPIC": system_topic,
           "EOML_CONTROLLER_CONSUMER_GROUP": group, "EOML_CONTROLLER_SOURCE_DRIVER": "local",
           "EOML_CONTROLLER_STORE": "local", "EOML_CONTROLLER_STORE_ROOT": str(store_root),
           "EOML_CONTROLLER_WRAPPER_URLS": json.dumps({"ssl-features": receiver.url}),
           "EOML_CONTROLLER_NOTIFY_TOPIC": unique("monitoring.notify"), "EOML_LOG_FORMAT": "json"}
    ensure_topics(bootstrap, [system_topic, f"{system_topic}.dlq"])
    store = LocalStepConfigStore(store_root)
    producer = Producer(producer_config(bootstrap))
    topics = [unique(f"outage{n}.in") for n in range(10)]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def start(log_path: Path) -> subprocess.Popen:
        with open(log_path, "wb") as log_file:
            return subprocess.Popen([sys.executable, "-m", "services.controller.cli", "consume"], env=env,
                                    stdout=log_file, stderr=subprocess.STDOUT)

    def publish(n: int) -> None:
        publish_json(producer, system_topic, workflow_message(f"wf-outage-{n}", topics[n], namespace="local"))

    def step(n: int) -> None:
        publish_json(producer, topics[n], {"previous_component_end": "True",
                                           "S3_bucket_desc": {"folder": f"outage/{n}/", "filename": ""}})

    started = time.monotonic()
    first = start(logs[0])
    second = None
    try:
        for n in range(5):
            publish(n)
        wait_until(lambda: len(store.list("local")) == 5, timeout_s=60)
        wait_until(lambda: _committed(bootstrap, group, system_topic) == 5, timeout_s=30)
        first.send_signal(signal.SIGKILL)  # no goodbye: no commit, no leave-group, no dispatcher shutdown
        first.wait(10)
        killed_at = time.monotonic()
        for n in range(5, 10):  # published while the controller is down
            publish(n)
        for n in range(5):  # steps of already wired workflows arrive meanwhile too
            step(n)
        # Down for longer than its consumer session (6 s): the broker has given its partition up.
        time.sleep(max(0.0, 7.0 - (time.monotonic() - killed_at)))
        down_s = time.monotonic() - killed_at
        second = start(logs[1])
        wait_until(lambda: len(store.list("local")) == 10, timeout_s=60)
        for n in range(5, 10):
            step(n)
        receiver.wait_for(lambda seen: len(seen) >= 10, timeout_s=60)
        wait_until(lambda: _committed(bootstrap, group, system_topic) == 10, timeout_s=30)
        time.sleep(1.0)  # a duplicate delivery or re-wiring would show by now
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
        receiver.stop()
    wired = _wired_lines(logs[0].read_text()) + _wired_lines(logs[1].read_text())
    deliveries = sorted(r.json["S3_bucket_desc"]["folder"] for r in receiver.snapshot())
    dead_letters = read_topic(bootstrap, f"{system_topic}.dlq", 1, timeout_s=3)
    print(f"\nconsume mode killed: 10 workflows (5 published while down {down_s:.1f} s), "
          f"wired {len(wired)} times, {len(deliveries)} step deliveries, {len(dead_letters)} dead letters, "
          f"wall {time.monotonic() - started:.1f} s")
    assert sorted(wired) == sorted(f"wf-outage-{n}" for n in range(10))  # each exactly once
    assert deliveries == sorted(f"outage/{n}/" for n in range(10))
    assert dead_letters == []


def _committed(bootstrap: str, group: str, topic: str) -> int:
    from services.controller.consumer_positions import ConsumerPositions

    return sum(ConsumerPositions(bootstrap, timeout_s=5).committed(group, topic).values())
