"""The delivery fault matrix, Wrapper side: every case ends with results byte-identical to a clean run of the same
input and with the next-step messages on ``Topics.out`` counted.

Real parts only: ``eo-wrapper`` processes (SIGKILLed and restarted) or the Wrapper's HTTP app, our inference server
on the exported ``uc5-cfactor`` model (stopped and restarted), moto S3 (stopped ~30 s) and tansu Kafka. The test
plays the KafkaSource: it POSTs a record as a binary-mode CloudEvent and, like the source, delivers it again after
anything but a 2xx. (Kafka broker restarts and 20 workflows at once run on the whole local platform:
``tests/platform``.)
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
import urllib.error
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from moto.server import ThreadedMotoServer

from services.wrapper.inputs import S3Access, make_s3_client
from services.wrapper.outputs.stac import is_stac_document
from services.wrapper.results import ANNOUNCED_SUFFIX, FAILED_SUFFIX, MANIFEST_SUFFIX, run_folder_of
from test_service_http import RunningApp, get, post
from wrapper_input_data import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, sample_patch_names, sample_tar_gz
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
EVENT_TIME = "2026-07-08T09:10:11Z"
PATCHES = 6
# Small batches: a step makes several inference requests, so that a fault can fall between two of them.
SLOW_STEP = {"batch_size": 4, "requests_in_flight": 1}
PATIENT = {"infer_retry_max_s": 120, "infer_backoff_initial_s": 0.2, "infer_backoff_max_s": 0.5}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log", models=[MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


def make_step(access: S3Access, kafka_broker: Any, store_root: Path, offset: int = 0) -> StepFixture:
    step = StepFixture(access, kafka_broker.bootstrap_servers, store_root, TASK)
    names = sample_patch_names()[offset: offset + PATCHES]
    step.s3.put_object(Bucket=access.bucket_name, Key="in/patches.tar.gz", Body=sample_tar_gz(names))
    return step


def headers_for(step: StepFixture, offset: int) -> dict[str, str]:
    return {
        "ce-id": f"partition:0/offset:{offset}",
        "ce-source": f"/apis/v1/namespaces/{step.namespace}/kafkasources/src#{step.topic_in}",
        "ce-type": "dev.knative.kafka.event",
        "ce-specversion": "1.0",
        "ce-subject": f"partition:0#{offset}",
        "ce-time": EVENT_TIME,
    }


def deliver(url: str, step: StepFixture, offset: int, timeout_s: float = 240,
            between: Callable[[int], None] | None = None) -> tuple[list[int | str], dict[str, Any]]:
    """Deliver one record as a KafkaSource does: again after anything but a 2xx (backoff 1 s), within a bound.
    Returns every answer's status (or the connection error) and the 2xx body."""
    body = json.dumps(step_message("in", meta={"offset": offset})).encode()
    answers: list[int | str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status, answer, _ = post(f"{url}/{step.config.config_name}", body, headers_for(step, offset))
        except (urllib.error.URLError, ConnectionError, OSError) as error:
            answers.append(type(error).__name__)
        else:
            answers.append(status)
            if 200 <= status < 300:
                return answers, answer
        if between is not None:
            between(len(answers))
        time.sleep(1.0)
    raise AssertionError(f"no 2xx within {timeout_s} s: {answers}")


def results_of(step: StepFixture, run_folder: str) -> dict[str, bytes]:
    """Every result object of a run, by its key relative to the run folder (not its STAC documents, which name the
    run and so differ between runs of the same input)."""
    keys = list_keys(step.s3, step.access.bucket_name, run_folder + "/")
    return {key[len(run_folder):]: object_bytes(step.s3, step.access.bucket_name, key) for key in keys
            if not is_stac_document(key)}


def assert_complete(step: StepFixture, run_folder: str, reference: dict[str, bytes]) -> dict[str, Any]:
    """The run's objects are exactly the reference's bytes and exactly what its manifest lists, beside its STAC
    documents (listed too); announced."""
    assert results_of(step, run_folder) == reference
    manifest = json.loads(object_bytes(step.s3, step.access.bucket_name, run_folder_of(run_folder) + MANIFEST_SUFFIX))
    assert sorted(o["key"] for o in manifest["objects"]) == sorted(run_folder + k for k in reference)
    stac = sorted(k for k in list_keys(step.s3, step.access.bucket_name, run_folder + "/") if is_stac_document(k))
    assert stac and sorted(o["key"] for o in manifest["stac"]) == stac
    assert manifest["folder"] == run_folder and manifest["created"] == "2026-07-08T09:10:11+00:00"
    object_bytes(step.s3, step.access.bucket_name, run_folder_of(run_folder) + ANNOUNCED_SUFFIX)  # raises if absent
    return manifest


def next_step_messages(step: StepFixture, timeout_s: float = 4) -> list[dict[str, Any]]:
    return [r["value"] for r in step.records([step.topic_out], timeout_s=timeout_s)]


def service_app(step: StepFixture, inference_url: str, **overrides: Any) -> RunningApp:
    from services.wrapper.pipeline import StepRuntime
    from services.wrapper.service import WrapperService

    settings = step.settings(inference_url, **{**SLOW_STEP, **overrides})
    return RunningApp(WrapperService(StepRuntime.from_settings(settings), step.store))


@pytest.fixture
def clean(server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path) -> dict[str, bytes]:
    """The results of a clean run of the input every case uses (same patches, same event time)."""
    step = make_step(s3_access, kafka_broker, tmp_path / "clean-store")
    app = service_app(step, server.grpc_url)
    try:
        _, body = deliver(app.url, step, offset=999)
    finally:
        app.stop()
    assert body["status"] == "SUCCESS"
    reference = results_of(step, body["folder"])
    assert len(reference) == PATCHES  # one raster per patch
    return reference


# ---- the eo-wrapper process, killed ----------------------------------------------------------------------------


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
            "EOML_WRAPPER_WORKERS": "1",
            "EOML_WRAPPER_PROGRESS_INTERVAL_S": "0",
            "EOML_WRAPPER_LOG_FORMAT": "json",
            "POD_NAME": f"wrapper-faults-{uuid.uuid4().hex[:6]}",
            **{f"EOML_WRAPPER_{name.upper()}": str(value) for name, value in {**SLOW_STEP, **PATIENT}.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen([sys.executable, "-m", "services.wrapper.cli"], cwd=PROJECT_ROOT,
                                            env=self.env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                if get(f"{self.url}/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the Wrapper did not become ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.slow
def test_wrapper_sigkilled_mid_step_then_restarted_completes_the_redelivered_step_once(
    clean: dict[str, bytes], s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    # The inference server is down at first: the step hangs in its retries (started, not ended) when the kill comes.
    late_server = InferenceServer(tmp_path / "server.log", models=[MODEL])
    wrapper = WrapperProcess(step, late_server.grpc_url, tmp_path / "wrapper.log")
    answers: list[Any] = []
    try:
        wrapper.start()
        first = threading.Thread(target=lambda: answers.append(_post_once(wrapper.url, step, 1)))
        first.start()
        wait_until(lambda: any(n["status"] == "START" for n in step.notifications(final=False)), 60, "START")
        wrapper.kill()  # SIGKILL: no answer ever reaches the source, so it delivers the record again
        first.join(30)
        assert answers and not (isinstance(answers[0], int) and 200 <= answers[0] < 300), answers
        late_server.start()
        wrapper.start()  # the same pod's container, restarted
        statuses, body = deliver(wrapper.url, step, 1)
        assert wrapper.stop() == 0
    finally:
        if wrapper.process is not None and wrapper.process.poll() is None:
            wrapper.process.kill()
        late_server.stop()

    assert body["status"] == "SUCCESS" and statuses[-1] == 200
    assert_complete(step, body["folder"], clean)
    assert [m["S3_bucket_desc"]["folder"] for m in next_step_messages(step)] == [body["folder"]]
    assert not step.records([step.dlq_topic], timeout_s=2)
    assert_no_secrets(wrapper.log_path.read_text())


@pytest.mark.slow
def test_sigterm_refuses_new_deliveries_and_lets_the_running_step_finish(
    clean: dict[str, bytes], s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    late_server = InferenceServer(tmp_path / "server.log", models=[MODEL])  # the step waits for it
    wrapper = WrapperProcess(step, late_server.grpc_url, tmp_path / "wrapper.log")
    wrapper.env["EOML_WRAPPER_WORKERS"] = "2"
    answers: list[Any] = []
    try:
        wrapper.start()
        running = threading.Thread(target=lambda: answers.append(_post_once(wrapper.url, step, 70)))
        running.start()
        wait_until(lambda: any(n["status"] == "START" for n in step.notifications(final=False)), 60, "START")
        assert wrapper.process is not None
        wrapper.process.send_signal(signal.SIGTERM)
        wait_until(lambda: get(f"{wrapper.url}/readyz")[0] == 503, 10, "readiness to turn off")
        refused, body, headers = post(f"{wrapper.url}/{step.config.config_name}",
                                      json.dumps(step_message("in", meta={"offset": 71})).encode(),
                                      headers_for(step, 71))
        late_server.start()
        running.join(120)
        code = wrapper.process.wait(timeout=60)
    finally:
        if wrapper.process is not None and wrapper.process.poll() is None:
            wrapper.process.kill()
        late_server.stop()
    assert refused == 503 and "stopping" in body["error"] and headers["Retry-After"] == "5"
    assert answers == [200] and code == 0  # the running step finished and was answered before the exit
    (message,) = next_step_messages(step)
    assert_complete(step, message["S3_bucket_desc"]["folder"], clean)


def inference_count(server: InferenceServer, model: str) -> int:
    """Requests the server has answered for ``model`` (its statistics endpoint, as Triton's)."""
    _, stats = get(f"http://{server.http_url}/v2/models/{model}/stats")
    return sum(int(entry.get("inference_count", 0)) for entry in stats.get("model_stats", []))


def _post_once(url: str, step: StepFixture, offset: int) -> int | str:
    try:
        return post(f"{url}/{step.config.config_name}", json.dumps(step_message("in", meta={"offset": offset})).encode(),
                    headers_for(step, offset))[0]
    except (urllib.error.URLError, ConnectionError, OSError) as error:
        return type(error).__name__


# ---- in-process Wrappers ------------------------------------------------------------------------------------------


def test_redelivery_of_a_completed_event_is_not_processed_again(
    server: InferenceServer, clean: dict[str, bytes], s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    app = service_app(step, server.grpc_url)
    try:
        _, first = deliver(app.url, step, 5)
        _, again = deliver(app.url, step, 5)
    finally:
        app.stop()
    assert first["status"] == "SUCCESS"
    assert again["duplicate"] is True and again["earlier"] == "announced" and again["folder"] == first["folder"]
    assert_complete(step, first["folder"], clean)
    assert len(next_step_messages(step)) == 1
    assert [n["status"] for n in step.notifications()].count("START") == 1  # no reprocessing


def test_a_failing_rerun_under_a_new_event_leaves_the_announced_results_untouched(
    clean: dict[str, bytes], s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    own_server = InferenceServer(tmp_path / "server.log", models=[MODEL]).start()
    app = service_app(step, own_server.grpc_url, infer_retry_max_s=3, infer_backoff_initial_s=0.2,
                      infer_backoff_max_s=0.5)
    try:
        _, first = deliver(app.url, step, 10)
        before = {key: object_bytes(step.s3, step.access.bucket_name, key)
                  for key in list_keys(step.s3, step.access.bucket_name, RESULT_PREFIX + "/")}
        own_server.stop()  # the workflow is re-published; its new run meets no inference server
        status, body, _ = post(f"{app.url}/{step.config.config_name}",
                               json.dumps(step_message("in", meta={"offset": 11})).encode(), headers_for(step, 11))
    finally:
        app.stop()
        own_server.stop()
    assert first["status"] == "SUCCESS"
    assert status == 503 and "Inference server unavailable" in body["error"]
    after = {key: object_bytes(step.s3, step.access.bucket_name, key)
             for key in list_keys(step.s3, step.access.bucket_name, RESULT_PREFIX + "/")}
    # The announced run: every object as it was, still listed by its manifest; the failed run announced nothing.
    assert {k: v for k, v in after.items() if k in before} == before
    assert [k for k in after if k not in before and k.endswith((MANIFEST_SUFFIX, ANNOUNCED_SUFFIX, FAILED_SUFFIX))] == []
    assert_complete(step, first["folder"], clean)
    assert [m["S3_bucket_desc"]["folder"] for m in next_step_messages(step)] == [first["folder"]]
    assert not step.records([step.dlq_topic], timeout_s=2)


def test_the_same_delivery_to_two_wrappers_at_once_is_announced_once(
    server: InferenceServer, clean: dict[str, bytes], s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    apps = [service_app(step, server.grpc_url), service_app(step, server.grpc_url)]
    answers: list[tuple[list[Any], dict[str, Any]]] = []
    barrier = threading.Barrier(2)

    def run(app: RunningApp) -> None:
        barrier.wait()
        answers.append(deliver(app.url, step, 20))

    threads = [threading.Thread(target=run, args=(app,)) for app in apps]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
    finally:
        for app in apps:
            app.stop()
    assert len(answers) == 2 and all(statuses == [200] for statuses, _ in answers)
    bodies = [body for _, body in answers]
    assert {b["folder"] for b in bodies} == {bodies[0]["folder"]}
    assert sorted(b["status"] for b in bodies) == ["DUPLICATE", "SUCCESS"]
    assert_complete(step, bodies[0]["folder"], clean)
    assert len(next_step_messages(step)) == 1


@pytest.mark.slow
def test_inference_server_restarted_mid_step_the_step_completes(
    s3_access: S3Access, kafka_broker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # ssl-features (ResNet-101, a request per patch): slow enough that the restart falls between two requests.
    step = StepFixture(s3_access, kafka_broker.bootstrap_servers, tmp_path / "store", "ssl-features")
    patches = 16
    step.s3.put_object(Bucket=s3_access.bucket_name, Key="in/patches.tar.gz",
                       Body=sample_tar_gz(sample_patch_names()[:patches]))
    own_server = InferenceServer(tmp_path / "server.log", models=["Bigearth-net-ssl-label"]).start()
    app = service_app(step, own_server.grpc_url, batch_size=1, requests_in_flight=1, progress_interval_s=0, **PATIENT)
    result: list[Any] = []
    try:
        _, clean_run = deliver(app.url, step, 60)  # the reference: the same input, the same event time
        runner = threading.Thread(target=lambda: result.append(deliver(app.url, step, 61)))
        with caplog.at_level(logging.WARNING):
            runner.start()
            # Restart once the server has answered the second run's first requests (its own statistics).
            wait_until(lambda: inference_count(own_server, "Bigearth-net-ssl-label") >= patches + 2, 60,
                       "the second run's first inferences", poll_s=0.02)
            own_server.stop()
            time.sleep(2)
            own_server.start()
            runner.join(240)
    finally:
        app.stop()
        own_server.stop()
    statuses, body = result[0]
    assert statuses == [200] and body["status"] == "SUCCESS"
    # The restart fell inside the step: it waited for the server, it did not fail.
    assert any(r.getMessage() == "inference server unavailable, retrying" for r in caplog.records)
    reference = results_of(step, clean_run["folder"])
    assert body["folder"] != clean_run["folder"]
    assert_complete(step, body["folder"], reference)
    assert json.loads(object_bytes(step.s3, step.access.bucket_name, run_folder_of(body["folder"]) + MANIFEST_SUFFIX))["patches"] == patches
    assert len(next_step_messages(step)) == 2  # one per event
    assert not step.records([step.dlq_topic], timeout_s=2)


@pytest.mark.slow
def test_s3_stopped_for_30_s_mid_step_the_step_completes(
    clean: dict[str, bytes], kafka_broker: Any, tmp_path: Path
) -> None:
    # An S3 server of this test's own (moto keeps its data in the process, so a new server on the same port
    # serves the same buckets).
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    access = S3Access(bucket_name=f"workflow-{uuid.uuid4().hex[:12]}", aws_access_key_id=TEST_ACCESS_KEY_ID,
                      aws_secret_access_key=TEST_SECRET_ACCESS_KEY, endpoint_url=f"http://127.0.0.1:{port}",
                      max_attempts=2)
    make_s3_client(access).create_bucket(Bucket=access.bucket_name)
    step = make_step(access, kafka_broker, tmp_path / "store")
    # The inference server comes up only once S3 is down: the step is certainly under way (input read, waiting
    # for inference) when S3 goes away, and its result writes meet the outage.
    late_server = InferenceServer(tmp_path / "server.log", models=[MODEL])
    app = service_app(step, late_server.grpc_url, progress_interval_s=0, s3_max_attempts=2, s3_connect_timeout_s=1,
                      **PATIENT)
    result: list[Any] = []
    try:
        runner = threading.Thread(target=lambda: result.append(deliver(app.url, step, 40, timeout_s=300)))
        runner.start()
        wait_until(lambda: any(n["status"] == "START" for n in step.notifications(final=False)), 60, "START")
        moto.stop()
        late_server.start()
        time.sleep(30)
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        moto.start()
        runner.join(300)
    finally:
        app.stop()
        late_server.stop()
    try:
        statuses, body = result[0]
        assert statuses[-1] == 200 and body["status"] == "SUCCESS", statuses
        # 503 while S3 was away (the source delivered again), never a permanent failure.
        assert 503 in statuses and set(statuses) == {200, 503}, statuses
        assert_complete(step, body["folder"], clean)
        assert [m["S3_bucket_desc"]["folder"] for m in next_step_messages(step)] == [body["folder"]]
        assert not step.records([step.dlq_topic], timeout_s=2)
    finally:
        moto.stop()


def test_a_poison_message_leaves_exactly_one_dead_letter_record(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    app = service_app(step, server.grpc_url)
    poison = json.dumps({"previous_component_end": "True", "S3_bucket_desc": {"folder": ["not", "a", "folder"]},
                         "meta_information": {}}).encode()
    try:
        answers = [post(f"{app.url}/{step.config.config_name}", poison, headers_for(step, 50)) for _ in range(3)]
    finally:
        app.stop()
    assert [a[0] for a in answers] == [200, 200, 200]
    assert answers[0][1]["status"] == "CRITICAL" and [a[1].get("duplicate") for a in answers[1:]] == [True, True]
    dead = step.records([step.dlq_topic], timeout_s=4)
    assert len(dead) == 1 and dead[0]["value"]["input_message"] == json.loads(poison)
    assert not next_step_messages(step, timeout_s=2)
