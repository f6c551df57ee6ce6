"""``consume`` mode: the controller reads ``system.ML`` itself (no Knative to deliver it).

Each record goes through the same ``WorkflowController.handle`` as an HTTP delivery; the offset is committed after
it was handled. An infrastructure failure is retried with backoff, a bounded number of times; then the record goes
to ``<system topic>.dlq`` (credentials redacted), is reported CRITICAL on ``monitoring.notify``, and the next record
follows (what the chart's KafkaSource with its dead-letter sink does).
"""

from __future__ import annotations

import logging
import threading

from typing import Callable

from services.core.kafka import consumer_config, encode_json, poll_record

from .reconciler import WorkflowController
from .wiring import DeliveryPolicy, dead_letter_topic, delivery_dead_letter_record

# (topic, value, headers): writes one record and returns once the broker acknowledged it.
DeadLetterWriter = Callable[[str, bytes, list[tuple[str, bytes]]], None]

log = logging.getLogger(__name__)


class SystemTopicConsumer:
    def __init__(self, controller: WorkflowController, bootstrap_servers: str, topic: str, group_id: str,
                 policy: DeliveryPolicy, poll_timeout_s: float = 0.5,
                 dead_letter_writer: DeadLetterWriter | None = None) -> None:
        self.controller = controller
        self.dead_letter_writer = dead_letter_writer
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group_id = group_id
        self.policy = policy
        self.poll_timeout_s = poll_timeout_s
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

    def _run(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(consumer_config(self.bootstrap_servers, self.group_id,
                                            # A topic created after the subscription is found at the next
                                            # metadata refresh (librdkafka's default: 5 min).
                                            **{"client.id": "eoml-controller",
                                               "topic.metadata.refresh.interval.ms": 5000}))
        consumer.subscribe([self.topic])
        log.info("consuming workflow messages", extra={"topic": self.topic, "consumer_group": self.group_id})
        try:
            while not self._stop.is_set():
                message = poll_record(consumer, self.poll_timeout_s, log, self.topic)
                if message is None:
                    continue
                self._handle(message.value() or b"", int(message.partition() or 0), int(message.offset() or 0))
                if self._stop.is_set():
                    break  # possibly unfinished: not committed
                consumer.commit(message=message, asynchronous=False)
                self.handled += 1
        finally:
            consumer.close()

    def _handle(self, value: bytes, partition: int, offset: int) -> None:
        reason = ""
        for attempt in range(1, self.policy.attempts + 1):
            result = self.controller.handle(value)
            if not result.retryable:
                return
            reason = result.reason
            if attempt == self.policy.attempts:
                break
            if self._stop.wait(self.policy.backoff_s(attempt)):
                return  # stopping: not committed, handled again after a restart
        target = dead_letter_topic(self.topic, self.policy.dead_letter_suffix)
        if self.dead_letter_writer is not None:
            record = delivery_dead_letter_record(
                f"workflow message not applied after {self.policy.attempts} attempt(s): {reason}",
                config_name="", service_name="", workflow_name="", topic_in=self.topic,
                event_id=f"partition:{partition}/offset:{offset}", value=value, attempts=self.policy.attempts,
                http_status=None)
            wait_s = 1.0
            while True:  # the offset is committed only once the dead-letter record is acknowledged
                try:
                    self.dead_letter_writer(target, encode_json(record), [])
                    break
                except Exception as error:  # noqa: BLE001 - the broker is away: wait for it
                    log.error("dead-letter write failed, retrying", extra={"dead_letter_topic": target,
                                                                            "error": str(error)[:300]})
                if self._stop.wait(wait_s):
                    return
                wait_s = min(2 * wait_s, 30.0)
        self.controller.report_given_up(value, reason)
        log.error("workflow message given up after retries",
                  extra={"topic": self.topic, "partition": partition, "offset": offset, "dead_letter_topic": target})
