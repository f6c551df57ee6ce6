"""Differential conformance: the same protocol tests against our server and NVIDIA's real Triton 2.51.

Both servers run on one tiny repository in explicit mode with the model-repository API restricted
(Triton's ``--http-restricted-api`` / ``--grpc-restricted-protocol``). Every test is parametrised
over both servers with the expectation written from what real Triton answers, so the ``triton``
case checks the expectation and the ``ours`` case checks our server against it; a few tests compare
the two servers' documents field by field. Differences we keep on purpose are listed in README.md
("Inference server", differences from Triton) and are not asserted here.

Real Triton comes from ``make triton-install``; without it the ``triton`` cases skip.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inference_servers import RunningServer, launch_server, our_server_command, start_real_triton
from services.local_platform.infra import free_ports
from tiny_models import CLASSIFIER_LABELS, SLOW_WIDTH, build_tiny_repository, make_versioned

SERVERS = ("ours", "triton")
LOADED = ("simple", "classifier", "versioned", "string_identity", "slow")
BROKEN_VERSION_MODEL = "broken_version"  # versions 1 and 3 served; version 3's model file is not ONNX
ADMIN_KEY = "admin-key"
ADMIN_SECRET = "conformance-secret"
RESTRICTION = f"model-repository:{ADMIN_KEY}={ADMIN_SECRET}"
ADMIN_HEADERS = {ADMIN_KEY: ADMIN_SECRET}
ADMIN_METADATA = ((f"triton-grpc-protocol-{ADMIN_KEY}", ADMIN_SECRET),)
# What Triton 2.51 exports for the models on a CPU machine (the per-model inference families).
TRITON_INFERENCE_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
}


@pytest.fixture(scope="module")
def started_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningServer | str]]:
    """Both servers on the same repository; the triton entry is the skip reason when it is not installed."""
    work = tmp_path_factory.mktemp("conformance")
    repository = build_tiny_repository(work / "model_repository")
    make_versioned(repository, name=BROKEN_VERSION_MODEL)
    (repository / BROKEN_VERSION_MODEL / "3" / "model.onnx").write_bytes(b"not an ONNX model")
    load_args = [arg for name in LOADED for arg in ("--load-model", name)]
    ports = free_ports(3)
    servers: dict[str, RunningServer | str] = {
        "ours": launch_server(
            our_server_command(repository, ports, "--model-control-mode", "explicit", *load_args,
                               "--http-restricted-api", RESTRICTION, "--grpc-restricted-protocol", RESTRICTION),
            repository, work / "ours.log", ports,
        )
    }
    try:
        servers["triton"] = start_real_triton(
            repository, work, "--model-control-mode=explicit", *(f"--load-model={name}" for name in LOADED),
            f"--http-restricted-api={RESTRICTION}", f"--grpc-restricted-protocol={RESTRICTION}",
        )
    except pytest.skip.Exception as skipped:
        servers["triton"] = str(skipped)
    yield servers
    for server in servers.values():
        if isinstance(server, RunningServer):
            server.stop()


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, started_servers) -> RunningServer:
    started = started_servers[request.param]
    if isinstance(started, str):
        pytest.skip(started)
    return started


@pytest.fixture
def both(started_servers) -> dict[str, RunningServer]:
    if isinstance(started_servers["triton"], str):
        pytest.skip(started_servers["triton"])
    return started_servers  # type: ignore[return-value]


def http(server: RunningServer, method: str, path: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict | list | None]:
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    return status, (json.loads(raw) if raw else None)


def _simple_body(data: list, shape: list[int], datatype: str = "FP32", name: str = "INPUT0") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


# (id, method, path, body, status, fragments of the error message); expectations from real Triton 2.51.
HTTP_CASES = [
    ("unknown model metadata", "GET", "/v2/models/nope", None, 404, ["nope"]),
    ("unknown model ready", "GET", "/v2/models/nope/ready", None, 400, []),
    ("unknown version metadata", "GET", "/v2/models/simple/versions/7", None, 404, ["simple", "7"]),
    ("unknown version ready", "GET", "/v2/models/simple/versions/7/ready", None, 400, []),
    ("non-integer version metadata", "GET", "/v2/models/simple/versions/abc", None, 404, []),
    ("non-integer version ready", "GET", "/v2/models/simple/versions/abc/ready", None, 404, []),
    ("non-integer version infer", "POST", "/v2/models/simple/versions/abc/infer",
     _simple_body([1, 2, 3, 4], [1, 4]), 404, []),
    ("unknown model infer", "POST", "/v2/models/nope/infer", _simple_body([1, 2, 3, 4], [1, 4]), 404, ["nope"]),
    ("wrong datatype", "POST", "/v2/models/simple/infer", _simple_body([1, 2, 3, 4], [1, 4], "INT32"), 400,
     ["INPUT0", "INT32", "FP32"]),
    ("wrong shape", "POST", "/v2/models/simple/infer", _simple_body([1, 2, 3, 4, 5], [1, 5]), 400,
     ["unexpected shape", "INPUT0"]),
    ("batch too large", "POST", "/v2/models/simple/infer", _simple_body([1] * 36, [9, 4]), 400,
     ["batch-size must be <= 8"]),
    ("unknown input", "POST", "/v2/models/simple/infer", _simple_body([1, 2, 3, 4], [1, 4], name="X"), 400,
     ["unexpected inference input 'X'"]),
    ("missing input", "POST", "/v2/models/simple/infer", {"inputs": []}, 400, ["expected 1 inputs but got 0"]),
    ("unknown output", "POST", "/v2/models/simple/infer",
     {**_simple_body([1, 2, 3, 4], [1, 4]), "outputs": [{"name": "NOPE"}]}, 400, ["unexpected inference output"]),
    ("unknown datatype", "POST", "/v2/models/simple/infer", _simple_body([1, 2, 3, 4], [1, 4], "FOO"), 400,
     ["INPUT0"]),
    ("BF16 as JSON", "POST", "/v2/models/simple/infer", _simple_body([1, 2, 3, 4], [1, 4], "BF16"), 400,
     ["BF16"]),
    ("unknown model statistics", "GET", "/v2/models/nope/stats", None, 400, ["nope"]),
    ("no endpoint", "GET", "/v2/nothing", None, 404, []),
    ("method not allowed", "DELETE", "/v2/health/live", None, 405, []),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[case[0] for case in HTTP_CASES])
def test_http_errors_have_tritons_status(server: RunningServer, case) -> None:
    _, method, path, body, expected_status, fragments = case
    status, document = http(server, method, path, body)
    assert status == expected_status, document
    if status != 200 and not path.endswith("/ready"):
        assert isinstance(document, dict) and isinstance(document.get("error"), str)
        for fragment in fragments:
            assert fragment.lower() in document["error"].lower()


def _grpc_status(call) -> tuple[str, str]:
    try:
        call()
    except InferenceServerException as error:
        return str(error.status()), error.message()
    return "OK", ""


def test_grpc_errors_have_tritons_codes(server: RunningServer) -> None:
    client = triton_grpc.InferenceServerClient(server.grpc_url)
    good = triton_grpc.InferInput("INPUT0", [1, 4], "FP32")
    good.set_data_from_numpy(np.ones((1, 4), np.float32))
    wrong_type = triton_grpc.InferInput("INPUT0", [1, 4], "INT32")
    wrong_type.set_data_from_numpy(np.ones((1, 4), np.int32))
    expectations = {
        "unknown model metadata": (lambda: client.get_model_metadata("nope"), "StatusCode.NOT_FOUND"),
        "non-integer version": (lambda: client.get_model_metadata("simple", "abc"), "StatusCode.INVALID_ARGUMENT"),
        "non-integer version ready": (lambda: client.is_model_ready("simple", "abc"), "StatusCode.INVALID_ARGUMENT"),
        "unknown version": (lambda: client.get_model_metadata("simple", "7"), "StatusCode.NOT_FOUND"),
        "unknown model infer": (lambda: client.infer("nope", [good]), "StatusCode.NOT_FOUND"),
        "wrong datatype": (lambda: client.infer("simple", [wrong_type]), "StatusCode.INVALID_ARGUMENT"),
        "unknown model statistics": (lambda: client.get_inference_statistics("nope"), "StatusCode.INVALID_ARGUMENT"),
        "unknown model config": (lambda: client.get_model_config("nope"), "StatusCode.NOT_FOUND"),
        "load missing directory": (lambda: client.load_model("nope", headers=dict(ADMIN_METADATA)),
                                   "StatusCode.INTERNAL"),
        "unload unknown model": (lambda: client.unload_model("nope", headers=dict(ADMIN_METADATA)), "OK"),
        "request timeout without a queue policy": (lambda: client.infer("simple", [good], timeout=1000), "OK"),
    }
    answers = {name: _grpc_status(call)[0] for name, (call, _) in expectations.items()}
    assert answers == {name: expected for name, (_, expected) in expectations.items()}
    client.close()


def test_metadata_documents(server: RunningServer) -> None:
    status, metadata = http(server, "GET", "/v2")
    assert status == 200 and set(metadata) == {"name", "version", "extensions"}
    for extension in ("classification", "model_repository", "model_configuration", "binary_tensor_data",
                      "parameters", "statistics"):
        assert extension in metadata["extensions"]
    status, model = http(server, "GET", "/v2/models/simple")
    assert status == 200
    assert model == {
        "name": "simple", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "OUTPUT1", "datatype": "FP32", "shape": [-1, 4]}],
    }
    status, versioned = http(server, "GET", "/v2/models/versioned")
    assert status == 200 and versioned["versions"] == ["1", "3"]


def _key_tree(document, depth: int = 0) -> object:
    """The document's keys, recursively (lists: the union over their items), without values."""
    if isinstance(document, dict):
        return {key: _key_tree(value, depth + 1) for key, value in document.items()}
    if isinstance(document, list):
        merged: dict = {}
        for item in document:
            tree = _key_tree(item, depth + 1)
            if isinstance(tree, dict):
                merged.update(tree)
        return merged or None
    return None


