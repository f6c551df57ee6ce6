"""The real parts the Wrapper pipeline and service tests run against, and small helpers around them.

- ``InferenceServer``: our inference server (``python -m services.inference.cli``) on the real ``model_repository``,
  on loopback ports chosen once, so that it can be stopped and started again at the same address;
- ``read_records``: every record of some Kafka topics (tansu), read from the beginning;
- ``StepFixture``: one workflow step (configuration + credentials in a local store, unique topics and workflow name)
  and the plain-function call ``run`` that processes a step message for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from services.local_platform.infra import free_port, free_ports
from services.core.contracts import StepMessage
from services.core.kafka import consumer_config
from services.core.step_config import LocalStepConfigStore, StepConfig, StepCredentials, step_config_name
from services.wrapper.inputs import S3Access, make_s3_client
from services.wrapper.inputs.s3_listing import S3Client
from services.wrapper.pipeline import StepOutcome, StepRequest, StepRuntime, run_step
from services.wrapper.settings import WrapperSettings
from wrapper_input_data import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
SERVER_START_TIMEOUT_S = 120.0
EVENT_TIME = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
SECRETS = (TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)


_OPEN_RUNTIMES: list[StepRuntime] = []


@pytest.fixture(autouse=True)
def close_step_runtimes() -> Iterator[None]:
    """Import into a test module: closes the runtimes ``StepFixture.runtime`` made (producers, clients, threads)."""
    yield
    while _OPEN_RUNTIMES:
        _OPEN_RUNTIMES.pop().close()


class InferenceServer:
    """One inference server subprocess; ``stop`` and ``start`` again keep its ports."""

    def __init__(self, log_path: Path, models: Iterable[str] = (), repository: Path = MODEL_REPOSITORY) -> None:
        self.models = list(models)
        self.repository = repository
        self.log_path = log_path
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, wait: bool = True) -> "InferenceServer":
        args = [
            sys.executable, "-m", "services.inference.cli", "--model-repository", str(self.repository),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
            "--log-format", "text", "--exit-timeout-secs", "2",
        ]
        if self.models:
            args += ["--model-control-mode", "explicit"]
            for model in self.models:
                args += ["--load-model", model]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                args, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"inference server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"inference server not ready within {timeout_s} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def read_records(
    bootstrap_servers: str,
    topics: Iterable[str],
    until: Callable[[list[dict[str, Any]]], bool] | None = None,
    timeout_s: float = 20.0,
    idle_s: float = 1.5,
) -> list[dict[str, Any]]:
    """Records of ``topics`` from the beginning, as ``{"topic", "key", "value", "headers", "raw"}`` (value parsed as
    JSON, headers decoded; ``raw``: key, value and headers as stored, to produce the record again).

    Stops when ``until(records)`` holds or at ``timeout_s``; without ``until``, also after ``idle_s`` without a new
    record once something was read. Topics that do not exist yet are picked up when they appear.
    """
    consumer = Consumer(consumer_config(bootstrap_servers, f"test-reader-{uuid.uuid4().hex[:8]}"))
    records: list[dict[str, Any]] = []
    wanted = list(topics)
    assigned: set[tuple[str, int]] = set()
    deadline = time.monotonic() + timeout_s
    last_record = time.monotonic()
    last_metadata = -1.0
    try:
        while time.monotonic() < deadline and not (until is not None and until(records)):
            if len(assigned) < len(wanted) and time.monotonic() - last_metadata > 0.5:
                # Topics are created by their first record: pick up the ones that appeared since.
                last_metadata = time.monotonic()
                metadata = consumer.list_topics(timeout=5)
                new = [
                    TopicPartition(topic, partition, OFFSET_BEGINNING)
                    for topic in wanted if topic in metadata.topics
                    for partition in metadata.topics[topic].partitions
                    if (topic, partition) not in assigned
                ]
                if new:
                    consumer.incremental_assign(new)
                    assigned.update((tp.topic, tp.partition) for tp in new)
            if not assigned:
                time.sleep(0.2)
                continue
            message = consumer.poll(0.2)
            if message is None or message.error():
                if until is None and records and time.monotonic() - last_record > idle_s:
                    break
                continue
            last_record = time.monotonic()
            records.append({
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "key": message.key().decode("utf-8") if message.key() else None,
                "value": json.loads(message.value()),
                "headers": {name: value.decode("utf-8") for name, value in (message.headers() or [])},
                "raw": (message.key(), message.value(), list(message.headers() or [])),
            })
    finally:
        consumer.close()
    return records


@dataclass
class StepFixture:
    """One workflow step of a test: unique topics and workflow, config + credentials in a local store."""

    access: S3Access
    bootstrap_servers: str
    store_root: Path
    task: str
    namespace: str = "uc-test"
    workflow_name: str = field(default_factory=lambda: f"wf-{uuid.uuid4().hex[:10]}")
    credentials: StepCredentials = field(
        default_factory=lambda: StepCredentials(aws_access_key_id=TEST_ACCESS_KEY_ID, aws_secret_access_key=TEST_SECRET_ACCESS_KEY)
    )

    def __post_init__(self) -> None:
        self.topic_in = f"{self.workflow_name}.{self.task}.in"
        self.topic_out = f"{self.workflow_name}.{self.task}.out"
        self.notify_topic = f"{self.workflow_name}.notify"
        self.config = StepConfig(
            config_name=step_config_name(self.topic_in),
            workflow_name=self.workflow_name,
            topic_in=self.topic_in,
            topic_out=self.topic_out,
            namespace=self.namespace,
            service_name=f"{self.task}-wrapper",
            component_name=f"Component {self.task}",
            bucket=self.access.bucket_name,
            region_name=self.access.region_name,
            endpoint_url=self.access.endpoint_url,
            bootstrap_servers=self.bootstrap_servers,
        )
        self.store = LocalStepConfigStore(self.store_root)
        self.store.put(self.namespace, self.config, self.credentials)

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_in}.dlq"

    @property
    def s3(self) -> S3Client:
        return make_s3_client(self.access)

    def settings(self, inference_url: str, **overrides: Any) -> WrapperSettings:
        values: dict[str, Any] = {
            "task": self.task,
            "inference_url": inference_url,
            "notify_topic": self.notify_topic,
            "store_root": str(self.store_root),
            "namespace": self.namespace,
            "progress_interval_s": 0,
            "pod_name": "wrapper-test-pod",
            "kafka_timeout_s": 15,
        }
        values.update(overrides)
        return WrapperSettings(**values)

    def runtime(self, inference_url: str, **overrides: Any) -> StepRuntime:
        """A runtime for this step's settings, closed after the test (with ``close_step_runtimes``)."""
        runtime = StepRuntime.from_settings(self.settings(inference_url, **overrides))
        _OPEN_RUNTIMES.append(runtime)
        return runtime

    def run(
        self,
        runtime: StepRuntime,
        folder: str,
        filename: str = "",
        meta: dict[str, Any] | None = None,
        event_time: datetime | None = EVENT_TIME,
        previous_component_end: str = "True",
        event_id: str | None = None,
        trace_attributes: dict[str, str] | None = None,
    ) -> StepOutcome:
        """One delivery through ``run_step``; a new event (id) unless ``event_id`` names one (a redelivery).
        ``trace_attributes``: the event's ``traceparent``/``tracestate`` extension attributes."""
        raw = step_message(folder, filename, meta, previous_component_end)
        request = StepRequest(
            config_name=self.config.config_name,
            message=StepMessage.model_validate(raw),
            raw_message=raw,
            event_id=event_id or f"partition:0/offset:{uuid.uuid4().int % 10**9}",
            event_time=event_time,
            event_source=f"/apis/v1/namespaces/{self.namespace}/kafkasources/src#{self.topic_in}",
            trace_attributes=trace_attributes or {},
        )
        return run_step(runtime, request, self.config, self.credentials)

    def records(self, topics: Iterable[str] | None = None, until: Callable[[list[dict[str, Any]]], bool] | None = None,
                timeout_s: float = 20.0) -> list[dict[str, Any]]:
        chosen = list(topics) if topics is not None else [self.topic_out, self.notify_topic, self.dlq_topic]
        return read_records(self.bootstrap_servers, chosen, until, timeout_s)

    def notifications(self, final: bool = True) -> list[dict[str, Any]]:
        """This step's notifications, read until SUCCESS or CRITICAL arrived (``final``)."""
        def done(records: list[dict[str, Any]]) -> bool:
            return any(r["value"]["status"] in ("SUCCESS", "CRITICAL") for r in self._own(records))

        # A notification topic may be shared by several steps (one per Wrapper deployment): keep this workflow's.
        return [
            r["value"] for r in self.records([self.notify_topic], until=done if final else None, timeout_s=60)
            if r["value"].get("workflow_name") == self.workflow_name
        ]

    def _own(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r["value"].get("workflow_name") == self.workflow_name]


def step_message(folder: str, filename: str = "", meta: dict[str, Any] | None = None,
                 previous_component_end: str = "True") -> dict[str, Any]:
    return {
        "previous_component_end": previous_component_end,
        "S3_bucket_desc": {"folder": folder, "filename": filename},
        "meta_information": meta if meta is not None else {"request": "test", "nested": {"k": [1, 2]}},
    }


def object_bytes(client: S3Client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def list_keys(client: S3Client, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(entry["Key"] for entry in page.get("Contents", []))
    return keys


def assert_no_secrets(*texts: Any) -> None:
    for text in texts:
        dumped = text if isinstance(text, str) else json.dumps(text, default=str)
        for secret in SECRETS:
            assert secret not in dumped, "a credential leaked"
