"""Bad input and broken dependencies end in the documented behaviour (real moto S3, tansu Kafka, inference server):

- a bad patch or archive member is rejected with its reason (log, WARNING, manifest) and the rest is processed;
- a step that cannot complete (corrupt archive, empty folder, S3 or inference server unreachable beyond the retry
  bound, nothing usable) ends in CRITICAL + a dead-letter record with the reason and the original message, no
  next-step message, and no result objects left behind;
- an inference server that comes back within the retry bound costs nothing but time.
Credentials never appear in anything published.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import tifffile

from services.wrapper.inputs import S3Access
from services.wrapper.outputs import read_features
from services.wrapper.results import ANNOUNCED_SUFFIX, FAILED_SUFFIX, MANIFEST_SUFFIX
from wrapper_input_data import (
    add_bytes,
    add_sample_patch,
    sample_band_path,
    sample_patch_names,
    sample_tar_gz,
)
from wrapper_stack import (  # noqa: F401 - close_step_runtimes is an autouse fixture
    InferenceServer,
    StepFixture,
    assert_no_secrets,
    close_step_runtimes,
    free_port,
    list_keys,
    object_bytes,
    step_message,
)

SSL_MODEL = "Bigearth-net-ssl-label"
LINEAR_MODEL = "Bigearth-net-linear-label"
GOOD = sample_patch_names()[:2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log", models=[SSL_MODEL, LINEAR_MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def ssl(s3_access: S3Access, kafka_broker: Any, tmp_path: Path) -> StepFixture:
    return StepFixture(s3_access, kafka_broker.bootstrap_servers, tmp_path / "store", "ssl-features")


def assert_failed_cleanly(
    step: StepFixture, outcome: Any, reason_part: str, folder: str, s3_reachable: bool = True
) -> dict[str, Any]:
    """CRITICAL last, a dead-letter record with reason + original message + config name, nothing announced or left."""
    assert outcome.status == "CRITICAL"
    assert reason_part in outcome.reason
    dead = step.records([step.dlq_topic], until=lambda r: len(r) >= 1)
    assert len(dead) == 1
    record = dead[0]["value"]
    assert reason_part in record["reason"]
    assert record["input_message"] == step_message(folder)
    assert record["config_name"] == step.config.config_name
    assert (record["task"], record["workflow_name"], record["topic_in"]) == ("ssl-features", step.workflow_name, step.topic_in)
    notifications = step.notifications()
    assert notifications[0]["status"] == "START"
    assert notifications[-1]["status"] == "CRITICAL" and reason_part in notifications[-1]["description"]
    assert not step.records([step.topic_out], timeout_s=2)
    if s3_reachable:
        # Only the failed marker of this run: no manifest, nothing announced.
        assert list_keys(step.s3, step.access.bucket_name, "result-") == [outcome.output_folder + FAILED_SUFFIX]
    assert_no_secrets(dead, notifications, outcome.reason)
    return record


def assert_left_for_a_retry(step: StepFixture, outcome: Any, reason_part: str, started: bool) -> None:
    """A transient failure: RETRY (the delivery is answered 5xx), nothing on record, nothing announced."""
    assert outcome.status == "RETRY", outcome.reason
    assert reason_part in outcome.reason
    assert not step.records([step.dlq_topic, step.topic_out], timeout_s=3)
    statuses = [n["status"] for n in step.notifications(final=False)] if started else []
    assert "CRITICAL" not in statuses and "SUCCESS" not in statuses
    if started:
        assert statuses[0] == "START" and statuses[-1] == "WARNING"  # "interrupted, Kafka will deliver it again"
    assert_no_secrets(outcome.reason)


def _patch_with_band(archive: tarfile.TarFile, patch: str, band: str, data: bytes) -> None:
    add_sample_patch(archive, patch, skip_bands=[band])
    add_bytes(archive, f"{patch}/{patch}_{band}.tif", data)


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------


def test_bad_members_and_patches_are_rejected_and_the_rest_is_processed(
    server: InferenceServer, ssl: StepFixture, caplog: pytest.LogCaptureFixture
) -> None:
    names = sample_patch_names()
    good, missing, wrong_dtype, empty = names[:2], names[2], names[3], names[4]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        add_sample_patch(archive, good[0])
        add_bytes(archive, f"../escape/{names[5]}/{names[5]}_B02.tif", sample_band_path(names[5], "B02").read_bytes())
        add_sample_patch(archive, missing, skip_bands=["B05"])
        _patch_with_band(archive, wrong_dtype, "B04",
                         _tiff(tifffile.imread(sample_band_path(wrong_dtype, "B04")).astype(np.float32)))
        _patch_with_band(archive, empty, "B03", _tiff(np.zeros((120, 120), dtype=np.uint16)))
        add_sample_patch(archive, good[1])
    ssl.s3.put_object(Bucket=ssl.access.bucket_name, Key="in/mixed.tar.gz", Body=buffer.getvalue())

    with caplog.at_level(logging.INFO):
        outcome = ssl.run(ssl.runtime(server.grpc_url), "in")

    assert outcome.status == "SUCCESS", outcome.reason
    assert outcome.patches == 2
    reasons = {r.patch_id: r.reason for r in outcome.rejections}
    escape = f"../escape/{names[5]}/{names[5]}_B02.tif"  # a refused member is named by its path
    assert "has '..' in its path" in reasons[escape]
    assert "missing band B05" in reasons[missing]
    assert "float32, expected uint16" in reasons[wrong_dtype]
    assert "B03 holds no data" in reasons[empty]
    features = read_features(object_bytes(ssl.s3, ssl.access.bucket_name, f"{outcome.output_folder}/mixed.features.npz"))
    assert features.patch_ids == tuple(good)
    manifest = json.loads(object_bytes(ssl.s3, ssl.access.bucket_name, outcome.run_folder + MANIFEST_SUFFIX))
    assert manifest["rejected"] == 4
    assert {r["patch_id"] for r in manifest["rejections"]} == set(reasons)
    notifications = ssl.notifications()
    warnings = [n["description"] for n in notifications if n["status"] == "WARNING"]
    assert len(warnings) == 4 and any("missing band B05" in w for w in warnings)
    assert notifications[-1]["status"] == "SUCCESS" and "4 rejected" in notifications[-1]["description"]
    assert ssl.records([ssl.topic_out], until=lambda r: len(r) >= 1)[0]["value"]["S3_bucket_desc"]["folder"] == outcome.output_folder
    rejected_logs = [r for r in caplog.records if r.getMessage() == "input rejected"]
    assert {r.patch_id for r in rejected_logs} == set(reasons)  # type: ignore[attr-defined]
    assert_no_secrets(notifications, manifest, caplog.text)


def test_corrupt_archive_fails_the_step_and_leaves_nothing(server: InferenceServer, ssl: StepFixture) -> None:
    archive = sample_tar_gz(GOOD)
    ssl.s3.put_object(Bucket=ssl.access.bucket_name, Key="in/cut.tar.gz", Body=archive[: len(archive) * 3 // 4])

    outcome = ssl.run(ssl.runtime(server.grpc_url), "in")

    assert_failed_cleanly(ssl, outcome, "truncated", "in")
    assert list_keys(ssl.s3, ssl.access.bucket_name) == ["in/cut.tar.gz", outcome.output_folder + FAILED_SUFFIX]


def test_every_patch_rejected_is_a_failure(server: InferenceServer, ssl: StepFixture) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        add_sample_patch(archive, GOOD[0], skip_bands=["B02"])
    ssl.s3.put_object(Bucket=ssl.access.bucket_name, Key="in/bad.tar.gz", Body=buffer.getvalue())

    runtime = ssl.runtime(server.grpc_url)
    outcome = ssl.run(runtime, "in", event_id="partition:0/offset:4")

    assert_failed_cleanly(ssl, outcome, "No usable input", "in")
    assert "missing band B02" in outcome.reason
    # Delivered again: the failure is on record already (failed marker): no second run, no second record.
    again = ssl.run(runtime, "in", event_id="partition:0/offset:4")
    assert (again.status, again.earlier, again.output_folder) == ("DUPLICATE", "failed", outcome.output_folder)
    assert len(ssl.records([ssl.dlq_topic], timeout_s=3)) == 1
    assert [n["status"] for n in ssl.notifications(final=False)].count("START") == 1


def test_a_run_stopped_between_manifest_and_announcement_is_announced_on_redelivery(
    server: InferenceServer, ssl: StepFixture, caplog: pytest.LogCaptureFixture
) -> None:
    ssl.s3.put_object(Bucket=ssl.access.bucket_name, Key="in/ok.tar.gz", Body=sample_tar_gz(GOOD[:1]))
    # Kafka unreachable for this Wrapper: the manifest is written, the next-step message cannot be published.
    cut_off = ssl.runtime(server.grpc_url, bootstrap_servers=f"127.0.0.1:{free_port()}", kafka_timeout_s=2)
    first = ssl.run(cut_off, "in", event_id="partition:0/offset:9")
    assert first.status == "RETRY" and "Publishing the next step message" in first.reason
    keys = list_keys(ssl.s3, ssl.access.bucket_name, "result-")
    assert first.output_folder == first.run_folder  # nothing announced
    assert first.run_folder + MANIFEST_SUFFIX in keys and first.run_folder + ANNOUNCED_SUFFIX not in keys
    results = {k: object_bytes(ssl.s3, ssl.access.bucket_name, k) for k in keys}

    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = ssl.run(ssl.runtime(server.grpc_url), "in", event_id="partition:0/offset:9")

    assert again.status == "SUCCESS" and again.resumed_announcement and again.run_folder == first.run_folder
    assert not [r for r in caplog.records if r.getMessage() == "step started"]  # announced, not run again
    manifest = json.loads(results[first.run_folder + MANIFEST_SUFFIX])
    assert again.output_folder == manifest["folder"] == f"{first.run_folder}/{manifest['attempt']}"
    (record,) = ssl.records([ssl.topic_out], timeout_s=4)
    message = record["value"]
    assert message["S3_bucket_desc"]["folder"] == manifest["folder"]
    assert message["meta_information"] == step_message("in")["meta_information"]
    marker = json.loads(object_bytes(ssl.s3, ssl.access.bucket_name, first.run_folder + ANNOUNCED_SUFFIX))
    assert (marker["event_id"], marker["topic"]) == ("partition:0/offset:9", ssl.topic_out)
    assert marker["ce_id"] == record["headers"]["ce_id"] == f"{first.run_folder.rsplit('/', 1)[1]}/{ssl.topic_out}"
    assert {k: object_bytes(ssl.s3, ssl.access.bucket_name, k) for k in keys} == results  # nothing rewritten
    assert [n["status"] for n in ssl.notifications()] == ["SUCCESS"]  # the first run's went to no broker


def test_empty_folder_fails_the_step(server: InferenceServer, ssl: StepFixture) -> None:
    ssl.s3.put_object(Bucket=ssl.access.bucket_name, Key="elsewhere/x.tar.gz", Body=sample_tar_gz(GOOD[:1]))

    outcome = ssl.run(ssl.runtime(server.grpc_url), "in")

    record = assert_failed_cleanly(ssl, outcome, "no input found under 'in'", "in")
    assert record["reason"].startswith("Input error:")


def test_unreachable_s3_is_left_for_a_retry_without_leaking_credentials(
    server: InferenceServer, s3_access: S3Access, kafka_broker: Any, tmp_path: Path
) -> None:
    dead = s3_access.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    step = StepFixture(dead, kafka_broker.bootstrap_servers, tmp_path / "store", "ssl-features")

    outcome = step.run(step.runtime(server.grpc_url, s3_max_attempts=2), "in")

    assert_left_for_a_retry(step, outcome, "unreachable", started=False)
    assert dead.endpoint_url in outcome.reason


def test_inference_server_down_beyond_the_retry_bound_is_left_for_a_retry(
    ssl: StepFixture, caplog: pytest.LogCaptureFixture
) -> None:
    ssl.s3.put_object(Bucket=ssl.access.bucket_name, Key="in/ok.tar.gz", Body=sample_tar_gz(GOOD[:1]))
    runtime = ssl.runtime(
        f"127.0.0.1:{free_port()}", infer_retry_max_s=3, infer_backoff_initial_s=0.2, infer_backoff_max_s=0.5
    )

    with caplog.at_level(logging.WARNING):
        outcome = ssl.run(runtime, "in")

    assert_left_for_a_retry(ssl, outcome, "Inference server unavailable", started=True)
    assert "retry bound" in outcome.reason and "3 s" in outcome.reason
    # Retried for the whole bound, not cut short by a count.
    assert sum(r.getMessage() == "inference server unavailable, retrying" for r in caplog.records) >= 4
    assert not [k for k in list_keys(ssl.s3, ssl.access.bucket_name, "result-") if k.endswith(MANIFEST_SUFFIX)]


def test_inference_server_back_within_the_retry_bound(
    ssl: StepFixture, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ssl.s3.put_object(Bucket=ssl.access.bucket_name, Key="in/ok.tar.gz", Body=sample_tar_gz(GOOD))
    restarted = InferenceServer(tmp_path / "late-server.log", models=[SSL_MODEL])
    runtime = ssl.runtime(
        restarted.grpc_url, infer_retry_max_s=120, infer_backoff_initial_s=0.2,
        infer_backoff_max_s=0.5,
    )

    def start_late() -> None:
        time.sleep(1.0)
        restarted.start(wait=False)

    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        with caplog.at_level(logging.WARNING):
            outcome = ssl.run(runtime, "in")
    finally:
        starter.join()
        restarted.stop()

    assert outcome.status == "SUCCESS", outcome.reason
    assert outcome.patches == 2
    assert any(r.getMessage() == "inference server unavailable, retrying" for r in caplog.records)
    assert [n["status"] for n in ssl.notifications()][-1] == "SUCCESS"
    assert not ssl.records([ssl.dlq_topic], timeout_s=2)


def test_a_model_that_does_not_fit_the_task_fails_the_step(
    s3_access: S3Access, kafka_broker: Any, tmp_path: Path, server: InferenceServer
) -> None:
    step = StepFixture(s3_access, kafka_broker.bootstrap_servers, tmp_path / "store", "ssl-features")
    step.s3.put_object(Bucket=s3_access.bucket_name, Key="in/ok.tar.gz", Body=sample_tar_gz(GOOD[:1]))

    outcome = step.run(step.runtime(server.grpc_url, model_name=LINEAR_MODEL), "in")

    assert_failed_cleanly(step, outcome, "Model does not fit the task", "in")
    assert "card says task 'classify'" in outcome.reason


def test_a_model_the_server_does_not_have_fails_at_once(
    s3_access: S3Access, kafka_broker: Any, tmp_path: Path, server: InferenceServer
) -> None:
    step = StepFixture(s3_access, kafka_broker.bootstrap_servers, tmp_path / "store", "ssl-features")
    step.s3.put_object(Bucket=s3_access.bucket_name, Key="in/ok.tar.gz", Body=sample_tar_gz(GOOD[:1]))
    # A ready server that does not know the model: not a transient condition, so no retries.
    runtime = step.runtime(server.grpc_url, model_name="no-such-model", infer_backoff_initial_s=5)

    outcome = step.run(runtime, "in")

    assert_failed_cleanly(step, outcome, "Inference failed", "in")
    assert "no-such-model" in outcome.reason and "NOT_FOUND" in outcome.reason


def test_a_message_that_is_not_an_end_marker_is_ignored(server: InferenceServer, ssl: StepFixture) -> None:
    outcome = ssl.run(ssl.runtime(server.grpc_url), "in", previous_component_end="False")

    assert outcome.status == "IGNORED"
    assert ssl.records(timeout_s=3) == []
