"""Issue 17's matrix, Wrapper cases: a rollout mid-step, and a 50-record burst at capacity 8 with queue timeouts.

Real processes: each "pod" is the queue-proxy model (``services/local_platform/queue_proxy.py``: containerConcurrency
slots and a queue of 10 x CC, the revision timeout counted from arrival -> 504, the drain, SIGTERM after it and
SIGKILL at the grace period) with a real ``eo-wrapper`` behind it; our inference server, moto S3, tansu Kafka.

Records reach the pod as a KafkaSource delivers them: through the EKB dispatcher model
(``services/controller/event_plane/dispatcher.py``: ``ordering: unordered``, up to ``max.poll.records`` = 50 records
in flight, retries with ``backoffDelay x 2^n``, per-attempt timeout, the dead-letter sink ``<Topics.in>.dlq`` after
the last retry), consuming the step's topic from the earliest offset. Every attempt's answer is recorded on the way.

``pytest -s`` prints the figures (records, dead letters, duplicates, wall time) of each case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
from confluent_kafka import Producer

from services.controller.event_plane.delivery import DispatchTarget, http_post
from services.controller.event_plane.dispatcher import (
    DispatcherTuning,
    InitialOffset,
    Ordering,
    SourceSpec,
    StepDispatcher,
)
from services.controller.wiring import DeliveryPolicy, consumer_group, kafka_source_name
from services.core.kafka import producer_config
from services.local_platform.infra import free_ports
from services.local_platform.queue_proxy import POD_TERMINATED
from services.wrapper.inputs import S3Access
from services.wrapper.results import ANNOUNCED_SUFFIX, FAILED_SUFFIX
from test_delivery_faults import (  # noqa: F401 - fixtures: the module's inference server, the clean reference
    MODEL,
    PATIENT,
    SLOW_STEP,
    TASK,
    assert_complete,
    clean,
    make_step,
    next_step_messages,
    server,
    wait_until,
)
from wrapper_input_data import sample_patch_names, sample_tar_gz
from wrapper_stack import PROJECT_ROOT, InferenceServer, StepFixture, assert_no_secrets, list_keys, step_message

# The chart's relation (templates/wrappers.yaml): SHUTDOWN_TIMEOUT_S = timeoutSeconds - drain - margin, with the
# drain shortened from 30 s so that the test runs in seconds (the margin is the chart's minimum).
SHUTDOWN_MARGIN_S = 15


FAST_COMMITS = DispatcherTuning(auto_commit_interval_s=0.5, poll_timeout_s=0.1, dead_letter_write_timeout_s=5.0)


class RecordingPost:
    """The dispatcher's HTTP POST, recording every attempt's answer (status, or the error's name) and body by
    event id, as the pod's caller sees it."""

    def __init__(self) -> None:
        self.attempts: dict[str, list[int | str]] = defaultdict(list)
        self.bodies: dict[str, list[bytes]] = defaultdict(list)
        self._lock = threading.Lock()

    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
        event_id = headers.get("ce-id", "")
        try:
            status, answer = http_post(url, body, headers, timeout_s)
        except Exception as error:
            with self._lock:
                self.attempts[event_id].append(type(error).__name__)
            raise
        with self._lock:
            self.attempts[event_id].append(status)
            self.bodies[event_id].append(answer)
        return status, answer

    def final(self, event_id: str) -> dict[str, Any]:
        """The 2xx answer of an event (its last answer)."""
        return json.loads(self.bodies[event_id][-1])


def produce_steps(step: StepFixture, offsets: range, timestamp_ms: int) -> None:
    producer = Producer(producer_config(step.bootstrap_servers))
    for offset in offsets:
        producer.produce(step.topic_in, value=json.dumps(step_message("in", meta={"offset": offset})).encode(),
                         timestamp=timestamp_ms)
    assert producer.flush(30) == 0


def start_dispatcher(step: StepFixture, pod_url: str, post: RecordingPost, retry: int, backoff_delay_s: float,
                     attempt_timeout_s: float) -> StepDispatcher:
    """The step's KafkaSource (unordered, earliest, exponential backoff) delivering to the pod."""
    policy = DeliveryPolicy(retry=retry, backoff_policy="exponential", backoff_delay_s=backoff_delay_s,
                            timeout_s=attempt_timeout_s)
    group = consumer_group(step.workflow_name, step.topic_in)
    target = DispatchTarget(namespace=step.namespace, config_name=step.config.config_name,
                            workflow_name=step.workflow_name, topic_in=step.topic_in, consumer_group=group,
                            source_name=kafka_source_name(step.topic_in),
                            url=f"{pod_url}/{step.config.config_name}")
    spec = SourceSpec(consumer_group=group, initial_offset=InitialOffset.EARLIEST, ordering=Ordering.UNORDERED,
                      policy=policy)
    producer = Producer(producer_config(step.bootstrap_servers))
    return StepDispatcher(target, spec, step.bootstrap_servers, producer, post=post, tuning=FAST_COMMITS).start()


class Pod:
    """One Wrapper pod: the queue-proxy model process with ``eo-wrapper`` behind it, on a fixed port."""

    def __init__(self, step: StepFixture, inference_url: str, log_path: Path, port: int, *, workers: int,
                 timeout_s: float, drain_quiet_s: float, extra_env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self.timeout_s = timeout_s
        self.drain_quiet_s = drain_quiet_s
        self.workers = workers
        self.step = step
        self.inference_url = inference_url
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Pod":
        (app_port,) = free_ports(1)
        env = {
            **os.environ,
            "EOML_WRAPPER_TASK": TASK,
            "EOML_WRAPPER_HTTP_HOST": "127.0.0.1",
            "EOML_WRAPPER_HTTP_PORT": str(app_port),
            "EOML_WRAPPER_INFERENCE_URL": self.inference_url,
            "EOML_WRAPPER_STORE_ROOT": str(self.step.store_root),
            "EOML_WRAPPER_NAMESPACE": self.step.namespace,
            "EOML_WRAPPER_NOTIFY_TOPIC": self.step.notify_topic,
            "EOML_WRAPPER_PROGRESS_INTERVAL_S": "0",
            "EOML_WRAPPER_LOG_FORMAT": "json",
            "EOML_LOG_FORMAT": "json",
            "POD_NAME": f"wrapper-pod-{uuid.uuid4().hex[:6]}",
            # As the chart sets them from containerConcurrency and timeoutSeconds:
            "EOML_WRAPPER_WORKERS": str(self.workers),
            "EOML_WRAPPER_WORKER_WAIT_S": str(self.timeout_s),
            "EOML_WRAPPER_SHUTDOWN_TIMEOUT_S": str(self.timeout_s - self.drain_quiet_s - SHUTDOWN_MARGIN_S),
            **self.extra_env,
        }
        argv = [sys.executable, "-m", "services.local_platform.queue_proxy", "--port", str(self.port),
                "--app-port", str(app_port), "--container-concurrency", str(self.workers),
                "--timeout-s", str(self.timeout_s), "--drain-quiet-s", str(self.drain_quiet_s),
                "--", sys.executable, "-m", "services.wrapper.cli"]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"the pod did not become ready:\n{self.log_path.read_text()}")

    def delete(self) -> None:
        """As the kubelet deletes a pod: preStop (drain), SIGTERM, SIGKILL at the grace period."""
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)

    def wait_terminated(self, timeout_s: float) -> dict[str, Any]:
        assert self.process is not None
        self.process.wait(timeout=timeout_s)
        return next(line for line in reversed(self.log_lines()) if line.get("msg") == POD_TERMINATED)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text(errors="replace").splitlines()
                if line.startswith("{")]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log", models=[MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


