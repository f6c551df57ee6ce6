"""The Wrapper's ``GET /metrics`` after real deliveries (real inference server, moto S3, tansu): steps by outcome,
patches, per-stage times, answers by HTTP code, dead-letter records, S3 errors, runs in flight."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.core.step_config import LocalStepConfigStore
from services.wrapper.inputs import S3Access
from services.wrapper.pipeline import StepRuntime
from services.wrapper.service import WrapperService
from services.wrapper.settings import WrapperSettings
from wrapper_input_data import sample_patch_names, sample_tar_gz
from test_service_http import RunningApp
from wrapper_stack import InferenceServer, StepFixture, free_port, step_message

SSL_MODEL = "Bigearth-net-ssl-label"
TASK = "ssl-features"


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json",
                                                                             **headers})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")  # the text format
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def headers_for(step: StepFixture) -> dict[str, str]:
    offset = uuid.uuid4().int % 100_000
    return {"ce-id": f"partition:0/offset:{offset}", "ce-specversion": "1.0", "ce-type": "dev.knative.kafka.event",
            "ce-source": f"/apis/v1/namespaces/{step.namespace}/kafkasources/src#{step.topic_in}",
            "ce-time": "2026-05-06T07:08:09Z"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log", models=[SSL_MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


def test_metrics_count_what_the_deliveries_did(server: InferenceServer, s3_access: S3Access, kafka_broker: Any,
                                               tmp_path: Path) -> None:
    store_root = tmp_path / "store"
    good = StepFixture(s3_access, kafka_broker.bootstrap_servers, store_root, TASK)
    good.s3.put_object(Bucket=s3_access.bucket_name, Key="in/two.tar.gz", Body=sample_tar_gz(sample_patch_names()[:2]))
    # A step whose S3 endpoint does not answer (nothing listens on the port): S3 errors, then a 503 to retry later.
    unreachable = s3_access.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1})
    no_s3 = StepFixture(unreachable, kafka_broker.bootstrap_servers, store_root, TASK)
    settings = WrapperSettings(task=TASK, inference_url=server.grpc_url, store_root=str(store_root),
                               namespace=good.namespace, notify_topic=good.notify_topic, progress_interval_s=0,
                               kafka_timeout_s=15, workers=3, s3_max_attempts=1, s3_connect_timeout_s=1)
    service = WrapperService(StepRuntime.from_settings(settings), LocalStepConfigStore(store_root))
    served = RunningApp(service)
    try:
        before = samples(served.url)
        assert value(before, "eoml_workers") == 3 and value(before, "eoml_runs_in_flight") == 0
        assert not [key for key in before if key[0] == "eoml_steps_total"]

        message = json.dumps(step_message("in")).encode()
        good_headers = headers_for(good)
        codes = [post(f"{served.url}/{good.config.config_name}", message, good_headers),
                 post(f"{served.url}/{good.config.config_name}", message, good_headers),  # a redelivery
                 post(f"{served.url}/{good.config.config_name}", b"{not json", headers_for(good)),
                 post(f"{served.url}/{no_s3.config.config_name}", message, headers_for(no_s3)),
                 post(f"{served.url}/json-config-nobody-12345678", message, headers_for(good))]
        assert codes == [200, 200, 200, 503, 404]

        found = samples(served.url)
        assert value(found, "eoml_steps_started_total", task=TASK) == 3  # the unreadable body runs no step
        assert value(found, "eoml_steps_total", task=TASK, outcome="succeeded") == 1
        assert value(found, "eoml_steps_total", task=TASK, outcome="duplicate") == 1
        assert value(found, "eoml_steps_total", task=TASK, outcome="retried") == 1
        assert value(found, "eoml_steps_total", task=TASK, outcome="failed") == 0
        assert value(found, "eoml_patches_total", task=TASK) == 2
        assert value(found, "eoml_dead_letter_records_total", task=TASK) == 1  # the unreadable body, on record
        assert value(found, "eoml_dependency_errors_total", task=TASK, source="s3") >= 1
        assert value(found, "eoml_dependency_errors_total", task=TASK, source="kafka") == 0
        assert {code: value(found, "eoml_deliveries_total", code=code) for code in ("200", "404", "503")} == \
            {"200": 3, "404": 1, "503": 1}
        assert value(found, "eoml_step_duration_seconds_count", task=TASK, outcome="succeeded") == 1
        for stage in ("download", "decode", "preprocess", "inference", "write", "announce"):
            # Once per step that reached the stage: the succeeded one only (the duplicate stopped before reading).
            assert value(found, "eoml_step_stage_seconds_count", task=TASK, stage=stage) == 1, stage
            assert value(found, "eoml_step_stage_seconds_sum", task=TASK, stage=stage) > 0, stage
        assert value(found, "eoml_runs_in_flight") == 0
    finally:
        served.stop()  # and the service
