"""What is stored in the open carries no credential; decoders refuse inputs that would decode to more than a limit
before allocating; the Wrapper's inference client can present the restricted-API header when configured."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import numpy as np
import pytest

from security_support import CANARY, RecordingServer
from services.core.contracts import WorkflowMessage
from services.core.step_config import LocalStepConfigStore, step_config_from_message
from services.core.step_config_k8s import EXTRA_CREDENTIALS_KEY, config_map_body, secret_body
from services.wrapper.inference_client import ModelClient
from services.wrapper.inputs.decode_limits import DecodeLimitExceeded, check_npy, check_npz
from services.wrapper.outputs.features import read_features
from services.wrapper.outputs.types import OutputFormatError
from services.wrapper.preprocess import PatchInvalid, read_era5_stack


def message(**bucket_extra) -> WorkflowMessage:
    return WorkflowMessage.model_validate({
        "workflow_name": "wf", "workflow_status": "published", "Topics": {"in": "a.in", "out": "a.out"},
        "ML": {"ServiceName": "classify", "Namespace": "uc1"},
        "S3_bucket": {"aws_access_key_id": "AKIA" + CANARY, "aws_secret_access_key": CANARY,
                      "s3-bucket-name": "bucket", "region_name": "eu-central-1",
                      "endpoint_url": "https://s3.eu-central-1.amazonaws.com", **bucket_extra},
        "api_password": CANARY, "nested": {"deeper": {"refresh_token": CANARY, "kept": "yes"}}})


def test_everything_but_bucket_region_and_endpoint_goes_to_the_credentials(tmp_path) -> None:
    config, credentials = step_config_from_message(
        message(aws_session_token="session-" + CANARY, sse_customer_key=CANARY, odd={"nested": CANARY}), "kafka:9092")
    stored = config.model_dump_json()
    assert CANARY not in stored
    assert config.message["S3_bucket"] == {"s3-bucket-name": "bucket", "region_name": "eu-central-1",
                                           "endpoint_url": "https://s3.eu-central-1.amazonaws.com"}
    assert config.message["nested"] == {"deeper": {"kept": "yes"}}  # secret-looking keys dropped at any depth
    assert set(credentials.extra) == {"aws_session_token", "sse_customer_key", "odd"}
    assert CANARY not in repr(credentials) and CANARY not in str(credentials.extra)
    # Kubernetes: the ConfigMap is clean, the Secret holds every credential.
    assert CANARY not in json.dumps(config_map_body(config))
    secret = secret_body(config, credentials)
    extra = json.loads(base64.b64decode(secret["data"][EXTRA_CREDENTIALS_KEY]))
    assert extra["aws_session_token"] == "session-" + CANARY
    # Locally: the config file is clean, the 0600 credentials file holds them, and they read back.
    store = LocalStepConfigStore(tmp_path)
    store.put("uc1", config, credentials)
    assert CANARY not in (tmp_path / "uc1" / f"{config.config_name}.json").read_text()
    _, read_back = store.get("uc1", config.config_name)
    assert read_back.revealed_extra()["aws_session_token"] == "session-" + CANARY


def test_an_endpoint_with_userinfo_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError) as refused:
        step_config_from_message(message(endpoint_url=f"https://AKIA:{CANARY}@s3.example.org"), "")
    assert CANARY not in str(refused.value)


def npy_header_only(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 64


def npz_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_npz_whose_header_claims_terabytes_is_refused_before_allocation() -> None:
    bomb = npz_of({"features.npy": npy_header_only((1 << 37,)), "patch_ids.npy": npy_header_only((1,)),
                   "i.npy": npy_header_only((1,)), "j.npy": npy_header_only((1,))})
    assert len(bomb) < 2048
    with pytest.raises(OutputFormatError, match="exceeds|larger than its data"):
        read_features(bomb)


def test_npz_decompression_bomb_and_member_flood_are_refused() -> None:
    zeros = io.BytesIO()
    np.save(zeros, np.zeros(4 * 1024 * 1024 // 8))  # 4 MiB of zeros: deflates to a few KiB
    bomb = npz_of({"features.npy": zeros.getvalue()})
    assert len(bomb) < 64 * 1024
    with pytest.raises(DecodeLimitExceeded, match="MiB"):
        check_npz(bomb, max_bytes=1024 * 1024)
    check_npz(bomb, max_bytes=8 * 1024 * 1024)  # within the limit: accepted
    flood = npz_of({f"a{n}.npy": npy_header_only((1,)) for n in range(100)})
    with pytest.raises(DecodeLimitExceeded, match="members"):
        check_npz(flood)


def test_npy_input_of_uc6_is_checked_before_it_is_loaded() -> None:
    with pytest.raises(DecodeLimitExceeded):
        check_npy(npy_header_only((4, 2, 1 << 20, 1 << 20)))
    with pytest.raises(PatchInvalid, match="exceeds"):
        read_era5_stack(npy_header_only((4, 2, 1 << 20, 1 << 20), "<f4"), "huge.npy")


def test_raster_dimensions_are_checked_before_decode() -> None:
    from rasterio.io import MemoryFile

    from services.wrapper.inputs.band_files import BandDecodeError, decode_band_file

    # A GeoTIFF header declaring 60000 x 60000 pixels, tiled and deflated: tiny on disk, 7 GB decoded.
    with MemoryFile() as memory:
        with memory.open(driver="GTiff", width=60000, height=60000, count=1, dtype="uint16", tiled=True,
                         compress="deflate", sparse_ok=True) as dataset:
            dataset.write(np.zeros((1, 16, 16), dtype=np.uint16),
                          window=((0, 16), (0, 16)))
        data = memory.read()
    assert len(data) < 5 * 1024 * 1024
    with pytest.raises(BandDecodeError, match="pixels"):
        decode_band_file(data)


def test_inference_client_sends_the_restricted_api_header_only_when_configured(monkeypatch) -> None:
    server = RecordingServer(status=200)
    try:
        url = f"127.0.0.1:{server.port}"
        ModelClient(url, "http", "m").model_ready()
        assert "eoml-admin-key" not in server.request_headers[-1]
        monkeypatch.setenv("EOML_WRAPPER_INFERENCE_RESTRICTED_HEADER", "eoml-admin-key=" + CANARY)
        ModelClient(url, "http", "m").model_ready()
        assert server.request_headers[-1]["eoml-admin-key"] == CANARY
        from services.wrapper.inference_client import RestrictedApiHeader

        assert RestrictedApiHeader().headers("grpc") == {"triton-grpc-protocol-eoml-admin-key": CANARY}
    finally:
        server.close()
