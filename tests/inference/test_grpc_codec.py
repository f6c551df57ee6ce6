"""The gRPC frontend's plain functions: protobuf <-> protocol types, without a server."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from services.inference.grpc_server import (
    DEFAULT_MAX_MESSAGE_BYTES,
    checked_model_version,
    fill_infer_response,
    grpc_server_options,
    infer_request_from_proto,
    infer_response_to_proto,
    load_config_override,
    parameters_from_proto,
    stream_error_response,
    unload_dependents_flag,
)
from services.inference.protocol import (
    ErrorKind,
    InferenceServerError,
    InferOutput,
    InferResponse,
    serialize_bytes_tensor,
)


def request_with_inputs(*arrays: tuple[str, str, np.ndarray], model_name: str = "m") -> service_pb2.ModelInferRequest:
    """A request as ``tritonclient.grpc`` builds it: tensor descriptions plus one raw content each."""
    request = service_pb2.ModelInferRequest(model_name=model_name)
    for name, datatype, array in arrays:
        infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        request.inputs.append(infer_input._get_tensor())
        request.raw_input_contents.append(infer_input._get_content())
    return request


def typed_input(name: str, datatype: str, shape: list[int], field: str, values: list) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def expect_error(kind: ErrorKind, *fragments: str):
    class Check:
        def __enter__(self):
            self._raises = pytest.raises(InferenceServerError)
            self.info = self._raises.__enter__()
            return self

        def __exit__(self, *exc):
            handled = self._raises.__exit__(*exc)
            error = self.info.value
            assert error.kind is kind, error.message
            for fragment in fragments:
                assert fragment in error.message, (fragment, error.message)
            return handled

    return Check()


# ---- raw contents ------------------------------------------------------------------------------


def test_raw_inputs_decode_to_typed_shaped_arrays() -> None:
    image = np.arange(2 * 10 * 3 * 3, dtype=np.float32).reshape(2, 10, 3, 3)
    codes = np.array([[1, -2, 3]], dtype=np.int64)
    words = np.array([[b"a", b"", b"\xffbytes"]], dtype=np.object_)
    request = request_with_inputs(("IMAGE", "FP32", image), ("CODES", "INT64", codes), ("WORDS", "BYTES", words))
    request.id = "req-7"
    request.model_version = "2"

    decoded = infer_request_from_proto(request)

    assert (decoded.model_name, decoded.model_version, decoded.id) == ("m", "2", "req-7")
    assert [i.name for i in decoded.inputs] == ["IMAGE", "CODES", "WORDS"]
    np.testing.assert_array_equal(decoded.inputs[0].data, image)
    assert decoded.inputs[0].data.dtype == np.float32 and decoded.inputs[0].shape == [2, 10, 3, 3]
    np.testing.assert_array_equal(decoded.inputs[1].data, codes)
    assert decoded.inputs[2].data.tolist() == words.tolist()
    assert decoded.outputs == []  # no requested outputs means every output


def test_requested_outputs_carry_classification_count_and_parameters() -> None:
    request = request_with_inputs(("X", "FP32", np.zeros((1, 5), np.float32)))
    request.outputs.append(grpcclient.InferRequestedOutput("PROB", class_count=3)._get_tensor())
    request.outputs.append(grpcclient.InferRequestedOutput("OTHER")._get_tensor())
    request.parameters["priority"].uint64_param = 2
    request.parameters["note"].string_param = "x"

    decoded = infer_request_from_proto(request)

    assert [(o.name, o.class_count) for o in decoded.outputs] == [("PROB", 3), ("OTHER", 0)]
    assert decoded.outputs[0].parameters == {}
    assert decoded.parameters == {"priority": 2, "note": "x"}


def test_raw_byte_size_mismatch_names_input_and_sizes() -> None:
    request = request_with_inputs(("IMAGE", "FP32", np.zeros((1, 4), np.float32)))
    request.raw_input_contents[0] = b"\0" * 12
    with expect_error(ErrorKind.INVALID_ARGUMENT, "IMAGE", "12", "16"):
        infer_request_from_proto(request)


def test_raw_contents_count_must_match_inputs() -> None:
    request = request_with_inputs(
        ("A", "FP32", np.zeros((1, 2), np.float32)), ("B", "FP32", np.zeros((1, 2), np.float32))
    )
    del request.raw_input_contents[1]
    with expect_error(ErrorKind.INVALID_ARGUMENT, "raw_input_contents", "expected 2", "got 1"):
        infer_request_from_proto(request)


def test_input_without_any_data_is_rejected() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="A", datatype="FP32", shape=[1, 2])
    with expect_error(ErrorKind.INVALID_ARGUMENT, "unable to find data", "'A'"):
        infer_request_from_proto(request)


def test_negative_dimension_is_rejected() -> None:
    request = request_with_inputs(("A", "FP32", np.zeros((1, 2), np.float32)))
    request.inputs[0].shape[:] = [-1, 2]
    with expect_error(ErrorKind.INVALID_ARGUMENT, "'A'", "negative"):
        infer_request_from_proto(request)


def test_model_version_must_be_empty_or_an_integer() -> None:
    assert checked_model_version("m", "") == ""
    assert checked_model_version("m", "12") == "12"
    for bad in ("latest", "-1", "1.0", " 1", "\u0661"):  # the last is an Arabic-Indic digit
        with expect_error(ErrorKind.INVALID_ARGUMENT, repr(bad)[1:-1], "'m'"):
            checked_model_version("m", bad)
    request = request_with_inputs(("A", "FP32", np.zeros((1, 2), np.float32)))
    request.model_version = "v2"
    with expect_error(ErrorKind.INVALID_ARGUMENT, "'v2'"):
        infer_request_from_proto(request)


def test_unknown_datatype_is_rejected() -> None:
    request = request_with_inputs(("A", "FP32", np.zeros((1, 2), np.float32)))
    request.inputs[0].datatype = "FP128"
    with expect_error(ErrorKind.INVALID_ARGUMENT, "'A'", "FP128"):
        infer_request_from_proto(request)


def test_raw_and_typed_contents_together_are_rejected() -> None:
    request = request_with_inputs(("A", "FP32", np.zeros((1, 2), np.float32)))
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    with expect_error(ErrorKind.INVALID_ARGUMENT, "contents field must not be specified", "'A'"):
        infer_request_from_proto(request)


def test_shared_memory_inputs_and_outputs_are_unsupported() -> None:
    request = request_with_inputs(("A", "FP32", np.zeros((1, 2), np.float32)))
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    with expect_error(ErrorKind.UNSUPPORTED, "'A'", "shared memory"):
        infer_request_from_proto(request)

    request = request_with_inputs(("A", "FP32", np.zeros((1, 2), np.float32)))
    output = grpcclient.InferRequestedOutput("OUT")
    output.set_shared_memory("region", 8)
    request.outputs.append(output._get_tensor())
    with expect_error(ErrorKind.UNSUPPORTED, "'OUT'", "shared memory"):
        infer_request_from_proto(request)


# ---- typed contents ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("BOOL", "bool_contents", [True, False, True, True], np.bool_),
        ("INT8", "int_contents", [-128, -1, 0, 127], np.int8),
        ("INT16", "int_contents", [-32768, -1, 0, 32767], np.int16),
        ("INT32", "int_contents", [-(2**31), -1, 0, 2**31 - 1], np.int32),
        ("INT64", "int64_contents", [-(2**63), -1, 0, 2**63 - 1], np.int64),
        ("UINT8", "uint_contents", [0, 1, 200, 255], np.uint8),
        ("UINT16", "uint_contents", [0, 1, 40000, 65535], np.uint16),
        ("UINT32", "uint_contents", [0, 1, 2**31, 2**32 - 1], np.uint32),
        ("UINT64", "uint64_contents", [0, 1, 2**63, 2**64 - 1], np.uint64),
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 1e-3], np.float32),
        ("FP64", "fp64_contents", [0.5, -1.25, 3.0, 1e-300], np.float64),
    ],
)
def test_typed_contents_decode_per_datatype(datatype: str, field: str, values: list, dtype: type) -> None:
    decoded = infer_request_from_proto(typed_input("A", datatype, [2, 2], field, values))
    array = decoded.inputs[0].data
    assert array.dtype == np.dtype(dtype)
    assert array.shape == (2, 2)
    np.testing.assert_array_equal(array, np.array(values, dtype=dtype).reshape(2, 2))


def test_typed_bytes_contents_decode_to_object_array() -> None:
    decoded = infer_request_from_proto(typed_input("S", "BYTES", [1, 3], "bytes_contents", [b"x", b"", b"yz"]))
    assert decoded.inputs[0].data.dtype == np.object_
    assert decoded.inputs[0].data.tolist() == [[b"x", b"", b"yz"]]


def test_typed_contents_of_another_type_are_rejected() -> None:
    with expect_error(ErrorKind.INVALID_ARGUMENT, "'A'", "INT64", "expected datatype 'FP32'"):
        infer_request_from_proto(typed_input("A", "FP32", [1, 2], "int64_contents", [1, 2]))


def test_typed_contents_element_count_must_match_shape() -> None:
    with expect_error(ErrorKind.INVALID_ARGUMENT, "'A'", "3 elements", "[2, 2]", "4"):
        infer_request_from_proto(typed_input("A", "FP32", [2, 2], "fp32_contents", [1.0, 2.0, 3.0]))


def test_fp16_cannot_travel_in_typed_contents() -> None:
    with expect_error(ErrorKind.INVALID_ARGUMENT, "'A'", "FP16", "raw_input_contents"):
        infer_request_from_proto(typed_input("A", "FP16", [1, 2], "fp32_contents", [1.0, 2.0]))


# ---- responses ---------------------------------------------------------------------------------


def test_response_puts_every_output_in_raw_contents_readable_by_tritonclient() -> None:
    features = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    codes = np.array([[[1, 2], [3, 4]]], dtype=np.int64)
    labels = np.array([[b"0.9:3:urban", b"0.1:0:water"]], dtype=np.object_)
    response = InferResponse(
        model_name="m",
        model_version="4",
        id="r1",
        outputs=[
            InferOutput("FEATURES", "FP32", [2, 6], features),
            InferOutput("CODES", "INT64", [1, 2, 2], codes, parameters={"note": "x"}),
            InferOutput("LABELS", "BYTES", [1, 2], labels),
        ],
        parameters={"sequence_end": True, "count": 3, "ratio": 0.5},
    )

    message = infer_response_to_proto(response)

    assert (message.model_name, message.model_version, message.id) == ("m", "4", "r1")
    assert len(message.raw_output_contents) == 3
    assert [o.name for o in message.outputs] == ["FEATURES", "CODES", "LABELS"]
    assert all(not o.HasField("contents") for o in message.outputs)
    assert message.raw_output_contents[2] == serialize_bytes_tensor(labels)
    assert parameters_from_proto(message.parameters) == {"sequence_end": True, "count": 3, "ratio": 0.5}
    assert parameters_from_proto(message.outputs[1].parameters) == {"note": "x"}
    result = grpcclient.InferResult(message)
    np.testing.assert_array_equal(result.as_numpy("FEATURES"), features)
    np.testing.assert_array_equal(result.as_numpy("CODES"), codes)
    assert result.as_numpy("LABELS").tolist() == labels.tolist()


def test_stream_response_embeds_the_infer_response_in_place() -> None:
    stream_response = service_pb2.ModelStreamInferResponse()
    fill_infer_response(
        stream_response.infer_response,
        InferResponse("m", "1", "abc", [InferOutput("Y", "FP32", [1], np.array([2.5], np.float32))]),
    )
    assert stream_response.error_message == ""
    assert grpcclient.InferResult(stream_response.infer_response).as_numpy("Y").tolist() == [2.5]


def test_stream_error_keeps_the_request_id() -> None:
    message = stream_error_response("req-9", "input 'X' is wrong")
    assert message.error_message == "input 'X' is wrong"
    assert message.infer_response.id == "req-9"
    assert len(message.infer_response.outputs) == 0


# ---- repository requests and options -----------------------------------------------------------


def test_load_request_config_override() -> None:
    request = service_pb2.RepositoryModelLoadRequest(model_name="m")
    assert load_config_override(request) is None
    request.parameters["config"].string_param = '{"max_batch_size": 4}'
    assert load_config_override(request) == '{"max_batch_size": 4}'

    request.parameters["config"].bool_param = True
    with expect_error(ErrorKind.INVALID_ARGUMENT, "config", "must be a string holding JSON"):
        load_config_override(request)

    request = service_pb2.RepositoryModelLoadRequest(model_name="m")
    request.parameters["file:1/model.onnx"].bytes_param = b"onnx"
    with expect_error(ErrorKind.UNSUPPORTED, "file:1/model.onnx"):
        load_config_override(request)

    request = service_pb2.RepositoryModelLoadRequest(model_name="m")
    request.parameters["colour"].string_param = "blue"
    with expect_error(ErrorKind.INVALID_ARGUMENT, "colour"):
        load_config_override(request)


def test_unload_request_dependents_flag() -> None:
    request = service_pb2.RepositoryModelUnloadRequest(model_name="m")
    assert unload_dependents_flag(request) is False
    request.parameters["unload_dependents"].bool_param = True
    assert unload_dependents_flag(request) is True
    request.parameters["unload_dependents"].string_param = "yes"
    with expect_error(ErrorKind.INVALID_ARGUMENT, "unload_dependents", "must be true or false"):
        unload_dependents_flag(request)


def test_message_size_options_default_and_minimum() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert dict(grpc_server_options(DEFAULT_MAX_MESSAGE_BYTES * 2)) == {
        "grpc.max_send_message_length": DEFAULT_MAX_MESSAGE_BYTES * 2,
        "grpc.max_receive_message_length": DEFAULT_MAX_MESSAGE_BYTES * 2,
    }
    with pytest.raises(ValueError, match="64 MiB"):
        grpc_server_options(DEFAULT_MAX_MESSAGE_BYTES - 1)
