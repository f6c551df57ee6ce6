"""KServe v2 inference protocol types with Triton's extensions, independent of any transport.

Frontends (HTTP, gRPC) decode their wire format into these types, call the engine, and encode
the result; the engine never sees JSON or protobuf messages of the inference path.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Triton datatype name -> numpy dtype. BYTES tensors are numpy object arrays of ``bytes``.
TRITON_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
try:  # numpy has no bfloat16; ml_dtypes (a dependency of tritonclient and onnx) does, as Triton's clients use it
    import ml_dtypes

    BF16_DTYPE: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
    TRITON_TO_NUMPY["BF16"] = BF16_DTYPE
except ImportError:  # pragma: no cover - BF16 is then an unsupported datatype
    BF16_DTYPE = None
NUMPY_TO_TRITON: dict[np.dtype, str] = {v: k for k, v in TRITON_TO_NUMPY.items()}
NUMPY_TO_TRITON[np.dtype(np.bytes_)] = "BYTES"

# config.pbtxt DataType enum names (TYPE_FP32) <-> protocol datatype names (FP32).
CONFIG_TYPE_PREFIX = "TYPE_"
CONFIG_TYPE_TO_TRITON = {CONFIG_TYPE_PREFIX + ("STRING" if k == "BYTES" else k): k for k in TRITON_TO_NUMPY}


class ErrorKind(enum.Enum):
    """Error categories with their HTTP status and gRPC status-code name, as Triton 2.51 maps them
    (``HttpCodeFromError`` / ``ToGrpcStatus``): UNSUPPORTED is 501 on HTTP, ALREADY_EXISTS is 400."""

    INVALID_ARGUMENT = (400, "INVALID_ARGUMENT")
    NOT_FOUND = (404, "NOT_FOUND")
    UNAVAILABLE = (503, "UNAVAILABLE")
    INTERNAL = (500, "INTERNAL")
    ALREADY_EXISTS = (400, "ALREADY_EXISTS")
    UNSUPPORTED = (501, "UNIMPLEMENTED")

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def grpc_code_name(self) -> str:
        return self.value[1]


class InferenceServerError(Exception):
    """An error a client sees: a kind (-> HTTP status / gRPC code) and a message saying what was wrong."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple:
        # Decoding may run in a helper process: the error must cross back intact.
        return (type(self), (self.kind, self.message))


def invalid(message: str) -> InferenceServerError:
    return InferenceServerError(ErrorKind.INVALID_ARGUMENT, message)


def not_found(message: str) -> InferenceServerError:
    return InferenceServerError(ErrorKind.NOT_FOUND, message)


def unavailable(message: str) -> InferenceServerError:
    return InferenceServerError(ErrorKind.UNAVAILABLE, message)


@dataclass(slots=True)
class InferInput:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # already shaped and typed; BYTES as object array of bytes
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary_data: bool | None = None  # HTTP only: None = the request's default
    class_count: int = 0  # classification extension: > 0 returns "score:index[:label]" BYTES
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""  # "" = the highest ready version
    id: str = ""
    inputs: list[InferInput] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty = every output
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferOutput:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str = ""
    outputs: list[InferOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return TRITON_TO_NUMPY[datatype]
    except KeyError:
        raise invalid(f"unsupported datatype '{datatype}'") from None


def triton_datatype(array: np.ndarray) -> str:
    dtype = array.dtype
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_TRITON[dtype]
    except KeyError:
        raise invalid(f"unsupported numpy dtype {dtype}") from None


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """Triton's raw BYTES layout: each element as a 4-byte little-endian length, then its bytes."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray)):
            item = str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def deserialize_bytes_tensor(buffer: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of :func:`serialize_bytes_tensor`; raises INVALID_ARGUMENT on malformed framing."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(view):
            raise invalid("BYTES tensor data is truncated: missing a length prefix")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise invalid("BYTES tensor data is truncated: an element is shorter than its length prefix")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise invalid(f"BYTES tensor data has {len(view) - offset} unexpected trailing bytes")
    out = np.empty(count, dtype=np.object_)
    out[:] = items
    return out


def array_from_raw(raw: bytes | memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """Decode a raw little-endian tensor (binary extension / gRPC raw contents), checking its byte size."""
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw, count).reshape(shape)
    dtype = numpy_dtype(datatype)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"unexpected byte size {len(raw)} for datatype {datatype} and shape {shape}: expected {expected}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def array_to_raw(array: np.ndarray) -> bytes:
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return serialize_bytes_tensor(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
