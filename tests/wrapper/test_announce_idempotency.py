"""Exactly one downstream effect per upstream run, announced objects that never change, and S3 endpoints that cannot
give those guarantees refused at once (issue 17, items 4-6).

Real parts: tansu Kafka, moto S3 (behind a small real HTTP proxy where an S3 must misbehave), our inference server
(ssl-features -> classify, the workflow the demo runs), an ``eo-wrapper`` process for the downstream step. The test
plays the KafkaSource: each record on the upstream's Topics.out becomes the delivery the local event plane's rule
(``services/controller/event_plane/cloudevents.py``, modelled on EKB) makes of it, with the producer's id, source
and time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from confluent_kafka import Producer

from services.controller.event_plane.cloudevents import KafkaRecord, RecordMode, record_cloudevent
from services.core.kafka import producer_config
from services.wrapper import pipeline
from services.wrapper.inputs import S3Access, make_s3_client
from services.wrapper.notifications import KafkaPublisher
from services.wrapper.pipeline import Earlier
from services.wrapper.results import ANNOUNCED_SUFFIX, FAILED_SUFFIX, MANIFEST_SUFFIX
from services.wrapper.s3_capability import PROBE_FOLDER
from s3_proxy import DROP_IF_NONE_MATCH, FORWARD, Answer, LoseAnswer, S3Proxy
from test_service_http import get, post
from wrapper_input_data import sample_patch_names, sample_tar_gz
from wrapper_stack import (  # noqa: F401 - close_step_runtimes is an autouse fixture
    PROJECT_ROOT,
    InferenceServer,
    StepFixture,
    assert_no_secrets,
    close_step_runtimes,
    free_port,
    list_keys,
    object_bytes,
    read_records,
)

SSL_MODEL = "Bigearth-net-ssl-label"
CLASSIFY_MODEL = "Bigearth-net-linear-label"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log",
                              models=[SSL_MODEL, CLASSIFY_MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


def upstream(access: S3Access, kafka_broker: Any, tmp_path: Path) -> StepFixture:
    step = StepFixture(access, kafka_broker.bootstrap_servers, tmp_path / "store", "ssl-features")
    step.s3.put_object(Bucket=access.bucket_name, Key="in/one.tar.gz", Body=sample_tar_gz(sample_patch_names()[:1]))
    return step


def as_delivery(record: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """What the KafkaSource POSTs for a record, by the local event plane's rule (EKB's): a binary-mode CloudEvent
    record keeps the producer's id, source, type and time."""
    key, value, headers = record["raw"]
    event = record_cloudevent(KafkaRecord(record["topic"], record["partition"], record["offset"], value, key,
                                          tuple(headers)), "uc-test", "next-step-source")
    assert event.mode is RecordMode.BINARY
    return event.data, event.http_headers()


