"""The local event plane: what a Knative KafkaSource does, for machines without Knative.

For every wired step a ``StepDispatcher`` thread consumes ``Topics.in`` with the step's consumer group and POSTs
each record to the Wrapper as the KafkaSource dispatcher would, as an HTTP binary-mode CloudEvent: a record that is a
CloudEvent (Kafka binary or structured mode) keeps the producer's id/source/type; a plain record gets ``ce-id:
partition:<p>/offset:<o>``, ``ce-type: dev.knative.kafka.event``, ``ce-source: /apis/v1/namespaces/<ns>/
kafkasources/<name>#<topic>``, its Kafka headers as ``ce-kafkaheader<name>`` (``event_plane/cloudevents.py``). Records of a partition are delivered in order, one at a time (the KafkaSource's ``ordered``
mode). Each attempt waits up to the step's delivery timeout (default 3600 s: the Wrapper answers only when the
step's outcome is durable, so an attempt lasts as long as the step). Connection errors, timeouts and retryable
answers (5xx, 404, 408, 409, 429) are retried with the step's backoff (bounded, as a KafkaSource: ``retry`` times,
exponential ``delay*2^n`` or linear ``delay*n``); after the last retry, or at once for any other 4xx (the event itself
is refused), exactly one record is written to the dead-letter topic (``<Topics.in>.dlq``, created by an admin call
when the step is wired; a JSON error record in the Wrapper's dead-letter shape, ``input_message`` = the record). The
offset is committed only after a 2xx or after the dead-letter record was acknowledged, so a crash or a stop in
between delivers the record again (at least once; the Wrapper recognises a redelivery of a completed event).
"""

from __future__ import annotations

import http.client
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

from services.core.auth import outgoing_auth_headers
from services.core.kafka import consumer_config, encode_json, ensure_topics, poll_record, producer_config
from services.core.step_config import StepConfig

from .event_plane.cloudevents import KafkaRecord, RecordEvent, RecordMode, record_cloudevent
from .settings import ControllerSettings
from .wiring import (
    DeliveryPolicy,
    StepRejected,
    consumer_group,
    dead_letter_topic,
    delivery_dead_letter_record,
    kafka_source_name,
)

log = logging.getLogger(__name__)

__all__ = ["KafkaRecord", "RecordEvent", "RecordMode", "record_cloudevent", "LocalSourceDriver", "ensure_topic"]
_RESPONSE_EXCERPT = 300


@dataclass(frozen=True)
class DispatchTarget:
    """Where one step's records come from and go to."""

    namespace: str
    config_name: str
    workflow_name: str
    topic_in: str
    consumer_group: str
    source_name: str
    url: str
    service_name: str = ""

    @classmethod
    def for_step(cls, config: StepConfig, wrapper_base_url: str) -> "DispatchTarget":
        return cls(namespace=config.namespace, config_name=config.config_name, workflow_name=config.workflow_name,
                   topic_in=config.topic_in, consumer_group=consumer_group(config.workflow_name, config.topic_in),
                   source_name=kafka_source_name(config.topic_in),
                   url=f"{wrapper_base_url.rstrip('/')}/{config.config_name}", service_name=config.service_name)


def kafka_record(message: Any) -> KafkaRecord:
    """A consumed confluent-kafka ``Message`` (without error) as plain data."""
    headers = tuple((name, value if isinstance(value, bytes) else (value or "").encode("utf-8"))
                    for name, value in (message.headers() or []))
    timestamp_type, timestamp_ms = message.timestamp()
    return KafkaRecord(topic=str(message.topic()), partition=int(message.partition()), offset=int(message.offset()),
                       value=message.value() or b"", key=message.key(), headers=headers,
                       timestamp_ms=timestamp_ms if timestamp_type else None)


def cloudevent_headers(record: KafkaRecord, target: DispatchTarget) -> dict[str, str]:
    """HTTP binary-mode headers of the event a record is delivered as (``record_cloudevent``)."""
    return record_cloudevent(record, target.namespace, target.source_name).http_headers()


@dataclass
class DeliveryResult:
    delivered: bool
    attempts: int
    status: int | None = None
    error: str = ""
    stopped: bool = False  # the dispatcher was stopped while retrying: neither delivered nor dead-lettered


class HttpPoster(Protocol):
    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]: ...


