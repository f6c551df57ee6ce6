"""The HTTP frontend's codecs as plain functions: request decoding, response encoding, Triton JSON.

Responses are read back with tritonclient's own parser (``InferResult.from_response_body``), so
these tests check the wire format against the real client, not against our idea of it.
"""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.grpc import model_config_pb2, service_pb2

from services.inference import triton_json
from services.inference.http_codec import (
    HttpStatusError,
    decode_infer_request,
    decompress_body,
    encode_infer_response,
    parse_index_request,
    parse_load_request,
    parse_unload_request,
)
from services.inference.protocol import (
    ErrorKind,
    InferenceServerError,
    InferOutput,
    InferResponse,
    RequestedOutput,
    serialize_bytes_tensor,
)


def _body(header: dict, *raw: bytes) -> tuple[bytes, str | None]:
    header_bytes = json.dumps(header).encode()
    if not raw:
        return header_bytes, None
    return header_bytes + b"".join(raw), str(len(header_bytes))


def _decode(header: dict, *raw: bytes, header_length: str | None = "auto"):
    body, computed_length = _body(header, *raw)
    return decode_infer_request("m", "", body, computed_length if header_length == "auto" else header_length)


def _invalid(header: dict, *raw: bytes, header_length: str | None = "auto") -> str:
    with pytest.raises(InferenceServerError) as caught:
        _decode(header, *raw, header_length=header_length)
    assert caught.value.kind.http_status == 400
    return caught.value.message


# --- request decoding -------------------------------------------------------------------------


def test_binary_input_is_a_view_into_the_request_body() -> None:
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                          "parameters": {"binary_data_size": values.nbytes}}]}
    body, header_length = _body(header, values.tobytes())
    decoded = decode_infer_request("m", "3", body, header_length)
    data = decoded.request.inputs[0].data
    np.testing.assert_array_equal(data, values)
    assert np.shares_memory(data, np.frombuffer(body, dtype=np.uint8)), "binary input was copied"
    assert decoded.request.model_name == "m" and decoded.request.model_version == "3"
    assert decoded.request.inputs[0].parameters == {}  # binary_data_size is consumed by the HTTP layer


def test_several_binary_inputs_and_a_json_input_in_one_request() -> None:
    first = np.array([[1, -2, 3]], dtype=np.int64)
    second = np.array([[True, False]], dtype=np.bool_)
    strings = np.array([b"a", b"\x00\xffbin", b""], dtype=np.object_)
    strings_raw = serialize_bytes_tensor(strings)
    header = {
        "id": "req-7",
        "parameters": {"priority": 2, "binary_data_output": True},
        "inputs": [
            {"name": "a", "datatype": "INT64", "shape": [1, 3], "parameters": {"binary_data_size": first.nbytes}},
            {"name": "j", "datatype": "FP32", "shape": [2, 2], "data": [[1.5, 2], [3, 4]]},
            {"name": "b", "datatype": "BOOL", "shape": [1, 2], "parameters": {"binary_data_size": second.nbytes}},
            {"name": "s", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(strings_raw)}},
        ],
        "outputs": [{"name": "o", "parameters": {"binary_data": False, "classification": 3, "custom": "x"}}],
    }
    decoded = _decode(header, first.tobytes(), second.tobytes(), strings_raw)
    request = decoded.request
    assert request.id == "req-7"
    assert request.parameters == {"priority": 2}
    assert decoded.binary_output_default is True
    by_name = {item.name: item for item in request.inputs}
    np.testing.assert_array_equal(by_name["a"].data, first)
    np.testing.assert_array_equal(by_name["j"].data, np.array([[1.5, 2], [3, 4]], dtype=np.float32))
    assert by_name["j"].data.dtype == np.float32
    np.testing.assert_array_equal(by_name["b"].data, second)
    assert list(by_name["s"].data) == list(strings)
    assert request.outputs == [RequestedOutput(name="o", binary_data=False, class_count=3, parameters={"custom": "x"})]


