"""What a step tells the world on Kafka: progress on ``monitoring.notify``, errors on the dead-letter topic.

Notifications (contracts section 4) go START, INFO progress (``overwrite: true``), WARNING per rejected input (the
first few), then SUCCESS or CRITICAL. They are best effort: a notification that cannot be delivered is logged and
the step goes on. The next-step message and the dead-letter record are not best effort (see ``pipeline``).

Nothing published here carries credentials: descriptions and records pass through ``scrub`` with the step's
secret values, and secret-looking keys are redacted whatever their nesting.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Protocol

from services.core.contracts import Notification, NotificationOptional, NotificationStatus
from services.core.kafka import encode_json, producer_config
from services.core.logging import REDACTED, redact

log = logging.getLogger(__name__)

MAX_WARNINGS_PER_STEP = 5
MAX_RAW_MESSAGE_CHARS = 64 * 1024  # a dead-letter record keeps this much of an unparseable body


@dataclass(frozen=True, slots=True)
class RecordPosition:
    """Where the broker stored a published record."""

    topic: str
    partition: int
    offset: int


class EventPublisher(Protocol):
    """Publishes one JSON record (with optional Kafka headers) and returns once the broker acknowledged THAT record
    (raises otherwise)."""

    def publish(self, bootstrap_servers: str, topic: str, value: Mapping[str, Any], key: str = "key",
                headers: Mapping[str, str] | None = None) -> RecordPosition: ...


# The delivery report of a record comes at message.timeout.ms at the latest; this much more before giving up on it.
DELIVERY_REPORT_GRACE_S = 5.0


class _DeliveryReport:
    """The delivery report of one produced record."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Any = None
        self.message: Any = None

    def on_delivery(self, error: Any, message: Any) -> None:
        self.error, self.message = error, message
        self.done.set()


class KafkaPublisher:
    """confluent-kafka producers, one per bootstrap address, shared by every worker (they are thread-safe)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._producers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _producer(self, bootstrap_servers: str) -> Any:
        with self._lock:
            producer = self._producers.get(bootstrap_servers)
            if producer is None:
                from confluent_kafka import Producer

                producer = Producer(producer_config(bootstrap_servers, **{"message.timeout.ms": int(self.timeout_s * 1000)}))
                self._producers[bootstrap_servers] = producer
            return producer

    def publish(self, bootstrap_servers: str, topic: str, value: Mapping[str, Any], key: str = "key",
                headers: Mapping[str, str] | None = None) -> RecordPosition:
        """Produce one record and wait for ITS delivery report only; return where the broker stored it.

        Not ``flush()``: the producer is shared by every worker, and a flush waits for (and would count) the other
        threads' pending records too, so a publish could fail after its own record was stored. Raises when this
        record was refused or not acknowledged within ``timeout_s`` (``message.timeout.ms``; its report comes then)."""
        if not bootstrap_servers:
            raise RuntimeError(f"no Kafka bootstrap servers configured to publish to {topic!r}")
        producer = self._producer(bootstrap_servers)
        report = _DeliveryReport()
        producer.produce(topic, key=key.encode("utf-8"), value=encode_json(value),
                         headers=[(name, text.encode("utf-8")) for name, text in (headers or {}).items()] or None,
                         on_delivery=report.on_delivery)
        # Any thread's poll() serves any record's report: each publish polls until its own has come.
        deadline = time.monotonic() + self.timeout_s + DELIVERY_REPORT_GRACE_S
        while not report.done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"record to {topic!r} not acknowledged within {self.timeout_s} s")
            producer.poll(min(left, 0.1))
        if report.error is not None:
            raise RuntimeError(f"publishing to {topic!r} failed: {report.error}")
        message = report.message
        return RecordPosition(topic, int(message.partition()), int(message.offset()))

    def close(self) -> None:
        with self._lock:
            producers, self._producers = list(self._producers.values()), {}
        for producer in producers:
            producer.flush(self.timeout_s)


def scrub(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` with every occurrence of a secret string replaced and secret-looking keys redacted."""
    hidden = [s for s in secrets if s]

    def clean(item: Any) -> Any:
        if isinstance(item, str):
            for secret in hidden:
                item = item.replace(secret, REDACTED)
            return item
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return clean(redact(value))


