"""BF16 tensors: binary HTTP and gRPC raw contents carry them (ml_dtypes.bfloat16, as Triton's clients send
them); JSON cannot, with Triton's error."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from services.inference.protocol import array_from_raw, array_to_raw, numpy_dtype
from tiny_models import make_bf16_square

VALUES = np.array([[1.5, -2.0, 3.0], [0.25, 8.0, -0.5]], dtype=ml_dtypes.bfloat16)


def test_raw_bf16_round_trip() -> None:
    assert numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    raw = array_to_raw(VALUES)
    assert len(raw) == VALUES.size * 2
    np.testing.assert_array_equal(array_from_raw(raw, "BF16", list(VALUES.shape)), VALUES)


@pytest.fixture
def bf16_server(tmp_path: Path, running_server):
    repository = tmp_path / "repository"
    make_bf16_square(repository)
    return running_server(repository)


def test_bf16_over_http_binary_and_grpc(bf16_server) -> None:
    expected = (VALUES.astype(np.float32) ** 2).astype(ml_dtypes.bfloat16)
    http_client = triton_http.InferenceServerClient(bf16_server.http_url)
    metadata = http_client.get_model_metadata("bf16_square")
    assert metadata["inputs"][0]["datatype"] == "BF16" and metadata["outputs"][0]["datatype"] == "BF16"
    infer_input = triton_http.InferInput("INPUT0", list(VALUES.shape), "BF16")
    infer_input.set_data_from_numpy(VALUES, binary_data=True)
    result = http_client.infer("bf16_square", [infer_input],
                               outputs=[triton_http.InferRequestedOutput("OUTPUT0", binary_data=True)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0").astype(np.float32), expected.astype(np.float32))
    http_client.close()

    grpc_client = triton_grpc.InferenceServerClient(bf16_server.grpc_url)
    grpc_input = triton_grpc.InferInput("INPUT0", list(VALUES.shape), "BF16")
    grpc_input.set_data_from_numpy(VALUES)
    result = grpc_client.infer("bf16_square", [grpc_input])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0").astype(np.float32), expected.astype(np.float32))
    grpc_client.close()


def test_bf16_as_json_is_refused_like_triton(bf16_server) -> None:
    body = {"inputs": [{"name": "INPUT0", "datatype": "BF16", "shape": [1, 3], "data": [1, 2, 3]}]}
    request = urllib.request.Request(f"http://{bf16_server.http_url}/v2/models/bf16_square/infer",
                                     data=json.dumps(body).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"] == (
        "receiving BF16 data via JSON is not supported. Please use the binary data format for input INPUT0"
    )