# Fields only real Triton's config has, and why they differ (see README.md, differences from Triton).
CONFIG_ONLY_TRITON: set[str] = set()


def test_config_and_statistics_documents_have_the_same_fields(both: dict[str, RunningServer]) -> None:
    configs = {kind: http(server, "GET", "/v2/models/simple/config")[1] for kind, server in both.items()}
    trees = {kind: _key_tree(config) for kind, config in configs.items()}
    assert set(trees["triton"]) - CONFIG_ONLY_TRITON == set(trees["ours"])
    for key in ("input", "output", "instance_group", "dynamic_batching", "version_policy", "optimization"):
        assert trees["ours"][key] == trees["triton"][key], key
    for key in ("name", "platform", "backend", "max_batch_size", "input", "output", "version_policy"):
        assert configs["ours"][key] == configs["triton"][key], key
    statistics = {kind: http(server, "GET", "/v2/models/simple/stats")[1] for kind, server in both.items()}
    assert _key_tree(statistics["ours"]) == _key_tree(statistics["triton"])


def test_binary_tensor_and_classification_extensions(server: RunningServer) -> None:
    client = triton_http.InferenceServerClient(server.http_url)
    batch = np.arange(8, dtype=np.float32).reshape(2, 4)
    infer_input = triton_http.InferInput("INPUT0", [2, 4], "FP32")
    infer_input.set_data_from_numpy(batch, binary_data=True)
    outputs = [triton_http.InferRequestedOutput("OUTPUT0", binary_data=True),
               triton_http.InferRequestedOutput("OUTPUT1", binary_data=False)]
    result = client.infer("simple", [infer_input], outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), batch + 1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), batch * 2)
    assert result.get_output("OUTPUT0")["parameters"]["binary_data_size"] == 32
    assert "data" in result.get_output("OUTPUT1")

    scores = np.array([[0.5, -1.0, 3.0, 2.0, 0.0]], dtype=np.float32)
    classify_input = triton_http.InferInput("INPUT0", [1, 5], "FP32")
    classify_input.set_data_from_numpy(scores)
    result = client.infer("classifier", [classify_input],
                          outputs=[triton_http.InferRequestedOutput("PROBABILITY", class_count=2)])
    probabilities = 1 / (1 + np.exp(-scores[0].astype(np.float64)))
    expected = [f"{probabilities[index]:f}:{index}:{CLASSIFIER_LABELS[index]}" for index in (2, 3)]
    assert [item.decode() for item in result.as_numpy("PROBABILITY").reshape(-1)] == expected

    strings = triton_http.InferInput("INPUT0", [1, 2], "BYTES")
    strings.set_data_from_numpy(np.array([[b"ab", "é".encode()]], dtype=np.object_))
    result = client.infer("string_identity", [strings])
    assert result.as_numpy("OUTPUT0").tolist() == [[b"ab", "é".encode()]]
    client.close()


