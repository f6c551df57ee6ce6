"""Issue 17's matrix, Wrapper cases: a rollout mid-step, and a 50-record burst at capacity 8 with queue timeouts.

Real processes: each "pod" is the queue-proxy model (``services/local_platform/queue_proxy.py``: containerConcurrency
slots and a queue of 10 x CC, the revision timeout counted from arrival -> 504, the drain, SIGTERM after it and
SIGKILL at the grace period) with a real ``eo-wrapper`` behind it; our inference server, moto S3, tansu Kafka.

The test plays the KafkaSource dispatcher as the delivery spec says (EKB ``WebClientCloudEventSender``): an attempt
with a per-attempt timeout; 5xx, 404 and connection errors are retried, waiting ``backoffDelay x 2^n`` before
retry n; after ``retry`` retries the record goes to the dead-letter sink (counted here). The burst is 50 concurrent
deliveries of 50 records, as an unordered KafkaSource keeps up to 50 records in flight (``max.poll.records``);
the unordered EKB dispatcher model is not used here (not in the local event plane yet).

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

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
    headers_for,
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


@dataclass(frozen=True)
class DeliverySpec:
    """A KafkaSource's ``spec.delivery``: retries, exponential backoff, per-attempt timeout."""

    retry: int
    backoff_delay_s: float
    timeout_s: float

    def backoff_s(self, retry_number: int) -> float:
        return self.backoff_delay_s * 2 ** retry_number  # retry n waits delay x 2^n (the first: 2 x delay)


