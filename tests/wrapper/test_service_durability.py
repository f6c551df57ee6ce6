"""The acceptance journal: an accepted step survives a Wrapper that is killed while it runs or waits.

Real parts only: the ``eo-wrapper`` process (SIGKILLed and restarted), the inference server on the exported
``uc5-cfactor`` model, moto S3 and tansu Kafka. A step is kept "running" without timing tricks by letting the
inference server be down: the step retries UNAVAILABLE (within a long bound) until the test starts the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from services.wrapper.acceptance_journal import (
    ENTRY_SUFFIX,
    AcceptanceJournal,
    JournalEntry,
    JournalOwner,
    entry_id,
    entry_key,
    kept_attributes,
    step_journal_prefix,
)
from services.wrapper.inputs import S3Access
from services.wrapper.pipeline import StepOutcome, StepRuntime
from services.wrapper.results import MANIFEST_SUFFIX, output_folder
from services.wrapper.service import WrapperService, parse_delivery, parse_step_message
from test_service_http import RunningApp, get, post
from wrapper_input_data import sample_patch_names, sample_tar_gz
from wrapper_stack import (
    PROJECT_ROOT,
    InferenceServer,
    StepFixture,
    assert_no_secrets,
    free_port,
    list_keys,
    object_bytes,
    step_message,
)

TASK = "uc5-cfactor"
MODEL = "uc5-cfactor"
RESULT_PREFIX = "result-uc5-cfactor"
JOURNAL_PREFIX = "_eoml/wrapper-journal"
EVENT_TIME = "2026-07-08T09:10:11Z"
# The inference server may be down for a while: steps wait for it instead of failing.
PATIENT_INFERENCE = {"infer_max_attempts": 100, "infer_retry_max_s": 120, "infer_backoff_initial_s": 0.2,
                     "infer_backoff_max_s": 0.5}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log", models=[MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


class Outcomes:
    """Step outcomes as a service reports them (after the step's journal entry was dealt with)."""

    def __init__(self) -> None:
        self.items: list[StepOutcome] = []
        self._changed = threading.Condition()

    def __call__(self, outcome: StepOutcome) -> None:
        with self._changed:
            self.items.append(outcome)
            self._changed.notify_all()

    def wait(self, count: int, timeout_s: float = 120) -> list[StepOutcome]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.items) >= count, timeout_s), \
                f"{len(self.items)} of {count} step outcomes after {timeout_s} s"
            return list(self.items)


def make_step(s3_access: S3Access, kafka_broker: Any, store_root: Path, inputs: int = 1) -> StepFixture:
    step = StepFixture(s3_access, kafka_broker.bootstrap_servers, store_root, TASK)
    for n, patch in enumerate(sample_patch_names()[20: 20 + inputs]):
        step.s3.put_object(Bucket=s3_access.bucket_name, Key=f"in/part-{n}/patch.tar.gz", Body=sample_tar_gz([patch]))
    return step


def make_service(step: StepFixture, inference_url: str, pod: str, outcomes: Callable[[StepOutcome], None] | None = None,
                 **overrides: Any) -> WrapperService:
    settings = step.settings(inference_url, pod_name=pod, service_name=step.config.service_name, **overrides)
    return WrapperService(StepRuntime.from_settings(settings), step.store, on_outcome=outcomes)


def headers_for(step: StepFixture, offset: int) -> dict[str, str]:
    """What a Knative KafkaSource sends (binary mode), plus a Kafka header that the journal must not keep."""
    return {
        "Content-Type": "application/json",
        "ce-id": f"partition:0/offset:{offset}",
        "ce-source": f"/apis/v1/namespaces/{step.namespace}/kafkasources/src#{step.topic_in}",
        "ce-type": "dev.knative.kafka.event",
        "ce-specversion": "1.0",
        "ce-subject": f"partition:0#{offset}",
        "ce-time": EVENT_TIME,
        "ce-kafkaheaderauthorization": "Bearer not-for-the-journal",
    }


