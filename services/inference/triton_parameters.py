"""Triton's request parameters and the rules on them, for every front end.

HTTP (JSON) and gRPC (protobuf ``InferParameter`` / ``ModelRepositoryParameter`` maps) carry the same parameters;
each front end turns its wire form into plain Python values (str, bool, int, float, bytes) and calls these
functions, so a client gets the same error, in the same words, whichever protocol it speaks. The HTTP status and
gRPC code of each error kind are in one table: :class:`services.inference.protocol.ErrorKind`.

Parameter names are Triton 2.51's (``src/http_server.cc``, ``src/grpc/infer_handler.cc``,
``src/grpc/grpc_server.cc`` of triton-inference-server/server).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, MutableMapping

from .protocol import ErrorKind, InferenceServerError, invalid

# Infer request parameters (HTTP's binary tensor extension; both protocols' classification and shared memory).
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
CLASSIFICATION = "classification"
SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

# Model repository requests.
LOAD_CONFIG = "config"
LOAD_FILE_PREFIX = "file:"
UNLOAD_DEPENDENTS = "unload_dependents"


def value_type_name(value: Any) -> str:
    """How an error names the type of a value a client sent (JSON's words; gRPC's parameter values map onto them)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_int(value: Any) -> bool:
    # true/false are bool, a subclass of int: they are not counts.
    return isinstance(value, int) and not isinstance(value, bool)


def reject_shared_memory(parameters: Mapping[str, Any], tensor: str) -> None:
    """``tensor`` (``input 'A'`` / ``output 'B'``) names a shared-memory region: this server has none."""
    if any(name in parameters for name in SHARED_MEMORY_PARAMETERS):
        raise InferenceServerError(
            ErrorKind.UNSUPPORTED,
            f"{tensor} uses shared memory, which this server does not support; send the tensor data in the request",
        )


def pop_classification(parameters: MutableMapping[str, Any], output: str) -> int:
    """The classification extension's class count of requested ``output`` (0: plain tensor), removed from
    ``parameters``."""
    class_count = parameters.pop(CLASSIFICATION, 0)
    if not is_int(class_count) or class_count < 0:
        raise invalid(f"output '{output}': parameter '{CLASSIFICATION}' must be a non-negative integer, got {class_count!r}")
    return int(class_count)


def load_config_override(model_name: str, parameters: Mapping[str, Any]) -> str | None:
    """The ``config`` override (Triton's JSON ModelConfig, as a string) of a load request, if any."""
    config_json: str | None = None
    for key, value in parameters.items():
        if key == LOAD_CONFIG:
            if not isinstance(value, str):
                raise invalid(
                    f"load of model '{model_name}': parameter '{LOAD_CONFIG}' must be a string holding JSON, "
                    f"got {value_type_name(value)}"
                )
            try:
                json.loads(value)
            except ValueError as error:
                raise invalid(f"load of model '{model_name}': parameter '{LOAD_CONFIG}' is not valid JSON: {error}") from None
            config_json = value
        elif key.startswith(LOAD_FILE_PREFIX):
            raise InferenceServerError(
                ErrorKind.UNSUPPORTED,
                f"load of model '{model_name}': parameter '{key}': model file overrides are not supported",
            )
        else:
            raise invalid(f"load of model '{model_name}': unknown load parameter '{key}' (supported: '{LOAD_CONFIG}')")
    return config_json


def unload_dependents(model_name: str, parameters: Mapping[str, Any]) -> bool:
    """``unload_dependents`` of an unload request (false when absent)."""
    for key in parameters:
        if key != UNLOAD_DEPENDENTS:
            raise invalid(
                f"unload of model '{model_name}': unknown unload parameter '{key}' (supported: '{UNLOAD_DEPENDENTS}')"
            )
    value = parameters.get(UNLOAD_DEPENDENTS, False)
    if not isinstance(value, bool):
        raise invalid(
            f"unload of model '{model_name}': parameter '{UNLOAD_DEPENDENTS}' must be true or false, "
            f"got {value_type_name(value)}"
        )
    return value