@dataclass
class Delivery:
    """One record's delivery: every attempt's answer (status, or the error's name) and how it ended."""

    offset: int
    attempts: list[int | str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    final: dict[str, Any] | None = None  # the 2xx body
    dead_lettered: bool = False


def dispatch(url: str, step: StepFixture, offset: int, spec: DeliverySpec) -> Delivery:
    body = json.dumps(step_message("in", meta={"offset": offset})).encode()
    delivery = Delivery(offset)
    for retry_number in range(spec.retry + 1):
        if retry_number:
            time.sleep(spec.backoff_s(retry_number))
        request = urllib.request.Request(f"{url}/{step.config.config_name}", data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers_for(step, offset)})
        try:
            with urllib.request.urlopen(request, timeout=spec.timeout_s) as response:
                delivery.attempts.append(response.status)
                delivery.final = json.loads(response.read())
                return delivery
        except urllib.error.HTTPError as error:
            delivery.attempts.append(error.code)
            delivery.bodies.append(error.read().decode(errors="replace"))
            if 400 <= error.code < 500 and error.code not in (404, 408, 409, 429):
                break
        except (urllib.error.URLError, ConnectionError, OSError) as error:
            delivery.attempts.append(type(error).__name__)
    delivery.dead_lettered = True
    return delivery


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
    spec = DeliverySpec(retry=8, backoff_delay_s=0.25, timeout_s=timeout_s + 10)
    result: list[Delivery] = []
    dispatcher = threading.Thread(target=lambda: result.append(dispatch(old.url, step, 21, spec)), daemon=True)
    assert server.process is not None
    frozen = False
    try:
        # The step cannot end within the grace period: the inference server is frozen (SIGSTOP) until the
        # Wrapper's SHUTDOWN_TIMEOUT_S has passed, so the step waits for it mid-way.
        server.process.send_signal(signal.SIGSTOP)
        frozen = True
        dispatcher.start()
        wait_until(lambda: any(n["status"] == "START" for n in step.notifications(final=False)), 60, "START")
        old.delete()
        wait_until(lambda: any(line.get("msg", "").startswith("shutdown: steps still running")
                               for line in old.log_lines()), 60, "the Wrapper's shutdown timeout")
        server.process.send_signal(signal.SIGCONT)
        frozen = False
        report = old.wait_terminated(timeout_s + 10)
        new.start()  # the new revision's pod, on the same address (the old one is gone: connection refused)
        dispatcher.join(120)
    finally:
        if frozen:
            server.process.send_signal(signal.SIGCONT)
        old.stop()
        new.stop()
    (delivery,) = result
    wall_s = time.monotonic() - started_at

    assert not delivery.dead_lettered and delivery.final is not None, delivery
    assert delivery.attempts[0] == 503 and delivery.attempts[-1] == 200, delivery.attempts
    assert "stopping" in delivery.bodies[0]  # cut off by the stopping Wrapper, not failed
    assert report["sigterm_after_s"] >= drain_s and not report["killed"] and report["exit_code"] == 0, report
    assert report["exited_after_s"] < timeout_s  # the Wrapper left before the kubelet's SIGKILL
    old_lines = old.log_lines()
    assert [line.get("cut_off") for line in old_lines if line.get("msg") == "wrapper stopped"] == [1]
    assert not [line for line in old_lines if line.get("level") in ("ERROR", "CRITICAL")]
    assert delivery.final["status"] == "SUCCESS"
    assert_complete(step, delivery.final["folder"], clean)  # byte-identical to a clean run
    messages = next_step_messages(step)
    assert [m["S3_bucket_desc"]["folder"] for m in messages] == [delivery.final["folder"]]
    dead, failed, critical = on_record(step)
    assert (dead, failed, critical) == (0, 0, 0)
    assert_no_secrets(old.log_path.read_text(), new.log_path.read_text())
    figures("rollout mid-step", records=1, attempts=delivery.attempts, next_step_messages=len(messages),
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
    spec = DeliverySpec(retry=8, backoff_delay_s=0.2, timeout_s=timeout_s + 5)
    deliveries: list[Delivery | None] = [None] * records
    started_at = time.monotonic()
    try:
        def run(index: int) -> None:
            deliveries[index] = dispatch(pod.url, step, 1000 + index, spec)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(records)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        wall_s = time.monotonic() - started_at
        messages = [r["value"] for r in step.records(
            [step.topic_out], until=lambda r: len(r) >= records, timeout_s=60)]
        messages += [r["value"] for r in step.records([step.topic_out], timeout_s=3)][len(messages):]
        pod_lines = pod.log_lines()
    finally:
        pod.stop()
    done = [d for d in deliveries if d is not None]
    assert len(done) == records
    answers = Counter(str(a) for d in done for a in d.attempts)
    wrapper_busy = sum(1 for d in done for body in d.bodies if '"wrapper busy' in body)
    folders = Counter(m["S3_bucket_desc"]["folder"] for m in messages)
    starts = [n for n in step.notifications(final=False) if n["status"] == "START"]
    orphaned = sum(1 for line in pod_lines if line.get("msg", "").startswith("caller gone: the run goes on"))
    dead, failed, critical = on_record(step)

    assert not [d.offset for d in done if d.dead_lettered or d.final is None]
    assert len(folders) == records and set(folders.values()) == {1}  # one next-step message per record
    for folder in folders:
        step.s3.head_object(Bucket=s3_access.bucket_name, Key=folder + ANNOUNCED_SUFFIX)
    assert len(starts) == records  # no record ran twice (a redelivery joins the running run or finds it done)
    assert (dead, failed, critical) == (0, 0, 0)
    assert wrapper_busy == 0  # no admitted request was refused by the Wrapper
    assert answers["504"] >= 1  # the burst did meet queue timeouts
    finals = Counter("duplicate" if d.final and d.final.get("duplicate") else (d.final or {}).get("status")
                     for d in done)
    figures("50-record burst at capacity 8", records=records, next_step_messages=len(messages),
            duplicates=len(messages) - len(folders), runs_started=len(starts), dead_letters=dead,
            answers=dict(sorted(answers.items())), wrapper_busy_503=wrapper_busy, orphaned_runs=orphaned,
            final=dict(finals), revision_timeout_s=timeout_s, wall_s=round(wall_s, 1))