@dataclass
class StepNotifier:
    """Notifications of one step (one workflow, one component)."""

    publisher: EventPublisher
    bootstrap_servers: str
    topic: str
    component_name: str
    workflow_name: str
    namespace: str = ""
    pod: str = ""
    secrets: tuple[str, ...] = ()
    warnings_sent: int = 0
    sent: list[str] = field(default_factory=list)  # statuses, in order (for logs and tests)

    def send(self, status: NotificationStatus, description: str, overwrite: bool = False) -> bool:
        notification = Notification(
            component_name=self.component_name,
            workflow_name=self.workflow_name,
            status=status,
            description=scrub(description, self.secrets),
            optional=NotificationOptional(namespace=self.namespace, pod=self.pod),
            overwrite=overwrite,
        )
        try:
            self.publisher.publish(self.bootstrap_servers, self.topic, notification.model_dump(mode="json"))
        except Exception as error:  # noqa: BLE001 - notifications never fail a step
            log.warning(
                "notification not delivered",
                extra={"status": status, "topic": self.topic, "error": scrub(str(error), self.secrets)},
            )
            return False
        self.sent.append(status)
        return True

    def warning(self, description: str) -> None:
        """A WARNING, for the first ``MAX_WARNINGS_PER_STEP`` of a step (the rest are summed up at the end)."""
        if self.warnings_sent < MAX_WARNINGS_PER_STEP:
            self.warnings_sent += 1
            self.send("WARNING", description)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


class ProgressReporter:
    """``Progress file n/N : x/y patches (p %) - Est. remaining: ...`` as INFO notifications with overwrite.

    ``y`` is the number of patches of the current file when known in advance (patch folders), else ``?`` (archives
    and SAFE products are streamed; their size shows once they are read). The percentage counts finished files plus
    the known fraction of the current one; the estimate extrapolates the time spent so far. Sent at most every
    ``interval_s`` seconds, and at the end of every file.
    """

    def __init__(
        self,
        notifier: StepNotifier,
        total_files: int,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.total_files = max(total_files, 1)
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.last_sent = -math.inf
        self.file_number = 0
        self.file_done = 0
        self.file_total: int | None = None
        self.files_done = 0
        self.in_file = False

    def start_file(self, number: int, expected: int | None) -> None:
        self.file_number, self.file_done, self.file_total, self.in_file = number, 0, expected, True

    def item_done(self) -> None:
        self.file_done += 1
        if self.clock() - self.last_sent >= self.interval_s:
            self.send()

    def end_file(self) -> None:
        self.files_done += 1
        self.file_total = self.file_done
        self.in_file = False
        self.send()

    def fraction(self) -> float:
        partial = min(self.file_done / self.file_total, 1.0) if self.in_file and self.file_total else 0.0
        return min((self.files_done + partial) / self.total_files, 1.0)

    def describe(self) -> str:
        fraction = self.fraction()
        elapsed = self.clock() - self.started
        remaining = elapsed * (1 - fraction) / fraction if fraction > 0 else math.inf
        total = str(self.file_total) if self.file_total is not None else "?"
        return (
            f"Progress file {max(self.file_number, 1)}/{self.total_files} : {self.file_done}/{total} patches "
            f"({fraction * 100:.0f} %) - Est. remaining: {format_duration(remaining)}"
        )

    def send(self) -> None:
        self.last_sent = self.clock()
        self.notifier.send("INFO", self.describe(), overwrite=True)


def dead_letter_record(
    reason: str,
    config_name: str,
    input_message: Any,
    *,
    task: str,
    workflow_name: str = "",
    component_name: str = "",
    topic_in: str = "",
    event_id: str = "",
    secrets: Iterable[str] = (),
) -> dict[str, Any]:
    """The record a failed step leaves on its dead-letter topic: why, and the input to replay it with."""
    if isinstance(input_message, (bytes, bytearray)):
        input_message = bytes(input_message[:MAX_RAW_MESSAGE_CHARS]).decode("utf-8", errors="replace")
    record = {
        "reason": reason,
        "config_name": config_name,
        "task": task,
        "workflow_name": workflow_name,
        "component_name": component_name,
        "topic_in": topic_in,
        "event_id": event_id,
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_message": input_message,
    }
    return scrub(record, secrets)
