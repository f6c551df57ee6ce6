"""Reading a ``system.ML`` record: raw JSON or a CloudEvent (binary or structured mode) -> ``WorkflowMessage``.

Every way a record can be unusable ends in ``MessageRejected`` with a reason that names the problem and never
quotes a value (the message carries S3 credentials).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from pydantic import ValidationError

from services.core.contracts import IGNORED_STATUSES, PUBLISHED, STOPPING, WorkflowMessage
from services.core.s3_endpoint_policy import EndpointRefused, S3EndpointPolicy

# What the production controller answers (contracts section 1): a DSL must see no difference.
ANSWER_VALID = {"msg": "Received message And valid"}
ANSWER_INVALID = {"msg": "There was a problem ignoring"}

STRUCTURED_CLOUDEVENT = "application/cloudevents+json"
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Kafka's own rule for topic names.
_KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


class MessageRejected(ValueError):
    """The record is not a usable workflow message; ``reason`` says why (safe to log: no values quoted)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _validation_reason(error: ValidationError) -> str:
    # loc + message only: pydantic's default text echoes the input, which may hold credentials.
    problems = [f"{'.'.join(str(p) for p in e['loc']) or '<message>'}: {e['msg']}" for e in error.errors()]
    return "invalid workflow message: " + "; ".join(problems)


def record_payload(body: bytes | str | Mapping[str, Any], content_type: str = "") -> Any:
    """The JSON value a delivery carries: the body itself (raw record or binary-mode CloudEvent), or the ``data``
    of a structured-mode CloudEvent."""
    if isinstance(body, Mapping):
        value: Any = dict(body)
    else:
        try:
            text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
        except UnicodeDecodeError as error:
            raise MessageRejected(f"body is not JSON (not UTF-8 at byte {error.start})") from None
        if not text.strip():
            raise MessageRejected("empty body")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise MessageRejected(f"body is not JSON ({error.msg} at position {error.pos})") from None
    if content_type.split(";")[0].strip().lower() == STRUCTURED_CLOUDEVENT:
        if not isinstance(value, dict) or "data" not in value:
            raise MessageRejected("structured CloudEvent without data")
        value = value["data"]
        if isinstance(value, str):
            return record_payload(value)
    return value


def parse_workflow_message(body: bytes | str | Mapping[str, Any], content_type: str = "") -> WorkflowMessage:
    """Validate a workflow message (contracts section 1) and what its status needs to be acted on."""
    payload = record_payload(body, content_type)
    if not isinstance(payload, dict):
        raise MessageRejected(f"workflow message must be a JSON object, got {type(payload).__name__}")
    if payload.get("workflow_status") == STOPPING:
        # A stop needs only workflow_name, Topics.in and ML.Namespace (contracts section 1): whatever else it
        # carries, a partial S3_bucket included, is not read.
        payload = {key: value for key, value in payload.items() if key != "S3_bucket"}
    try:
        message = WorkflowMessage.model_validate(payload)
    except ValidationError as error:
        raise MessageRejected(_validation_reason(error)) from None
    check_actionable(message)
    return message


def check_actionable(message: WorkflowMessage) -> None:
    """What ``published``/``stopping`` need beyond the schema: names Kubernetes and Kafka accept."""
    status = message.workflow_status
    if status not in (PUBLISHED, STOPPING):
        return
    if not _KAFKA_TOPIC.match(message.Topics.in_):
        raise MessageRejected("Topics.in is not a legal Kafka topic name ([a-zA-Z0-9._-], at most 249 characters)")
    if not _DNS1123_LABEL.match(message.ML.Namespace):
        raise MessageRejected("ML.Namespace is not a Kubernetes namespace name (DNS-1123 label)")
    if status == STOPPING:
        return
    if message.S3_bucket is None:
        raise MessageRejected("a published workflow message needs S3_bucket")
    if message.S3_bucket.endpoint_url is not None:
        try:  # the Wrapper checks again, DNS included, right before it connects
            S3EndpointPolicy.from_settings().check_without_dns(message.S3_bucket.endpoint_url)
        except EndpointRefused as refused:
            raise MessageRejected(str(refused)) from None
    if message.Topics.out and not _KAFKA_TOPIC.match(message.Topics.out):
        raise MessageRejected("Topics.out is not a legal Kafka topic name ([a-zA-Z0-9._-], at most 249 characters)")
    if not message.ML.ServiceName:
        raise MessageRejected("a published workflow message needs ML.ServiceName (the Wrapper service)")
    if not _DNS1123_LABEL.match(message.ML.ServiceName):
        raise MessageRejected("ML.ServiceName is not a Kubernetes Service name (DNS-1123 label)")


def is_known_status(status: str) -> bool:
    return status in (PUBLISHED, STOPPING) or status in IGNORED_STATUSES
