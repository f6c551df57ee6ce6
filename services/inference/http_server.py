"""Triton-compatible HTTP/REST frontend (KServe v2 + Triton's extensions) over the engine.

The request/response codecs are plain functions (:func:`decode_infer_request`,
:func:`encode_infer_response`) that tests call directly; :func:`create_http_app` only maps paths
to engine calls and errors to ``{"error": "..."}`` bodies with Triton's status codes.

Hot path (``POST .../infer``): the JSON header is parsed once, binary inputs become
``np.frombuffer`` views into the request body (no copy), and a binary response is the JSON
header followed by the outputs' raw bytes joined once. Nothing is logged per request at INFO.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import shared_memory
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

import numpy as np
from aiohttp import web

from . import triton_json
from .restricted_api import Restriction, http_refusal
from .engine import ModelMetadata, RepositoryIndexEntry, ServerMetadata
from .protocol import (
    ErrorKind,
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

if TYPE_CHECKING:
    from .engine import InferenceEngine

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# Parameters the HTTP layer consumes itself; they are not passed on to the engine.
_BINARY_DATA_SIZE = "binary_data_size"
_BINARY_DATA = "binary_data"
_BINARY_DATA_OUTPUT = "binary_data_output"
_CLASSIFICATION = "classification"
_SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

# JSON headers longer than this are decoded in a helper process, so /v2/health/* keeps answering meanwhile.
OFFLOAD_DECODE_BYTES = 1024 * 1024
DECODER_PROCESSES = 2
DECODER_NICENESS = 10

_LOAD_CONFIG_PARAMETER = "config"
_LOAD_FILE_PARAMETER_PREFIX = "file:"
_UNLOAD_DEPENDENTS_PARAMETER = "unload_dependents"


# True when the server runs with aiohttp's automatic request decompression off (see start_site):
# bodies then arrive as sent and decompress_body inflates them, so a corrupt stream gets its 400
# on a connection that stays open. With aiohttp inflating (its default), the 400 closes the
# connection, because aiohttp's decoder cannot resynchronise on the rest of the stream.
RAW_REQUEST_BODIES = web.AppKey("raw_request_bodies", bool)


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
        raise invalid(f"{what} must be a JSON object, got {_json_type_name(value)}")
    return value


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, a subclass of int: they are not sizes or dims.
    return isinstance(value, int) and not isinstance(value, bool)


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
    if not isinstance(value, list) or not all(_is_int(dim) for dim in value):
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
            raise invalid(f"{where}: BYTES data must hold strings, found {_json_type_name(item)}")


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
        if kind == "O" and all(_is_int(item) for item in parsed.reshape(-1)):
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
    for shared_memory_parameter in _SHARED_MEMORY_PARAMETERS:
        if shared_memory_parameter in parameters:
            raise InferenceServerError(ErrorKind.UNSUPPORTED, f"{where}: shared memory inputs are not supported")
    binary_size = parameters.pop(_BINARY_DATA_SIZE, None)
    has_json_data = "data" in entry

    if binary_size is not None:
        if has_json_data:
            raise invalid(f"{where}: has both 'data' and '{_BINARY_DATA_SIZE}'; send one of them")
        if not _is_int(binary_size) or binary_size < 0:
            raise invalid(f"{where}: '{_BINARY_DATA_SIZE}' must be a non-negative integer, got {binary_size!r}")
        end = offset + binary_size
        if end > len(binary):
            raise invalid(
                f"{where}: '{_BINARY_DATA_SIZE}' is {binary_size} bytes but only {len(binary) - offset} bytes "
                f"of binary data are left after the JSON header"
            )
        try:
            data = array_from_raw(binary[offset:end], datatype, shape)
        except InferenceServerError as error:
            raise invalid(f"{where}: {error.message}") from None
        return InferInput(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters), end

    if not has_json_data:
        raise invalid(f"{where}: has neither 'data' nor '{_BINARY_DATA_SIZE}'")
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
    where = f"requested output '{name}'"
    parameters = dict(_require_dict(entry.get("parameters", {}), f"{where}: 'parameters'"))
    for shared_memory_parameter in _SHARED_MEMORY_PARAMETERS:
        if shared_memory_parameter in parameters:
            raise InferenceServerError(ErrorKind.UNSUPPORTED, f"{where}: shared memory outputs are not supported")
    binary_data = parameters.pop(_BINARY_DATA, None)
    if binary_data is not None and not isinstance(binary_data, bool):
        raise invalid(f"{where}: '{_BINARY_DATA}' must be true or false, got {binary_data!r}")
    class_count = parameters.pop(_CLASSIFICATION, 0)
    if not _is_int(class_count) or class_count < 0:
        raise invalid(f"{where}: '{_CLASSIFICATION}' must be a non-negative integer, got {class_count!r}")
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
        raise invalid(f"'id' must be a string, got {_json_type_name(request_id)}")
    parameters = dict(_require_dict(header.get("parameters", {}), "request 'parameters'"))
    binary_output_default = parameters.pop(_BINARY_DATA_OUTPUT, False)
    if not isinstance(binary_output_default, bool):
        raise invalid(f"'{_BINARY_DATA_OUTPUT}' must be true or false, got {binary_output_default!r}")

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
            f"claims (inputs' '{_BINARY_DATA_SIZE}' add up to {offset})"
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


def decode_shared_infer_request(model_name: str, model_version: str, shared_name: str, size: int) -> DecodedInferRequest:
    """:func:`decode_infer_request` of a JSON body the server wrote into shared memory (runs in a helper process)."""
    # The server creates and unlinks the block. (Attaching registers it again with the resource tracker this
    # process shares with the server: a no-op for a name the tracker already holds.)
    shared = shared_memory.SharedMemory(name=shared_name)
    try:
        body = bytes(shared.buf[:size])
    finally:
        shared.close()
    return decode_infer_request(model_name, model_version, body, None)


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
            parameters[_BINARY_DATA_SIZE] = raw.nbytes if isinstance(raw, np.ndarray) else len(raw)
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


def parse_load_request(body: bytes) -> str | None:
    """The config override (Triton's JSON ModelConfig, as a string) of a load request, if any."""
    document = _parse_optional_json_object(body, "load request")
    parameters = _require_dict(document.get("parameters", {}), "load request 'parameters'")
    config_json: str | None = None
    for key, value in parameters.items():
        if key == _LOAD_CONFIG_PARAMETER:
            if not isinstance(value, str):
                raise invalid(f"load parameter 'config' must be a string holding JSON, got {_json_type_name(value)}")
            try:
                json.loads(value)
            except ValueError as error:
                raise invalid(f"load parameter 'config' is not valid JSON: {error}") from None
            config_json = value
        elif key.startswith(_LOAD_FILE_PARAMETER_PREFIX):
            raise InferenceServerError(
                ErrorKind.UNSUPPORTED, f"load parameter '{key}': model file overrides are not supported"
            )
        else:
            raise invalid(f"unknown load parameter '{key}' (supported: 'config')")
    return config_json


def parse_unload_request(body: bytes) -> bool:
    """``unload_dependents`` of an unload request (the body is optional)."""
    document = _parse_optional_json_object(body, "unload request")
    parameters = _require_dict(document.get("parameters", {}), "unload request 'parameters'")
    for key in parameters:
        if key != _UNLOAD_DEPENDENTS_PARAMETER:
            raise invalid(f"unknown unload parameter '{key}' (supported: '{_UNLOAD_DEPENDENTS_PARAMETER}')")
    unload_dependents = parameters.get(_UNLOAD_DEPENDENTS_PARAMETER, False)
    if not isinstance(unload_dependents, bool):
        raise invalid(f"'{_UNLOAD_DEPENDENTS_PARAMETER}' must be true or false, got {unload_dependents!r}")
    return unload_dependents


def _parse_optional_json_object(body: bytes, what: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise invalid(f"{what} body is not valid JSON: {error}") from None
    return _require_dict(document, f"{what} body")


_SUPPORTED_ENCODINGS = ("identity", "gzip", "deflate")


def _normalized_encoding(content_encoding: str) -> str:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return "identity"
    return "gzip" if encoding == "x-gzip" else encoding


def _starts_compressed(body: bytes, content_encoding: str) -> bool:
    """Whether ``body`` still begins with a gzip or zlib header, so nothing inflated it yet.

    Covers a runner that turned aiohttp's decompression off without going through start_site:
    an inflated body is the JSON header, which never begins with these bytes.
    """
    encoding = _normalized_encoding(content_encoding)
    if encoding == "gzip":
        return body[:2] == b"\x1f\x8b"
    if encoding == "deflate":
        # RFC 1950: compression method 8 in the low nibble, header checksum divisible by 31.
        return len(body) >= 2 and body[0] & 0x0F == 8 and ((body[0] << 8) | body[1]) % 31 == 0
    return False


def decompress_body(body: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """The body of a ``Content-Encoding: gzip|deflate`` request, at most ``max_bytes`` once inflated."""
    encoding = _normalized_encoding(content_encoding)
    if encoding == "identity":
        return body
    if encoding not in _SUPPORTED_ENCODINGS:
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


# --------------------------------------------------------------------------------------------
# aiohttp application
# --------------------------------------------------------------------------------------------


def json_response(document: Any, status: int = 200) -> web.Response:
    return web.Response(body=triton_json.dumps(document), status=status, content_type=JSON_CONTENT_TYPE)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=triton_json.dumps({"error": message}), status=status, content_type=JSON_CONTENT_TYPE, headers=headers
    )


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure becomes ``{"error": "<message>"}`` with Triton's status; the server keeps serving."""
    try:
        return await handler(request)
    except InferenceServerError as error:
        return error_response(error.kind.http_status, error.message)
    except HttpStatusError as error:
        response = error_response(error.status, error.message)
        if error.close_connection:
            response.force_close()
        return response
    except web.HTTPMethodNotAllowed as error:
        allowed = ", ".join(sorted(error.allowed_methods))
        return error_response(
            405, f"method {request.method} is not allowed on {request.path} (allowed: {allowed})",
            headers={"Allow": ",".join(sorted(error.allowed_methods))},
        )
    except web.HTTPNotFound:
        return error_response(404, f"no endpoint at {request.method} {request.path}")
    except web.HTTPRequestEntityTooLarge as error:
        return error_response(413, error.text or "request body too large")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, error.text or error.reason)
    except Exception as error:  # noqa: BLE001 - the server must answer and keep serving
        log.exception("unhandled error in HTTP handler", extra={"method": request.method, "path": request.path})
        return error_response(500, f"internal error: {type(error).__name__}: {error}")


class _HttpFrontend:
    """Handlers: each decodes, calls one engine method, encodes. No request state is kept here."""

    def __init__(self, engine: InferenceEngine, max_body_bytes: int) -> None:
        self._engine = engine
        self._max_body_bytes = max_body_bytes
        self._decoder_pool: ProcessPoolExecutor | None = None  # started on the first large JSON request

    async def _decode_elsewhere(
        self, name: str, version: str, body: bytes, header_length: str | None
    ) -> DecodedInferRequest:
        if self._decoder_pool is None:
            self._decoder_pool = self._start_decoder_pool()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder_pool, decode_infer_request, name, version, body, header_length)

    async def _decode_shared(self, request: web.Request, name: str, version: str, size: int) -> DecodedInferRequest:
        shared = shared_memory.SharedMemory(create=True, size=size)
        try:
            offset = 0
            try:
                async for chunk in request.content.iter_any():
                    end = offset + len(chunk)
                    if end > size:
                        raise invalid(f"request body is longer than its Content-Length of {size} bytes")
                    shared.buf[offset:end] = chunk
                    offset = end
            except (InferenceServerError, asyncio.CancelledError):
                raise
            except Exception as error:  # a broken stream: as _read_body answers it
                request.content.feed_eof()
                raise HttpStatusError(400, f"could not read the request body: {error}", close_connection=True) from None
            if offset != size:
                raise invalid(f"request body ended after {offset} of its Content-Length of {size} bytes")
            if self._decoder_pool is None:
                self._decoder_pool = self._start_decoder_pool()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._decoder_pool, decode_shared_infer_request, name, version, shared.name, size
            )
        finally:
            shared.close()
            shared.unlink()

    def _start_decoder_pool(self) -> ProcessPoolExecutor:
        # spawn: forking a process that runs ONNX Runtime and gRPC threads is not safe. Niced: the event loop
        # (health probes, small requests) wins the CPU over a large decode.
        return ProcessPoolExecutor(
            DECODER_PROCESSES, mp_context=multiprocessing.get_context("spawn"),
            initializer=os.nice, initargs=(DECODER_NICENESS,),
        )

    async def close(self, app: web.Application) -> None:
        if self._decoder_pool is not None:
            self._decoder_pool.shutdown(wait=False, cancel_futures=True)
            self._decoder_pool = None

    async def _read_body(self, request: web.Request) -> bytes:
        # Refuse by Content-Length before reading anything; aiohttp's own limit (client_max_size)
        # covers chunked and compressed bodies while they are read.
        encoding = request.headers.get("Content-Encoding")
        declared = request.content_length
        if declared is not None and declared > self._max_body_bytes:
            raise HttpStatusError(
                413, f"request body of {declared} bytes exceeds the server's limit of {self._max_body_bytes} bytes"
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpStatusError(
                413, f"request body exceeds the server's limit of {self._max_body_bytes} bytes"
            ) from None
        except Exception as error:  # aiohttp raises its own types for bad gzip/deflate or broken chunking
            if isinstance(error, web.HTTPException):
                raise
            # The stream is broken past this point: mark the body finished so aiohttp does not try
            # to drain it after the response (it would fail again and log a traceback), and close.
            request.content.feed_eof()
            detail = f" (Content-Encoding: {encoding})" if encoding else ""
            # aiohttp wraps its parser error ("400, message: ..."); the cause carries the plain text.
            cause = error.__cause__ or error
            message = str(getattr(cause, "message", "") or error).replace("\n", " ").strip()
            raise HttpStatusError(
                400, f"could not read the request body{detail}: {message}", close_connection=True
            ) from None
        if encoding is None:
            return body
        # Refused only now: the body had to be read for the connection to stay usable.
        if _normalized_encoding(encoding) not in _SUPPORTED_ENCODINGS:
            raise invalid(f"unsupported Content-Encoding '{encoding}' (supported: gzip, deflate)")
        if not request.app[RAW_REQUEST_BODIES] and not _starts_compressed(body, encoding):
            return body  # aiohttp already inflated it
        return decompress_body(body, encoding, self._max_body_bytes)

    # --- health and metadata ---------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._engine.is_live() else 400)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._engine.is_ready() else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(server_metadata_json(self._engine.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        return json_response(model_metadata_json(self._engine.model_metadata(name, version)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        return web.Response(status=200 if self._engine.model_ready(name, version) else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        return json_response(triton_json.model_config_to_json_dict(self._engine.model_config(name, version)))

    async def model_statistics(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        return json_response(triton_json.statistics_to_json_dict(self._engine.model_statistics(name, version)))

    # --- model repository ------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        ready_only = parse_index_request(await self._read_body(request))
        return json_response(repository_index_json(self._engine.repository_index(ready_only=ready_only)))

    async def load(self, request: web.Request) -> web.Response:
        config_json = parse_load_request(await self._read_body(request))
        await self._engine.load_model(request.match_info["model"], config_json)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        unload_dependents = parse_unload_request(await self._read_body(request))
        await self._engine.unload_model(request.match_info["model"], unload_dependents=unload_dependents)
        return web.Response(status=200)

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        header_length = request.headers.get(HEADER_LENGTH)
        declared = request.content_length
        # Parsing megabytes of JSON holds the GIL for a second or more (json and numpy do not release it),
        # which would stall /v2/health/* past a probe's timeout: a helper process decodes large JSON.
        if (header_length is None and "Content-Encoding" not in request.headers and declared is not None
                and OFFLOAD_DECODE_BYTES < declared <= self._max_body_bytes):
            # A large plain JSON body goes into shared memory a chunk at a time: not even a copy of it is
            # made on the event loop's thread.
            decoded = await self._decode_shared(request, name, version, declared)
        else:
            body = await self._read_body(request)
            if _json_bytes(body, header_length) > OFFLOAD_DECODE_BYTES:
                decoded = await self._decode_elsewhere(name, version, body, header_length)
            else:
                decoded = decode_infer_request(name, version, body, header_length)

        def encode(response: InferResponse) -> EncodedInferResponse:
            return encode_infer_response(response, decoded.request.outputs, decoded.binary_output_default)

        encoded = await self._engine.infer(decoded.request, encode)
        if encoded.header_length is None:
            return web.Response(body=encoded.body, content_type=JSON_CONTENT_TYPE)
        return web.Response(
            body=encoded.body,
            content_type=BINARY_CONTENT_TYPE,
            headers={HEADER_LENGTH: str(encoded.header_length)},
        )


def _json_bytes(body: bytes, header_length: str | None) -> int:
    """How much of ``body`` is JSON to parse (the header; all of it without the binary extension)."""
    if header_length is None:
        return len(body)
    try:
        return min(len(body), max(0, int(header_length)))
    except ValueError:
        return 0  # decode_infer_request answers the bad header at once


def _model_and_version(request: web.Request) -> tuple[str, str]:
    match_info = request.match_info
    version = match_info.get("version", "")
    if version and not version.isdigit():
        # Triton's routes take only digits as a version: anything else is no endpoint at all (404).
        raise HttpStatusError(404, f"no endpoint at {request.method} {request.path}: a model version is an integer")
    return match_info.get("model", ""), version


def restriction_middleware(restrictions: Mapping[str, Restriction]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Triton's ``--http-restricted-api``: 403 unless the request carries the group's header, before
    anything of the request is read."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        refusal = http_refusal(restrictions, request.method, request.path, request.headers)
        if refusal is not None:
            return error_response(403, refusal)
        return await handler(request)

    return middleware


def create_http_app(
    engine: InferenceEngine, *, max_body_bytes: int, restrictions: Mapping[str, Restriction] | None = None
) -> web.Application:
    """The Triton-compatible HTTP/REST application over ``engine``.

    ``max_body_bytes`` bounds every request body (413 beyond it), checked against Content-Length
    before reading and while reading chunked or compressed bodies. ``restrictions``: API group ->
    required header (:func:`services.inference.restricted_api.parse_restrictions`).
    """
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    frontend = _HttpFrontend(engine, max_body_bytes)
    middlewares = [error_middleware]
    if restrictions:
        middlewares.append(restriction_middleware(dict(restrictions)))
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[RAW_REQUEST_BODIES] = False
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    routes = [
        web.get("/v2/health/live", frontend.live),
        web.get("/v2/health/ready", frontend.ready),
        web.get("/v2", frontend.server_metadata),
        # Before the model routes: a model can be named "stats" only through /v2/models/stats/stats.
        web.get("/v2/models/stats", frontend.model_statistics),
        web.post("/v2/repository/index", frontend.repository_index),
        web.post("/v2/repository/models/{model}/load", frontend.load),
        web.post("/v2/repository/models/{model}/unload", frontend.unload),
    ]
    for prefix in (model, versioned):
        routes += [
            web.get(prefix, frontend.model_metadata),
            web.get(prefix + "/ready", frontend.model_ready),
            web.get(prefix + "/config", frontend.model_config),
            web.get(prefix + "/stats", frontend.model_statistics),
            web.post(prefix + "/infer", frontend.infer),
        ]
    app.add_routes(routes)
    app.on_cleanup.append(frontend.close)
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; returns the runner to clean up (``await runner.cleanup()``).

    No access log (one INFO line per request costs more than the tiny models' inference), and
    request bodies reach the handlers as sent (``auto_decompress=False``), so
    :func:`decompress_body` answers corrupt gzip / deflate data with a 400 and the keep-alive
    connection stays usable. aiohttp keeps TCP_NODELAY on the accepted sockets either way.
    """
    if RAW_REQUEST_BODIES in app:
        app[RAW_REQUEST_BODIES] = True
    runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