def deliver(service: WrapperService, step: StepFixture, offset: int, folder: str, meta: dict[str, Any]) -> str:
    """A delivery through the same plain functions the HTTP shell calls; the acceptance status."""
    delivery = parse_delivery(headers_for(step, offset), json.dumps(step_message(folder, meta=meta)).encode())
    message, raw = parse_step_message(delivery.body)
    return service.accept(step.config.config_name, delivery, message, raw).status


def journal_keys(step: StepFixture) -> list[str]:
    return list_keys(step.s3, step.access.bucket_name, step_journal_prefix(JOURNAL_PREFIX, step.config.config_name))


def read_entry(step: StepFixture, key: str) -> JournalEntry:
    return JournalEntry.decode(object_bytes(step.s3, step.access.bucket_name, key))


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def assert_one_complete_result(step: StepFixture, folder: str) -> dict[str, Any]:
    """One output folder for the input, its manifest listing exactly the objects that are there."""
    result = output_folder(RESULT_PREFIX, folder)
    manifest = json.loads(object_bytes(step.s3, step.access.bucket_name, result + MANIFEST_SUFFIX))
    stored = sorted(list_keys(step.s3, step.access.bucket_name, result + "/"))
    assert sorted(o["key"] for o in manifest["objects"]) == stored and stored
    assert manifest["created"] == "2026-07-08T09:10:11+00:00"  # the event's time, kept by the journal
    return manifest


# ---- plain functions --------------------------------------------------------------------------------------------


def test_entry_ids_identify_an_event_and_keep_only_what_a_step_needs() -> None:
    attributes = {"id": "partition:0/offset:7", "source": "/src#t", "time": EVENT_TIME, "type": "t",
                  "kafkaheaderauthorization": "Bearer x", "stepconfig": "json-config-x"}
    assert entry_id(attributes) == entry_id(dict(attributes))
    assert entry_id(attributes) != entry_id({**attributes, "time": "2026-07-08T09:10:12Z"})  # a re-created topic
    assert entry_id(attributes) != entry_id({**attributes, "source": "/other#t"})
    assert entry_id({}) != entry_id({})  # no id: never a duplicate
    assert kept_attributes(attributes) == {"id": "partition:0/offset:7", "source": "/src#t", "time": EVENT_TIME,
                                           "type": "t"}
    key = entry_key(JOURNAL_PREFIX, "json-config-x", entry_id(attributes))
    assert key.startswith("_eoml/wrapper-journal/json-config-x/") and key.endswith(ENTRY_SUFFIX)


def test_accepted_delivery_is_journalled_until_its_step_ends(
    s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path)
    # The inference server is down at first: the step waits in its retries while its entry is read.
    server = InferenceServer(tmp_path / "server.log", models=[MODEL])
    outcomes = Outcomes()
    service = make_service(step, server.grpc_url, "pod-a", outcomes, **PATIENT_INFERENCE)
    meta = {"request": "journalled", "nested": {"k": [1, 2]}}
    try:
        assert deliver(service, step, 1, "in/part-0", meta) == "accepted"
        (key,) = journal_keys(step)  # written before ``accept`` returned, that is before any 202
        stored = object_bytes(step.s3, step.access.bucket_name, key)
        server.start()
        (outcome,) = outcomes.wait(1)
    finally:
        service.shutdown(timeout_s=30)
        server.stop()
    entry = JournalEntry.decode(stored)
    assert key.endswith(ENTRY_SUFFIX)
    assert entry.config_name == step.config.config_name and entry.task == TASK and entry.attempt == 1
    assert entry.event == {"id": "partition:0/offset:1", "source": headers_for(step, 1)["ce-source"],
                           "type": "dev.knative.kafka.event", "time": EVENT_TIME, "subject": "partition:0#1",
                           "specversion": "1.0"}
    assert entry.message == step_message("in/part-0", meta=meta)
    assert entry.owner.pod == "pod-a"
    assert b"Bearer" not in stored  # Kafka headers are not kept
    assert_no_secrets(stored.decode())
    # Removed once the step had ended (after the announcement).
    assert outcome.status == "SUCCESS", outcome.reason
    assert journal_keys(step) == []
    assert_one_complete_result(step, "in/part-0")
    (announced,) = step.records([step.topic_out], until=lambda r: len(r) >= 1)
    assert announced["value"]["meta_information"] == meta


