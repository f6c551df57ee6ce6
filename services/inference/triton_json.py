"""Protobuf messages <-> the JSON Triton serves over HTTP (model configuration, statistics).

Triton renders its protos with proto field names, enums as names and "primitive fields always
printed", then turns the 64-bit integers back into JSON numbers. Protobuf's own ``MessageToDict``
writes int64/uint64 as strings (``"dims": ["10", "120"]``), which ``perf_analyzer`` and
``tritonclient`` callers do not accept, so the rendering here walks the descriptor itself.

Presence rules, as Triton applies them:
- scalars without presence, repeated fields and maps are always written (defaults included);
- message fields, oneof members and proto3 ``optional`` fields only when set
  (``dynamic_batching`` absent means "no dynamic batching" to a reader of the config).
Statistics are rendered with every sub-message present (zero counts included), because readers
such as perf_analyzer index ``inference_stats.cache_hit.count`` without checking for it.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Iterable, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2, service_pb2

from .protocol import invalid

MessageT = TypeVar("MessageT", bound=Message)

_FLOAT_TYPES = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def _float_to_json(value: float, field_type: int) -> float | str:
    # JSON has no NaN/Infinity literals: protobuf's JSON mapping writes them as strings.
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if field_type == FieldDescriptor.TYPE_FLOAT:
        # A float field read from Python is the float32 widened to double (0.1 -> 0.10000000149...);
        # the shortest decimal that round-trips through float32 is what a reader of the config expects.
        return float(str(np.float32(value)))
    return value


def _scalar_to_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type in _FLOAT_TYPES:
        return _float_to_json(value, field.type)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    # int64/uint64 stay Python ints: json.dumps writes them as numbers.
    return value


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 has the ``is_repeated`` property and deprecates ``label``; older releases only have ``label``.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.has_options
        and field.message_type.GetOptions().map_entry
    )


def message_to_json_dict(message: Message, *, include_unset_messages: bool = False) -> dict[str, Any]:
    """``message`` as Triton's HTTP JSON: proto field names, enum names, 64-bit ints as numbers.

    ``include_unset_messages`` also writes message fields that were never set (as their default,
    recursively), except oneof members; statistics use it so that every counter is present.
    """
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {
                str(key): (
                    message_to_json_dict(item, include_unset_messages=include_unset_messages)
                    if value_field.type == FieldDescriptor.TYPE_MESSAGE
                    else _scalar_to_json(value_field, item)
                )
                for key, item in value.items()
            }
        elif _is_repeated(field):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                out[field.name] = [
                    message_to_json_dict(item, include_unset_messages=include_unset_messages) for item in value
                ]
            else:
                out[field.name] = [_scalar_to_json(field, item) for item in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            is_set = message.HasField(field.name)
            if is_set or (include_unset_messages and field.containing_oneof is None):
                out[field.name] = message_to_json_dict(value, include_unset_messages=include_unset_messages)
        elif field.has_presence:
            if message.HasField(field.name):
                out[field.name] = _scalar_to_json(field, value)
        else:
            out[field.name] = _scalar_to_json(field, value)
    return out


def model_config_to_json_dict(config: model_config_pb2.ModelConfig) -> dict[str, Any]:
    """What Triton answers on ``GET /v2/models/<m>/config``."""
    return message_to_json_dict(config)


def statistics_to_json_dict(statistics: Iterable[service_pb2.ModelStatistics]) -> dict[str, Any]:
    """What Triton answers on ``GET /v2/models[/<m>[/versions/<v>]]/stats``."""
    return {"model_stats": [message_to_json_dict(entry, include_unset_messages=True) for entry in statistics]}


def json_dict_to_message(data: dict[str, Any] | str, message_type: type[MessageT], *, what: str) -> MessageT:
    """Parse Triton's JSON form (numbers or strings for 64-bit ints, enum names) into a proto.

    Unknown fields are an error, as in Triton; ``what`` names the document in the message.
    """
    message = message_type()
    try:
        if isinstance(data, str):
            json_format.Parse(data, message)
        else:
            json_format.ParseDict(data, message)
    except json_format.ParseError as error:
        raise invalid(f"{what} is not a valid {message_type.DESCRIPTOR.name}: {error}") from None
    return message


def model_config_from_json(text: str) -> model_config_pb2.ModelConfig:
    """A ``ModelConfig`` from the JSON a load request carries (``parameters.config``)."""
    return json_dict_to_message(text, model_config_pb2.ModelConfig, what="model configuration JSON")


def dumps(document: Any) -> bytes:
    """Compact JSON bytes for a response body."""
    return json.dumps(document, separators=(",", ":")).encode("utf-8")
