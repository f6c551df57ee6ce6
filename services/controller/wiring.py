"""How a workflow step is wired: names, the KafkaSource body, and the delivery policy both drivers follow.

One step = one input topic (``Topics.in``) of one workflow in one namespace. Every name derives deterministically
from the step, so a re-publish addresses the same objects (create-or-replace) and a re-created source resumes its
consumer group's offsets instead of replaying the topic (contracts defect 5). The consumer group also names the
workflow, and a KafkaSource's ``consumerGroup`` is immutable: a re-publish under another workflow name recreates the
source (delete, then create) instead of updating it, before the step's settings are overwritten.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from services.core.redaction import redact
from services.core.step_config import StepConfig, dns1123_name
from services.core.step_config_k8s import step_annotations, step_labels

from .settings import ControllerSettings

KAFKA_SOURCE_API_GROUP = "sources.knative.dev"
KAFKA_SOURCE_API_VERSION = "v1beta1"
KAFKA_SOURCE_PLURAL = "kafkasources"
KAFKA_SOURCE_KIND = "KafkaSource"
DEAD_LETTER_PATH = "/dead-letter"
CONSUMER_GROUP_PREFIX = "eoml"
# Production's KafkaSources (contracts section 2) deliver to the Wrapper exactly this way.
CLOUDEVENT_TYPE = "dev.knative.kafka.event"


class StepRejected(ValueError):
    """A step that cannot be wired, for a reason the sender can fix (e.g. no Wrapper for ``ML.ServiceName``)."""


def kafka_source_name(topic_in: str) -> str:
    """The KafkaSource of a step: the topic, DNS-1123-sanitised, with a hash suffix (distinct topics never collide)."""
    return dns1123_name(topic_in)


def consumer_group(workflow_name: str, topic_in: str) -> str:
    """Deterministic per workflow step: ``eoml-<dns1123(workflow)>-<dns1123(topic)>``."""
    return f"{CONSUMER_GROUP_PREFIX}-{dns1123_name(workflow_name)}-{dns1123_name(topic_in)}"


def dead_letter_topic(topic_in: str, suffix: str = ".dlq") -> str:
    """Where a step's undeliverable input ends: ``<Topics.in>.dlq`` (the Wrapper writes its failures there too)."""
    return f"{topic_in}{suffix}"


def cloudevent_source(namespace: str, source_name: str, topic: str) -> str:
    """``ce-source`` as the Knative KafkaSource dispatcher sets it."""
    return f"/apis/v1/namespaces/{namespace}/kafkasources/{source_name}#{topic}"


def topic_from_cloudevent_source(ce_source: str) -> str | None:
    """The topic named after ``#`` in a KafkaSource's ``ce-source``."""
    _, hash_mark, topic = ce_source.rpartition("#")
    return topic if hash_mark and topic else None


def iso8601_seconds(seconds: float) -> str:
    """``PT<n>S``: whole seconds as an integer, sub-second delays with up to 3 decimals."""
    if float(seconds).is_integer():
        return f"PT{int(seconds)}S"
    return f"PT{seconds:.3f}".rstrip("0").rstrip(".") + "S"


@dataclass(frozen=True)
class DeliveryPolicy:
    """Bounded retries with backoff, a per-request timeout, a dead-letter destination (contracts defect 3)."""

    retry: int
    backoff_policy: str
    backoff_delay_s: float
    timeout_s: float
    dead_letter_suffix: str = ".dlq"

    @classmethod
    def from_settings(cls, settings: ControllerSettings) -> "DeliveryPolicy":
        return cls(retry=settings.delivery_retry, backoff_policy=settings.delivery_backoff_policy,
                   backoff_delay_s=settings.delivery_backoff_delay_s, timeout_s=settings.delivery_timeout_s,
                   dead_letter_suffix=settings.dead_letter_suffix)

    def backoff_s(self, retry_number: int) -> float:
        """Delay before retry ``retry_number`` (1-based), as Knative computes it: linear ``delay*n``,
        exponential ``delay*2^n``."""
        if self.backoff_policy == "linear":
            return self.backoff_delay_s * retry_number
        return self.backoff_delay_s * (2 ** retry_number)

    @property
    def attempts(self) -> int:
        return 1 + self.retry