def deliver_downstream(server: InferenceServer, down: StepFixture, records: list[dict[str, Any]],
                       log_path: Path) -> list[dict[str, Any]]:
    """Each record, one after the other, to a real ``eo-wrapper`` process of the downstream task."""
    port = free_port()
    env = {**os.environ, "EOML_WRAPPER_TASK": down.task, "EOML_WRAPPER_INFERENCE_URL": server.grpc_url,
           "EOML_WRAPPER_STORE_ROOT": str(down.store_root), "EOML_WRAPPER_NAMESPACE": down.namespace,
           "EOML_WRAPPER_NOTIFY_TOPIC": down.notify_topic, "EOML_WRAPPER_LOG_FORMAT": "json"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.wrapper.cli", "--http-host", "127.0.0.1", "--http-port", str(port)],
            cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            try:
                if get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        answers = []
        for record in records:
            value, headers = as_delivery(record)
            status, body, _ = post(f"http://127.0.0.1:{port}/{down.config.config_name}", value, headers)
            assert status == 200, body
            answers.append(body)
        return answers
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def assert_one_downstream_run(server: InferenceServer, access: S3Access, up: StepFixture,
                              records: list[dict[str, Any]], tmp_path: Path) -> None:
    """Every copy of the upstream record is one downstream run: one result folder, one next-step message."""
    down = StepFixture(access, up.bootstrap_servers, tmp_path / "down-store", "classify")
    answers = deliver_downstream(server, down, records, tmp_path / "downstream-wrapper.log")
    assert [a["status"] for a in answers] == ["SUCCESS"] + ["DUPLICATE"] * (len(records) - 1), answers
    assert {a["folder"] for a in answers} == {answers[0]["folder"]}
    assert len(down.records([down.topic_out], timeout_s=3)) == 1
    assert [n["status"] for n in down.notifications(final=False)].count("START") == 1
    run_folders = {k.rsplit("/", 1)[0] for k in list_keys(down.s3, down.access.bucket_name, "result-feature2class/")
                   if k.endswith(MANIFEST_SUFFIX)}
    assert len(run_folders) == 1


def test_a_duplicate_next_step_record_is_one_run_downstream(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    up = upstream(s3_access, kafka_broker, tmp_path)
    outcome = up.run(up.runtime(server.grpc_url), "in")
    assert outcome.status == "SUCCESS", outcome.reason
    (record,) = up.records([up.topic_out], until=lambda r: len(r) >= 1)
    # The same record produced again (a producer retry, a re-announcement): same key, value and headers.
    key, value, headers = record["raw"]
    producer = Producer(producer_config(kafka_broker.bootstrap_servers))
    producer.produce(up.topic_out, key=key, value=value, headers=headers)
    assert producer.flush(15) == 0
    records = up.records([up.topic_out], until=lambda r: len(r) >= 2)
    assert len(records) == 2 and records[0]["raw"] == records[1]["raw"]

    assert_one_downstream_run(server, s3_access, up, records, tmp_path)


def test_marker_put_failing_after_the_produce_announces_the_same_event_again(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    failing = threading.Event()
    failing.set()

    def rule(method: str, path: str, headers: Any) -> str | Answer:
        if failing.is_set() and method == "PUT" and path.split("?")[0].endswith(ANNOUNCED_SUFFIX):
            return Answer(503, "SlowDown")
        return FORWARD

    proxy = S3Proxy(str(s3_access.endpoint_url), rule).start()
    try:
        up = upstream(s3_access.model_copy(update={"endpoint_url": proxy.url}), kafka_broker, tmp_path)
        runtime = up.runtime(server.grpc_url)
        first = up.run(runtime, "in", event_id="partition:0/offset:3")
        # Kafka acknowledged the next-step record, then the marker could not be written: the delivery is retried.
        assert first.status == "RETRY" and "announced.json" in first.reason
        failing.clear()
        again = up.run(runtime, "in", event_id="partition:0/offset:3")
        assert again.status == "SUCCESS" and again.resumed_announcement and again.run_folder == first.run_folder
        probes = [p for m, p, _ in proxy.seen if m == "PUT" and f"/{PROBE_FOLDER}/" in p]
    finally:
        proxy.stop()
    assert len(probes) == 2  # the bucket's conditional create was checked once for this process (two PUTs)

    records = up.records([up.topic_out], until=lambda r: len(r) >= 2)
    assert len(records) == 2
    assert records[0]["raw"] == records[1]["raw"]  # the redelivery's record is the same event: same ce_id
    assert records[0]["headers"]["ce_id"] == f"{first.run_folder.rsplit('/', 1)[1]}/{up.topic_out}"
    assert_one_downstream_run(server, s3_access, up, records, tmp_path)


def test_a_manifest_put_whose_answer_was_lost_is_still_this_runs_win(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    """S3 wrote the manifest but the answer was lost (a 500 after the write): the client's retry of the create-only
    PUT meets the run's own manifest (412). That is this run's win, not a lost race: announced, results kept."""
    lost = threading.Event()

    def rule(method: str, path: str, headers: Any) -> str | Answer | LoseAnswer:
        if method == "PUT" and path.split("?")[0].endswith(MANIFEST_SUFFIX) and not lost.is_set():
            lost.set()
            return LoseAnswer(500, "InternalError")
        return FORWARD

    proxy = S3Proxy(str(s3_access.endpoint_url), rule).start()
    try:
        up = upstream(s3_access.model_copy(update={"endpoint_url": proxy.url}), kafka_broker, tmp_path)
        meta = {"max_tokens": 5, "note": "see token=abc"}  # the workflow's own fields: passed on unchanged
        outcome = up.run(up.runtime(server.grpc_url), "in", meta=meta, event_id="partition:0/offset:9")
        manifest_puts = [p for m, p, _ in proxy.seen if m == "PUT" and p.split("?")[0].endswith(MANIFEST_SUFFIX)]
    finally:
        proxy.stop()
    assert lost.is_set() and len(manifest_puts) >= 2  # the write, then the client's retry of it
    assert outcome.status == "SUCCESS" and not outcome.resumed_announcement, outcome.reason
    direct = make_s3_client(s3_access)
    manifest = json.loads(object_bytes(direct, s3_access.bucket_name, outcome.run_folder + MANIFEST_SUFFIX))
    assert manifest["objects"] and all(
        object_bytes(direct, s3_access.bucket_name, o["key"]) for o in manifest["objects"])  # nothing discarded
    [record] = up.records([up.topic_out], until=lambda r: len(r) >= 1)
    assert record["value"]["meta_information"] == meta


@pytest.mark.parametrize("misbehaviour", ["ignores If-None-Match", "answers 501"])
def test_an_s3_without_conditional_create_is_a_permanent_configuration_error(
    misbehaviour: str, s3_access: S3Access, kafka_broker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def rule(method: str, path: str, headers: Any) -> str | Answer:
        if method == "PUT" and any(name.lower() == "if-none-match" for name in headers):
            return DROP_IF_NONE_MATCH if misbehaviour == "ignores If-None-Match" else Answer(501, "NotImplemented")
        return FORWARD

    proxy = S3Proxy(str(s3_access.endpoint_url), rule).start()
    try:
        step = upstream(s3_access.model_copy(update={"endpoint_url": proxy.url}), kafka_broker, tmp_path)
        # No inference server: the step fails before any model is needed.
        runtime = step.runtime("127.0.0.1:9")
        with caplog.at_level(logging.INFO):
            outcome = step.run(runtime, "in", event_id="partition:0/offset:1")
            again = step.run(runtime, "in", event_id="partition:0/offset:1")
    finally:
        proxy.stop()

    endpoint = proxy.url
    expected = "ignores conditional create" if misbehaviour == "ignores If-None-Match" else "does not implement"
    assert outcome.status == "CRITICAL" and "S3 configuration error" in outcome.reason, outcome.reason
    assert expected in outcome.reason and endpoint in outcome.reason
    assert (again.status, again.earlier) == ("DUPLICATE", "failed")  # on record once, never retried
    (dead,) = step.records([step.dlq_topic], timeout_s=3)
    assert endpoint in dead["value"]["reason"]
    notifications = step.notifications()
    assert [n["status"] for n in notifications] == ["CRITICAL"] and endpoint in notifications[0]["description"]
    assert any(r.levelno == logging.CRITICAL and endpoint in getattr(r, "reason", "") for r in caplog.records)
    assert_no_secrets(dead, notifications, outcome.reason, [r.getMessage() for r in caplog.records])
    # Nothing but the failed marker: no result, no manifest, no probe left behind (deleted after the check).
    assert list_keys(make_s3_client(s3_access), s3_access.bucket_name, "result-") == [outcome.run_folder + FAILED_SUFFIX]
    assert not step.records([step.topic_out], timeout_s=1)


def test_a_late_duplicate_run_never_writes_into_the_announced_folder(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    up = upstream(s3_access, kafka_broker, tmp_path)
    first = up.run(up.runtime(server.grpc_url), "in", event_id="partition:0/offset:5")
    assert first.status == "SUCCESS", first.reason
    before = {k: object_bytes(up.s3, s3_access.bucket_name, k)
              for k in list_keys(up.s3, s3_access.bucket_name, first.run_folder)}
    assert first.output_folder.startswith(first.run_folder + "/a-")

    # A second run of the same delivery that claimed before the first wrote its manifest (so it saw no marker), on
    # a revision with other output settings (quicklooks add objects) and a different outputs profile.
    monkeypatch.setattr(pipeline, "earlier_run", lambda *args: (Earlier.NOTHING, {}))
    late = up.run(up.runtime(server.grpc_url, quicklooks="always"), "in", event_id="partition:0/offset:5")

    assert (late.status, late.earlier, late.output_folder) == ("DUPLICATE", "announced", first.output_folder)
    assert late.objects and all(not o.key.startswith(first.output_folder + "/") for o in late.objects)
    assert any(o.key.endswith(".quicklook.png") for o in late.objects)
    after = {k: object_bytes(up.s3, s3_access.bucket_name, k)
             for k in list_keys(up.s3, s3_access.bucket_name, first.run_folder)}
    assert after == before  # same objects, same bytes; the late run's own attempt folder is gone too
    assert len(up.records([up.topic_out], timeout_s=3)) == 1


def test_publish_waits_for_its_own_record_only(kafka_broker: Any) -> None:
    """A publish reports its own record, while other threads keep the shared producer busy (a flush() would wait
    for their records too and time out although this record was stored)."""
    publisher = KafkaPublisher(timeout_s=3)
    bootstrap = kafka_broker.bootstrap_servers
    publisher.publish(bootstrap, "publish-own-warmup", {"warm": True})
    producer = publisher._producer(bootstrap)
    stop = threading.Event()
    backlog: list[int] = []

    def busy() -> None:  # another worker's stream of records on the same producer, never idle
        value = bytes(range(256)) * 16
        while not stop.is_set():
            try:
                producer.produce("publish-own-other", value=value)
            except BufferError:
                producer.poll(0.01)
            backlog.append(len(producer))

    other = threading.Thread(target=busy, daemon=True)
    other.start()
    try:
        time.sleep(0.5)
        positions = []
        for index in range(10):
            started = time.monotonic()
            positions.append(publisher.publish(bootstrap, "publish-own-mine", {"index": index}))
            assert time.monotonic() - started < 3
    finally:
        stop.set()
        other.join(10)
        publisher.close()
    assert max(backlog) > 0
    mine = read_records(bootstrap, ["publish-own-mine"], until=lambda r: len(r) >= 10)
    by_position = {(r["partition"], r["offset"]): r["value"]["index"] for r in mine}
    assert [by_position[(p.partition, p.offset)] for p in positions] == list(range(10))


def test_a_race_loser_announces_the_winners_manifest_when_the_winner_stopped(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    up = upstream(s3_access, kafka_broker, tmp_path)
    # The winner: its manifest is written, then Kafka is out of its reach (it stops before announcing).
    cut_off = up.runtime(server.grpc_url, bootstrap_servers=f"127.0.0.1:{free_port()}", kafka_timeout_s=2)
    winner = up.run(cut_off, "in", event_id="partition:0/offset:6")
    assert winner.status == "RETRY" and "Publishing the next step message" in winner.reason
    manifest = json.loads(object_bytes(up.s3, s3_access.bucket_name, winner.run_folder + MANIFEST_SUFFIX))

    # A concurrent run of the same delivery (it claimed before the winner's manifest existed) loses the manifest
    # race and, the winner's marker not coming within ANNOUNCE_WAIT_S, announces the winner's attempt itself.
    monkeypatch.setattr(pipeline, "earlier_run", lambda *args: (Earlier.NOTHING, {}))
    loser = up.run(up.runtime(server.grpc_url, announce_wait_s=0), "in", event_id="partition:0/offset:6")

    assert loser.status == "SUCCESS" and loser.resumed_announcement, loser.reason
    assert loser.output_folder == manifest["folder"]
    (record,) = up.records([up.topic_out], timeout_s=3)
    assert record["value"]["S3_bucket_desc"]["folder"] == manifest["folder"]
    assert record["headers"]["ce_id"] == f"{winner.run_folder.rsplit('/', 1)[1]}/{up.topic_out}"
    assert record["headers"]["ce_time"] == manifest["created"]
    # Under the run folder: the winner's attempt only (the loser deleted its own objects).
    stored = list_keys(up.s3, s3_access.bucket_name, winner.run_folder + "/")
    assert stored and all(key.startswith(manifest["folder"] + "/") for key in stored)
    assert sorted(o["key"] for o in [*manifest["objects"], *manifest["stac"]]) == sorted(stored)
