"""Which CloudEvent a consumed Kafka record becomes: the one rule the local event plane delivers by.

Modelled on eventing-kafka-broker (EKB) ``data-plane/dispatcher/.../impl/consumer/CloudEventDeserializer.java``
(a record is first read as a CloudEvent of the CloudEvents Kafka protocol binding: binary mode = ``ce_*``
headers plus ``content-type``, structured mode = a ``content-type: application/cloudevents+json`` value; anything
that does not parse is an "invalid" event) and ``InvalidCloudEventInterceptor.java`` (an invalid event, i.e. a plain
record, gets id ``partition:<p>/offset:<o>``, source ``/apis/v1/namespaces/<ns>/kafkasources/<name>#<topic>``,
type ``dev.knative.kafka.event``, subject ``partition:<p>#<o>``, time = the record timestamp, ``key`` and
``partitionkey`` from the record key, every other header as a ``kafkaheader<name>`` extension and ``content-type``
as ``datacontenttype``). A record that IS a CloudEvent keeps the producer's id, source, type, time, subject and
extensions: the sink sees exactly what the producer wrote, so a producer that derives ``ce_id`` deterministically
gets the same id on every duplicate of a record.

The dispatcher sends the event to the sink in HTTP binary mode (``ce-<attribute>`` headers, body = data), as EKB's
``WebClientCloudEventSender`` does. ``cloudevent_kafka_headers`` is the inverse for producers (binary mode).
Not modelled: CloudEvents spec versions other than 1.0, ``data`` of a structured event that is neither JSON nor a
string (XML and the like), Avro/Protobuf structured formats.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

CLOUDEVENT_TYPE = "dev.knative.kafka.event"
SPEC_VERSION = "1.0"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
KAFKA_BINARY_PREFIX = "ce_"
REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")
_NOT_ATTRIBUTE_CHARS = re.compile(r"[^a-z0-9]")


class RecordMode(enum.Enum):
    """How a record carried its event: a CloudEvent in Kafka binary or structured mode, or a plain record."""

    BINARY = "binary"
    STRUCTURED = "structured"
    PLAIN = "plain"


@dataclass(frozen=True)
class KafkaRecord:
    """The parts of a consumed record a delivery needs (plain data: tests build them directly)."""

    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    @property
    def position(self) -> str:
        """``partition:<p>/offset:<o>``: where the record is (the id a plain record is delivered with)."""
        return f"partition:{self.partition}/offset:{self.offset}"


@dataclass(frozen=True)
class RecordEvent:
    """The CloudEvent the sink receives for one record: its context attributes (``specversion``, ``id``,
    ``source``, ``type``, optional ``time``, ``subject``, ``datacontenttype``, extensions) and its data."""

    mode: RecordMode
    attributes: Mapping[str, str]
    data: bytes = b""
    extensions: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.attributes["id"]

    def http_headers(self) -> dict[str, str]:
        """HTTP binary mode: ``ce-<name>`` for every attribute and extension, ``content-type`` = datacontenttype."""
        headers = {f"ce-{name}": value for name, value in self.attributes.items() if name != "datacontenttype"}
        headers.update({f"ce-{name}": value for name, value in self.extensions.items()})
        if "datacontenttype" in self.attributes:
            headers["content-type"] = self.attributes["datacontenttype"]
        return headers


def record_cloudevent(record: KafkaRecord, namespace: str, source_name: str) -> RecordEvent:
    """The event a KafkaSource named ``source_name`` in ``namespace`` delivers for ``record``: the producer's
    CloudEvent when the record is one (binary or structured mode), otherwise the plain-record event."""
    event = _binary_event(record) or _structured_event(record)
    return event or _plain_event(record, namespace, source_name)


def _header_text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", errors="replace")


def _binary_event(record: KafkaRecord) -> RecordEvent | None:
    """CloudEvents Kafka binding, binary mode: attributes in ``ce_<name>`` headers, ``content-type`` header =
    datacontenttype, value = data. None unless every required attribute is there (EKB: an invalid event)."""
    attributes: dict[str, str] = {}
    extensions: dict[str, str] = {}
    content_type = None
    for name, value in record.headers:
        lowered = name.lower()
        if lowered == "content-type":
            content_type = _header_text(value)
        elif lowered.startswith(KAFKA_BINARY_PREFIX):
            attribute = lowered[len(KAFKA_BINARY_PREFIX):]
            target = attributes if attribute in (*REQUIRED_ATTRIBUTES, "time", "subject", "dataschema") \
                else extensions
            target[attribute] = _header_text(value)
    if attributes.get("specversion") != SPEC_VERSION or not all(attributes.get(a) for a in REQUIRED_ATTRIBUTES):
        return None
    if content_type:
        attributes["datacontenttype"] = content_type
    return RecordEvent(RecordMode.BINARY, attributes, record.value, extensions)


def _structured_event(record: KafkaRecord) -> RecordEvent | None:
    """Structured mode: the value is the whole event as JSON (``content-type: application/cloudevents+json``)."""
    content_type = next((_header_text(v) for n, v in record.headers if n.lower() == "content-type"), "")
    if not content_type.lower().startswith(STRUCTURED_CONTENT_TYPE):
        return None
    try:
        envelope = json.loads(record.value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(envelope, dict) or envelope.get("specversion") != SPEC_VERSION \
            or not all(isinstance(envelope.get(a), str) and envelope.get(a) for a in REQUIRED_ATTRIBUTES):
        return None
    attributes: dict[str, str] = {}
    extensions: dict[str, str] = {}
    for name, value in envelope.items():
        if name in ("data", "data_base64"):
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        known = name in (*REQUIRED_ATTRIBUTES, "time", "subject", "dataschema", "datacontenttype")
        (attributes if known else extensions)[name] = text
    data = _structured_data(envelope, attributes)
    if data is None:
        return None
    return RecordEvent(RecordMode.STRUCTURED, attributes, data, extensions)


def _structured_data(envelope: dict[str, Any], attributes: dict[str, str]) -> bytes | None:
    if "data_base64" in envelope:
        try:
            return base64.b64decode(envelope["data_base64"], validate=True)
        except (binascii.Error, TypeError):
            return None
    if "data" not in envelope:
        return b""
    data = envelope["data"]
    if isinstance(data, str) and not attributes.get("datacontenttype", "application/json").endswith("json"):
        return data.encode("utf-8")
    # JSON data (the spec's default content type): serialised as JSON.
    attributes.setdefault("datacontenttype", "application/json")
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _plain_event(record: KafkaRecord, namespace: str, source_name: str) -> RecordEvent:
    attributes = {
        "specversion": SPEC_VERSION,
        "id": record.position,
        "source": f"/apis/v1/namespaces/{namespace}/kafkasources/{source_name}#{record.topic}",
        "type": CLOUDEVENT_TYPE,
        "subject": f"partition:{record.partition}#{record.offset}",
    }
    if record.timestamp_ms:
        moment = datetime.fromtimestamp(record.timestamp_ms / 1000, tz=timezone.utc)
        attributes["time"] = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    extensions: dict[str, str] = {}
    if record.key is not None:
        key = _header_text(record.key)
        extensions["partitionkey"] = key
        extensions["key"] = key
    content_type = ""
    for name, value in record.headers:
        if name.lower() == "content-type":
            content_type = _header_text(value).lower()
            continue
        # CloudEvents attribute names are lower-case letters and digits only.
        extensions["kafkaheader" + _NOT_ATTRIBUTE_CHARS.sub("", name.lower())] = _header_text(value)
    # Our step messages are JSON; a record without content-type is delivered as JSON, as the local stack always did.
    attributes["datacontenttype"] = content_type or "application/json"
    return RecordEvent(RecordMode.PLAIN, attributes, record.value, extensions)


def cloudevent_kafka_headers(*, id: str, source: str, type: str, time: str | None = None,
                             subject: str | None = None, content_type: str = "application/json",
                             extensions: Mapping[str, str] | None = None) -> list[tuple[str, bytes]]:
    """Kafka headers of a binary-mode CloudEvent record (the value stays the data): ``ce_specversion``,
    ``ce_id``, ``ce_source``, ``ce_type``, optional ``ce_time``/``ce_subject``, ``ce_<extension>``, and
    ``content-type``. ``record_cloudevent`` reads them back into the same attributes."""
    pairs: list[tuple[str, str]] = [("ce_specversion", SPEC_VERSION), ("ce_id", id), ("ce_source", source),
                                    ("ce_type", type)]
    if time:
        pairs.append(("ce_time", time))
    if subject:
        pairs.append(("ce_subject", subject))
    for name, value in (extensions or {}).items():
        if _NOT_ATTRIBUTE_CHARS.search(name) or not name:
            raise ValueError(f"CloudEvent extension names are lower-case letters and digits: {name!r}")
        pairs.append((f"ce_{name}", value))
    pairs.append(("content-type", content_type))
    return [(name, value.encode("utf-8")) for name, value in pairs]
