"""``consume`` mode: the controller reads ``system.ML`` itself (no Knative to deliver it).

Each record goes through the same ``WorkflowController.handle`` as an HTTP delivery; the offset is committed after
it was handled. An infrastructure failure is retried with backoff, a bounded number of times, then logged and
skipped (a KafkaSource without a dead-letter sink would do the same).
"""

from __future__ import annotations

import logging
import threading

from services.core.kafka import consumer_config, poll_record

from .reconciler import WorkflowController
from .wiring import DeliveryPolicy

log = logging.getLogger(__name__)


class SystemTopicConsumer:
    def __init__(self, controller: WorkflowController, bootstrap_servers: str, topic: str, group_id: str,
                 policy: DeliveryPolicy, poll_timeout_s: float = 0.5) -> None:
        self.controller = controller
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
                                            **{"client.id": "eoml-controller"}))
        consumer.subscribe([self.topic])
        log.info("consuming workflow messages", extra={"topic": self.topic, "consumer_group": self.group_id})
        try:
            while not self._stop.is_set():
                message = poll_record(consumer, self.poll_timeout_s, log, self.topic)
                if message is None:
                    continue
                self._handle(message.value() or b"", int(message.partition() or 0), int(message.offset() or 0))
                if self._stop.is_set():
                    break
                consumer.commit(message=message, asynchronous=False)
                self.handled += 1
        finally:
            consumer.close()

    def _handle(self, value: bytes, partition: int, offset: int) -> None:
        for attempt in range(1, self.policy.attempts + 1):
            result = self.controller.handle(value)
            if not result.retryable:
                return
            if attempt == self.policy.attempts or self._stop.wait(self.policy.backoff_s(attempt)):
                break
        log.error("workflow message skipped after retries",
                  extra={"topic": self.topic, "partition": partition, "offset": offset})