def test_nested_and_flat_json_data_decode_to_the_same_row_major_array() -> None:
    nested = _decode({"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}]})
    flat = _decode({"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]})
    np.testing.assert_array_equal(nested.request.inputs[0].data, flat.request.inputs[0].data)
    assert flat.request.inputs[0].data.dtype == np.int32
    assert flat.request.inputs[0].data[1, 0] == 4


def test_json_bytes_input_becomes_utf8_bytes() -> None:
    decoded = _decode({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1, 2], "data": [["héllo", ""]]}]})
    assert decoded.request.inputs[0].data.tolist() == [["héllo".encode(), b""]]


@pytest.mark.parametrize(
    ("header_length", "expected"),
    [
        ("abc", "must be an integer"),
        ("-1", "must not be negative"),
        ("999999", "has only"),
    ],
)
def test_bad_header_length_values(header_length: str, expected: str) -> None:
    message = _invalid({"inputs": []}, b"\x00" * 4, header_length=header_length)
    assert "Inference-Header-Content-Length" in message and expected in message


def test_binary_sizes_that_do_not_add_up() -> None:
    raw = np.zeros(4, dtype=np.float32).tobytes()
    too_big = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 32}}]}
    assert "only 16 bytes" in _invalid(too_big, raw)
    leftover = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}]}
    message = _invalid(leftover, raw + b"\x00" * 20)
    assert "20 bytes of binary data" in message and "no input claims" in message
    negative = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": -16}}]}
    assert "non-negative integer" in _invalid(negative, raw)
    boolean = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": True}}]}
    assert "non-negative integer" in _invalid(boolean, raw)
    overflowing = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4],
                               "parameters": {"binary_data_size": 2**70}}]}
    assert "binary_data_size" in _invalid(overflowing, raw)
    no_header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}]}
    assert "binary_data_size" in _invalid(no_header, header_length=None)


