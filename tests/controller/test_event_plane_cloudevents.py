"""Records that are CloudEvents keep the producer's identity; plain records get their position (EKB
CloudEventDeserializer.java + InvalidCloudEventInterceptor.java), checked as a rule and through real tansu + HTTP."""

from __future__ import annotations

import base64
import json

from confluent_kafka import Producer

from controller_test_support import RecordingReceiver, unique, workflow_message
from services.controller.event_plane.cloudevents import (
    KafkaRecord,
    RecordMode,
    cloudevent_kafka_headers,
    record_cloudevent,
)
from services.controller.local_event_plane import LocalSourceDriver, ensure_topic
from services.controller.messages import parse_workflow_message
from services.controller.settings import ControllerSettings
from services.controller.wiring import kafka_source_name
from services.core.kafka import producer_config
from services.core.step_config import step_config_from_message

VALUE = b'{"previous_component_end":"True","S3_bucket_desc":{"folder":"input/1","filename":""}}'
PRODUCER_HEADERS = cloudevent_kafka_headers(
    id="run-7f3a/next", source="/eoml/wrapper/ssl-features", type="eu.eo4eu.eoml.step.done",
    time="2026-12-07T01:02:03.456Z", subject="wf-a/step-1", extensions={"eomlrun": "7f3a"})


def test_binary_mode_record_keeps_the_producers_attributes() -> None:
    record = KafkaRecord("t.in", 2, 41, VALUE, key=b"k", headers=(*PRODUCER_HEADERS, ("trace", b"x")),
                         timestamp_ms=1_700_000_000_000)
    event = record_cloudevent(record, "ns", "src")
    assert event.mode is RecordMode.BINARY
    headers = event.http_headers()
    assert (headers["ce-id"], headers["ce-source"], headers["ce-type"]) == \
        ("run-7f3a/next", "/eoml/wrapper/ssl-features", "eu.eo4eu.eoml.step.done")
    assert headers["ce-time"] == "2026-12-07T01:02:03.456Z" and headers["ce-subject"] == "wf-a/step-1"
    assert headers["ce-eomlrun"] == "7f3a" and headers["content-type"] == "application/json"
    assert event.data == VALUE
    assert "ce-kafkaheadertrace" not in headers  # only plain records get kafkaheader extensions


def test_structured_mode_record_is_unwrapped_to_its_data() -> None:
    envelope = {"specversion": "1.0", "id": "s-1", "source": "/producer", "type": "t.x", "subject": "sub",
                "datacontenttype": "application/json", "eomlrun": "r1", "data": {"n": 1}}
    record = KafkaRecord("t.in", 0, 5, json.dumps(envelope).encode(),
                         headers=(("content-type", b"application/cloudevents+json; charset=utf-8"),))
    event = record_cloudevent(record, "ns", "src")
    assert event.mode is RecordMode.STRUCTURED
    assert event.id == "s-1" and event.http_headers()["ce-eomlrun"] == "r1"
    assert json.loads(event.data) == {"n": 1}
    binary = {**envelope, "datacontenttype": "application/octet-stream"}
    del binary["data"]
    binary["data_base64"] = base64.b64encode(b"\x00\x01").decode()
    record = KafkaRecord("t.in", 0, 6, json.dumps(binary).encode(),
                         headers=(("content-type", b"application/cloudevents+json"),))
    assert record_cloudevent(record, "ns", "src").data == b"\x00\x01"


def test_plain_and_incomplete_records_get_their_position() -> None:
    plain = KafkaRecord("t.in", 1, 9, VALUE, key=b"k1", headers=(("Trace-ID", b"abc"),), timestamp_ms=0)
    event = record_cloudevent(plain, "ns", "src")
    headers = event.http_headers()
    assert event.mode is RecordMode.PLAIN
    assert headers["ce-id"] == "partition:1/offset:9" and headers["ce-subject"] == "partition:1#9"
    assert headers["ce-type"] == "dev.knative.kafka.event"
    assert headers["ce-source"] == "/apis/v1/namespaces/ns/kafkasources/src#t.in"
    assert headers["ce-kafkaheadertraceid"] == "abc" and headers["ce-key"] == "k1"
    # A binary record missing a required attribute (no ce_source) is not a CloudEvent: EKB treats it as plain.
    incomplete = tuple(h for h in PRODUCER_HEADERS if h[0] != "ce_source")
    assert record_cloudevent(KafkaRecord("t.in", 0, 3, VALUE, headers=incomplete), "ns", "src").id \
        == "partition:0/offset:3"
    # Structured content type with a value that is no CloudEvent: plain as well.
    broken = KafkaRecord("t.in", 0, 4, b"{not json", headers=(("content-type", b"application/cloudevents+json"),))
    assert record_cloudevent(broken, "ns", "src").mode is RecordMode.PLAIN


def test_the_event_plane_delivers_each_mode_with_its_identity(kafka_broker) -> None:
    receiver = RecordingReceiver().start()
    topic = unique("plane.identity")
    ensure_topic(kafka_broker.bootstrap_servers, topic)
    message = parse_workflow_message(workflow_message("wf-ce", topic, service="ssl-features", namespace="local"))
    step = step_config_from_message(message, kafka_broker.bootstrap_servers)[0]
    settings = ControllerSettings(bootstrap_servers=kafka_broker.bootstrap_servers,
                                  wrapper_urls={"ssl-features": receiver.url}, delivery_retry=0,
                                  delivery_backoff_delay_s=0.05, delivery_timeout_s=5, source_ordering="ordered")
    driver = LocalSourceDriver(settings)
    producer = Producer(producer_config(kafka_broker.bootstrap_servers))
    structured = {"specversion": "1.0", "id": "s-9", "source": "/producer", "type": "t.s", "data": {"n": 2}}
    try:
        driver.wire(step)
        producer.produce(topic, value=VALUE, headers=PRODUCER_HEADERS)
        producer.produce(topic, value=json.dumps(structured).encode(),
                         headers=[("content-type", b"application/cloudevents+json")])
        producer.produce(topic, value=VALUE, headers=[("trace", b"t")])
        assert producer.flush(30) == 0
        seen = receiver.wait_for(lambda s: len(s) >= 3)
    finally:
        driver.close()
        receiver.stop()
    by_id = {r.headers["ce-id"]: r for r in seen}
    assert set(by_id) == {"run-7f3a/next", "s-9", "partition:0/offset:2"}
    assert by_id["run-7f3a/next"].headers["ce-source"] == "/eoml/wrapper/ssl-features"
    assert by_id["run-7f3a/next"].body == VALUE
    assert json.loads(by_id["s-9"].body) == {"n": 2} and by_id["s-9"].headers["ce-type"] == "t.s"
    plain = by_id["partition:0/offset:2"]
    assert plain.headers["ce-type"] == "dev.knative.kafka.event"
    assert plain.headers["ce-source"].endswith(f"kafkasources/{kafka_source_name(topic)}#{topic}")
    assert "ce-time" in plain.headers
