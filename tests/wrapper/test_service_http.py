"""The HTTP shell as a KafkaSource sees it: real HTTP on loopback to the aiohttp app (and to the ``eo-wrapper``
process), a real inference server, moto S3 and tansu Kafka.

The answer comes once the outcome is durable: 200 after the results are announced; 200 "duplicate" for an event
done before; 200 CRITICAL after a bad body was put on record (one dead-letter record, even when redelivered); 400
for a bad body to an unknown step; 404 for an unknown step; 503 with Retry-After when every worker is busy or the
inference server stayed away past its bound; health and readiness (not tied to the inference server).
"""

from __future__ import annotations

import asyncio
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
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from services.wrapper.http_app import create_http_app
from services.wrapper.inputs import S3Access
from services.wrapper.pipeline import StepRuntime
from services.wrapper.results import ANNOUNCED_SUFFIX, MANIFEST_SUFFIX, run_folder_of
from services.wrapper.service import WrapperService
from services.core.step_config import LocalStepConfigStore
from wrapper_input_data import sample_patch_names, sample_tar_gz
from wrapper_stack import (
    PROJECT_ROOT,
    InferenceServer,
    StepFixture,
    assert_no_secrets,
    free_port,
    object_bytes,
    step_message,
)

SSL_MODEL = "Bigearth-net-ssl-label"
EVENT_TIME = "2026-05-06T07:08:09Z"


