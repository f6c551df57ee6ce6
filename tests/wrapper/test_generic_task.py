"""Task ``generic`` and the cloud filter end to end: the served ``s2-cloud-mask`` (the ukis-csmask L2A model,
onboarded only through its card) through ``run_step`` and through the real ``eo-wrapper`` process, on real
BigEarthNet sample patches in moto S3, with our inference server and tansu Kafka.

Expected masks come from ``ukis_csmask.CSmask`` run directly (its own ONNX Runtime session, not the server) on
the same 30 m working stack (``bench/cloud_mask_agreement.py``); expected georeferencing from the patch's own
metadata JSON (read without rasterio).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import rasterio

from services.core.model_card import load_card
from services.wrapper.outputs.quicklook import decode_png
from services.wrapper.results import MANIFEST_SUFFIX, run_folder_of
from wrapper_input_data import SAMPLE_PATCHES, sample_georeference, upload_patch_folder
from wrapper_stack import (  # noqa: F401 - close_step_runtimes is an autouse fixture
    PROJECT_ROOT,
    close_step_runtimes,
    InferenceServer,
    StepFixture,
    assert_no_secrets,
    list_keys,
    object_bytes,
)
from test_pipeline_tasks import check_announced, check_manifest

sys.path.insert(0, str(PROJECT_ROOT / "bench"))
import cloud_mask_agreement as agreement  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (PROJECT_ROOT / "model_repository" / "s2-cloud-mask" / "1" / "model.onnx").exists(),
    reason="s2-cloud-mask is fetched by `make models`",
)

MASK_MODEL = "s2-cloud-mask"
SSL_MODEL = "Bigearth-net-ssl-label"
# Real patches with shadow (27_57: ~63 %, 37_90: ~28 %), a little cloud (38_88), a clear one (27_56) and a
# clear georeferenced one (36_85: EPSG:32629; the others carry no georeferencing).
PATCHES = (*(f"S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_{n}" for n in ("27_56", "27_57", "37_90", "38_88")),
           "S2A_MSIL2A_20170617T113321_36_85")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log",
                              models=[MASK_MODEL, SSL_MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    """Per patch: CSmask's class codes on the working grid and their fractions."""
    text = (PROJECT_ROOT / "model_repository" / MASK_MODEL / "config.pbtxt").read_text()
    card = _card_from_pbtxt(text)
    out: dict[str, dict[str, Any]] = {}
    from services.wrapper import generic_kinds

    for patch in PATCHES:
        scene = agreement.read_patch(SAMPLE_PATCHES / patch)
        stack = generic_kinds.working_stack(scene, card)
        codes = np.asarray(card.codes, dtype=np.uint8)[agreement.reference_mask(stack, card, batch_size=4)]
        fractions = {name: float(np.mean(codes == code)) for name, code in zip(card.class_names, card.codes)}
        out[patch] = {"codes": codes, "fractions": fractions}
    return out