def test_binary_size_must_match_datatype_and_shape() -> None:
    raw = np.zeros(3, dtype=np.float32).tobytes()
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 12}}]}
    message = _invalid(header, raw)
    assert "byte size 12" in message and "expected 16" in message


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "x", "datatype": "FP33", "shape": [1], "data": [1]}, "unsupported datatype 'FP33'"),
        ({"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}, "negative dimensions"),
        ({"name": "x", "datatype": "FP32", "shape": "4", "data": [1]}, "'shape' must be an array"),
        ({"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}, "has 2 elements in 'data'"),
        ({"name": "x", "datatype": "INT8", "shape": [2], "data": [1, 300]}, "out of range for INT8"),
        ({"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2.5]}, "must hold integers"),
        ({"name": "x", "datatype": "FP32", "shape": [2], "data": [1, "two"]}, "must hold numbers"),
        ({"name": "x", "datatype": "BOOL", "shape": [2], "data": [1, 0]}, "true/false"),
        ({"name": "x", "datatype": "BYTES", "shape": [2], "data": ["a", 2]}, "must hold strings"),
        ({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3]]}, "ragged"),
        ({"name": "x", "datatype": "UINT64", "shape": [1], "data": [2**70]}, "out of range for UINT64"),
        ({"name": "x", "datatype": "FP32", "shape": [1]}, "neither 'data' nor 'binary_data_size'"),
        ({"datatype": "FP32", "shape": [1], "data": [1]}, "'name' must be a non-empty string"),
        ({"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"binary_data_size": 4}},
         "both 'data' and 'binary_data_size'"),
    ],
)
def test_bad_json_inputs_name_the_problem(entry: dict, expected: str) -> None:
    message = _invalid({"inputs": [entry]}, header_length=None)
    assert expected in message
    if "name" in entry:
        assert "'x'" in message  # the message says which input


def test_bad_request_documents() -> None:
    assert "not valid JSON" in _invalid_body(b"{not json")
    assert "must be a JSON object" in _invalid_body(b"[1, 2]")
    assert "'inputs' array" in _invalid_body(b"{}")
    assert "'id' must be a string" in _invalid_body(b'{"id": 5, "inputs": []}')
    assert "binary_data_output" in _invalid_body(b'{"inputs": [], "parameters": {"binary_data_output": "yes"}}')
    assert "'classification'" in _invalid_body(b'{"inputs": [], "outputs": [{"name": "o", "parameters": '
                                                b'{"classification": -1}}]}')
    assert "'binary_data'" in _invalid_body(b'{"inputs": [], "outputs": [{"name": "o", "parameters": '
                                            b'{"binary_data": 1}}]}')


def _invalid_body(body: bytes) -> str:
    with pytest.raises(InferenceServerError) as caught:
        decode_infer_request("m", "", body, None)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    return caught.value.message


def test_shared_memory_is_refused_as_unsupported() -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                          "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}
    with pytest.raises(InferenceServerError) as caught:
        _decode(header, header_length=None)
    assert caught.value.kind is ErrorKind.UNSUPPORTED and "shared memory" in caught.value.message


# --- response encoding ------------------------------------------------------------------------


def _response() -> InferResponse:
    return InferResponse(
        model_name="m",
        model_version="2",
        id="abc",
        outputs=[
            InferOutput("f", "FP32", [2, 2], np.array([[0.1, -2], [np.inf, 4]], dtype=np.float32)),
            InferOutput("i", "INT64", [3], np.array([1, -2, 2**40], dtype=np.int64)),
            InferOutput("s", "BYTES", [2], np.array([b"0.9:1:forest", b"0.1:0:water"], dtype=np.object_)),
            InferOutput("h", "FP16", [2], np.array([0.5, 1.5], dtype=np.float16)),
        ],
    )


def _parse(encoded) -> triton_http.InferResult:
    return triton_http.InferResult.from_response_body(encoded.body, header_length=encoded.header_length)


@pytest.mark.parametrize("binary_default", [True, False])
def test_response_round_trips_through_tritonclient(binary_default: bool) -> None:
    response = _response()
    encoded = encode_infer_response(response, [], binary_default)
    assert (encoded.header_length is not None) is binary_default
    result = _parse(encoded)
    document = result.get_response()
    assert document["model_name"] == "m" and document["model_version"] == "2" and document["id"] == "abc"
    for output in response.outputs:
        if output.datatype == "FP16" and not binary_default:
            np.testing.assert_array_equal(result.as_numpy(output.name).astype(np.float16), output.data)
            continue
        got = result.as_numpy(output.name)
        if output.datatype == "BYTES":
            assert [item if isinstance(item, bytes) else item.encode() for item in got.tolist()] == list(output.data)
        else:
            np.testing.assert_array_equal(got, output.data)
        entry = result.get_output(output.name)
        assert entry["shape"] == output.shape
        assert ("binary_data_size" in entry.get("parameters", {})) is binary_default


def test_per_output_binary_flag_overrides_the_request_default() -> None:
    response = _response()
    requested = [RequestedOutput("f", binary_data=True), RequestedOutput("i", binary_data=False)]
    encoded = encode_infer_response(response, requested, False)
    result = _parse(encoded)
    assert result.get_output("f")["parameters"]["binary_data_size"] == 16
    assert "data" in result.get_output("i") and result.get_output("i")["data"] == [1, -2, 2**40]
    assert "data" in result.get_output("s")  # not mentioned: request default (JSON)
    # Binary data follows the JSON header exactly: header + 16 bytes.
    assert len(encoded.body) == encoded.header_length + 16
    np.testing.assert_array_equal(result.as_numpy("f"), response.outputs[0].data)


def test_json_only_response_has_no_header_length() -> None:
    encoded = encode_infer_response(_response(), [], False)
    assert encoded.header_length is None
    document = json.loads(encoded.body)
    assert document["outputs"][0]["data"][2] == "Infinity"


def test_non_utf8_bytes_output_requested_as_json_is_a_clear_error() -> None:
    response = InferResponse("m", "1", outputs=[InferOutput("s", "BYTES", [1], np.array([b"\xff"], dtype=object))])
    with pytest.raises(InferenceServerError) as caught:
        encode_infer_response(response, [], False)
    assert "not UTF-8" in caught.value.message and "binary_data" in caught.value.message
    encoded = encode_infer_response(response, [], True)
    assert _parse(encoded).as_numpy("s").tolist() == [b"\xff"]


# --- repository requests, compression ---------------------------------------------------------


def test_repository_request_bodies() -> None:
    assert parse_index_request(b"") is False
    assert parse_index_request(b'{"ready": true}') is True
    assert parse_load_request("m", b"") is None
    config = json.dumps({"max_batch_size": 2})
    assert parse_load_request("m", json.dumps({"parameters": {"config": config}}).encode()) == config
    assert parse_unload_request("m", b"") is False
    assert parse_unload_request("m", b'{"parameters": {"unload_dependents": true}}') is True
    for bad, expected in [
        (lambda: parse_index_request(b'{"ready": "yes"}'), "'ready'"),
        (lambda: parse_load_request("m", b'{"parameters": {"config": "{not json"}}'), "not valid JSON"),
        (lambda: parse_load_request("m", b'{"parameters": {"config": 5}}'), "must be a string"),
        (lambda: parse_load_request("m", b'{"parameters": {"colour": "red"}}'), "unknown load parameter 'colour'"),
        (lambda: parse_load_request("m", b'{"parameters": {"file:1/model.onnx": "AAAA"}}'), "not supported"),
        (lambda: parse_unload_request("m", b'{"parameters": {"unload_dependents": 1}}'), "unload_dependents"),
        (lambda: parse_unload_request("m", b"[]"), "JSON object"),
    ]:
        with pytest.raises(InferenceServerError) as caught:
            bad()
        assert expected in caught.value.message


def test_decompress_body() -> None:
    payload = b'{"inputs": []}' * 10
    assert decompress_body(gzip.compress(payload), "gzip", 1000) == payload
    assert decompress_body(zlib.compress(payload), "deflate", 1000) == payload
    assert decompress_body(payload, "identity", 1000) == payload
    with pytest.raises(InferenceServerError, match="not valid gzip"):
        decompress_body(b"definitely not gzip", "gzip", 1000)
    with pytest.raises(InferenceServerError, match="truncated"):
        decompress_body(gzip.compress(payload)[:-12], "gzip", 1000)
    with pytest.raises(InferenceServerError, match="unsupported Content-Encoding 'br'"):
        decompress_body(payload, "br", 1000)
    bomb = gzip.compress(b"\x00" * 10_000_000)
    with pytest.raises(HttpStatusError) as caught:
        decompress_body(bomb, "gzip", 1_000_000)
    assert caught.value.status == 413


# --- Triton JSON of protos --------------------------------------------------------------------


def test_model_config_json_has_numbers_enum_names_and_triton_presence() -> None:
    config = model_config_pb2.ModelConfig(name="ssl", backend="onnxruntime", max_batch_size=16)
    config.input.add(name="x", data_type=model_config_pb2.TYPE_FP32, dims=[10, 120, 120])
    config.output.add(name="y", data_type=model_config_pb2.TYPE_STRING, dims=[-1], label_filename="labels.txt")
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO, count=2)
    config.version_policy.specific.versions.extend([1, 3])
    config.parameters["threads"].string_value = "1"

    document = json.loads(json.dumps(triton_json.model_config_to_json_dict(config)))
    assert document["max_batch_size"] == 16
    assert document["input"][0]["dims"] == [10, 120, 120]
    assert document["input"][0]["data_type"] == "TYPE_FP32"
    assert document["input"][0]["is_shape_tensor"] is False  # defaults are present, as Triton shows them
    assert document["output"][0]["dims"] == [-1] and document["output"][0]["data_type"] == "TYPE_STRING"
    assert document["instance_group"][0]["kind"] == "KIND_AUTO" and document["instance_group"][0]["count"] == 2
    assert document["version_policy"] == {"specific": {"versions": [1, 3]}}  # oneof: only the member set
    assert document["parameters"] == {"threads": {"string_value": "1"}}
    assert "dynamic_batching" not in document  # unset message: absent, as in Triton
    config.dynamic_batching.max_queue_delay_microseconds = 100
    document = triton_json.model_config_to_json_dict(config)
    assert document["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert document["dynamic_batching"]["preferred_batch_size"] == []
    # And back: Triton's JSON parses to the same proto (the load-override direction).
    assert triton_json.json_dict_to_message(json.dumps(document), model_config_pb2.ModelConfig, what="t") == config


def test_float_fields_render_as_their_shortest_float32_decimal() -> None:
    config = model_config_pb2.ModelConfig(name="m")
    config.sequence_batching.direct.minimum_slot_utilization = 0.1  # a float field: stored as 0.10000000149...
    control = config.sequence_batching.control_input.add(name="START").control.add()
    control.fp32_false_true.extend([0.0, 1.0])
    document = triton_json.model_config_to_json_dict(config)
    assert document["sequence_batching"]["direct"]["minimum_slot_utilization"] == 0.1
    assert document["sequence_batching"]["control_input"][0]["control"][0]["fp32_false_true"] == [0.0, 1.0]
    timeout = model_config_pb2.ModelQueuePolicy(default_timeout_microseconds=2**40)
    assert triton_json.message_to_json_dict(timeout)["default_timeout_microseconds"] == 2**40


def test_unknown_config_field_is_an_invalid_argument() -> None:
    with pytest.raises(InferenceServerError) as caught:
        triton_json.model_config_from_json('{"max_batch_sise": 4}')
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT and "max_batch_sise" in caught.value.message


def test_statistics_json_has_every_counter_as_numbers() -> None:
    entry = service_pb2.ModelStatistics(name="m", version="1", inference_count=5, execution_count=2,
                                        last_inference=1_700_000_000_000)
    entry.inference_stats.success.count = 5
    entry.inference_stats.success.ns = 123_456_789_012
    batch = entry.batch_stats.add(batch_size=4)
    batch.compute_infer.count = 1
    batch.compute_infer.ns = 99
    document = json.loads(json.dumps(triton_json.statistics_to_json_dict([entry])))
    stats = document["model_stats"][0]
    assert stats["inference_count"] == 5 and stats["execution_count"] == 2
    assert stats["last_inference"] == 1_700_000_000_000
    assert stats["inference_stats"]["success"] == {"count": 5, "ns": 123_456_789_012}
    for never_set in ("fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss"):
        assert stats["inference_stats"][never_set] == {"count": 0, "ns": 0}
    assert stats["batch_stats"][0]["batch_size"] == 4
    assert stats["batch_stats"][0]["compute_infer"] == {"count": 1, "ns": 99}
    assert stats["batch_stats"][0]["compute_input"] == {"count": 0, "ns": 0}


def test_deeply_nested_json_is_a_client_error() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InferenceServerError) as caught:
        decode_infer_request("simple", "", body, None)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT and "too deeply" in caught.value.message


def test_errors_cross_a_process_boundary_intact() -> None:
    """Large JSON requests are decoded in a helper process: its errors must come back as they were."""
    import pickle

    error = pickle.loads(pickle.dumps(InferenceServerError(ErrorKind.NOT_FOUND, "no such model")))
    assert (error.kind, error.message) == (ErrorKind.NOT_FOUND, "no such model")


def test_a_large_body_is_decoded_from_shared_memory() -> None:
    """The helper process's side of the large-JSON path: the body the server wrote into shared memory."""
    from multiprocessing import shared_memory

    from services.inference.http_decode_pool import decode_shared_infer_request

    body = json.dumps({"id": "big", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 2],
                                                "data": [1, 2, 3, 4]}]}).encode()
    shared = shared_memory.SharedMemory(create=True, size=len(body) + 16)  # the block may be larger than the body
    try:
        shared.buf[:len(body)] = body
        decoded = decode_shared_infer_request("simple", "1", shared.name, len(body))
    finally:
        shared.close()
        shared.unlink()
    assert decoded.request.id == "big" and decoded.request.model_version == "1"
    np.testing.assert_array_equal(decoded.request.inputs[0].data, np.array([[1, 2], [3, 4]], np.float32))
