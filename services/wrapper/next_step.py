"""The next-step record a step run announces: the DSL's JSON step message as the value, a CloudEvent in Kafka
binary mode in the headers (CloudEvents Kafka protocol binding: ``ce_*`` headers, ``content-type``).

The event's identity is the upstream run's, deterministic: ``ce_id`` = ``<run id>/<Topics.out>``, ``ce_source`` =
``/eoml/<namespace>/<step configuration>``, ``ce_time`` = the run's ``created`` (the upstream event's time, kept in
the manifest). A KafkaSource delivers a binary-mode record with the producer's id, source and time, and the
downstream Wrapper derives its run id from them (``results.run_id``), so every copy of this record, however many a
re-announcement or a producer retry put on the topic, is one run downstream: one result, one message further on.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from services.core.contracts import S3BucketDesc, StepMessage

NEXT_STEP_EVENT_TYPE = "eu.eo4eu.ml.step.completed"
CLOUDEVENTS_SPEC_VERSION = "1.0"
STEP_MESSAGE_CONTENT_TYPE = "application/json"


def next_message(folder: str, message: StepMessage) -> dict[str, Any]:
    """The next component's step message: ``folder`` = the announced folder, ``meta_information`` unchanged."""
    return StepMessage(
        previous_component_end=True,
        S3_bucket_desc=S3BucketDesc(folder=folder, filename=""),
        meta_information=message.meta_information,
    ).model_dump(mode="json", by_alias=True)


def canonical(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its keys sorted at every level: it encodes to the same bytes whoever publishes it (the
    first announcement, or one from the manifest, whose JSON is written with sorted keys)."""
    value: dict[str, Any] = json.loads(json.dumps(message, sort_keys=True))
    return value


def event_id(run_id: str, topic_out: str) -> str:
    return f"{run_id}/{topic_out}"


def event_source(namespace: str, config_name: str) -> str:
    return f"/eoml/{namespace or 'default'}/{config_name}"


def next_step_headers(run_id: str, topic_out: str, namespace: str, config_name: str,
                      created: datetime | str) -> dict[str, str]:
    """Kafka record headers of the next-step record (binary-mode CloudEvent attributes)."""
    time_text = created if isinstance(created, str) else created.isoformat()
    return {
        "ce_specversion": CLOUDEVENTS_SPEC_VERSION,
        "ce_id": event_id(run_id, topic_out),
        "ce_source": event_source(namespace, config_name),
        "ce_type": NEXT_STEP_EVENT_TYPE,
        "ce_time": time_text,
        "content-type": STEP_MESSAGE_CONTENT_TYPE,
    }