def _card_from_pbtxt(text: str) -> Any:
    """The card from ``card.*`` parameters of a config.pbtxt (a plain reading of the text format)."""
    import re

    parameters = dict(re.findall(r'key:\s*"(card\.[^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text))
    return load_card(parameters)


def make_step(task: str, s3_access: Any, kafka_broker: Any, tmp_path: Path) -> StepFixture:
    step = StepFixture(s3_access, kafka_broker.bootstrap_servers, tmp_path / "store", task)
    for patch in PATCHES:
        upload_patch_folder(step.s3, s3_access.bucket_name, "scenes/t33uup/", patch)
    return step


def test_cloud_mask_step_writes_georeferenced_class_rasters_fractions_and_quicklooks(
    server: InferenceServer, s3_access: Any, kafka_broker: Any, tmp_path: Path, reference: dict[str, Any]
) -> None:
    step = make_step("generic", s3_access, kafka_broker, tmp_path)
    runtime = step.runtime(server.grpc_url, model_name=MASK_MODEL)
    outcome = step.run(runtime, "scenes/t33uup")

    assert outcome.status == "SUCCESS", outcome.reason
    assert outcome.output_folder.startswith("result-s2-cloud-mask/")
    check_announced(step, outcome)
    manifest = check_manifest(step, outcome)
    assert manifest["task"] == "generic" and manifest["model"]["name"] == MASK_MODEL
    assert manifest["patches"] == len(PATCHES)
    (unit,) = manifest["stats"]["per_input"]
    entries = {entry["patch_id"]: entry for entry in unit["patches"]}
    assert sorted(entries) == sorted(PATCHES)
    bucket = s3_access.bucket_name
    for patch in PATCHES:
        raster_key = f"{outcome.output_folder}/t33uup/{patch}.classes.tif"
        with rasterio.open(io.BytesIO(object_bytes(step.s3, bucket, raster_key))) as dataset:
            codes = dataset.read(1)
            georeference = sample_georeference(patch)
            if georeference is None:  # the input has none: the raster claims none
                assert dataset.crs is None
            else:
                epsg, ulx, uly = georeference
                assert dataset.crs.to_epsg() == int(epsg.split(":")[1])
                assert (dataset.transform.a, dataset.transform.e) == (30.0, -30.0)
                assert (dataset.transform.c, dataset.transform.f) == (ulx, uly)
            assert dataset.nodata == 255 and dataset.colormap(1)[1][:3] == (0xF2, 0xE6, 0x00)  # cloud: yellow
            assert json.loads(dataset.tags()["class_names"]) == ["clear", "cloud", "shadow"]
        expected = reference[patch]
        assert codes.shape == (40, 40)
        assert np.mean(codes == expected["codes"]) >= agreement.TARGET_AGREEMENT
        for name, value in expected["fractions"].items():
            assert entries[patch]["class_fractions"][name] == pytest.approx(value, abs=1e-3)
            # The manifest's figures are those of the raster it lists.
            assert entries[patch]["class_fractions"][name] == pytest.approx(
                float(np.mean(codes == ["clear", "cloud", "shadow"].index(name))), abs=1e-6)
        picture = decode_png(object_bytes(step.s3, bucket, f"{outcome.output_folder}/t33uup/{patch}.quicklook.png"))
        assert picture.shape == (120, 120, 3)
    assert sum(sample_georeference(p) is not None for p in PATCHES) == 1
    assert sorted(manifest["stats"]["quicklooks"]) == sorted(
        f"{outcome.output_folder}/t33uup/{patch}.quicklook.png" for patch in PATCHES)
    shadowy = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_27_57"
    assert entries[shadowy]["class_fractions"]["shadow"] > 0.3  # a real shadow, seen by both
    pooled = unit["class_fractions"]
    assert pooled["shadow"] == pytest.approx(np.mean([reference[p]["fractions"]["shadow"] for p in PATCHES]), abs=1e-3)


def _expected_above(reference: dict[str, Any], limit: float, include_shadow: bool) -> set[str]:
    return {p for p in PATCHES if reference[p]["fractions"]["cloud"]
            + (reference[p]["fractions"]["shadow"] if include_shadow else 0.0) > limit}


def test_cloud_filter_skips_cloudy_patches_of_a_features_step(
    server: InferenceServer, s3_access: Any, kafka_broker: Any, tmp_path: Path, reference: dict[str, Any]
) -> None:
    from services.wrapper.outputs import read_features

    step = make_step("ssl-features", s3_access, kafka_broker, tmp_path)
    meta = {"request": "filtered", "cloud_filter": {"max_cloud_fraction": 0.2, "include_shadow": True}}
    outcome = step.run(step.runtime(server.grpc_url), "scenes/t33uup", meta=meta)

    assert outcome.status == "SUCCESS", outcome.reason
    check_announced(step, outcome, meta=meta)  # meta_information passed on as received
    manifest = check_manifest(step, outcome)
    skipped = _expected_above(reference, 0.2, include_shadow=True)
    assert skipped and skipped != set(PATCHES)
    features = read_features(object_bytes(step.s3, s3_access.bucket_name, f"{outcome.output_folder}/t33uup.features.npz"))
    assert set(features.patch_ids) == set(PATCHES) - skipped
    assert {r["patch_id"] for r in manifest["rejections"]} == skipped
    assert all("above the workflow's max_cloud_fraction 0.2" in r["reason"] for r in manifest["rejections"])
    assert "quicklooks" not in manifest["stats"]  # QUICKLOOKS=auto: production tasks write what they always wrote
    cloud = manifest["stats"]["cloud_filter"]
    assert (cloud["model"], cloud["action"], cloud["measured"], cloud["skipped"]) == (MASK_MODEL, "skip", len(PATCHES), len(skipped))
    for record in cloud["patches"]:
        fractions = reference[record["patch_id"]]["fractions"]
        assert record["cloud_fraction"] == pytest.approx(fractions["cloud"], abs=1e-3)
        assert record["shadow_fraction"] == pytest.approx(fractions["shadow"], abs=1e-3)
        assert record.get("skipped", False) == (record["patch_id"] in skipped)


def test_cloud_filter_flags_without_skipping_and_a_bad_filter_fails_clearly(
    server: InferenceServer, s3_access: Any, kafka_broker: Any, tmp_path: Path, reference: dict[str, Any]
) -> None:
    from services.wrapper.outputs import read_features

    step = make_step("ssl-features", s3_access, kafka_broker, tmp_path)
    runtime = step.runtime(server.grpc_url, quicklooks="always")
    meta = {"cloud_filter": {"max_cloud_fraction": 0.01, "action": "flag"}}
    outcome = step.run(runtime, "scenes/t33uup", meta=meta)
    assert outcome.status == "SUCCESS", outcome.reason
    manifest = check_manifest(step, outcome)
    flagged = _expected_above(reference, 0.01, include_shadow=False)
    assert flagged  # 38_88 has a little cloud
    features = read_features(object_bytes(step.s3, s3_access.bucket_name, f"{outcome.output_folder}/t33uup.features.npz"))
    assert set(features.patch_ids) == set(PATCHES) and not manifest["rejections"]
    cloud = manifest["stats"]["cloud_filter"]
    assert {r["patch_id"] for r in cloud["patches"] if r.get("flagged")} == flagged
    assert cloud["flagged"] == len(flagged) and cloud["skipped"] == 0
    # QUICKLOOKS=always: a true-colour picture per patch next to the features, listed in the manifest.
    assert sorted(manifest["stats"]["quicklooks"]) == sorted(
        f"{outcome.output_folder}/t33uup/{patch}.quicklook.png" for patch in PATCHES)
    for key in manifest["stats"]["quicklooks"]:
        assert decode_png(object_bytes(step.s3, s3_access.bucket_name, key)).shape == (120, 120, 3)

    bad = step.run(runtime, "scenes/t33uup", meta={"cloud_filter": {"max_cloud_fraction": 1.5}})
    assert bad.status == "CRITICAL"
    assert "meta_information.cloud_filter is invalid" in bad.reason and "max_cloud_fraction" in bad.reason
    dead = step.records([step.dlq_topic], until=lambda r: len(r) >= 1)
    assert len(dead) == 1
    assert_no_secrets(dead, bad.reason)
    assert not [k for k in list_keys(step.s3, s3_access.bucket_name, bad.output_folder) if k.endswith(MANIFEST_SUFFIX)]


def test_eo_wrapper_process_serves_the_cloud_mask_through_task_generic(
    server: InferenceServer, s3_access: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    """The real ``eo-wrapper`` process, configured on its command line as the chart's ``cloud-mask`` deployment is
    through the environment, answers a KafkaSource-style delivery once the mask results are announced."""
    import os
    import signal
    import subprocess
    import time

    from services.local_platform.infra import free_port
    from test_service_http import cloudevent_headers, get, post

    step = make_step("generic", s3_access, kafka_broker, tmp_path)
    port = free_port()
    env = {**os.environ, "EOML_WRAPPER_STORE_ROOT": str(step.store_root), "EOML_WRAPPER_NAMESPACE": step.namespace,
           "EOML_WRAPPER_NOTIFY_TOPIC": step.notify_topic, "EOML_WRAPPER_LOG_FORMAT": "json"}
    log_path = tmp_path / "wrapper.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.wrapper.cli", "--task", "generic", "--model-name", MASK_MODEL,
             "--inference-url", server.grpc_url, "--http-host", "127.0.0.1", "--http-port", str(port),
             "--quicklook-max-side", "64"],
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
        body = json.dumps({"previous_component_end": "True", "S3_bucket_desc": {"folder": "scenes/t33uup",
                                                                                 "filename": ""},
                           "meta_information": {}}).encode()
        status, answer, _ = post(f"http://127.0.0.1:{port}/{step.config.config_name}", body, cloudevent_headers(step))
        assert status == 200, answer
        (record,) = step.records([step.topic_out], until=lambda r: len(r) >= 1)
        folder = record["value"]["S3_bucket_desc"]["folder"]
        assert folder.startswith("result-s2-cloud-mask/t33uup-")
        manifest = json.loads(object_bytes(step.s3, s3_access.bucket_name, run_folder_of(folder) + MANIFEST_SUFFIX))
        assert manifest["task"] == "generic" and manifest["patches"] == len(PATCHES)
        assert len(manifest["stats"]["quicklooks"]) == len(PATCHES)
        # --quicklook-max-side 64: the 120 x 120 pictures are block-averaged by 2.
        picture = decode_png(object_bytes(step.s3, s3_access.bucket_name, manifest["stats"]["quicklooks"][0]))
        assert picture.shape == (60, 60, 3)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0
    assert_no_secrets(log_path.read_text())
