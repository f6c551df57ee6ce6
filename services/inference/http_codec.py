"""Triton's HTTP/REST wire format (KServe v2 + Triton's extensions) as plain functions: JSON and binary-extension
request bodies into :mod:`services.inference.protocol` types, responses back into bodies, and the JSON documents
of the non-inference endpoints. No aiohttp here: :mod:`services.inference.http_server` serves these, tests call
them directly, and :mod:`services.inference.http_decode_pool` runs :func:`decode_infer_request` in helper
processes for large JSON bodies.

Hot path: the JSON header is parsed once, binary inputs become ``np.frombuffer`` views into the request body (no
copy), and a binary response is the JSON header followed by the outputs' raw bytes joined once.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import ModelMetadata, RepositoryIndexEntry, ServerMetadata
from .protocol import (
    InferenceServerError,
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    array_from_raw,
    element_count,
    invalid,
    numpy_dtype,
    serialize_bytes_tensor,
)
from .triton_parameters import (
    BINARY_DATA,
    BINARY_DATA_OUTPUT,
    BINARY_DATA_SIZE,
    is_int,
    load_config_override,
    pop_classification,
    reject_shared_memory,
    unload_dependents,
    value_type_name,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

class HttpStatusError(Exception):
    """An HTTP-level error with no engine counterpart (413 body too large, unreadable body).

    ``close_connection``: the rest of the request stream cannot be trusted, so the response
    says ``Connection: close`` and the connection ends after it (the server keeps serving others).
    """

    def __init__(self, status: int, message: str, *, close_connection: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close_connection = close_connection



# --------------------------------------------------------------------------------------------
# Request decoding
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class DecodedInferRequest:
    request: InferRequest
    binary_output_default: bool  # request-level ``binary_data_output``


def _require_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object, got {value_type_name(value)}")
    return value


def _parse_header_length(header_value: str | None, body_length: int) -> int:
    """The JSON header's length: the whole body when the header is absent."""
    if header_value is None:
        return body_length
    try:
        header_length = int(header_value.strip())
    except ValueError:
        raise invalid(f"{HEADER_LENGTH} header must be an integer, got '{header_value}'") from None
    if header_length < 0:
        raise invalid(f"{HEADER_LENGTH} header must not be negative, got {header_length}")
    if header_length > body_length:
        raise invalid(
            f"{HEADER_LENGTH} header says {header_length} bytes but the request body has only {body_length}"
        )
    return header_length


def _parse_shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(is_int(dim) for dim in value):
        raise invalid(f"{where}: 'shape' must be an array of integers, got {json.dumps(value)[:200]}")
    if any(dim < 0 for dim in value):
        raise invalid(f"{where}: 'shape' must not have negative dimensions, got {value}")
    return value


def _flatten_strings(data: Any, out: list[bytes], where: str) -> None:
    for item in data:
        if isinstance(item, list):
            _flatten_strings(item, out, where)
        elif isinstance(item, str):
            out.append(item.encode("utf-8"))
        else:
            raise invalid(f"{where}: BYTES data must hold strings, found {value_type_name(item)}")


_JSON_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "non-integer numbers", "U": "strings"}


def _kind_name(kind: str) -> str:
    return _JSON_KIND_NAMES.get(kind, "mixed or non-numeric values")


