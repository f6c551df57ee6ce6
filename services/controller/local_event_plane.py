"""The local event plane: what Knative's KafkaSource dispatcher (eventing-kafka-broker) does, for machines without
Knative. The implementation is the package ``event_plane`` (one module per upstream concern, each citing the
upstream file it models); this module keeps the names the controller and the tests import.

- ``event_plane/cloudevents.py``: which CloudEvent a record becomes (producer's identity, or its position).
- ``event_plane/delivery.py``: HTTP attempts, retry/backoff and per-attempt timeout as ``spec.delivery`` says.
- ``event_plane/offsets.py``: commit of the contiguous finished prefix only.
- ``event_plane/dispatcher.py``: unordered (in-flight cap max.poll.records) or ordered dispatch, dead-letter sink,
  commit after a failing dead-letter sink.
- ``event_plane/groups.py``: consumer group deleted with its source, ``initialOffset`` on re-creation.
- ``event_plane/driver.py``: ``LocalSourceDriver``, the controller's ``SourceDriver``.
"""

from __future__ import annotations

from .event_plane.cloudevents import KafkaRecord, RecordEvent, RecordMode, cloudevent_kafka_headers, record_cloudevent
from .event_plane.delivery import (
    DeliveryResult,
    DispatchTarget,
    HttpPoster,
    deliver_record,
    delivery_policy_from_spec,
    http_post,
    is_retryable_status,
)
from .event_plane.dispatcher import (
    DispatcherTuning,
    InitialOffset,
    Ordering,
    Outcome,
    SourceSpec,
    StepDispatcher,
    dead_letter_headers,
    dead_letter_value,
    ensure_topic,
    kafka_record,
)
from .event_plane.driver import LocalSourceDriver
from .event_plane.groups import (
    commit_group_offsets,
    commit_latest_where_none,
    committed_group_offsets,
    delete_consumer_group,
)


def cloudevent_headers(record: KafkaRecord, target: DispatchTarget) -> dict[str, str]:
    """HTTP binary-mode headers of the event a record is delivered as (``record_cloudevent``)."""
    return record_cloudevent(record, target.namespace, target.source_name).http_headers()


__all__ = [
    "DeliveryResult", "DispatchTarget", "DispatcherTuning", "HttpPoster", "InitialOffset", "KafkaRecord",
    "LocalSourceDriver", "Ordering", "Outcome", "RecordEvent", "RecordMode", "SourceSpec", "StepDispatcher",
    "cloudevent_headers", "cloudevent_kafka_headers", "commit_group_offsets", "commit_latest_where_none",
    "committed_group_offsets", "dead_letter_headers", "dead_letter_value", "delete_consumer_group",
    "deliver_record", "delivery_policy_from_spec", "ensure_topic", "http_post", "is_retryable_status",
    "kafka_record", "record_cloudevent",
]