def on_record(step: StepFixture) -> tuple[int, int, int]:
    """(dead-letter records, failed markers, CRITICAL notifications) of the step."""
    dead = len(step.records([step.dlq_topic], timeout_s=2))
    failed = len([k for k in list_keys(step.s3, step.access.bucket_name) if k.endswith(FAILED_SUFFIX)])
    critical = [n["status"] for n in step.notifications(final=False)].count("CRITICAL")
    return dead, failed, critical


def figures(case: str, **values: Any) -> None:
    print(f"\n[issue-17 matrix] {case}: " + ", ".join(f"{name}={value}" for name, value in values.items()))


# ---- rollout mid-step ---------------------------------------------------------------------------------------------

# The event time of the records (their Kafka timestamp, the CloudEvent time): the clean reference's.
EVENT_TIME_MS = int(datetime(2026, 7, 8, 9, 10, 11, tzinfo=timezone.utc).timestamp() * 1000)


@pytest.mark.slow
def test_rollout_mid_step_drain_sigterm_grace_shorter_than_the_step(
    clean: dict[str, bytes], server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path,
) -> None:
    started_at = time.monotonic()
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    (port,) = free_ports(1)
    timeout_s, drain_s = 20.0, 1.0  # grace = timeoutSeconds = 20 s, counted from before the 1 s drain
    slow = {f"EOML_WRAPPER_{name.upper()}": str(value) for name, value in {**SLOW_STEP, **PATIENT}.items()}

    def pod(name: str) -> Pod:
        return Pod(step, server.grpc_url, tmp_path / f"{name}.log", port, workers=1, timeout_s=timeout_s,
                   drain_quiet_s=drain_s, extra_env=slow)

    old, new = pod("old-pod").start(), pod("new-pod")
    post = RecordingPost()
    dispatcher: StepDispatcher | None = None
    assert server.process is not None
    frozen = False
    try:
        # The step cannot end within the grace period: the inference server is frozen (SIGSTOP) until the
        # Wrapper's SHUTDOWN_TIMEOUT_S has passed, so the step waits for it mid-way.
        server.process.send_signal(signal.SIGSTOP)
        frozen = True
        produce_steps(step, range(1), EVENT_TIME_MS)
        dispatcher = start_dispatcher(step, old.url, post, retry=8, backoff_delay_s=0.25,
                                      attempt_timeout_s=timeout_s + 10)
        wait_until(lambda: any(n["status"] == "START" for n in step.notifications(final=False)), 60, "START")
        old.delete()
        wait_until(lambda: any(line.get("msg", "").startswith("shutdown: steps still running")
                               for line in old.log_lines()), 60, "the Wrapper's shutdown timeout")
        server.process.send_signal(signal.SIGCONT)
        frozen = False
        report = old.wait_terminated(timeout_s + 10)
        new.start()  # the new revision's pod, on the same address (the old one is gone: connection refused)
        wait_until(lambda: dispatcher.stats.delivered + dispatcher.stats.dead_lettered >= 1, 120, "the delivery")
    finally:
        if frozen:
            server.process.send_signal(signal.SIGCONT)
        if dispatcher is not None:
            dispatcher.stop()
        old.stop()
        new.stop()
    wall_s = time.monotonic() - started_at
    assert (dispatcher.stats.delivered, dispatcher.stats.dead_lettered) == (1, 0)
    (event,) = post.attempts  # the record's CloudEvent id
    attempts = post.attempts[event]
    assert attempts[0] == 503 and attempts[-1] == 200, attempts
    final = post.final(event)
    assert b"stopping" in post.bodies[event][0]  # cut off by the stopping Wrapper, not failed
    assert report["sigterm_after_s"] >= drain_s and not report["killed"] and report["exit_code"] == 0, report
    assert report["exited_after_s"] < timeout_s  # the Wrapper left before the kubelet's SIGKILL
    old_lines = old.log_lines()
    assert [line.get("cut_off") for line in old_lines if line.get("msg") == "wrapper stopped"] == [1]
    assert not [line for line in old_lines if line.get("level") in ("ERROR", "CRITICAL")]
    assert final["status"] == "SUCCESS"
    assert_complete(step, final["folder"], clean)  # byte-identical to a clean run
    messages = next_step_messages(step)
    assert [m["S3_bucket_desc"]["folder"] for m in messages] == [final["folder"]]
    dead, failed, critical = on_record(step)
    assert (dead, failed, critical) == (0, 0, 0)
    assert_no_secrets(old.log_path.read_text(), new.log_path.read_text())
    figures("rollout mid-step", records=1, event=event, attempts=attempts, next_step_messages=len(messages),
            duplicates=len(messages) - 1, dead_letters=dead, failed_markers=failed, critical=critical,
            drain_s=report["drained_after_s"], sigterm_s=report["sigterm_after_s"],
            old_wrapper_exit_s=report["exited_after_s"], grace_s=timeout_s, wall_s=round(wall_s, 1))


