"""Bad requests over raw HTTP: each gets Triton's status and a message naming the problem, and the
server answers a good request right after (on the same connection where the stream is intact)."""

from __future__ import annotations

import gzip
import http.client
import json
from dataclasses import dataclass, field

import numpy as np
import tritonclient.http as triton_http

from services.inference.protocol import serialize_bytes_tensor

MAX_BODY_BYTES = 64 * 1024
MAX_BODY_ARGS = ("--http-max-body-size", str(MAX_BODY_BYTES))
INFER_PATH = "/v2/models/simple/infer"
GOOD_INPUT = np.arange(4, dtype=np.float32).reshape(1, 4)


@dataclass
class Case:
    name: str
    status: int
    expected: tuple[str, ...]  # fragments the error message must contain (case-insensitive)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    path: str = INFER_PATH
    method: str = "POST"
    chunks: list[bytes] | None = None  # sent with Transfer-Encoding: chunked instead of body
    stream_intact: bool = True  # whether the same connection must serve the next request


def binary_request(header: dict, raw: bytes, header_length: int | str | None = None) -> tuple[bytes, dict]:
    header_bytes = json.dumps(header).encode()
    length = len(header_bytes) if header_length is None else header_length
    return header_bytes + raw, {"Inference-Header-Content-Length": str(length)}


def fp32_input(shape: list[int], size: int | None = None, name: str = "INPUT0") -> dict:
    count = int(np.prod(shape))
    return {"name": name, "datatype": "FP32", "shape": shape,
            "parameters": {"binary_data_size": count * 4 if size is None else size}}


