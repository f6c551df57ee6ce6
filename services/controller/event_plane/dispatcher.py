"""One KafkaSource's dispatcher: consume the step's topic with the source's consumer group, deliver every record.

Modelled on eventing-kafka-broker (EKB) ``data-plane/dispatcher/.../impl/consumer/``:
- ``UnorderedConsumerVerticle.java`` (``ordering: unordered``): records are delivered concurrently; polling stops
  while ``max.poll.records`` (50, ``data-plane/config/source/100-config-kafka-source-data-plane.yaml``) or more are
  in flight, counted per consumer across its partitions, and one poll can add up to 50 more (a soft cap, ~2x).
- ``OrderedConsumerVerticle.java`` (``ordering: ordered``, the upstream default): one record in flight per partition.
- ``OffsetManager.java`` (``offsets.py``): commit of the contiguous finished prefix only, every
  ``auto.commit.interval.ms`` (5 s), synchronously on revoke and on close; a failure (dead-letter sink failed
  included) finishes the record like a success.
- ``RecordDispatcherImpl.java``: after the last retry the record goes to the dead-letter sink; if that fails too
  (``onDeadLetterSinkFailure``) the record is still committed: it is gone from the group, only an ERROR log is left.
  That is why the platform's dead-letter sink must be durable.

The dead-letter sink here is a Kafka topic write (``<Topics.in>.dlq``, the Wrapper's dead-letter record shape)
where the cluster's KafkaSource posts to the controller's ``/dead-letter``; the write is tried with the source's
retry policy (EKB builds its dead-letter sender from the same egress config). Not modelled: rebalancing between
several dispatcher replicas (one consumer per source here), the pausing of busy partitions in ordered mode (a
bounded buffer instead: the same one-in-flight-per-partition order), ``max.poll.interval.ms`` arithmetic
(``ConsumerVerticleContext``: set far above any delivery here), OIDC tokens, the dispatcher pod's own restarts.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from services.core.kafka import consumer_config, encode_json, ensure_topics

from ..wiring import DeliveryPolicy, dead_letter_topic, delivery_dead_letter_record
from .cloudevents import KafkaRecord
from .delivery import (
    RESPONSE_EXCERPT,
    DeliveryResult,
    DispatchTarget,
    HttpPoster,
    deliver_record,
    delivery_policy_from_spec,
    http_post,
)
from .groups import commit_latest_where_none
from .offsets import OffsetTracker

log = logging.getLogger(__name__)

MAX_POLL_RECORDS = 50  # config-kafka-source-data-plane: max.poll.records
AUTO_COMMIT_INTERVAL_S = 5.0  # auto.commit.interval.ms


class Ordering(enum.Enum):
    ORDERED = "ordered"
    UNORDERED = "unordered"


class InitialOffset(enum.Enum):
    EARLIEST = "earliest"
    LATEST = "latest"


class Outcome(enum.Enum):
    """How a record's handling ended. All but STOPPED finish the record (its offset may be committed)."""

    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    DEAD_LETTER_FAILED = "dead_letter_failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SourceSpec:
    """What a KafkaSource's ``spec`` tells its dispatcher (the same body the Kubernetes driver creates)."""

    consumer_group: str
    initial_offset: InitialOffset
    ordering: Ordering
    policy: DeliveryPolicy

    @classmethod
    def from_kafka_source(cls, spec: Mapping[str, Any], dead_letter_suffix: str = ".dlq") -> "SourceSpec":
        return cls(consumer_group=str(spec["consumerGroup"]),
                   initial_offset=InitialOffset(spec.get("initialOffset") or "latest"),
                   ordering=Ordering(spec.get("ordering") or "ordered"),
                   policy=delivery_policy_from_spec(spec.get("delivery"), dead_letter_suffix))


@dataclass(frozen=True)
class DispatcherTuning:
    """The data plane's own settings (config-kafka-source-data-plane); tests shorten the commit interval."""

    max_poll_records: int = MAX_POLL_RECORDS
    auto_commit_interval_s: float = AUTO_COMMIT_INTERVAL_S
    poll_timeout_s: float = 0.2
    # One dead-letter write attempt waits at most this for the broker's acknowledgement.
    dead_letter_write_timeout_s: float = 30.0


@dataclass
class DispatcherStats:
    delivered: int = 0
    dead_lettered: int = 0
    dead_letter_failed: int = 0
    failed_attempts: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    last_error: str = ""
    committed: dict[int, int] = field(default_factory=dict)