def test_validation_errors_are_no_inference_failures(server: RunningServer) -> None:
    def counts() -> tuple[int, int]:
        stats = http(server, "GET", "/v2/models/classifier/stats")[1]["model_stats"][0]["inference_stats"]
        return stats["success"]["count"], stats["fail"]["count"]

    before = counts()
    assert http(server, "POST", "/v2/models/classifier/infer", _simple_body([1, 2, 3], [1, 3]))[0] == 400
    assert http(server, "POST", "/v2/models/classifier/infer", _simple_body([1, 2, 3, 4, 5], [1, 5]))[0] == 200
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)


def _metric_families(server: RunningServer) -> set[str]:
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))


def test_metric_names(server: RunningServer) -> None:
    assert TRITON_INFERENCE_METRICS <= _metric_families(server)


def settled_index_entries(server: RunningServer, name: str, timeout: float = 30.0) -> dict[str, dict]:
    """The model's index entries by version once none is LOADING or UNLOADING (Triton answers unload and
    failed loads before the versions settle)."""
    deadline = time.monotonic() + timeout
    while True:
        _, index = http(server, "POST", "/v2/repository/index", headers=ADMIN_HEADERS)
        entries = {entry.get("version", ""): entry for entry in index if entry["name"] == name}
        if all(entry.get("state") not in ("LOADING", "UNLOADING") for entry in entries.values()):
            return entries
        assert time.monotonic() < deadline, f"{name} did not settle: {entries}"
        time.sleep(0.1)


