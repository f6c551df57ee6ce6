"""The controller's own dead letters: a workflow message it refused for good is kept on ``<system topic>.dlq``.

A message the controller cannot apply whatever is retried (invalid, or refused by the Kubernetes API: 403, 422) is
answered (production's "problem" answer, contracts section 1) and reported CRITICAL; its body is kept as a
dead-letter record in the Wrapper's dead-letter shape (``input_message`` = the message, so it can be replayed
after the cause is fixed), with its credentials removed: secret-looking keys by ``services.core.logging.redact``
(through ``delivery_dead_letter_record``) and the message's own credential values by ``notifications.scrub``
wherever else they appear.

Every write is bounded: ``KafkaDeadLetterWriter`` waits for the broker's acknowledgement of its own record at most
``timeout_s`` (its producer gives up on the record after the same time), then raises ``DeadLetterNotWritten``; the
caller keeps the message uncommitted (consume mode) or answers 503 (serve mode), so nothing is lost and nothing hangs.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Iterable

from services.core.kafka import encode_json, producer_config

from .notifications import scrub
from .wiring import delivery_dead_letter_record

# (topic, value, headers): writes one record, returns once the broker acknowledged it; raises otherwise.
DeadLetterWriter = Callable[[str, bytes, list[tuple[str, bytes]]], None]


class DeadLetterNotWritten(ConnectionError):
    """The dead-letter record was not acknowledged in time: temporary (the broker is away)."""


class KafkaDeadLetterWriter:
    """A dead-letter writer with its own producer, so that a wait counts only its own record (never another
    thread's notification), bounded by ``timeout_s``."""

    def __init__(self, bootstrap_servers: str, timeout_s: float = 30.0, producer: Any = None) -> None:
        self.timeout_s = timeout_s
        if producer is None:
            from confluent_kafka import Producer

            # message.timeout.ms: librdkafka drops the record when the wait below gives up, so a write reported
            # failed is not written later behind the caller's back (only a lost acknowledgement can duplicate it).
            producer = Producer(producer_config(bootstrap_servers, **{
                "message.timeout.ms": max(1, int(timeout_s * 1000)), "client.id": "eoml-controller-dead-letters"}))
        self.producer = producer

    def __call__(self, topic: str, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        acknowledged = threading.Event()
        errors: list[Any] = []

        def on_delivery(error: Any, _message: Any) -> None:
            if error is not None:
                errors.append(error)
            acknowledged.set()

        deadline = time.monotonic() + self.timeout_s
        try:
            self.producer.produce(topic, value=value, headers=headers, on_delivery=on_delivery)
        except BufferError as error:  # the local queue is full: the broker has been away for a while
            raise DeadLetterNotWritten(f"dead-letter record to {topic!r} not queued: {error}") from None
        while not acknowledged.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadLetterNotWritten(f"dead-letter record to {topic!r} not acknowledged within "
                                           f"{self.timeout_s:g} s")
            self.producer.poll(min(remaining, 0.2))  # serves the delivery callback (of whichever thread)
        if errors:
            raise DeadLetterNotWritten(f"dead-letter record to {topic!r} refused: {errors[0]}"[:300])


def refused_message_record(value: bytes | str, reason: str, system_topic: str, event_id: str = "",
                           workflow_name: str = "", config_name: str = "",
                           secrets: Iterable[str] = ()) -> bytes:
    """The dead-letter record of a workflow message refused for good, credentials removed (module docstring)."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    record = delivery_dead_letter_record(
        f"workflow message refused: {reason}", config_name=config_name, service_name="",
        workflow_name=workflow_name, topic_in=system_topic, event_id=event_id, value=raw, attempts=1,
        http_status=None)
    record["delivery"].pop("http_status")
    # A value as it appears inside the JSON text too (quotes and backslashes escaped).
    values = [v for secret in secrets if secret for v in {secret, json.dumps(secret)[1:-1]}]
    return scrub(encode_json(record).decode("utf-8"), values).encode("utf-8")
