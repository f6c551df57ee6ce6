"""``consume`` mode: the controller reads ``system.ML`` itself (no Knative to deliver it).

Each record goes through the same ``WorkflowController.handle`` as an HTTP delivery; the offset is committed only
after it was handled. An infrastructure failure is retried with backoff, a bounded number of times; then the record
goes to ``<system topic>.dlq`` (credentials redacted), is reported CRITICAL on ``monitoring.notify``, and the next
record follows (what the chart's KafkaSource with its dead-letter sink does). A dead-letter write is bounded; when it
fails the record stays uncommitted and is handled again from the start (the broker is away: nothing is lost).

The handling of one record may take long (retries and backoff, each attempt bounded by the Kubernetes API retry
policy and the Kafka admin timeouts), and librdkafka leaves the group when ``poll`` is not called for
``max.poll.interval.ms``: that is set above the worst case computed from the settings (``max_poll_interval_ms``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from services.core.kafka import consumer_config, encode_json, poll_record

from .api_retry import ApiRetryPolicy
from .dead_letters import DeadLetterWriter
from .reconciler import WorkflowController
from .settings import ControllerSettings
from .wiring import DeliveryPolicy, dead_letter_topic, delivery_dead_letter_record

log = logging.getLogger(__name__)

# Kubernetes API calls of one publish at most: step configuration read (ConfigMap, Secret), source read, delete,
# Secret and ConfigMap create-or-replace (2 each), source create, read, replace (12), plus the driver's 409 loop:
# up to 8 rounds of read, replace and create (24).
K8S_CALLS_PER_MESSAGE = 36
# Bounded waits of the Kubernetes driver (kubernetes_driver.py): a deleted source to disappear (once per 409 round
# at most: 8 x 60 s), and the 409 backoff.
K8S_DELETION_WAIT_S = 8 * 60.0
K8S_CONFLICT_BACKOFF_S = 20.0
# Kafka waits of one publish under a new name, each bounded by its timeout (15 s): dead-letter topic creation (1),
# two position saves (each 2 offset reads of 2 waits and a commit that may fall back to a consumer commit: 6) and a
# seed (2 reads, a commit: 6); rounded up.
KAFKA_ADMIN_CALLS_PER_MESSAGE = 20
KAFKA_ADMIN_TIMEOUT_S = 15.0
MARGIN_S = 60.0
LIBRDKAFKA_MAX_POLL_INTERVAL_MS = 86_400_000


def attempt_bound_s(settings: ControllerSettings) -> float:
    """Longest one ``handle`` can take: every bounded wait of a publish at its limit."""
    bound = KAFKA_ADMIN_CALLS_PER_MESSAGE * KAFKA_ADMIN_TIMEOUT_S + settings.dead_letter_write_timeout_s
    if settings.source_driver == "kubernetes" or settings.store == "kubernetes":
        api = ApiRetryPolicy(settings.kubernetes_api_attempts, settings.kubernetes_api_backoff_s,
                             settings.kubernetes_api_timeout_s)
        bound += K8S_CALLS_PER_MESSAGE * api.worst_case_s + K8S_DELETION_WAIT_S + K8S_CONFLICT_BACKOFF_S \
            + settings.inference_service_wait_s
    return bound


def max_poll_interval_ms(settings: ControllerSettings) -> int:
    """Above the worst-case handling of one record: every attempt at its bound, every backoff, the dead-letter write
    and a margin. Refused at startup when librdkafka cannot wait that long (24 h)."""
    policy = DeliveryPolicy.from_settings(settings)
    worst_s = policy.attempts * attempt_bound_s(settings) \
        + sum(policy.backoff_s(n) for n in range(1, policy.attempts)) \
        + settings.dead_letter_write_timeout_s + MARGIN_S
    interval_ms = int(worst_s * 1000)
    if interval_ms > LIBRDKAFKA_MAX_POLL_INTERVAL_MS:
        raise ValueError(f"worst-case handling of one workflow message ({worst_s:.0f} s) exceeds librdkafka's "
                         "max.poll.interval.ms limit (24 h): lower delivery_retry or the timeouts")
    return interval_ms


class SystemTopicConsumer:
    def __init__(self, controller: WorkflowController, bootstrap_servers: str, topic: str, group_id: str,
                 policy: DeliveryPolicy, poll_timeout_s: float = 0.5,
                 dead_letter_writer: DeadLetterWriter | None = None, max_poll_interval_ms: int = 300_000) -> None:
        self.controller = controller
        self.dead_letter_writer = dead_letter_writer
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group_id = group_id
        self.policy = policy
        self.poll_timeout_s = poll_timeout_s
        self.max_poll_interval_ms = max_poll_interval_ms
        self.handled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-ml-consumer", daemon=True)

    def start(self) -> "SystemTopicConsumer":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def consumer_overrides(self) -> dict[str, Any]:
        return {
            "client.id": "eoml-controller",
            # A topic created after the subscription is found at the next metadata refresh (librdkafka's
            # default: 5 min).
            "topic.metadata.refresh.interval.ms": 5000,
            "max.poll.interval.ms": self.max_poll_interval_ms}

    def consumer_settings(self) -> dict[str, Any]:
        return consumer_config(self.bootstrap_servers, self.group_id, **self.consumer_overrides())

    def _run(self) -> None:
        from confluent_kafka import KafkaException

        while not self._stop.is_set():
            try:
                self._consume()
            except KafkaException as error:
                # A commit or seek failed (the broker went away, the group rebalanced): a fresh consumer resumes at
                # the last committed offset, so the record comes again (handling is idempotent) and none is skipped.
                log.warning("consumer restarted after a Kafka error: uncommitted workflow messages come again",
                            extra={"topic": self.topic, "error": str(error)[:300]})
                self._stop.wait(self.policy.backoff_s(1))

    def _consume(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(consumer_config(self.bootstrap_servers, self.group_id, **self.consumer_overrides()))
        consumer.subscribe([self.topic])
        log.info("consuming workflow messages", extra={"topic": self.topic, "consumer_group": self.group_id,
                                                       "max_poll_interval_ms": self.max_poll_interval_ms})
        try:
            while not self._stop.is_set():
                message = poll_record(consumer, self.poll_timeout_s, log, self.topic)
                if message is None:
                    continue
                partition, offset = int(message.partition() or 0), int(message.offset() or 0)
                finished = self._handle(message.value() or b"", partition, offset)
                if self._stop.is_set():
                    break  # possibly unfinished: not committed
                if not finished:
                    # Its dead letter was not written: handle it again from the start, after a pause.
                    consumer.seek(TopicPartition(self.topic, partition, offset))
                    self._stop.wait(self.policy.backoff_s(1))
                    continue
                consumer.commit(message=message, asynchronous=False)
                self.handled += 1
        finally:
            consumer.close()

    def _handle(self, value: bytes, partition: int, offset: int) -> bool:
        """Handle one record, retrying temporary failures; True when it is finished (applied, refused and kept, or
        given up and dead-lettered), False when it must be handled again (stopping, or the dead-letter write
        failed)."""
        event_id = f"partition:{partition}/offset:{offset}"
        reason = ""
        for attempt in range(1, self.policy.attempts + 1):
            result = self.controller.handle(value, event_id=event_id)
            if not result.retryable:
                return True
            reason = result.reason
            if attempt == self.policy.attempts:
                break
            if self._stop.wait(self.policy.backoff_s(attempt)):
                return False  # stopping: not committed, handled again after a restart
        target = dead_letter_topic(self.topic, self.policy.dead_letter_suffix)
        if self.dead_letter_writer is not None:
            record = delivery_dead_letter_record(
                f"workflow message not applied after {self.policy.attempts} attempt(s): {reason}",
                config_name="", service_name="", workflow_name="", topic_in=self.topic,
                event_id=event_id, value=value, attempts=self.policy.attempts, http_status=None)
            try:  # bounded (dead_letters.KafkaDeadLetterWriter)
                self.dead_letter_writer(target, encode_json(record), [])
            except Exception as error:  # noqa: BLE001 - the broker is away: not committed, handled again
                log.error("dead-letter write failed, the message will be handled again",
                          extra={"dead_letter_topic": target, "error": str(error)[:300]})
                return False
        self.controller.report_given_up(value, reason)
        log.error("workflow message given up after retries",
                  extra={"topic": self.topic, "partition": partition, "offset": offset, "dead_letter_topic": target})
        return True