def _array_from_json_data(data: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) as an array of ``datatype`` and ``shape``."""
    expected = element_count(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        items: list[bytes] = []
        _flatten_strings(data, items, where)
        if len(items) != expected:
            raise invalid(f"{where}: has {len(items)} elements in 'data' but shape {shape} needs {expected}")
        array = np.empty(len(items), dtype=np.object_)
        array[:] = items
        return array.reshape(shape)

    dtype = numpy_dtype(datatype)
    try:
        parsed = np.array(data)
    except (ValueError, OverflowError) as error:
        raise invalid(f"{where}: 'data' is not a regular (non-ragged) array of numbers: {error}") from None
    if parsed.size != expected:
        raise invalid(f"{where}: has {parsed.size} elements in 'data' but shape {shape} needs {expected}")
    if parsed.size == 0:
        return np.empty(shape, dtype=dtype)
    kind = parsed.dtype.kind
    if dtype.kind == "b":
        if kind != "b":
            raise invalid(f"{where}: BOOL data must hold true/false values, found {_kind_name(kind)}")
    elif dtype.kind in "iu":
        if kind == "O" and all(is_int(item) for item in parsed.reshape(-1)):
            raise invalid(f"{where}: value out of range for {datatype}")
        if kind not in "iu":
            raise invalid(f"{where}: {datatype} data must hold integers, found {_kind_name(kind)}")
        limits = np.iinfo(dtype)
        low, high = int(parsed.min()), int(parsed.max())
        if low < limits.min or high > limits.max:
            raise invalid(f"{where}: value out of range for {datatype} ({low}..{high})")
    elif dtype.kind == "f":
        if kind not in "iuf":
            raise invalid(f"{where}: {datatype} data must hold numbers, found {_kind_name(kind)}")
    return parsed.astype(dtype, copy=False).reshape(shape)


def _decode_input(entry: Any, index: int, binary: memoryview, offset: int) -> tuple[InferInput, int]:
    where = f"input #{index}"
    entry = _require_dict(entry, where)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}: 'name' must be a non-empty string")
    where = f"input '{name}'"
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise invalid(f"{where}: 'datatype' must be a string")
    try:
        numpy_dtype(datatype)
    except InferenceServerError as error:
        raise invalid(f"{where}: {error.message}") from None
    shape = _parse_shape(entry.get("shape"), where)
    parameters = dict(_require_dict(entry.get("parameters", {}), f"{where}: 'parameters'"))
    reject_shared_memory(parameters, where)
    binary_size = parameters.pop(BINARY_DATA_SIZE, None)
    has_json_data = "data" in entry

    if binary_size is not None:
        if has_json_data:
            raise invalid(f"{where}: has both 'data' and '{BINARY_DATA_SIZE}'; send one of them")
        if not is_int(binary_size) or binary_size < 0:
            raise invalid(f"{where}: '{BINARY_DATA_SIZE}' must be a non-negative integer, got {binary_size!r}")
        end = offset + binary_size
        if end > len(binary):
            raise invalid(
                f"{where}: '{BINARY_DATA_SIZE}' is {binary_size} bytes but only {len(binary) - offset} bytes "
                f"of binary data are left after the JSON header"
            )
        try:
            data = array_from_raw(binary[offset:end], datatype, shape)
        except InferenceServerError as error:
            raise invalid(f"{where}: {error.message}") from None
        return InferInput(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters), end

    if not has_json_data:
        raise invalid(f"{where}: has neither 'data' nor '{BINARY_DATA_SIZE}'")
    if datatype == "BF16":
        # Triton's rule and wording: JSON numbers cannot say which bfloat16 they mean.
        raise invalid(f"receiving BF16 data via JSON is not supported. Please use the binary data format for input {name}")
    data = _array_from_json_data(entry["data"], datatype, shape, where)
    return InferInput(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters), offset


def _decode_requested_output(entry: Any, index: int) -> RequestedOutput:
    where = f"requested output #{index}"
    entry = _require_dict(entry, where)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}: 'name' must be a non-empty string")
    where = f"output '{name}'"
    parameters = dict(_require_dict(entry.get("parameters", {}), f"{where}: 'parameters'"))
    reject_shared_memory(parameters, where)
    binary_data = parameters.pop(BINARY_DATA, None)
    if binary_data is not None and not isinstance(binary_data, bool):
        raise invalid(f"{where}: '{BINARY_DATA}' must be true or false, got {binary_data!r}")
    class_count = pop_classification(parameters, name)
    return RequestedOutput(name=name, binary_data=binary_data, class_count=class_count, parameters=parameters)


def decode_infer_request(
    model_name: str, model_version: str, body: bytes, header_length_value: str | None
) -> DecodedInferRequest:
    """Decode an infer request body (JSON header + optional binary tensor data) into protocol types."""
    header_length = _parse_header_length(header_length_value, len(body))
    try:
        header = json.loads(body[:header_length] if header_length != len(body) else body)
    except (UnicodeDecodeError, ValueError) as error:
        raise invalid(f"request JSON header is not valid JSON: {error}") from None
    except RecursionError:
        raise invalid("request JSON header nests arrays or objects too deeply") from None
    header = _require_dict(header, "request JSON header")

    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise invalid(f"'id' must be a string, got {value_type_name(request_id)}")
    parameters = dict(_require_dict(header.get("parameters", {}), "request 'parameters'"))
    binary_output_default = parameters.pop(BINARY_DATA_OUTPUT, False)
    if not isinstance(binary_output_default, bool):
        raise invalid(f"'{BINARY_DATA_OUTPUT}' must be true or false, got {binary_output_default!r}")

    input_entries = header.get("inputs")
    if not isinstance(input_entries, list):
        raise invalid("request JSON header must have an 'inputs' array")
    binary = memoryview(body)[header_length:]
    offset = 0
    inputs: list[InferInput] = []
    for index, entry in enumerate(input_entries):
        infer_input, offset = _decode_input(entry, index, binary, offset)
        inputs.append(infer_input)
    if offset != len(binary):
        raise invalid(
            f"request body has {len(binary) - offset} bytes of binary data after the JSON header that no input "
            f"claims (inputs' '{BINARY_DATA_SIZE}' add up to {offset})"
        )

    output_entries = header.get("outputs", [])
    if not isinstance(output_entries, list):
        raise invalid("'outputs' must be an array")
    outputs = [_decode_requested_output(entry, index) for index, entry in enumerate(output_entries)]

    request = InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
    )
    return DecodedInferRequest(request=request, binary_output_default=binary_output_default)


# --------------------------------------------------------------------------------------------
# Response encoding
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class EncodedInferResponse:
    body: bytes
    header_length: int | None  # None: the body is JSON only


def _raw_buffer(array: np.ndarray) -> Any:
    """The tensor's little-endian row-major bytes, as a buffer that avoids a copy where it can."""
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return serialize_bytes_tensor(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # ascontiguousarray is a no-op for the usual C-contiguous output; join() reads the buffer directly.
    return np.ascontiguousarray(array)


def _json_data(array: np.ndarray, output_name: str) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        try:
            return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in flat]
        except UnicodeDecodeError:
            raise invalid(
                f"output '{output_name}' holds bytes that are not UTF-8 text; request it with binary_data"
            ) from None
    values = flat.tolist()
    if array.dtype.kind == "f" and not np.isfinite(flat).all():
        # JSON has no NaN/Infinity; Triton's clients read these string forms back as floats.
        values = [v if np.isfinite(v) else ("NaN" if np.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
                  for v in values]
    return values


def encode_infer_response(
    response: InferResponse, requested_outputs: list[RequestedOutput], binary_output_default: bool
) -> EncodedInferResponse:
    """The HTTP body of ``response``: JSON alone, or JSON header + binary outputs in order."""
    binary_by_name = {
        output.name: output.binary_data for output in requested_outputs if output.binary_data is not None
    }
    outputs_json: list[dict[str, Any]] = []
    raw_parts: list[Any] = []
    for output in response.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        parameters = dict(output.parameters)
        if binary_by_name.get(output.name, binary_output_default):
            raw = _raw_buffer(output.data)
            parameters[BINARY_DATA_SIZE] = raw.nbytes if isinstance(raw, np.ndarray) else len(raw)
            raw_parts.append(raw)
            entry["parameters"] = parameters
        else:
            if parameters:
                entry["parameters"] = parameters
            entry["data"] = _json_data(output.data, output.name)
        outputs_json.append(entry)

    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs_json
    header = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if not raw_parts:
        return EncodedInferResponse(body=header, header_length=None)
    return EncodedInferResponse(body=b"".join([header, *raw_parts]), header_length=len(header))


# --------------------------------------------------------------------------------------------
# Non-inference documents
# --------------------------------------------------------------------------------------------


def server_metadata_json(metadata: ServerMetadata) -> dict[str, Any]:
    return {"name": metadata.name, "version": metadata.version, "extensions": list(metadata.extensions)}


def model_metadata_json(metadata: ModelMetadata) -> dict[str, Any]:
    def tensors(entries: list[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in entries]

    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": tensors(metadata.inputs),
        "outputs": tensors(metadata.outputs),
    }


def repository_index_json(entries: list[RepositoryIndexEntry]) -> list[dict[str, str]]:
    index: list[dict[str, str]] = []
    for entry in entries:
        item = {"name": entry.name}
        if entry.version:
            item["version"] = entry.version
        if entry.state:
            item["state"] = entry.state
        if entry.reason:
            item["reason"] = entry.reason
        index.append(item)
    return index


def parse_index_request(body: bytes) -> bool:
    """``ready`` of ``POST /v2/repository/index`` (the body is optional)."""
    document = _parse_optional_json_object(body, "repository index request")
    ready = document.get("ready", False)
    if not isinstance(ready, bool):
        raise invalid(f"'ready' must be true or false, got {ready!r}")
    return ready


def parse_load_request(model_name: str, body: bytes) -> str | None:
    """The config override (Triton's JSON ModelConfig, as a string) of a load request, if any."""
    document = _parse_optional_json_object(body, "load request")
    return load_config_override(model_name, _require_dict(document.get("parameters", {}), "load request 'parameters'"))


def parse_unload_request(model_name: str, body: bytes) -> bool:
    """``unload_dependents`` of an unload request (the body is optional)."""
    document = _parse_optional_json_object(body, "unload request")
    return unload_dependents(model_name, _require_dict(document.get("parameters", {}), "unload request 'parameters'"))


def _parse_optional_json_object(body: bytes, what: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise invalid(f"{what} body is not valid JSON: {error}") from None
    return _require_dict(document, f"{what} body")


SUPPORTED_ENCODINGS = ("identity", "gzip", "deflate")


def normalized_encoding(content_encoding: str) -> str:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return "identity"
    return "gzip" if encoding == "x-gzip" else encoding


def starts_compressed(body: bytes, content_encoding: str) -> bool:
    """Whether ``body`` still begins with a gzip or zlib header, so nothing inflated it yet.

    Covers a runner that turned aiohttp's decompression off without going through start_site:
    an inflated body is the JSON header, which never begins with these bytes.
    """
    encoding = normalized_encoding(content_encoding)
    if encoding == "gzip":
        return body[:2] == b"\x1f\x8b"
    if encoding == "deflate":
        # RFC 1950: compression method 8 in the low nibble, header checksum divisible by 31.
        return len(body) >= 2 and body[0] & 0x0F == 8 and ((body[0] << 8) | body[1]) % 31 == 0
    return False


def decompress_body(body: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """The body of a ``Content-Encoding: gzip|deflate`` request, at most ``max_bytes`` once inflated."""
    encoding = normalized_encoding(content_encoding)
    if encoding == "identity":
        return body
    if encoding not in SUPPORTED_ENCODINGS:
        raise invalid(f"unsupported Content-Encoding '{content_encoding}' (supported: gzip, deflate)")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise invalid(f"request body is not valid {encoding} data: {error}") from None
    if len(inflated) > max_bytes:
        raise HttpStatusError(413, f"request body inflates to more than the server's limit of {max_bytes} bytes")
    if not inflater.eof:
        raise invalid(f"request body is truncated {encoding} data")
    return inflated

