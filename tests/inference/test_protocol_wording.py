"""Both front ends give the same error, in the same words, for the same mistake.

One real server; each case is sent once over HTTP (JSON) and once over gRPC (protobuf), and must come back with
the status of the same ``ErrorKind`` on each protocol (HTTP status and gRPC code from the one table in
``services/inference/protocol.py``) and the identical message, because both front ends call
``services/inference/triton_parameters.py``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.inference.protocol import ErrorKind


@dataclass(frozen=True)
class Case:
    name: str
    kind: ErrorKind
    http_path: str
    http_body: dict[str, Any]
    grpc_call: Callable[[service_pb2_grpc.GRPCInferenceServiceStub], Any]
    words: str  # a phrase the message must hold, so that "both empty" cannot pass


def _load(stub: service_pb2_grpc.GRPCInferenceServiceStub, **parameters: dict[str, Any]) -> Any:
    request = service_pb2.RepositoryModelLoadRequest(model_name="simple")
    for key, value in parameters.items():
        setattr(request.parameters[key], *next(iter(value.items())))
    return stub.RepositoryModelLoad(request)


def _unload(stub: service_pb2_grpc.GRPCInferenceServiceStub, **parameters: dict[str, Any]) -> Any:
    request = service_pb2.RepositoryModelUnloadRequest(model_name="simple")
    for key, value in parameters.items():
        setattr(request.parameters[key], *next(iter(value.items())))
    return stub.RepositoryModelUnload(request)


INPUT = np.arange(4, dtype=np.float32).reshape(1, 4)


def _http_infer(output_parameters: dict[str, Any], input_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": INPUT.ravel().tolist()}
    if input_parameters:
        entry["parameters"] = input_parameters
    return {"inputs": [entry], "outputs": [{"name": "OUTPUT0", "parameters": output_parameters}]}


def _grpc_infer(stub: service_pb2_grpc.GRPCInferenceServiceStub, output_parameters: dict[str, tuple[str, Any]],
                input_parameters: dict[str, tuple[str, Any]] | None = None) -> Any:
    request = service_pb2.ModelInferRequest(model_name="simple")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    for key, (field, value) in (input_parameters or {}).items():
        setattr(tensor.parameters[key], field, value)
    request.raw_input_contents.append(INPUT.tobytes())
    output = request.outputs.add(name="OUTPUT0")
    for key, (field, value) in output_parameters.items():
        setattr(output.parameters[key], field, value)
    return stub.ModelInfer(request)


LOAD = "/v2/repository/models/simple/load"
UNLOAD = "/v2/repository/models/simple/unload"
INFER = "/v2/models/simple/infer"
SHARED_MEMORY = {"shared_memory_region": "region", "shared_memory_byte_size": 16}
GRPC_SHARED_MEMORY = {"shared_memory_region": ("string_param", "region"),
                      "shared_memory_byte_size": ("int64_param", 16)}

CASES = [
    Case("unknown load parameter", ErrorKind.INVALID_ARGUMENT, LOAD, {"parameters": {"colour": "red"}},
         lambda stub: _load(stub, colour={"string_param": "red"}), "unknown load parameter 'colour'"),
    Case("model file override", ErrorKind.UNSUPPORTED, LOAD, {"parameters": {"file:1/model.onnx": "AAAA"}},
         lambda stub: _load(stub, **{"file:1/model.onnx": {"bytes_param": b"AAAA"}}), "not supported"),
    Case("config that is no string", ErrorKind.INVALID_ARGUMENT, LOAD, {"parameters": {"config": True}},
         lambda stub: _load(stub, config={"bool_param": True}), "must be a string holding JSON, got a boolean"),
    Case("config that is no JSON", ErrorKind.INVALID_ARGUMENT, LOAD, {"parameters": {"config": "{not json"}},
         lambda stub: _load(stub, config={"string_param": "{not json"}), "is not valid JSON"),
    Case("unknown unload parameter", ErrorKind.INVALID_ARGUMENT, UNLOAD, {"parameters": {"colour": "red"}},
         lambda stub: _unload(stub, colour={"string_param": "red"}), "unknown unload parameter 'colour'"),
    Case("unload_dependents that is no boolean", ErrorKind.INVALID_ARGUMENT, UNLOAD,
         {"parameters": {"unload_dependents": "yes"}},
         lambda stub: _unload(stub, unload_dependents={"string_param": "yes"}), "must be true or false"),
    Case("negative classification", ErrorKind.INVALID_ARGUMENT, INFER, _http_infer({"classification": -1}),
         lambda stub: _grpc_infer(stub, {"classification": ("int64_param", -1)}), "'classification'"),
    Case("shared-memory output", ErrorKind.UNSUPPORTED, INFER, _http_infer(SHARED_MEMORY),
         lambda stub: _grpc_infer(stub, GRPC_SHARED_MEMORY), "output 'OUTPUT0' uses shared memory"),
    Case("shared-memory input", ErrorKind.UNSUPPORTED, INFER, _http_infer({}, SHARED_MEMORY),
         lambda stub: _grpc_infer(stub, {}, GRPC_SHARED_MEMORY), "input 'INPUT0' uses shared memory"),
]


def _http_error(http_url: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{http_url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


def test_http_and_grpc_answer_each_mistake_alike(tiny_repository, running_server) -> None:  # noqa: ANN001
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple")
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for case in CASES:
            http_status, http_message = _http_error(server.http_url, case.http_path, case.http_body)
            with pytest.raises(grpc.RpcError) as caught:
                case.grpc_call(stub)
            grpc_code, grpc_message = caught.value.code(), caught.value.details()
            assert (http_status, grpc_code.name) == (case.kind.http_status, case.kind.grpc_code_name), case.name
            assert http_message == grpc_message, case.name
            assert case.words in http_message, (case.name, http_message)
        # Nothing of the refused requests stuck: the model still serves.
        answer = stub.ModelInfer(service_pb2.ModelInferRequest(
            model_name="simple", inputs=[{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4]}],
            raw_input_contents=[INPUT.tobytes()]))
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == (INPUT + 1).ravel().tolist()