def http_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
    """One POST on a fresh connection (status, body); connection problems raise ``OSError``/``HTTPException``."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                                                               timeout=timeout_s)
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        # The local platform's shared token (EOML_AUTH_MODE=token), as Knative's dispatcher sends its OIDC token.
        connection.request("POST", path, body=body, headers={**headers, **outgoing_auth_headers()})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def is_retryable_status(status: int) -> bool:
    """What the Knative dispatcher retries: server errors, 404 (the sink or its configuration is not there yet),
    408, 409 and 429. Any other 4xx says the event itself is wrong: retrying cannot help, it is dead-lettered."""
    return status >= 500 or status in (404, 408, 409, 429)


def deliver_record(record: KafkaRecord, target: DispatchTarget, policy: DeliveryPolicy,
                   post: HttpPoster = http_post, stop: threading.Event | None = None,
                   on_failed_attempt: Callable[[DeliveryResult], None] | None = None) -> DeliveryResult:
    """POST one record until a 2xx, at most ``policy.attempts`` times, backing off between retryable failures."""
    event = record_cloudevent(record, target.namespace, target.source_name)
    headers = event.http_headers()
    stop = stop or threading.Event()
    result = DeliveryResult(delivered=False, attempts=0)
    for attempt in range(1, policy.attempts + 1):
        if attempt > 1 and stop.wait(policy.backoff_s(attempt - 1)):
            result.stopped = True
            return result
        result.attempts = attempt
        try:
            status, answer = post(target.url, event.data, headers, policy.timeout_s)
        except (OSError, http.client.HTTPException) as error:
            result.status, result.error = None, f"{type(error).__name__}: {error}"[:_RESPONSE_EXCERPT]
        else:
            result.status = status
            if 200 <= status < 300:
                result.delivered, result.error = True, ""
                return result
            result.error = f"HTTP {status}: {answer[:_RESPONSE_EXCERPT].decode('utf-8', errors='replace')}"
            if not is_retryable_status(status):
                if on_failed_attempt is not None:
                    on_failed_attempt(result)
                log.warning("delivery refused, not retried", extra={
                    "config_name": target.config_name, "topic": record.topic, "partition": record.partition,
                    "offset": record.offset, "error": result.error})
                return result
        if on_failed_attempt is not None:
            on_failed_attempt(result)
        log.warning("delivery failed", extra={"config_name": target.config_name, "topic": record.topic,
                                              "partition": record.partition, "offset": record.offset,
                                              "attempt": attempt, "of": policy.attempts, "error": result.error})
    return result


def dead_letter_headers(record: KafkaRecord, target: DispatchTarget, result: DeliveryResult) -> list[tuple[str, bytes]]:
    """The record's own headers plus why it failed, named like the extensions Knative adds for a dead-letter sink
    (``knativeerrordest``, ``knativeerrorcode``, ``knativeerrordata``)."""
    return [
        *record.headers,
        ("knativeerrordest", target.url.encode()),
        ("knativeerrorcode", str(result.status or 0).encode()),
        ("knativeerrordata", result.error.encode("utf-8", errors="replace")),
    ]


def dead_letter_value(record: KafkaRecord, target: DispatchTarget, result: DeliveryResult) -> bytes:
    reason = f"not delivered to the Wrapper after {result.attempts} attempt(s): {result.error}"
    value = delivery_dead_letter_record(
        reason, config_name=target.config_name, service_name=target.service_name,
        workflow_name=target.workflow_name, topic_in=record.topic,
        event_id=record_cloudevent(record, target.namespace, target.source_name).id, value=record.value,
        attempts=result.attempts, http_status=result.status)
    return encode_json(value)


def ensure_topic(bootstrap_servers: str, topic: str, timeout_s: float = 10.0) -> None:
    """Create ``topic`` if it does not exist yet, so that the subscription sees it at once. Best effort: a broker
    that refuses is logged, the metadata refresh finds the topic once it exists."""
    try:
        ensure_topics(bootstrap_servers, [topic], timeout_s=timeout_s)
    except RuntimeError as error:
        log.warning("topic not created", extra={"topic": topic, "error": str(error)[:300]})


@dataclass
class DispatcherStats:
    delivered: int = 0
    dead_lettered: int = 0
    failed_attempts: int = 0
    last_error: str = ""
    last_offset: dict[int, int] = field(default_factory=dict)


class StepDispatcher:
    """One step's consumer + delivery loop on its own thread; ``stop()`` ends it (the group's offsets stay)."""

    def __init__(self, target: DispatchTarget, policy: DeliveryPolicy, bootstrap_servers: str, producer: Any,
                 post: HttpPoster = http_post, poll_timeout_s: float = 0.5) -> None:
        self.target = target
        self.policy = policy
        self.bootstrap_servers = bootstrap_servers
        self.producer = producer
        self.post = post
        self.poll_timeout_s = poll_timeout_s
        self.stats = DispatcherStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dispatch-{target.source_name}", daemon=True)
        self.error: str = ""

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> "StepDispatcher":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        from confluent_kafka import Consumer

        # The input topic (so that the subscription sees it at once) and the dead-letter topic (never left to a
        # broker's auto-creation); the controller created the latter when the step was wired, but a broker that
        # keeps topics in memory may have been restarted since.
        for topic in (self.target.topic_in, dead_letter_topic(self.target.topic_in, self.policy.dead_letter_suffix)):
            ensure_topic(self.bootstrap_servers, topic)
        consumer = Consumer(consumer_config(
            self.bootstrap_servers, self.target.consumer_group,
            **{"client.id": f"eoml-dispatch-{self.target.source_name}",
               # A topic created after the subscription is found at the next metadata refresh (default 5 min).
               "topic.metadata.refresh.interval.ms": 2000}))
        log.info("dispatcher started", extra={"config_name": self.target.config_name, "topic": self.target.topic_in,
                                              "consumer_group": self.target.consumer_group, "url": self.target.url})
        try:
            consumer.subscribe([self.target.topic_in])
            while not self._stop.is_set():
                message = poll_record(consumer, self.poll_timeout_s, log, self.target.topic_in)
                if message is None:
                    continue
                record = kafka_record(message)
                if not self._handle(record):
                    break  # stopped mid-retry: uncommitted, so the record is delivered again after a re-wire
                consumer.commit(message=message, asynchronous=False)
                self.stats.last_offset[record.partition] = record.offset
        except Exception as error:  # a dead dispatcher must be visible in the status API, not silent
            self.error = f"{type(error).__name__}: {error}"[:_RESPONSE_EXCERPT]
            log.exception("dispatcher failed", extra={"config_name": self.target.config_name})
        finally:
            consumer.close()
            log.info("dispatcher stopped", extra={"config_name": self.target.config_name})

    def _handle(self, record: KafkaRecord) -> bool:
        """Deliver or dead-letter one record; False when stopped before either happened."""
        result = deliver_record(record, self.target, self.policy, self.post, self._stop, self._count_failure)
        if result.stopped:
            return False
        if result.delivered:
            self.stats.delivered += 1
            return True
        if not self._dead_letter(record, result):
            return False
        self.stats.dead_lettered += 1
        return True

    def _count_failure(self, result: DeliveryResult) -> None:
        # Counted as they happen: the status API shows a struggling step while it is still being retried.
        self.stats.failed_attempts += 1
        self.stats.last_error = result.error

    def _dead_letter(self, record: KafkaRecord, result: DeliveryResult) -> bool:
        """Write the one dead-letter record of an exhausted delivery; True once the broker acknowledged it. A broker
        that is away is waited for (the offset stays uncommitted meanwhile); False only when stopped first."""
        topic = dead_letter_topic(record.topic, self.policy.dead_letter_suffix)
        value = dead_letter_value(record, self.target, result)
        headers = dead_letter_headers(record, self.target, result)
        # One idempotent producer retries inside librdkafka without duplicates; the loop covers a broker away for
        # longer than message.timeout.ms. A record acknowledged late but reported failed could be written twice:
        # at least once, like the KafkaSource's own dead-letter sink.
        wait_s = 1.0
        while True:
            errors: list[Any] = []
            self.producer.produce(topic, key=record.key, value=value, headers=headers,
                                  on_delivery=lambda err, _msg: errors.append(err) if err else None)
            remaining = self.producer.flush(30)
            if not remaining and not errors:
                break
            log.error("dead-letter write failed, retrying", extra={
                "config_name": self.target.config_name, "dead_letter_topic": topic,
                "error": str(errors[0]) if errors else "not acknowledged in 30 s"})
            if self._stop.wait(wait_s):
                return False
            wait_s = min(wait_s * 2, 30.0)
        log.error("record dead-lettered", extra={"config_name": self.target.config_name, "topic": record.topic,
                                                 "partition": record.partition, "offset": record.offset,
                                                 "dead_letter_topic": topic, "attempts": result.attempts,
                                                 "error": result.error})
        return True


class LocalSourceDriver:
    """``SourceDriver`` for the local event plane: one ``StepDispatcher`` per wired step."""

    def __init__(self, settings: ControllerSettings, post: HttpPoster = http_post,
                 producer_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.policy = DeliveryPolicy.from_settings(settings)
        self.post = post
        self._producer_factory = producer_factory
        self._producer: Any = None
        self._dispatchers: dict[tuple[str, str], StepDispatcher] = {}
        self._lock = threading.Lock()

    def _wrapper_url(self, config: StepConfig) -> str:
        url = self.settings.wrapper_urls.get(config.service_name)
        if not url:
            known = ", ".join(sorted(self.settings.wrapper_urls)) or "none"
            raise StepRejected(f"no Wrapper for ML.ServiceName {config.service_name!r} (known: {known})")
        return url

    def _shared_producer(self) -> Any:
        if self._producer is None:
            if self._producer_factory is not None:
                self._producer = self._producer_factory()
            else:
                from confluent_kafka import Producer

                # message.timeout.ms bounds one flush; _dead_letter retries beyond it.
                self._producer = Producer(producer_config(self.settings.bootstrap_servers,
                                                          **{"message.timeout.ms": 30000}))
        return self._producer

    def check(self, config: StepConfig) -> None:
        self._wrapper_url(config)

    def source_info(self, config: StepConfig) -> dict[str, Any]:
        return {"driver": "local", "kafka_source": kafka_source_name(config.topic_in),
                "consumer_group": consumer_group(config.workflow_name, config.topic_in),
                "sink": f"{self.settings.wrapper_urls.get(config.service_name, '?').rstrip('/')}/{config.config_name}"}

    def release_conflicting(self, config: StepConfig) -> bool:
        """Before the step's configuration is overwritten: stop its dispatcher if it would deliver differently
        (another workflow's consumer group, another Wrapper), so that it never delivers into the new settings."""
        target = DispatchTarget.for_step(config, self._wrapper_url(config))
        with self._lock:
            current = self._dispatchers.get((config.namespace, config.config_name))
            if current is None or current.target == target:
                return False
            del self._dispatchers[(config.namespace, config.config_name)]
        current.stop()
        log.info("dispatcher stopped before re-wiring", extra={"config_name": config.config_name,
                                                                "consumer_group": target.consumer_group})
        return True

    def wire(self, config: StepConfig) -> dict[str, Any]:
        target = DispatchTarget.for_step(config, self._wrapper_url(config))
        key = (config.namespace, config.config_name)
        with self._lock:
            current = self._dispatchers.get(key)
            if current is not None and current.target == target and current.running:
                return self.source_info(config)  # re-publish of an unchanged step: keep consuming
            if current is not None:
                current.stop()
            bootstrap = config.bootstrap_servers or self.settings.bootstrap_servers
            self._dispatchers[key] = StepDispatcher(target, self.policy, bootstrap, self._shared_producer(),
                                                    self.post).start()
        return self.source_info(config)

    def unwire(self, config: StepConfig | None, namespace: str, topic_in: str) -> bool:
        from services.core.step_config import step_config_name

        with self._lock:
            dispatcher = self._dispatchers.pop((namespace, step_config_name(topic_in)), None)
        if dispatcher is None:
            return False
        dispatcher.stop()
        return True

    def describe(self, config: StepConfig) -> dict[str, Any]:
        dispatcher = self._dispatchers.get((config.namespace, config.config_name))
        if dispatcher is None:
            return {"source_present": False}
        stats = dispatcher.stats
        described: dict[str, Any] = {"source_present": True, "source_ready": dispatcher.running,
                                     "delivered": stats.delivered, "dead_lettered": stats.dead_lettered,
                                     "failed_attempts": stats.failed_attempts}
        if stats.last_error:
            described["last_error"] = stats.last_error
        if dispatcher.error:
            described["dispatcher_error"] = dispatcher.error
        return described

    def resume(self, configs: list[StepConfig]) -> None:
        """After a restart: dispatch every stored step again (each resumes at its group's committed offset)."""
        for config in configs:
            try:
                self.wire(config)
            except StepRejected as error:
                log.error("stored step not resumed", extra={"config_name": config.config_name, "reason": str(error)})

    def close(self) -> None:
        with self._lock:
            dispatchers, self._dispatchers = list(self._dispatchers.values()), {}
        for dispatcher in dispatchers:
            dispatcher._stop.set()
        for dispatcher in dispatchers:
            dispatcher.stop()
        if self._producer is not None:
            self._producer.flush(10)
