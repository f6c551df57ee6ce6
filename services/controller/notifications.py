"""The controller's failures on ``monitoring.notify``: the notification of contracts section 4, status CRITICAL
(a message refused, a step not wired, a message given up after every retry) or WARNING (a temporary failure that
the source retries), with the reason. Reasons name fields and statuses, never values; ``scrub`` removes the
message's credential values as a second guard.

Best effort: a notification that cannot be delivered is logged, and the message's handling is unaffected.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Iterable, Protocol

from services.core.contracts import Notification, NotificationOptional, NotificationStatus
from services.core.kafka import producer_config, publish_json
from services.core import redaction

log = logging.getLogger(__name__)

CONTROLLER_COMPONENT = "ML Controller"


class ControllerNotifier(Protocol):
    def notify(self, status: NotificationStatus, reason: str, workflow_name: str = "", component_name: str = "",
               namespace: str = "", secrets: Iterable[str] = ()) -> None: ...


def scrub(text: str, secrets: Iterable[str]) -> str:
    return redaction.redact(text, secrets)


def controller_notification(status: NotificationStatus, reason: str, workflow_name: str = "",
                            component_name: str = "", namespace: str = "",
                            secrets: Iterable[str] = ()) -> Notification:
    return Notification(
        component_name=component_name or CONTROLLER_COMPONENT, workflow_name=workflow_name, status=status,
        description=scrub(f"{CONTROLLER_COMPONENT}: {reason}", secrets),
        optional=NotificationOptional(namespace=namespace, pod=os.environ.get("POD_NAME") or socket.gethostname()))


class NullNotifier:
    """No Kafka (unit tests of the Kubernetes side): notifications are only logged."""

    def __init__(self) -> None:
        self.sent: list[Notification] = []

    def notify(self, status: NotificationStatus, reason: str, workflow_name: str = "", component_name: str = "",
               namespace: str = "", secrets: Iterable[str] = ()) -> None:
        self.sent.append(controller_notification(status, reason, workflow_name, component_name, namespace, secrets))


class KafkaNotifier:
    """Publishes to ``topic`` and waits for the broker's acknowledgement (bounded); failures are logged only."""

    def __init__(self, bootstrap_servers: str, topic: str, producer: Any = None, timeout_s: float = 10.0) -> None:
        self.topic = topic
        self.timeout_s = timeout_s
        if producer is None:
            from confluent_kafka import Producer

            producer = Producer(producer_config(bootstrap_servers,
                                                **{"message.timeout.ms": int(timeout_s * 1000)}))
        self.producer = producer

    def notify(self, status: NotificationStatus, reason: str, workflow_name: str = "", component_name: str = "",
               namespace: str = "", secrets: Iterable[str] = ()) -> None:
        notification = controller_notification(status, reason, workflow_name, component_name, namespace, secrets)
        try:
            publish_json(self.producer, self.topic, notification.model_dump(mode="json"), key=workflow_name or "key",
                         timeout_s=self.timeout_s)
        except Exception as error:  # noqa: BLE001 - best effort, see module docstring
            log.error("notification not delivered", extra={"topic": self.topic, "status": status,
                                                           "workflow": workflow_name, "error": str(error)[:300]})
