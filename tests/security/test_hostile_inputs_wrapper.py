"""Hostile input files through the real ``eo-wrapper`` (issue 18, item 1), on the local stack: moto S3, tansu Kafka,
our inference server, the Wrapper process started as its console command is.

One step's input folder holds a tar.gz of BigEarthNet patches in which each hostile patch has one band file that is
not a GeoTIFF but a GDAL meta-format or file-referencing format (VRT reading a local raw file or GeoTIFF, VRT on
``/vsicurl/``, WMS, WCS, GTI, ISIS3 and PDS3 labels), beside clean patches; and Sentinel-2 SAFE products whose
``.jp2`` band is VRT (``/vsicurl/``, raw local file) or a PDS3 label climbing out of the scratch folder. What holds:
the step succeeds with the clean patches, each hostile patch or product is rejected with a reason that says what
its file is, the loopback listener the files point at gets no request, and no output holds the canary's pixels.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import rasterio
from moto.server import ThreadedMotoServer
from rasterio.transform import from_origin

from hostile_rasters import HOSTILE, Canary, canary_bytes_in
from security_support import PROJECT_ROOT, ServiceProcess, cloudevent_headers, http

sys.path.insert(0, str(PROJECT_ROOT / "tests" / "wrapper"))
from wrapper_input_data import add_bytes, add_sample_patch, sample_patch_names  # noqa: E402
from wrapper_stack import InferenceServer, StepFixture, list_keys, object_bytes  # noqa: E402

from services.local_platform.infra import free_port  # noqa: E402
from services.wrapper.inputs import S3Access, make_s3_client  # noqa: E402
from services.wrapper.results import MANIFEST_SUFFIX  # noqa: E402

TASK = MODEL = "uc5-cfactor"
CLEAN_PATCHES = 2
HOSTILE_BAND = "B02"
SAFE_10M = ("B02", "B03", "B04", "B08")
SAFE_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
SAFE_HOSTILE = ("vrt-vsicurl", "vrt-raw-band", "pds3-label")  # what each product's B02 .jp2 really is
GRANULE, STEM = "L2A_T33UUP_A035000_20240101T100305", "T33UUP_20240101T100309"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    if not (PROJECT_ROOT / "model_repository" / MODEL).exists():
        pytest.skip("no exported models: run 'make models' (make test does)")
    started = InferenceServer(tmp_path_factory.mktemp("inference") / "server.log", models=[MODEL]).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Canary]:
    made = Canary.make(tmp_path / "canary")
    yield made
    made.close()


def _hostile_tar_gz(canary: Canary, clean: list[str], hostile: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for patch in clean:
            add_sample_patch(archive, patch)
        for patch, kind in hostile.items():
            add_sample_patch(archive, patch, skip_bands=[HOSTILE_BAND])
            add_bytes(archive, f"{patch}/{patch}_{HOSTILE_BAND}.tif", HOSTILE[kind](canary))
    return buffer.getvalue()


def _jp2_bytes(array: np.ndarray, pixel_size: float) -> bytes:
    with rasterio.MemoryFile() as memory:
        with memory.open(driver="JP2OpenJPEG", width=array.shape[1], height=array.shape[0], count=1, dtype="uint16",
                         crs="EPSG:32633", transform=from_origin(399960, 5300040, pixel_size, pixel_size),
                         QUALITY=100, REVERSIBLE="YES", YCBCR420="NO") as dataset:
            dataset.write(array, 1)
        return bytes(memory.read())


def _upload_safe_product(step: StepFixture, product: str, hostile_b02: bytes) -> None:
    rng = np.random.default_rng(18)
    for band in SAFE_10M + SAFE_20M:
        resolution = 10 if band in SAFE_10M else 20
        side = 240 if band in SAFE_10M else 120
        key = f"in/{product}.SAFE/GRANULE/{GRANULE}/IMG_DATA/R{resolution}m/{STEM}_{band}_{resolution}m.jp2"
        data = hostile_b02 if band == "B02" else _jp2_bytes(rng.integers(1, 10_000, (side, side), np.uint16),
                                                            float(resolution))
        step.s3.put_object(Bucket=step.access.bucket_name, Key=key, Body=data)


def test_hostile_band_files_through_the_real_wrapper(moto_endpoint: str, inference: InferenceServer,
                                                     kafka_broker: Any, canary: Canary, tmp_path: Path) -> None:
    access = S3Access(bucket_name=f"hostile-{uuid.uuid4().hex[:10]}", aws_access_key_id="AKIATESTWRAPPERINPUT",
                      aws_secret_access_key="wrapper-input-secret-never-shown-0123456789",
                      endpoint_url=moto_endpoint, max_attempts=2)
    make_s3_client(access).create_bucket(Bucket=access.bucket_name)
    step = StepFixture(access, kafka_broker.bootstrap_servers, tmp_path / "store", TASK)
    names = sample_patch_names()
    clean = names[:CLEAN_PATCHES]
    hostile = dict(zip(names[CLEAN_PATCHES:], sorted(HOSTILE)))
    step.s3.put_object(Bucket=access.bucket_name, Key="in/patches.tar.gz",
                       Body=_hostile_tar_gz(canary, clean, hostile))
    products = {f"S2B_MSIL2A_20240101T100309_N0510_R122_T33UUP_{index:02d}": kind
                for index, kind in enumerate(SAFE_HOSTILE)}
    for product, kind in products.items():
        _upload_safe_product(step, product, HOSTILE[kind](canary))

    port = free_port()
    wrapper = _start_wrapper(step, inference.grpc_url, tmp_path / "wrapper.log", port)
    try:
        body = _post_step(port, step, wrapper)
    finally:
        wrapper.stop()

    # Nothing reached the listener the hostile files point at.
    assert canary.listener.requests == []
    # The clean patches went through; every hostile patch and product is a rejection saying what its file is.
    assert body["status"] == "SUCCESS", body
    run_folder = body["folder"].rsplit("/", 1)[0]  # the answer names the announced attempt folder inside the run folder
    manifest = json.loads(object_bytes(step.s3, access.bucket_name, run_folder + MANIFEST_SUFFIX))
    assert manifest["patches"] == CLEAN_PATCHES
    reasons = {r["patch_id"]: r["reason"] for r in manifest["rejections"]}
    for patch in hostile:
        assert reasons.get(patch, "").startswith(f"band {HOSTILE_BAND} is not a GeoTIFF file (it starts with "), \
            (patch, hostile[patch], reasons.get(patch))
    for product in products:
        (reason,) = [r["reason"] for r in manifest["rejections"] if r["source"].endswith(f"{product}.SAFE")]
        assert reason.startswith("band B02 is not a JPEG 2000 file (it starts with "), (products[product], reason)
    assert manifest["rejected"] == len(hostile) + len(products)

    # No output holds the canary's pixels; the Wrapper set its GDAL policy before GDAL registered its drivers.
    outputs = [key for key in list_keys(step.s3, access.bucket_name) if not key.startswith("in/")]
    assert len([key for key in outputs if key.endswith(".tif")]) == CLEAN_PATCHES  # one raster per clean patch
    assert [key for key in outputs if any(patch in key for patch in hostile)] == []
    leaked = [key for key in outputs if canary_bytes_in(object_bytes(step.s3, access.bucket_name, key))]
    assert leaked == []
    log_text = wrapper.log_path.read_text(errors="replace")
    assert "registered before the GDAL policy" not in log_text
    assert not canary_bytes_in(log_text.encode())


def _start_wrapper(step: StepFixture, inference_url: str, log_path: Path, port: int) -> ServiceProcess:
    env = {
        "EOML_WRAPPER_TASK": TASK, "EOML_WRAPPER_HTTP_HOST": "127.0.0.1", "EOML_WRAPPER_HTTP_PORT": str(port),
        "EOML_WRAPPER_INFERENCE_URL": inference_url, "EOML_WRAPPER_STORE_ROOT": str(step.store_root),
        "EOML_WRAPPER_NAMESPACE": step.namespace, "EOML_WRAPPER_NOTIFY_TOPIC": step.notify_topic,
        "EOML_WRAPPER_WORKERS": "1", "EOML_WRAPPER_PROGRESS_INTERVAL_S": "0", "EOML_WRAPPER_LOG_FORMAT": "json",
        "POD_NAME": f"wrapper-hostile-{uuid.uuid4().hex[:6]}",
    }
    return ServiceProcess("services.wrapper.cli", [], env, log_path, f"http://127.0.0.1:{port}/readyz")


def _post_step(port: int, step: StepFixture, wrapper: ServiceProcess) -> dict[str, Any]:
    body = json.dumps({"previous_component_end": "True", "S3_bucket_desc": {"folder": "in", "filename": ""},
                       "meta_information": {"case": "hostile-inputs"}}).encode()
    headers = {**cloudevent_headers(step.namespace, step.topic_in, 0), "ce-time": "2026-07-08T09:10:11Z"}
    status, answer = http("POST", f"http://127.0.0.1:{port}/{step.config.config_name}", body, headers,
                          timeout_s=300)
    assert status == 200, (status, answer[:500], wrapper.log()[-3000:])
    return json.loads(answer)