def test_repository_api_behind_the_restriction(server: RunningServer) -> None:
    status, document = http(server, "POST", "/v2/repository/index")
    assert (status, document) == (403, {"error": f"This API is restricted, expecting header '{ADMIN_KEY}'"})
    status, document = http(server, "POST", "/v2/repository/index", headers={ADMIN_KEY: "wrong"})
    assert status == 403 and ADMIN_SECRET not in json.dumps(document)

    status, index = http(server, "POST", "/v2/repository/index", {"ready": True}, headers=ADMIN_HEADERS)
    assert status == 200
    assert sorted((entry["name"], entry["version"], entry["state"]) for entry in index) == sorted(
        [(name, "1", "READY") for name in LOADED] + [("versioned", "3", "READY")]
    )
    status, full = http(server, "POST", "/v2/repository/index", headers=ADMIN_HEADERS)
    assert {"name": "fixed_shape"} in full  # present in the repository, never loaded: the name alone

    # Unload, index says why, load again; other groups stay open.
    assert http(server, "POST", "/v2/repository/models/string_identity/unload", headers=ADMIN_HEADERS)[0] == 200
    # Triton answers the unload before the model is gone (state UNLOADING meanwhile): wait for the end state.
    entries = settled_index_entries(server, "string_identity")
    assert entries["1"] == {"name": "string_identity", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert http(server, "GET", "/v2/models/string_identity/ready")[0] == 400
    assert http(server, "POST", "/v2/repository/models/string_identity/load", headers=ADMIN_HEADERS)[0] == 200
    assert http(server, "GET", "/v2/models/string_identity/ready")[0] == 200
    assert http(server, "POST", "/v2/repository/models/nope/unload", headers=ADMIN_HEADERS)[0] == 200
    status, document = http(server, "POST", "/v2/repository/models/nope/load", headers=ADMIN_HEADERS)
    assert status == 500 and "nope" in document["error"]


def test_grpc_restricted_protocol(server: RunningServer) -> None:
    channel = grpc.insecure_channel(server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    for metadata in ((), ((f"triton-grpc-protocol-{ADMIN_KEY}", "wrong"),), ((ADMIN_KEY, ADMIN_SECRET),)):
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), metadata=metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == (
            f"This protocol is restricted, expecting header 'triton-grpc-protocol-{ADMIN_KEY}'"
        )
    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), metadata=ADMIN_METADATA, timeout=10)
    assert {model.name for model in index.models} == set(LOADED)
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live  # health is not restricted
    channel.close()