class RunningApp:
    """The Wrapper's aiohttp app served from a background thread's event loop on a free loopback port."""

    def __init__(self, service: WrapperService) -> None:
        self.service = service
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._runner = web.AppRunner(create_http_app(service), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert started.wait(10), "app did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.service.shutdown(timeout_s=30)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def cloudevent_headers(step: StepFixture, offset: int | None = None) -> dict[str, str]:
    """What a Knative KafkaSource sends (binary mode)."""
    offset = offset if offset is not None else uuid.uuid4().int % 100_000
    return {
        "ce-id": f"partition:0/offset:{offset}",
        "ce-source": f"/apis/v1/namespaces/{step.namespace}/kafkasources/src#{step.topic_in}",
        "ce-type": "dev.knative.kafka.event",
        "ce-specversion": "1.0",
        "ce-subject": f"partition:0#{offset}",
        "ce-time": EVENT_TIME,
        "ce-kafkaheadertraceparent": "00-abc-def-01",
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log", models=[SSL_MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("step-configs")


NOTIFY_TOPIC = f"notify-{uuid.uuid4().hex[:8]}"


def make_service(task: str, store_root: Path, inference_url: str, **overrides: Any) -> WrapperService:
    from services.wrapper.settings import WrapperSettings

    settings = WrapperSettings(
        task=task, inference_url=inference_url, store_root=str(store_root), namespace="uc-test",
        notify_topic=NOTIFY_TOPIC, progress_interval_s=0, pod_name="wrapper-http-test", kafka_timeout_s=15, **overrides,
    )
    return WrapperService(StepRuntime.from_settings(settings), LocalStepConfigStore(store_root))


@pytest.fixture(scope="module")
def app(server: InferenceServer, store_root: Path) -> Iterator[RunningApp]:
    running = RunningApp(make_service("ssl-features", store_root, server.grpc_url))
    yield running
    running.stop()


def make_step(s3_access: S3Access, kafka_broker: Any, store_root: Path) -> StepFixture:
    step = StepFixture(s3_access, kafka_broker.bootstrap_servers, store_root, "ssl-features")
    step.notify_topic = NOTIFY_TOPIC
    step.s3.put_object(Bucket=s3_access.bucket_name, Key="in/one.tar.gz", Body=sample_tar_gz(sample_patch_names()[:1]))
    return step


def announced_folder(step: StepFixture) -> str:
    records = step.records([step.topic_out], until=lambda r: len(r) >= 1, timeout_s=60)
    assert len(records) == 1, "no next-step message"
    return records[0]["value"]["S3_bucket_desc"]["folder"]


# ---------------------------------------------------------------------------------------------------------------


def test_delivery_is_answered_once_its_results_are_announced(
    app: RunningApp, s3_access: S3Access, kafka_broker: Any, store_root: Path
) -> None:
    step = make_step(s3_access, kafka_broker, store_root)
    headers = cloudevent_headers(step)
    body_bytes = json.dumps(step_message("in")).encode()

    status, body, _ = post(f"{app.url}/{step.config.config_name}", body_bytes, headers)

    assert status == 200, body
    assert (body["status"], body["config_name"], body["event_id"]) == ("SUCCESS", step.config.config_name, headers["ce-id"])
    folder = body["folder"]
    # Durable before the answer: manifest, announced marker (with the record's position), next-step message.
    marker = json.loads(object_bytes(step.s3, s3_access.bucket_name, run_folder_of(folder) + ANNOUNCED_SUFFIX))
    assert (marker["event_id"], marker["topic"], marker["offset"]) == (headers["ce-id"], step.topic_out, 0)
    assert announced_folder(step) == folder
    manifest = json.loads(object_bytes(step.s3, s3_access.bucket_name, run_folder_of(folder) + MANIFEST_SUFFIX))
    assert manifest["patches"] == 1 and manifest["folder"] == folder
    assert manifest["created"] == "2026-05-06T07:08:09+00:00"  # the event's time, not the clock's

    # Kafka redelivers the same record (e.g. the answer was lost): recognised, nothing run or sent again.
    status, again, _ = post(f"{app.url}/{step.config.config_name}", body_bytes, headers)
    assert status == 200 and again["duplicate"] is True and again["folder"] == folder
    assert len(step.records([step.topic_out], timeout_s=3)) == 1
    assert [n["status"] for n in step.notifications()].count("START") == 1


def test_delivery_to_root_finds_its_step_from_the_source_topic(
    app: RunningApp, s3_access: S3Access, kafka_broker: Any, store_root: Path
) -> None:
    step = make_step(s3_access, kafka_broker, store_root)

    status, body, _ = post(f"{app.url}/", json.dumps(step_message("in")).encode(), cloudevent_headers(step))

    assert status == 200 and body["config_name"] == step.config.config_name
    assert announced_folder(step).startswith("result-image2feature/in-")


def test_bad_bodies_are_put_on_record_once_for_a_known_step(
    app: RunningApp, s3_access: S3Access, kafka_broker: Any, store_root: Path
) -> None:
    step = make_step(s3_access, kafka_broker, store_root)
    url = f"{app.url}/{step.config.config_name}"
    not_json_headers = cloudevent_headers(step)

    not_json = post(url, b'{"previous_component_end": "True", "S3_bucket_desc": ', not_json_headers)
    not_a_step = post(url, json.dumps({"previous_component_end": "True"}).encode(), cloudevent_headers(step))
    redelivered = post(url, b'{"previous_component_end": "True", "S3_bucket_desc": ', not_json_headers)

    # 200: the failure is on record, so the offset may be committed (a 4xx would make the source dead-letter
    # the record a second time).
    assert not_json[0] == 200 and not_json[1]["status"] == "CRITICAL" and "not valid JSON" in not_json[1]["reason"]
    assert not_a_step[0] == 200 and "S3_bucket_desc: Field required" in not_a_step[1]["reason"]
    assert redelivered[0] == 200 and redelivered[1]["duplicate"] is True
    dead = step.records([step.dlq_topic], until=lambda r: len(r) >= 2)
    assert len(step.records([step.dlq_topic], timeout_s=3)) == 2  # one per event, none for the redelivery
    messages = [d["value"]["input_message"] for d in dead]
    assert messages == ['{"previous_component_end": "True", "S3_bucket_desc": ', {"previous_component_end": "True"}]
    assert all(d["value"]["config_name"] == step.config.config_name for d in dead)
    critical = [n for n in step.notifications(final=False) if n["status"] == "CRITICAL"]
    assert len(critical) == 2 and "Bad step message" in critical[0]["description"]
    assert not step.records([step.topic_out], timeout_s=2)
    assert_no_secrets(dead, critical)

    unknown = post(f"{app.url}/json-config-nobody-12345678", b"not json", cloudevent_headers(step))
    assert unknown[0] == 400 and "not valid JSON" in unknown[1]["error"]


def test_unknown_step_is_404_and_undeliverable_is_400(app: RunningApp) -> None:
    status, body, _ = post(f"{app.url}/json-config-nobody-12345678", json.dumps(step_message("in")).encode())
    assert status == 404 and "json-config-nobody-12345678" in body["error"]

    status, body, _ = post(f"{app.url}/", json.dumps(step_message("in")).encode())
    assert status == 400 and "cannot tell which step" in body["error"]


def test_health_and_readiness(app: RunningApp, store_root: Path) -> None:
    status, body = get(f"{app.url}/healthz")
    assert status == 200 and body["live"] is True and body["workers"] == 2
    status, body = get(f"{app.url}/readyz")
    assert status == 200 and body == {"ready": True, "reason": "ready", "model": SSL_MODEL}

    # No inference server at all: still ready (steps wait for the server; the process can serve).
    orphan = RunningApp(make_service("ssl-features", store_root, f"127.0.0.1:{free_port()}"))
    try:
        assert get(f"{orphan.url}/readyz")[0] == 200
        assert get(f"{orphan.url}/healthz")[0] == 200
    finally:
        orphan.stop()


def test_busy_workers_answer_503_and_an_inference_outage_past_its_bound_is_503(
    s3_access: S3Access, kafka_broker: Any, store_root: Path
) -> None:
    # One worker and an inference server that never answers: the first delivery holds the worker for as long as
    # its retry bound allows, then is answered 503 (Kafka redelivers it later).
    service = make_service(
        "ssl-features", store_root, f"127.0.0.1:{free_port()}", workers=1,
        infer_retry_max_s=4, infer_backoff_initial_s=0.2, infer_backoff_max_s=0.5,
    )
    running = RunningApp(service)
    step = make_step(s3_access, kafka_broker, store_root)
    url = f"{running.url}/{step.config.config_name}"
    message = json.dumps(step_message("in")).encode()
    answers: dict[str, Any] = {}
    try:
        first_headers = cloudevent_headers(step, offset=1)
        threads = [threading.Thread(target=lambda k=k: answers.__setitem__(k, post(url, message, first_headers)))
                   for k in ("first", "same-event")]
        threads[0].start()
        deadline = time.monotonic() + 10
        while service.state()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        threads[1].start()  # the same event while it runs: shares the running delivery, no second run
        other = post(url, message, cloudevent_headers(step, offset=2))
        for thread in threads:
            thread.join(60)

        assert other[0] == 503 and other[2]["Retry-After"] == "5" and "busy" in other[1]["error"]
        for key in ("first", "same-event"):
            status, body, headers = answers[key]
            assert status == 503 and headers["Retry-After"] == "5", body
            assert "Inference server unavailable" in body["error"]
        statuses = [n["status"] for n in step.notifications(final=False)]
        assert statuses.count("START") == 1 and "CRITICAL" not in statuses  # not failed for good: retried
        assert not step.records([step.dlq_topic, step.topic_out], timeout_s=2)
        assert service.state()["running"] == 0
    finally:
        running.stop()


def test_eo_wrapper_process_serves_deliveries_and_stops_cleanly(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, store_root: Path, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, store_root)
    port = free_port()
    env = {
        **os.environ,
        "EOML_WRAPPER_TASK": "ssl-features",
        "EOML_WRAPPER_INFERENCE_URL": server.grpc_url,
        "EOML_WRAPPER_STORE_ROOT": str(store_root),
        "EOML_WRAPPER_NAMESPACE": "uc-test",
        "EOML_WRAPPER_NOTIFY_TOPIC": NOTIFY_TOPIC,
        "EOML_WRAPPER_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "wrapper.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.wrapper.cli", "--http-host", "127.0.0.1", "--http-port", str(port)],
            cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        status, _, _ = post(f"http://127.0.0.1:{port}/{step.config.config_name}",
                            json.dumps(step_message("in")).encode(), cloudevent_headers(step))
        assert status == 200
        assert announced_folder(step).startswith("result-image2feature/in-")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0
    log_text = log_path.read_text()
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    assert any(line["msg"] == "step succeeded" for line in lines)
    assert_no_secrets(log_text)