def dead_letter_sink(settings: ControllerSettings) -> dict[str, Any]:
    if settings.dead_letter_uri:
        return {"uri": settings.dead_letter_uri}
    return {
        "ref": {"apiVersion": settings.wrapper_api_version, "kind": "Service",
                "name": settings.controller_service_name, "namespace": settings.controller_namespace},
        "uri": DEAD_LETTER_PATH,
    }


def sink_audiences(config: StepConfig, settings: ControllerSettings) -> tuple[dict[str, str], dict[str, str]]:
    """``audience`` of the step's sink and of its dead-letter sink ({} when not configured): with Knative's
    ``authentication-oidc`` on, the source then sends ``Authorization: Bearer`` with its own identity."""
    sink = settings.wrapper_audience_template.format(namespace=config.namespace, service=config.service_name)
    return ({"audience": sink} if sink else {},
            {"audience": settings.dead_letter_audience} if settings.dead_letter_audience else {})


def kafka_source_body(config: StepConfig, settings: ControllerSettings) -> dict[str, Any]:
    """The KafkaSource (``sources.knative.dev/v1beta1``) that delivers a step's input topic to its Wrapper."""
    policy = DeliveryPolicy.from_settings(settings)
    bootstrap = config.bootstrap_servers or settings.bootstrap_servers
    sink_audience, dead_letter_audience = sink_audiences(config, settings)
    body: dict[str, Any] = {
        "apiVersion": f"{KAFKA_SOURCE_API_GROUP}/{KAFKA_SOURCE_API_VERSION}",
        "kind": KAFKA_SOURCE_KIND,
        "metadata": {
            "name": kafka_source_name(config.topic_in),
            "namespace": config.namespace,
            "labels": step_labels(config),
            "annotations": {**step_annotations(config), "eoml.eo4eu.eu/config-name": config.config_name},
        },
        "spec": {
            "bootstrapServers": [s.strip() for s in bootstrap.split(",") if s.strip()],
            "topics": [config.topic_in],
            "consumerGroup": consumer_group(config.workflow_name, config.topic_in),
            "initialOffset": "earliest",
            "ordering": settings.source_ordering,
            "delivery": {
                "retry": policy.retry,
                "backoffPolicy": policy.backoff_policy,
                "backoffDelay": iso8601_seconds(policy.backoff_delay_s),
                "timeout": iso8601_seconds(policy.timeout_s),
                "deadLetterSink": {**dead_letter_sink(settings), **dead_letter_audience},
            },
            "sink": {
                "ref": {"apiVersion": settings.wrapper_api_version, "kind": settings.wrapper_kind,
                        "name": config.service_name, "namespace": config.namespace},
                "uri": f"/{config.config_name}",
                **sink_audience,
            },
        },
    }
    if settings.kafka_net:
        # Secret references only (checked by the settings): the dispatcher reads them in the step's namespace.
        body["spec"]["net"] = copy.deepcopy(settings.kafka_net)
    return body


# Fields of a KafkaSource the Knative webhook refuses to change on update: a change needs delete + create.
IMMUTABLE_SOURCE_FIELDS = ("consumerGroup",)


def immutable_fields_changed(current: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The ``spec`` fields whose change the KafkaSource webhook would refuse (empty: an update is accepted)."""
    old, new = current.get("spec") or {}, wanted.get("spec") or {}
    return [f"spec.{name}" for name in IMMUTABLE_SOURCE_FIELDS if old.get(name) != new.get(name)]


def delivery_dead_letter_record(reason: str, *, config_name: str, service_name: str, workflow_name: str,
                                topic_in: str, event_id: str, value: bytes, attempts: int,
                                http_status: int | None) -> dict[str, Any]:
    """The dead-letter record of an undeliverable step message, in the shape the Wrapper uses for failed steps
    (``reason``, ``config_name``, ``task``, ..., ``input_message``: replay it by publishing that to ``topic_in``),
    plus what the delivery saw. A step message carries no credentials; a workflow message (the controller's own
    source on ``system.ML``) does: every credential it carries is redacted by key and by value, JSON held in a
    string (a structured CloudEvent's ``data``) included (``services.core.redaction``)."""
    try:
        input_message: Any = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError):
        input_message = value[:65536].decode("utf-8", errors="replace")
    return redact({
        "reason": reason,
        "config_name": config_name,
        "task": service_name,
        "workflow_name": workflow_name,
        "component_name": "",
        "topic_in": topic_in,
        "event_id": event_id,
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_message": input_message,
        "delivery": {"attempts": attempts, "http_status": http_status},
    })