def json_input(data, shape: list[int], datatype: str = "FP32", name: str = "INPUT0") -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def build_cases() -> list[Case]:
    four = np.ones(4, dtype=np.float32).tobytes()
    cases = [
        Case("malformed JSON", 400, ("not valid json",), body=b'{"inputs": [ {"name": '),
        Case("JSON that is not an object", 400, ("must be a json object",), body=b"[1, 2, 3]"),
        Case("no inputs array", 400, ("'inputs'",), body=b'{"outputs": []}'),
        Case("datatype that does not exist", 400, ("input0", "fp33"),
             body=json.dumps({"inputs": [json_input([1, 2, 3, 4], [1, 4], "FP33")]}).encode()),
        Case("JSON data with the wrong element count", 400, ("input0", "3 elements"),
             body=json.dumps({"inputs": [json_input([1, 2, 3], [1, 4])]}).encode()),
        Case("JSON strings for an FP32 input", 400, ("input0", "numbers"),
             body=json.dumps({"inputs": [json_input(["a", "b", "c", "d"], [1, 4])]}).encode()),
        Case("negative dimension", 400, ("input0", "negative"),
             body=json.dumps({"inputs": [json_input([1, 2, 3, 4], [-1, 4])]}).encode()),
    ]
    body, headers = binary_request({"inputs": [fp32_input([1, 4])]}, four, header_length=10_000)
    cases.append(Case("header length beyond the body", 400, ("inference-header-content-length", "has only"),
                      body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4])]}, four, header_length=-5)
    cases.append(Case("negative header length", 400, ("inference-header-content-length", "negative"),
                      body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4])]}, four, header_length="12abc")
    cases.append(Case("header length that is not a number", 400, ("inference-header-content-length", "integer"),
                      body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4], size=64)]}, four)
    cases.append(Case("binary size larger than the data sent", 400, ("input0", "binary_data_size", "64"),
                      body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4])]}, four + b"\x00" * 8)
    cases.append(Case("binary data no input claims", 400, ("8 bytes", "no input claims"), body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4], size=-16)]}, four)
    cases.append(Case("negative binary size", 400, ("input0", "binary_data_size"), body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4], size=2**64 + 16)]}, four)
    cases.append(Case("overflowing binary size", 400, ("input0", "binary_data_size"), body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4], size=12)]}, four[:12])
    cases.append(Case("byte size wrong for the shape", 400, ("input0", "byte size 12", "expected 16"),
                      body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 5])]}, np.ones(5, np.float32).tobytes())
    cases.append(Case("shape the model does not take", 400, ("input0", "5"), body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([9, 4])]}, np.ones(36, np.float32).tobytes())
    cases.append(Case("batch larger than max_batch_size", 400, ("9", "8"), body=body, headers=headers))
    int_input = {"name": "INPUT0", "datatype": "INT32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}
    body, headers = binary_request({"inputs": [int_input]}, np.ones(4, np.int32).tobytes())
    cases.append(Case("datatype the model does not take", 400, ("input0", "int32", "fp32"), body=body,
                      headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4], name="NOPE")]}, four)
    cases.append(Case("unknown input name", 400, ("nope",), body=body, headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4])], "outputs": [{"name": "OUTPUT9"}]}, four)
    cases.append(Case("unknown output name", 400, ("output9",), body=body, headers=headers))
    strings = serialize_bytes_tensor(np.array([b"abc"], dtype=object))
    body, headers = binary_request(
        {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 2],
                     "parameters": {"binary_data_size": len(strings)}}]}, strings)
    cases.append(Case("BYTES framing too short for the shape", 400, ("input0", "truncated"), body=body,
                      headers=headers))
    body, headers = binary_request({"inputs": [fp32_input([1, 4])]}, four)
    cases += [
        Case("unknown model", 404, ("no_such_model",), body=body, headers=headers,
             path="/v2/models/no_such_model/infer"),
        Case("unknown version", 404, ("simple", "7"), body=body, headers=headers,
             path="/v2/models/simple/versions/7/infer"),
        Case("unknown path", 404, ("/v2/nothing/here",), method="GET", path="/v2/nothing/here"),
        Case("wrong method on infer", 405, ("get", "post"), method="GET", path=INFER_PATH),
        Case("wrong method on health", 405, ("post",), method="POST", path="/v2/health/live"),
        Case("corrupt gzip body", 400, ("gzip",), body=b"this is not gzip at all", stream_intact=False,
             headers={"Content-Encoding": "gzip"}),
        Case("unsupported content encoding", 400, ("content-encoding", "br"),
             body=json.dumps({"inputs": []}).encode(), headers={"Content-Encoding": "br"}),
        Case("body over the limit (Content-Length)", 413, (str(MAX_BODY_BYTES),),
             body=b"{" + b" " * (MAX_BODY_BYTES + 100) + b"}"),
        Case("chunked body over the limit", 413, (str(MAX_BODY_BYTES),),
             chunks=[b" " * 16384] * (MAX_BODY_BYTES // 16384 + 2)),
        Case("gzip body inflating over the limit", 413, (str(MAX_BODY_BYTES),),
             body=gzip.compress(b" " * (MAX_BODY_BYTES * 4)), headers={"Content-Encoding": "gzip"}),
        Case("load request with a bad body", 400, ("not valid json",), body=b"{oops",
             path="/v2/repository/models/simple/load"),
        Case("unload request with a bad parameter", 400, ("unload_dependents",),
             body=b'{"parameters": {"unload_dependents": "yes"}}', path="/v2/repository/models/simple/unload"),
        Case("index request with a bad body", 400, ("'ready'",), body=b'{"ready": 3}', path="/v2/repository/index"),
    ]
    return cases


def _send(connection: http.client.HTTPConnection, case: Case) -> tuple[int, dict, bytes]:
    if case.chunks is not None:
        connection.request(case.method, case.path, body=iter(case.chunks), headers=case.headers,
                           encode_chunked=True)
    else:
        connection.request(case.method, case.path, body=case.body or None, headers=case.headers)
    response = connection.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def _good_request(connection: http.client.HTTPConnection) -> np.ndarray:
    """A valid binary request on ``connection``; returns OUTPUT0."""
    body, headers = binary_request({"inputs": [fp32_input([1, 4])], "parameters": {"binary_data_output": True}},
                                   GOOD_INPUT.tobytes())
    connection.request("POST", INFER_PATH, body=body, headers=headers)
    response = connection.getresponse()
    payload = response.read()
    assert response.status == 200, payload[:300]
    header_length = int(response.getheader("Inference-Header-Content-Length"))
    offset = header_length
    outputs: dict[str, np.ndarray] = {}
    for output in json.loads(payload[:header_length])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        outputs[output["name"]] = np.frombuffer(payload[offset : offset + size], dtype=np.float32)
        offset += size
    return outputs["OUTPUT0"]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple",
                            *MAX_BODY_ARGS)
    host, port = server.http_url.split(":")
    client = triton_http.InferenceServerClient(server.http_url)
    good_input = triton_http.InferInput("INPUT0", [1, 4], "FP32")
    good_input.set_data_from_numpy(GOOD_INPUT)

    failures: list[str] = []
    for case in build_cases():
        connection = http.client.HTTPConnection(host, int(port), timeout=20)
        try:
            status, headers, body = _send(connection, case)
            problems = []
            if status != case.status:
                problems.append(f"status {status}, expected {case.status}")
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = ""
                problems.append(f"body is not {{\"error\": ...}}: {body[:200]!r}")
            if not headers.get("content-type", "").startswith("application/json"):
                problems.append(f"content type {headers.get('content-type')}")
            missing = [fragment for fragment in case.expected if fragment.lower() not in message.lower()]
            if missing:
                problems.append(f"message {message!r} does not mention {missing}")
            if case.status == 405 and "allow" not in headers:
                problems.append("405 without an Allow header")
            if case.stream_intact and status < 413 and headers.get("connection", "").lower() != "close":
                # The same keep-alive connection serves the next request.
                output = _good_request(connection)
                np.testing.assert_array_equal(output, (GOOD_INPUT + 1).reshape(-1))
            if problems:
                failures.append(f"{case.name}: " + "; ".join(problems))
        except Exception as error:  # noqa: BLE001 - collect every case's failure, report them together
            failures.append(f"{case.name}: {type(error).__name__}: {error}")
        finally:
            connection.close()
        # And a fresh client request succeeds after every bad one.
        result = client.infer("simple", [good_input])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), GOOD_INPUT + 1)

    assert not failures, "\n".join(failures)
    assert server.process.poll() is None
    assert "Traceback" not in server.log(), server.log()[-3000:]
    client.close()


def test_requests_within_the_body_limit_are_served(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple",
                            *MAX_BODY_ARGS)
    client = triton_http.InferenceServerClient(server.http_url)
    # A JSON body just under the limit: padding whitespace is legal JSON.
    header = json.dumps({"inputs": [json_input([1, 2, 3, 4], [1, 4])]}).encode()
    body = header[:-1] + b" " * (MAX_BODY_BYTES - len(header)) + b"}"
    assert len(body) == MAX_BODY_BYTES
    host, port = server.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    connection.request("POST", INFER_PATH, body=body)
    response = connection.getresponse()
    assert response.status == 200, response.read()[:300]
    assert json.loads(response.read())["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
    connection.close()
    infer_input = triton_http.InferInput("INPUT0", [1, 4], "FP32")
    infer_input.set_data_from_numpy(GOOD_INPUT)
    assert client.infer("simple", [infer_input]).as_numpy("OUTPUT1").tolist() == (GOOD_INPUT * 2).tolist()
    client.close()
