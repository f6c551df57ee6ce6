"""docs/add-your-model.md's model served as a workflow step: steps 1-2 of the guide run literally in a temporary
directory (the tiny ONNX water mask and its config.pbtxt), our inference server serves that temporary repository,
and the guide's "as a workflow step" command starts the real ``eo-wrapper`` (task ``generic``; only ports, listen
address and the local store's place added). A KafkaSource-style delivery of a step whose input is a real sample
patch (sea) in moto S3 gets the class GeoTIFF, the quicklook and the fractions; Kafka is tansu.

Nothing of the Wrapper names the water model: this is the line count "the new model needed" (none).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from services.local_platform.infra import free_port, free_ports
from services.wrapper.outputs.quicklook import decode_png
from services.wrapper.results import MANIFEST_SUFFIX
from test_service_http import cloudevent_headers, get, post
from wrapper_input_data import SAMPLE_PATCHES, upload_patch_folder
from wrapper_stack import PROJECT_ROOT, StepFixture, assert_no_secrets, list_keys, object_bytes

GUIDE = PROJECT_ROOT / "docs" / "add-your-model.md"
SEA_PATCH = "S2A_MSIL2A_20170613T101031_39_24"
_STEP = re.compile(r"```(?P<language>\w+)\n# (?P<title>step \d|as a workflow step)[^\n]*\n(?P<body>.*?)```", re.S)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")]


def guide_blocks() -> dict[str, str]:
    return {m["title"]: m["body"] for m in _STEP.finditer(GUIDE.read_text())}


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> int:
    os.killpg(process.pid, signal.SIGTERM)
    return process.wait(timeout=60)


def test_the_guides_model_runs_as_a_workflow_step_through_the_generic_wrapper(
    s3_access: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    blocks = guide_blocks()
    assert {"step 1", "step 2", "step 4", "as a workflow step"} <= set(blocks), "the guide changed: update this test"
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    made = subprocess.run([sys.executable, "-c", blocks["step 1"]], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    (workdir / "my_repository/s2-water-demo/config.pbtxt").write_text(blocks["step 2"])

    http_port, grpc_port, metrics_port = free_ports(3)
    serve = (blocks["step 4"].replace("8000", str(http_port)).replace("8001", str(grpc_port))
             .replace("8002", str(metrics_port)).strip() + " --http-address 127.0.0.1 --grpc-address 127.0.0.1")
    step = StepFixture(s3_access, kafka_broker.bootstrap_servers, tmp_path / "store", "generic")
    upload_patch_folder(step.s3, s3_access.bucket_name, "coast/", SEA_PATCH)
    wrapper_port = free_port()
    run_wrapper = (blocks["as a workflow step"].replace("127.0.0.1:8001", f"127.0.0.1:{grpc_port}")
                   .replace("--store-root step-configs", f"--store-root {step.store_root}").strip()
                   + f" --http-host 127.0.0.1 --http-port {wrapper_port} --namespace {step.namespace}"
                   f" --notify-topic {step.notify_topic}")
    server_log, wrapper_log = tmp_path / "server.log", tmp_path / "wrapper.log"
    with server_log.open("wb") as log:
        server = subprocess.Popen(["bash", "-c", serve], cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    wrapper = None
    try:
        wait_http(f"http://127.0.0.1:{http_port}/v2/models/s2-water-demo/ready", server, server_log)
        with wrapper_log.open("wb") as log:
            wrapper = subprocess.Popen(["bash", "-c", run_wrapper], cwd=workdir, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"http://127.0.0.1:{wrapper_port}/healthz", wrapper, wrapper_log)
        assert get(f"http://127.0.0.1:{wrapper_port}/healthz")[0] == 200
        body = json.dumps({"previous_component_end": "True",
                           "S3_bucket_desc": {"folder": "coast", "filename": ""}, "meta_information": {}}).encode()
        status, answer, _ = post(f"http://127.0.0.1:{wrapper_port}/{step.config.config_name}", body,
                                 cloudevent_headers(step))
        assert status == 200, (answer, wrapper_log.read_text()[-3000:])
    finally:
        if wrapper is not None:
            assert stop(wrapper) == 0
        stop(server)

    (record,) = step.records([step.topic_out], until=lambda r: len(r) >= 1)
    folder = record["value"]["S3_bucket_desc"]["folder"]
    assert folder.startswith("result-s2-water-demo/coast-")
    bucket = s3_access.bucket_name
    # The one manifest of the output folder (found by listing: ``eo-wrapper`` here is the installed entry point,
    # which in a shared development venv may be another checkout's code).
    (manifest_key,) = [k for k in list_keys(step.s3, bucket, folder.split("/r-")[0] + "/") if k.endswith(MANIFEST_SUFFIX)]
    manifest = json.loads(object_bytes(step.s3, bucket, manifest_key))
    assert manifest["folder"] == folder
    assert manifest["model"]["name"] == "s2-water-demo" and manifest["patches"] == 1
    (unit,) = manifest["stats"]["per_input"]
    (entry,) = unit["patches"]
    with rasterio.open(_local(step, bucket, f"{folder}/coast/{SEA_PATCH}.classes.tif", tmp_path)) as dataset:
        codes = dataset.read(1)
        assert dataset.colormap(1)[1][:3] == (0x1F, 0x78, 0xB4) and dataset.nodata == 255

    # Independently of the platform's code: water where the 20 m block mean of green exceeds that of nir.
    def block_mean(band: str) -> np.ndarray:
        with rasterio.open(SAMPLE_PATCHES / SEA_PATCH / f"{SEA_PATCH}_{band}.tif") as dataset:
            return dataset.read(1).astype(np.float64).reshape(60, 2, 60, 2).mean(axis=(1, 3))

    expected = (block_mean("B03") > block_mean("B08")).astype(np.uint8)
    assert codes.shape == (60, 60)
    assert np.mean(codes == expected) >= 0.999
    assert entry["class_fractions"]["water"] == pytest.approx(float(codes.mean()), abs=1e-6) and codes.mean() > 0.5
    (quicklook_key,) = manifest["stats"]["quicklooks"]
    assert decode_png(object_bytes(step.s3, bucket, quicklook_key)).shape == (120, 120, 3)
    assert_no_secrets(wrapper_log.read_text(), manifest)


def _local(step: StepFixture, bucket: str, key: str, tmp_path: Path) -> Path:
    path = tmp_path / key.rsplit("/", 1)[-1]
    path.write_bytes(object_bytes(step.s3, bucket, key))
    return path