def test_journal_write_failure_is_503_and_the_wrapper_keeps_serving(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    good = make_step(s3_access, kafka_broker, tmp_path)
    gone = S3Access(bucket_name=f"no-such-bucket-{uuid.uuid4().hex[:8]}", aws_access_key_id=s3_access.aws_access_key_id,
                    aws_secret_access_key=s3_access.aws_secret_access_key, endpoint_url=s3_access.endpoint_url,
                    max_attempts=1)
    bad = StepFixture(gone, kafka_broker.bootstrap_servers, tmp_path, TASK)
    running = RunningApp(make_service(good, server.grpc_url, "pod-a"))
    body = json.dumps(step_message("in/part-0")).encode()
    try:
        status, answer, headers = post(f"{running.url}/{bad.config.config_name}", body, headers_for(bad, 3))
        assert status == 503 and headers["Retry-After"] == "5"
        assert "could not be recorded" in answer["error"]
        assert_no_secrets(answer)
        assert running.service.state()["active"] == 0  # nothing was queued
        assert get(f"{running.url}/healthz")[0] == 200
        assert post(f"{running.url}/{good.config.config_name}", body, headers_for(good, 3))[0] == 202
        (announced,) = good.records([good.topic_out], until=lambda r: len(r) >= 1, timeout_s=60)
    finally:
        running.stop()
    assert announced["value"]["S3_bucket_desc"]["folder"] == output_folder(RESULT_PREFIX, "in/part-0")


def test_a_journalled_event_is_a_duplicate_until_its_lease_passes_then_a_sweep_runs_it_once(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path)
    # What a Wrapper on another pod left when it died right after journalling the delivery.
    lease_s = 5.0
    dead = AcceptanceJournal(JOURNAL_PREFIX, JournalOwner.for_this_process("pod-dead"), lease_s=lease_s)
    headers = headers_for(step, 4)
    raw = step_message("in/part-0", meta={"request": "left by a dead pod"})
    delivery = parse_delivery(headers, json.dumps(raw).encode())
    dead.record(step.s3, step.access.bucket_name,
                dead.new_entry(step.config.config_name, TASK, delivery.attributes, raw))
    outcomes = Outcomes()
    service = make_service(step, server.grpc_url, "pod-live", outcomes, journal_lease_s=lease_s)
    try:
        # The source redelivers the same record: journalled already, so not run a second time here.
        assert deliver(service, step, 4, "in/part-0", raw["meta_information"]) == "duplicate"
        # The entry's owner may still be alive until the lease has passed without a renewal.
        assert service.sweep().resumed == 0
        wait_until(lambda: service.sweep().resumed == 1, 30, "the lease to pass and a sweep to take the entry")
        (outcome,) = outcomes.wait(1)
        assert service.sweep().resumed == 0
    finally:
        service.shutdown(timeout_s=30)
    assert outcome.status == "SUCCESS", outcome.reason
    assert journal_keys(step) == []
    assert_one_complete_result(step, "in/part-0")
    announced = step.records([step.topic_out], until=lambda r: len(r) >= 1)
    assert [r["value"]["meta_information"] for r in announced] == [{"request": "left by a dead pod"}]
    starts = [n["description"] for n in step.notifications() if n["status"] == "START"]
    assert len(starts) == 1 and "attempt 2: resumed after its Wrapper stopped" in starts[0]


def test_a_live_wrapper_renews_its_entries_so_no_other_wrapper_takes_them(
    s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path)
    lease_s = 3.0
    outcomes = Outcomes()
    # No inference server: the step keeps retrying for longer than two leases.
    owner = make_service(step, f"127.0.0.1:{free_port()}", "pod-a", outcomes, journal_lease_s=lease_s,
                         infer_max_attempts=100, infer_retry_max_s=4 * lease_s, infer_backoff_initial_s=0.2,
                         infer_backoff_max_s=0.5)
    other = make_service(step, f"127.0.0.1:{free_port()}", "pod-b", journal_lease_s=lease_s)
    try:
        owner.start_journal_keeping()
        assert deliver(owner, step, 5, "in/part-0", {"request": "renewed"}) == "accepted"
        (key,) = journal_keys(step)
        time.sleep(2.5 * lease_s)  # more than two leases: only renewals keep the entry fresh
        assert other.sweep().resumed == 0
        entry = read_entry(step, key)
        (outcome,) = outcomes.wait(1)
    finally:
        owner.shutdown(timeout_s=30)
        other.shutdown(timeout_s=30)
    assert entry.owner.pod == "pod-a" and entry.attempt == 1
    # The step ended (inference unavailable beyond its bound) with its failure on record: the entry is gone.
    assert outcome.status == "CRITICAL" and outcome.dead_letter_delivered
    assert journal_keys(step) == []


def test_a_step_that_keeps_killing_its_wrapper_is_dead_lettered_not_retried(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path)
    max_attempts = 3
    # An earlier process of this same pod (a container restarted after an OOM kill) was on its last attempt.
    earlier = AcceptanceJournal(JOURNAL_PREFIX, JournalOwner.for_this_process("pod-a"), lease_s=120)
    raw = step_message("in/part-0", meta={"request": "poison"})
    delivery = parse_delivery(headers_for(step, 6), json.dumps(raw).encode())
    entry = earlier.new_entry(step.config.config_name, TASK, delivery.attributes, raw)
    earlier.record(step.s3, step.access.bucket_name, entry.model_copy(update={"attempt": max_attempts}))
    outcomes = Outcomes()
    service = make_service(step, server.grpc_url, "pod-a", outcomes, journal_max_attempts=max_attempts)
    try:
        report = service.sweep()
    finally:
        service.shutdown(timeout_s=30)
    assert (report.resumed, report.given_up) == (0, 1)
    assert outcomes.items == []  # never run again
    assert journal_keys(step) == []
    (dead,) = step.records([step.dlq_topic], until=lambda r: len(r) >= 1)
    assert dead["value"]["reason"].startswith(f"Gave up after {max_attempts} attempts")
    assert dead["value"]["input_message"] == raw and dead["value"]["event_id"] == "partition:0/offset:6"
    assert [n["status"] for n in step.notifications()] == ["CRITICAL"]
    assert not step.records([step.topic_out], timeout_s=2)


def test_a_failure_that_cannot_be_put_on_record_keeps_its_entry_for_a_retry(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path)
    lease_s = 2.0
    failed = Outcomes()
    # Kafka unreachable (so no dead-letter record) and the inference server too (so the step fails).
    cut_off = make_service(step, f"127.0.0.1:{free_port()}", "pod-a", failed, journal_lease_s=lease_s,
                           bootstrap_servers=f"127.0.0.1:{free_port()}", kafka_timeout_s=1, infer_max_attempts=1)
    try:
        assert deliver(cut_off, step, 7, "in/part-0", {"request": "retried"}) == "accepted"
        (outcome,) = failed.wait(1)
    finally:
        cut_off.shutdown(timeout_s=30)
    assert outcome.status == "CRITICAL" and not outcome.dead_letter_delivered
    assert len(journal_keys(step)) == 1

    succeeded = Outcomes()
    healthy = make_service(step, server.grpc_url, "pod-b", succeeded, journal_lease_s=lease_s)
    try:
        wait_until(lambda: healthy.sweep().resumed == 1, 30, "the lease to pass and a sweep to take the entry")
        (retried,) = succeeded.wait(1)
    finally:
        healthy.shutdown(timeout_s=30)
    assert retried.status == "SUCCESS", retried.reason
    assert journal_keys(step) == []
    assert_one_complete_result(step, "in/part-0")


# ---- the eo-wrapper process, killed -----------------------------------------------------------------------------


class WrapperProcess:
    """``eo-wrapper`` for one step's task on a fixed port, started and SIGKILLed like a pod's container."""

    def __init__(self, step: StepFixture, inference_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "EOML_WRAPPER_TASK": TASK,
            "EOML_WRAPPER_HTTP_HOST": "127.0.0.1",
            "EOML_WRAPPER_HTTP_PORT": str(self.port),
            "EOML_WRAPPER_INFERENCE_URL": inference_url,
            "EOML_WRAPPER_STORE_ROOT": str(step.store_root),
            "EOML_WRAPPER_NAMESPACE": step.namespace,
            "EOML_WRAPPER_NOTIFY_TOPIC": step.notify_topic,
            "EOML_WRAPPER_SERVICE_NAME": step.config.service_name,
            "EOML_WRAPPER_WORKERS": "1",
            "EOML_WRAPPER_PROGRESS_INTERVAL_S": "0",
            "EOML_WRAPPER_LOG_FORMAT": "json",
            # Long: only "an earlier process of this pod" can make the restarted Wrapper take the entries over.
            "EOML_WRAPPER_JOURNAL_LEASE_S": "600",
            "POD_NAME": f"wrapper-durability-{uuid.uuid4().hex[:6]}",
            **{f"EOML_WRAPPER_{name.upper()}": str(value) for name, value in PATIENT_INFERENCE.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen([sys.executable, "-m", "services.wrapper.cli"], cwd=PROJECT_ROOT,
                                            env=self.env, stdout=log_file, stderr=subprocess.STDOUT)

        def live() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log_path.read_text()
            try:
                return get(f"{self.url}/healthz")[0] == 200
            except OSError:
                return False

        wait_until(live, 60, "the Wrapper to listen")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


def test_wrapper_killed_mid_step_loses_no_accepted_step_and_duplicates_no_output(
    s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    inputs = 3
    step = make_step(s3_access, kafka_broker, tmp_path, inputs=inputs)
    # The inference server is down at first: the first step hangs in its retries, the others wait in the queue.
    server = InferenceServer(tmp_path / "server.log", models=[MODEL])
    wrapper = WrapperProcess(step, server.grpc_url, tmp_path / "wrapper.log")
    folders = [f"in/part-{n}" for n in range(inputs)]
    try:
        wrapper.start()
        for n, folder in enumerate(folders):
            status, body, _ = post(f"{wrapper.url}/{step.config.config_name}",
                                   json.dumps(step_message(folder, meta={"part": n})).encode(), headers_for(step, n))
            assert (status, body.get("duplicate")) == (202, None), body
        starts = step.records([step.notify_topic], until=lambda r: any(x["value"]["status"] == "START" for x in r),
                              timeout_s=60)
        assert [n["value"]["status"] for n in starts] == ["START"]  # the first step runs, none has ended
        assert len(journal_keys(step)) == inputs

        wrapper.kill()  # SIGKILL: no goodbye, the three deliveries were answered 202 (their offsets committed)
        server.start()
        wrapper.start()  # the same pod's container, restarted

        def all_ended() -> bool:
            return journal_keys(step) == []

        wait_until(all_ended, 240, "every accepted step to end")
        finals = step.records([step.topic_out, step.dlq_topic], timeout_s=30)
        notifications = [n["value"] for n in step.records([step.notify_topic], timeout_s=30)]
        assert wrapper.stop() == 0
    finally:
        if wrapper.process is not None and wrapper.process.poll() is None:
            wrapper.process.kill()
        server.stop()

    assert [r for r in finals if r["topic"] == step.dlq_topic] == []
    announced = [r["value"] for r in finals if r["topic"] == step.topic_out]
    # Every input exactly once, with its own result folder, complete.
    assert sorted(m["meta_information"]["part"] for m in announced) == list(range(inputs))
    assert sorted(m["S3_bucket_desc"]["folder"] for m in announced) == sorted(
        output_folder(RESULT_PREFIX, folder) for folder in folders)
    for folder in folders:
        assert_one_complete_result(step, folder)
    manifests = [k for k in list_keys(step.s3, step.access.bucket_name, RESULT_PREFIX + "/")
                 if k.endswith(MANIFEST_SUFFIX)]
    assert len(manifests) == inputs
    statuses = [n["status"] for n in notifications]
    assert statuses.count("SUCCESS") == inputs and "CRITICAL" not in statuses
    resumed = [line for line in wrapper.log_lines() if line["msg"] == "accepted step resumed from the journal"]
    assert sorted(line["event_id"] for line in resumed) == [f"partition:0/offset:{n}" for n in range(inputs)]
    assert_no_secrets(wrapper.log_path.read_text())