class StepDispatcher:
    """One source's consumer + deliveries; ``start()`` begins consuming, ``stop()`` commits the finished prefix and
    leaves the group's offsets in place (deleting the group is the driver's ``unwire``)."""

    def __init__(self, target: DispatchTarget, spec: SourceSpec, bootstrap_servers: str, producer: Any,
                 post: HttpPoster = http_post, tuning: DispatcherTuning | None = None) -> None:
        self.target = target
        self.spec = spec
        self.policy = spec.policy
        self.bootstrap_servers = bootstrap_servers
        self.producer = producer
        self.post = post
        self.tuning = tuning or DispatcherTuning()
        self.stats = DispatcherStats()
        self.offsets = OffsetTracker()
        self.error: str = ""
        self._stop = threading.Event()
        self._state = threading.Condition()
        self._lanes: dict[int, queue.SimpleQueue[KafkaRecord]] = {}
        self._thread = threading.Thread(target=self._run, name=f"dispatch-{target.source_name}", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> "StepDispatcher":
        self._thread.start()
        return self

    def request_stop(self) -> None:
        self._stop.set()
        with self._state:
            self._state.notify_all()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop consuming and commit what finished; deliveries still in flight are abandoned uncommitted (they
        come again to the group's next consumer: at least once)."""
        self.request_stop()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    # -- consumer thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        from confluent_kafka import Consumer

        # The input topic (so that the subscription sees it at once) and the dead-letter topic (never left to a
        # broker's auto-creation).
        for topic in (self.target.topic_in, dead_letter_topic(self.target.topic_in, self.policy.dead_letter_suffix)):
            ensure_topic(self.bootstrap_servers, topic)
        consumer: Any = None
        try:
            if self.spec.initial_offset is InitialOffset.LATEST:
                commit_latest_where_none(self.bootstrap_servers, self.spec.consumer_group, self.target.topic_in)
            consumer = Consumer(consumer_config(
                self.bootstrap_servers, self.spec.consumer_group,
                **{"client.id": f"eoml-dispatch-{self.target.source_name}",
                   "auto.offset.reset": self.spec.initial_offset.value,
                   # ConsumerVerticleContext raises it far above any delivery: a slow sink is no rebalance.
                   "max.poll.interval.ms": 86_400_000,
                   # A topic created after the subscription is found at the next metadata refresh (default 5 min).
                   "topic.metadata.refresh.interval.ms": 2000}))
            log.info("dispatcher started", extra={
                "config_name": self.target.config_name, "topic": self.target.topic_in,
                "consumer_group": self.spec.consumer_group, "url": self.target.url,
                "ordering": self.spec.ordering.value, "initial_offset": self.spec.initial_offset.value})
            consumer.subscribe([self.target.topic_in], on_revoke=self._on_revoke)
            self._consume(consumer)
        except Exception as error:  # a dead dispatcher must be visible in the status API, not silent
            self.error = f"{type(error).__name__}: {error}"[:RESPONSE_EXCERPT]
            log.exception("dispatcher failed", extra={"config_name": self.target.config_name})
        finally:
            if consumer is not None:
                self._commit(consumer)
                consumer.close()
            log.info("dispatcher stopped", extra={"config_name": self.target.config_name,
                                                  "committed": self.stats.committed})

    def _consume(self, consumer: Any) -> None:
        next_commit = time.monotonic() + self.tuning.auto_commit_interval_s
        while not self._stop.is_set():
            if self._may_poll():
                for message in consumer.consume(num_messages=self.tuning.max_poll_records,
                                                timeout=self.tuning.poll_timeout_s):
                    if message.error() is not None:
                        _log_consumer_error(message, self.target.topic_in)
                        continue
                    self._admit(kafka_record(message))
            else:
                with self._state:
                    self._state.wait(self.tuning.poll_timeout_s)
            if time.monotonic() >= next_commit:
                self._commit(consumer)
                next_commit = time.monotonic() + self.tuning.auto_commit_interval_s

    def _may_poll(self) -> bool:
        """Unordered: poll while fewer than max.poll.records are in flight (UnorderedConsumerVerticle.poll).
        Ordered: the same bound on records waiting in the partitions' lanes."""
        with self._state:
            return self.stats.in_flight < self.tuning.max_poll_records

    def _commit(self, consumer: Any, partitions: set[int] | None = None) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        offsets = self.offsets.committable(partitions)
        if not offsets:
            return
        try:
            consumer.commit(offsets=[TopicPartition(self.target.topic_in, p, o) for p, o in offsets.items()],
                            asynchronous=False)
        except KafkaException as error:
            log.warning("offset commit failed", extra={"config_name": self.target.config_name,
                                                       "offsets": offsets, "error": str(error)[:300]})
            return
        self.offsets.mark_committed(offsets)
        self.stats.committed.update(offsets)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = {tp.partition for tp in partitions}
        self._commit(consumer, revoked)
        self.offsets.forget(revoked)

    def _admit(self, record: KafkaRecord) -> None:
        self.offsets.started(record.partition, record.offset)
        with self._state:
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        if self.spec.ordering is Ordering.UNORDERED:
            threading.Thread(target=self._deliver_one, args=(record,), daemon=True,
                             name=f"deliver-{record.partition}-{record.offset}").start()
            return
        lane = self._lanes.get(record.partition)
        if lane is None:
            lane = self._lanes[record.partition] = queue.SimpleQueue()
            threading.Thread(target=self._run_lane, args=(lane,), daemon=True,
                             name=f"lane-{self.target.source_name}-{record.partition}").start()
        lane.put(record)

    # -- delivery threads --------------------------------------------------------------------------------------

    def _run_lane(self, lane: "queue.SimpleQueue[KafkaRecord]") -> None:
        """Ordered mode: one partition's records, one at a time."""
        while not self._stop.is_set():
            try:
                record = lane.get(timeout=self.tuning.poll_timeout_s)
            except queue.Empty:
                continue
            self._deliver_one(record)

    def _deliver_one(self, record: KafkaRecord) -> None:
        try:
            outcome = self._handle(record)
            if outcome is not Outcome.STOPPED:
                self.offsets.finished(record.partition, record.offset)
        except Exception:
            log.exception("delivery crashed", extra={"config_name": self.target.config_name,
                                                     "partition": record.partition, "offset": record.offset})
        finally:
            with self._state:
                self.stats.in_flight -= 1
                self._state.notify_all()

    def _handle(self, record: KafkaRecord) -> Outcome:
        result = deliver_record(record, self.target, self.policy, self.post, self._stop, self._count_failure)
        if result.stopped:
            return Outcome.STOPPED
        if result.delivered:
            with self._state:
                self.stats.delivered += 1
            return Outcome.DELIVERED
        outcome = self._dead_letter(record, result)
        with self._state:
            if outcome is Outcome.DEAD_LETTERED:
                self.stats.dead_lettered += 1
            elif outcome is Outcome.DEAD_LETTER_FAILED:
                self.stats.dead_letter_failed += 1
        return outcome

    def _count_failure(self, result: DeliveryResult) -> None:
        # Counted as they happen: the status API shows a struggling step while it is still being retried.
        with self._state:
            self.stats.failed_attempts += 1
            self.stats.last_error = result.error

    def _dead_letter(self, record: KafkaRecord, result: DeliveryResult) -> Outcome:
        """Write the exhausted record to the dead-letter topic, with the source's retry policy. Success and
        failure both finish the record (RecordDispatcherImpl): after a failure it is lost from the group."""
        topic = dead_letter_topic(record.topic, self.policy.dead_letter_suffix)
        value = dead_letter_value(record, self.target, result)
        headers = dead_letter_headers(record, self.target, result)
        error = ""
        for attempt in range(1, self.policy.attempts + 1):
            if attempt > 1 and self._stop.wait(self.policy.backoff_s(attempt - 1)):
                return Outcome.STOPPED
            errors: list[Any] = []
            self.producer.produce(topic, key=record.key, value=value, headers=headers,
                                  on_delivery=lambda err, _msg: errors.append(err) if err else None)
            remaining = self.producer.flush(self.tuning.dead_letter_write_timeout_s)
            if not remaining and not errors:
                log.error("record dead-lettered", extra={
                    "config_name": self.target.config_name, "topic": record.topic, "partition": record.partition,
                    "offset": record.offset, "dead_letter_topic": topic, "attempts": result.attempts,
                    "error": result.error})
                return Outcome.DEAD_LETTERED
            error = str(errors[0]) if errors else f"not acknowledged in {self.tuning.dead_letter_write_timeout_s} s"
        log.error("dead-letter sink failed: offset committed anyway, the record is gone from the consumer group", extra={
            "config_name": self.target.config_name, "topic": record.topic, "partition": record.partition,
            "offset": record.offset, "event_id": result.event_id, "dead_letter_topic": topic,
            "delivery_error": result.error, "dead_letter_error": error[:RESPONSE_EXCERPT]})
        return Outcome.DEAD_LETTER_FAILED


def kafka_record(message: Any) -> KafkaRecord:
    """A consumed confluent-kafka ``Message`` (without error) as plain data."""
    headers = tuple((name, value if isinstance(value, bytes) else (value or "").encode("utf-8"))
                    for name, value in (message.headers() or []))
    timestamp_type, timestamp_ms = message.timestamp()
    return KafkaRecord(topic=str(message.topic()), partition=int(message.partition()), offset=int(message.offset()),
                       value=message.value() or b"", key=message.key(), headers=headers,
                       timestamp_ms=timestamp_ms if timestamp_type else None)


def _log_consumer_error(message: Any, topic: str) -> None:
    from confluent_kafka import KafkaError

    error = message.error()
    # A topic nobody has written to yet is normal at the start of a workflow.
    if error.code() not in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._PARTITION_EOF):
        log.warning("consumer error", extra={"topic": topic, "error": str(error)})


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
        workflow_name=target.workflow_name, topic_in=record.topic, event_id=result.event_id, value=record.value,
        attempts=result.attempts, http_status=result.status)
    return encode_json(value)


def ensure_topic(bootstrap_servers: str, topic: str, timeout_s: float = 10.0) -> None:
    """Create ``topic`` if it does not exist yet, so that the subscription sees it at once. Best effort: a broker
    that refuses is logged, the metadata refresh finds the topic once it exists."""
    try:
        ensure_topics(bootstrap_servers, [topic], timeout_s=timeout_s)
    except RuntimeError as error:
        log.warning("topic not created", extra={"topic": topic, "error": str(error)[:300]})