# ---- 50-record burst at capacity 8 ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_fifty_record_burst_at_capacity_8_with_queue_timeouts_is_processed_once_each(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path,
) -> None:
    records = 50
    step = StepFixture(s3_access, kafka_broker.bootstrap_servers, tmp_path / "store", TASK)
    step.s3.put_object(Bucket=s3_access.bucket_name, Key="in/patches.tar.gz",
                       Body=sample_tar_gz(sample_patch_names()[:1]))
    (port,) = free_ports(1)
    # A short revision timeout: most of the 50 wait in queue-proxy longer than that (504) and are redelivered.
    timeout_s = 2.0
    pod = Pod(step, server.grpc_url, tmp_path / "pod.log", port, workers=8, timeout_s=timeout_s, drain_quiet_s=1.0,
              extra_env={"EOML_WRAPPER_SHUTDOWN_TIMEOUT_S": "30"}).start()
    post = RecordingPost()
    dispatcher: StepDispatcher | None = None
    produce_steps(step, range(records), int(time.time() * 1000))
    started_at = time.monotonic()
    try:
        dispatcher = start_dispatcher(step, pod.url, post, retry=8, backoff_delay_s=0.2,
                                      attempt_timeout_s=timeout_s + 5)
        wait_until(lambda: dispatcher.stats.delivered + dispatcher.stats.dead_lettered >= records, 300,
                   "every record delivered or dead-lettered")
        wall_s = time.monotonic() - started_at
        max_in_flight = dispatcher.stats.max_in_flight
        messages = [r["value"] for r in step.records(
            [step.topic_out], until=lambda r: len(r) >= records, timeout_s=60)]
        messages += [r["value"] for r in step.records([step.topic_out], timeout_s=3)][len(messages):]
        pod_lines = pod.log_lines()
    finally:
        if dispatcher is not None:
            dispatcher.stop()
        pod.stop()
    answers = Counter(str(a) for attempts in post.attempts.values() for a in attempts)
    wrapper_busy = sum(1 for bodies in post.bodies.values() for body in bodies if b'"wrapper busy' in body)
    folders = Counter(m["S3_bucket_desc"]["folder"] for m in messages)
    starts = [n for n in step.notifications(final=False) if n["status"] == "START"]
    orphaned = sum(1 for line in pod_lines if line.get("msg", "").startswith("caller gone: the run goes on"))
    dead, failed, critical = on_record(step)
    finals = Counter("duplicate" if body.get("duplicate") else body.get("status")
                     for body in (post.final(event) for event in post.attempts))

    assert (dispatcher.stats.delivered, dispatcher.stats.dead_lettered) == (records, 0)
    assert len(post.attempts) == records and sum(finals.values()) == records
    assert len(folders) == records and set(folders.values()) == {1}  # one next-step message per record
    for folder in folders:  # the announced folder is the run's winning attempt; the marker is the run folder's
        step.s3.head_object(Bucket=s3_access.bucket_name, Key=folder.rsplit("/", 1)[0] + ANNOUNCED_SUFFIX)
    assert len(starts) == records  # no record ran twice (a redelivery joins the running run or finds it done)
    assert (dead, failed, critical) == (0, 0, 0)
    assert wrapper_busy == 0  # no admitted request was refused by the Wrapper
    assert answers["504"] >= 1  # the burst did meet queue timeouts
    figures("50-record burst at capacity 8", records=records, next_step_messages=len(messages),
            duplicates=len(messages) - len(folders), runs_started=len(starts), dead_letters=dead,
            answers=dict(sorted(answers.items())), wrapper_busy_503=wrapper_busy, orphaned_runs=orphaned,
            final=dict(finals), dispatcher_max_in_flight=max_in_flight, revision_timeout_s=timeout_s,
            wall_s=round(wall_s, 1))