def test_grpc_stream_responses_are_final(server: RunningServer) -> None:
    channel = grpc.insecure_channel(server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    bad = service_pb2.ModelInferRequest(model_name="simple", id="bad")
    bad.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 5]).contents.fp32_contents.extend([1, 2, 3, 4, 5])
    request = service_pb2.ModelInferRequest(model_name="simple", id="r1")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    responses = list(stub.ModelStreamInfer(iter([bad, request]), timeout=30))
    assert len(responses) == 2
    # A failed request: its error and id, no final-response flag (as Triton); the stream goes on.
    assert "unexpected shape" in responses[0].error_message and responses[0].infer_response.id == "bad"
    assert "triton_final_response" not in responses[0].infer_response.parameters
    assert not responses[1].error_message
    answer = responses[1].infer_response
    assert answer.id == "r1" and answer.parameters["triton_final_response"].bool_param is True
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [2, 3, 4, 5]
    channel.close()


def test_repository_path_layout_is_unchanged(started_servers) -> None:
    """Both servers serve the very same directory: Triton's shim needs no file of its own there."""
    repositories = {server.repository for server in started_servers.values() if isinstance(server, RunningServer)}
    assert len(repositories) == 1
    (repository,) = repositories
    assert sorted(path.name for path in Path(repository, "simple").iterdir()) == ["1", "config.pbtxt"]


def test_one_failing_version_fails_the_models_load(server: RunningServer) -> None:
    """Triton 2.51 loads a model's versions together: version 3 failing leaves version 1 unloaded too."""
    status, document = http(server, "POST", f"/v2/repository/models/{BROKEN_VERSION_MODEL}/load",
                            headers=ADMIN_HEADERS)
    assert status == 400 and BROKEN_VERSION_MODEL in document["error"]
    entries = settled_index_entries(server, BROKEN_VERSION_MODEL)
    assert entries["1"]["state"] == "UNAVAILABLE" and entries["1"]["reason"] == "unloaded"
    assert entries["3"]["state"] == "UNAVAILABLE" and "model.onnx" in entries["3"]["reason"]
    assert http(server, "GET", f"/v2/models/{BROKEN_VERSION_MODEL}/versions/1/ready")[0] == 400
    assert http(server, "GET", "/v2/health/live")[0] == 200


def test_large_json_request(server: RunningServer) -> None:
    """Over a MiB of JSON (ours decodes it in a helper process, off the event loop): same answer as small ones."""
    words = [f"w{index % 1000:03d}" for index in range(200_000)]
    body = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, len(words)], "data": words}]}
    assert len(json.dumps(body)) > 1024 * 1024
    status, document = http(server, "POST", "/v2/models/string_identity/infer", body)
    assert status == 200
    assert document["outputs"][0]["shape"] == [1, len(words)] and document["outputs"][0]["data"] == words
    status, document = http(server, "POST", "/v2/models/string_identity/infer",
                            {**body, "inputs": [{**body["inputs"][0], "datatype": "FP32"}]})
    assert status in (400, 500)  # strings as FP32 data: Triton answers 500, ours 400 (README: differences)


def test_dynamic_batching_merges_concurrent_requests(server: RunningServer) -> None:
    """``slow`` (~20 ms a batch, 2 ms queue delay): 16 requests at once run in fewer executions, on Triton too
    (its Python-backend shim runs the requests Triton hands it as one batch)."""
    def stats() -> tuple[int, int]:
        entry = http(server, "GET", "/v2/models/slow/stats")[1]["model_stats"][0]
        return entry["inference_count"], entry["execution_count"]

    before = stats()
    rows = [np.full(SLOW_WIDTH, float(index), dtype=np.float32) for index in range(16)]
    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(
            lambda row: http(server, "POST", "/v2/models/slow/infer", _simple_body(row.tolist(), [1, SLOW_WIDTH])),
            rows,
        ))
    for row, (status, document) in zip(rows, answers):
        assert status == 200 and document["outputs"][0]["data"] == row.tolist()
    after = stats()
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 16 and executions < inferences, (inferences, executions)
