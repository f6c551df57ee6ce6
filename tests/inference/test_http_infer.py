"""Inference over HTTP with the real tritonclient (sync and aio), checked against in-process ONNX Runtime.

Every output is compared with what ``onnxruntime.InferenceSession`` computes on the same
``model.onnx`` the server loaded, for JSON and binary inputs, ``binary_data_output`` on and off,
per-output ``binary_data``, the classification extension, versions and compressed request bodies.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio

from tiny_models import CLASSIFIER_LABELS

SERVED_MODELS = ("simple", "int64_identity", "string_identity", "classifier", "fixed_shape", "versioned")


def _load_args() -> list[str]:
    args = ["--model-control-mode", "explicit"]
    for name in SERVED_MODELS:
        args += ["--load-model", name]
    return args


def run_onnxruntime(repository: Path, model: str, feeds: dict[str, np.ndarray], version: int = 1) -> dict:
    session = onnxruntime.InferenceSession(
        str(repository / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _input(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton_http.InferInput:
    infer_input = triton_http.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array, binary_data=binary)
    return infer_input


# (requested outputs or None, which outputs come back binary)
OUTPUT_MODES = {
    "all outputs, binary_data_output": (None, {"OUTPUT0": True, "OUTPUT1": True}),
    "both requested binary": ([("OUTPUT0", True), ("OUTPUT1", True)], {"OUTPUT0": True, "OUTPUT1": True}),
    "both requested JSON": ([("OUTPUT0", False), ("OUTPUT1", False)], {"OUTPUT0": False, "OUTPUT1": False}),
    "mixed": ([("OUTPUT0", True), ("OUTPUT1", False)], {"OUTPUT0": True, "OUTPUT1": False}),
    "only OUTPUT1": ([("OUTPUT1", False)], {"OUTPUT1": False}),
}


def _check_simple_result(result, expected: dict, binary_outputs: dict[str, bool]) -> None:
    response = result.get_response()
    assert sorted(output["name"] for output in response["outputs"]) == sorted(binary_outputs)
    for name, binary in binary_outputs.items():
        entry = result.get_output(name)
        assert ("binary_data_size" in entry.get("parameters", {})) is binary, (name, entry)
        assert ("data" in entry) is not binary
        got = result.as_numpy(name)
        assert got.dtype == expected[name].dtype
        np.testing.assert_array_equal(got, expected[name])


def test_outputs_match_onnxruntime_in_json_and_binary(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository, *_load_args())
    client = triton_http.InferenceServerClient(server.http_url)
    rng = np.random.default_rng(7)

    x = rng.standard_normal((3, 4)).astype(np.float32)
    expected = run_onnxruntime(tiny_repository, "simple", {"INPUT0": x})
    for input_binary in (True, False):
        for mode, (requested, binary_outputs) in OUTPUT_MODES.items():
            outputs = None
            if requested is not None:
                outputs = [triton_http.InferRequestedOutput(name, binary_data=b) for name, b in requested]
            result = client.infer("simple", [_input("INPUT0", x, "FP32", input_binary)], outputs=outputs,
                                  request_id=f"{mode}-{input_binary}")
            assert result.get_response()["id"] == f"{mode}-{input_binary}"
            assert result.get_response()["model_name"] == "simple"
            assert result.get_response()["model_version"] == "1"
            _check_simple_result(result, expected, binary_outputs)

    # INT64 beyond 2**53 survives JSON both ways (no float detour).
    big = np.array([[2**62 + 1, -(2**60) - 3, 0, 7]], dtype=np.int64)
    for binary in (True, False):
        result = client.infer("int64_identity", [_input("INPUT0", big, "INT64", binary)],
                              outputs=[triton_http.InferRequestedOutput("OUTPUT0", binary_data=binary)])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                      run_onnxruntime(tiny_repository, "int64_identity", {"INPUT0": big})["OUTPUT0"])

    # BYTES in both encodings (JSON needs UTF-8 text; binary carries any bytes).
    texts = np.array([["alpha", "βeta", ""], ["x", "yy", "zzz"]], dtype=np.object_)
    expected_text = run_onnxruntime(tiny_repository, "string_identity", {"INPUT0": texts.astype(str)})["OUTPUT0"]
    for binary in (True, False):
        result = client.infer("string_identity", [_input("INPUT0", texts, "BYTES", binary)],
                              outputs=[triton_http.InferRequestedOutput("OUTPUT0", binary_data=binary)])
        got = result.as_numpy("OUTPUT0")
        decoded = [[item.decode() if isinstance(item, bytes) else item for item in row] for row in got.tolist()]
        assert decoded == expected_text.tolist()
    # Binary BYTES come back as the exact bytes sent (ONNX string tensors take UTF-8 text only).
    utf8_bytes = np.array([["caf\u00e9 \u2603".encode(), b""]], dtype=np.object_)
    result = client.infer("string_identity", [_input("INPUT0", utf8_bytes, "BYTES", True)])
    assert result.as_numpy("OUTPUT0").tolist() == utf8_bytes.tolist()

    # No batch dimension (max_batch_size 0).
    fixed = rng.standard_normal((2, 3)).astype(np.float32)
    result = client.infer("fixed_shape", [_input("INPUT0", fixed, "FP32", False)],
                          outputs=[triton_http.InferRequestedOutput("OUTPUT0", binary_data=False)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                  run_onnxruntime(tiny_repository, "fixed_shape", {"INPUT0": fixed})["OUTPUT0"])

    # Versions: the path picks the version, no version means the highest loaded one.
    for version, expected_version in (("1", 1), ("3", 3), ("", 3)):
        result = client.infer("versioned", [_input("INPUT0", x, "FP32", True)], model_version=version)
        assert result.get_response()["model_version"] == str(expected_version)
        np.testing.assert_array_equal(
            result.as_numpy("OUTPUT0"),
            run_onnxruntime(tiny_repository, "versioned", {"INPUT0": x}, version=expected_version)["OUTPUT0"],
        )

    # Compressed request bodies, as tritonclient sends them.
    for algorithm in ("gzip", "deflate"):
        result = client.infer("simple", [_input("INPUT0", x, "FP32", True)], request_compression_algorithm=algorithm)
        _check_simple_result(result, expected, OUTPUT_MODES["all outputs, binary_data_output"][1])
    client.close()


def test_response_framing_on_the_wire(tiny_repository, running_server) -> None:
    """Content types and Inference-Header-Content-Length as Triton sends them (raw HTTP)."""
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple")
    host, port = server.http_url.split(":")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    def post(header: dict, raw: bytes = b"") -> tuple[int, dict, bytes]:
        header_bytes = json.dumps(header).encode()
        headers = {"Content-Type": "application/octet-stream"}
        if raw:
            headers["Inference-Header-Content-Length"] = str(len(header_bytes))
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("POST", "/v2/models/simple/infer", body=header_bytes + raw, headers=headers)
        response = connection.getresponse()
        result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        connection.close()
        return result

    binary_input = {"name": "INPUT0", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}

    # binary_data_output false and no outputs requested: everything JSON.
    status, headers, body = post({"inputs": [binary_input], "parameters": {"binary_data_output": False}}, x.tobytes())
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert "inference-header-content-length" not in headers
    document = json.loads(body)
    outputs = {output["name"]: output for output in document["outputs"]}
    assert outputs["OUTPUT0"]["data"] == (x + 1).reshape(-1).tolist()
    assert outputs["OUTPUT1"]["shape"] == [2, 4]

    # binary_data_output true: JSON header then OUTPUT0 and OUTPUT1 bytes in the order of the header.
    status, headers, body = post({"inputs": [binary_input], "parameters": {"binary_data_output": True}}, x.tobytes())
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    header_length = int(headers["inference-header-content-length"])
    document = json.loads(body[:header_length])
    offset = header_length
    for output in document["outputs"]:
        size = output["parameters"]["binary_data_size"]
        got = np.frombuffer(body[offset : offset + size], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_array_equal(got, x + 1 if output["name"] == "OUTPUT0" else x * 2)
        offset += size
    assert offset == len(body)

    # Nested JSON data is read row-major, like flat data.
    status, headers, body = post({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 4],
                                              "data": x.tolist()}],
                                  "outputs": [{"name": "OUTPUT1"}]})
    assert status == 200
    assert json.loads(body)["outputs"][0]["data"] == (x * 2).reshape(-1).tolist()


def _check_classification(result, probabilities: np.ndarray, class_count: int) -> None:
    got = result.as_numpy("PROBABILITY")
    assert got.shape == (probabilities.shape[0], class_count)
    for row, row_probabilities in zip(got, probabilities):
        order = np.argsort(-row_probabilities, kind="stable")[:class_count]
        entries = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
        assert [int(index) for _, index, _ in entries] == order.tolist()
        assert [label for _, _, label in entries] == [CLASSIFIER_LABELS[i] for i in order]
        np.testing.assert_allclose([float(score) for score, _, _ in entries], row_probabilities[order], rtol=1e-5)


def test_classification_with_labels_sync_and_aio(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "classifier")
    logits = np.array([[0.5, 3.0, -1.0, 1.0, 0.0], [-2.0, -1.0, 4.0, 2.5, 0.1]], dtype=np.float32)
    probabilities = run_onnxruntime(tiny_repository, "classifier", {"INPUT0": logits})["PROBABILITY"]

    client = triton_http.InferenceServerClient(server.http_url)
    for binary in (True, False):
        result = client.infer(
            "classifier", [_input("INPUT0", logits, "FP32", binary)],
            outputs=[triton_http.InferRequestedOutput("PROBABILITY", binary_data=binary, class_count=3)],
        )
        assert result.get_output("PROBABILITY")["datatype"] == "BYTES"
        _check_classification(result, probabilities, 3)
    client.close()

    async def with_aio_client() -> None:
        async with triton_http_aio.InferenceServerClient(server.http_url) as aio_client:
            infer_input = triton_http_aio.InferInput("INPUT0", list(logits.shape), "FP32")
            infer_input.set_data_from_numpy(logits)
            result = await aio_client.infer(
                "classifier", [infer_input],
                outputs=[triton_http_aio.InferRequestedOutput("PROBABILITY", class_count=len(CLASSIFIER_LABELS))],
            )
            _check_classification(result, probabilities, len(CLASSIFIER_LABELS))

    asyncio.run(with_aio_client())


def test_aio_client_inference_matches_onnxruntime(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple")
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    expected = run_onnxruntime(tiny_repository, "simple", {"INPUT0": x})

    async def with_aio_client() -> None:
        async with triton_http_aio.InferenceServerClient(server.http_url) as aio_client:
            for input_binary in (True, False):
                for mode, (requested, binary_outputs) in OUTPUT_MODES.items():
                    infer_input = triton_http_aio.InferInput("INPUT0", list(x.shape), "FP32")
                    infer_input.set_data_from_numpy(x, binary_data=input_binary)
                    outputs = None
                    if requested is not None:
                        outputs = [triton_http_aio.InferRequestedOutput(name, binary_data=b) for name, b in requested]
                    result = await aio_client.infer("simple", [infer_input], outputs=outputs, request_id=mode)
                    assert result.get_response()["id"] == mode
                    _check_simple_result(result, expected, binary_outputs)
            # Concurrent requests on one client: each gets its own answer.
            inputs = [x + i for i in range(8)]

            async def one(array: np.ndarray):
                infer_input = triton_http_aio.InferInput("INPUT0", list(array.shape), "FP32")
                infer_input.set_data_from_numpy(array)
                return await aio_client.infer("simple", [infer_input])

            results = await asyncio.gather(*(one(array) for array in inputs))
            for array, result in zip(inputs, results):
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array + 1)
            gzip_input = triton_http_aio.InferInput("INPUT0", list(x.shape), "FP32")
            gzip_input.set_data_from_numpy(x)
            result = await aio_client.infer("simple", [gzip_input], request_compression_algorithm="gzip")
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected["OUTPUT1"])

    asyncio.run(with_aio_client())


@pytest.fixture(autouse=True)
def _quiet_onnxruntime() -> None:
    onnxruntime.set_default_logger_severity(3)
