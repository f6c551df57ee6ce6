"""Wiring steps on Kubernetes: one Knative KafkaSource per step (``CustomObjectsApi``), optionally after the model's
KServe InferenceService is Ready."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from services.core.step_config import StepConfig

from .settings import ControllerSettings
from .wiring import (
    KAFKA_SOURCE_API_GROUP,
    KAFKA_SOURCE_API_VERSION,
    KAFKA_SOURCE_PLURAL,
    consumer_group,
    immutable_fields_changed,
    kafka_source_body,
    kafka_source_name,
)

log = logging.getLogger(__name__)

KSERVE_GROUP = "serving.kserve.io"
KSERVE_VERSION = "v1beta1"
KSERVE_PLURAL = "inferenceservices"
# Attempts to create-or-replace a KafkaSource through 409 Conflicts, with backoff 0.25, 0.5, ... capped at 5 s
# (~18 s in all; each call retries 429/5xx itself, api_retry.py).
_CONFLICT_ATTEMPTS = 8
_CONFLICT_BACKOFF_S = 0.25
_CONFLICT_BACKOFF_MAX_S = 5.0
# A deleted KafkaSource lingers until Knative's finalizer has removed its consumer group; bounded wait for that.
_DELETION_WAIT_S = 60.0


def _status(error: Exception) -> int | None:
    return getattr(error, "status", None)


class SourceConflict(TimeoutError):
    """A KafkaSource kept answering 409 Conflict: temporary (another writer, a deletion), so the message is retried."""


def _terminating(obj: dict[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def ready_condition(obj: dict[str, Any]) -> tuple[bool, str]:
    """Whether a Knative/KServe object's ``Ready`` condition is True, and its reason/message otherwise."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            if condition.get("status") == "True":
                return True, ""
            return False, condition.get("message") or condition.get("reason") or "Ready is not True"
    return False, "no Ready condition yet"


class KubernetesSourceDriver:
    """``SourceDriver`` that creates, replaces and deletes KafkaSources through the Kubernetes API."""

    def __init__(self, custom_api: Any, settings: ControllerSettings,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        # ``custom_api``: a ``kubernetes.client.CustomObjectsApi`` (injected: tests use a fake API server).
        self.custom_api = custom_api
        self.settings = settings
        self._sleep = sleep

    def check(self, config: StepConfig) -> None:
        """Nothing beyond message validation: the sink is resolved by Knative."""

    def source_info(self, config: StepConfig) -> dict[str, Any]:
        return {"driver": "kubernetes", "kafka_source": kafka_source_name(config.topic_in),
                "consumer_group": consumer_group(config.workflow_name, config.topic_in),
                "sink": f"{config.service_name}.{config.namespace}/{config.config_name}"}

    def release_conflicting(self, config: StepConfig) -> bool:
        """Before the step's configuration is overwritten: delete its KafkaSource if the new one cannot replace it
        in place (an immutable field such as ``consumerGroup`` changes: a re-publish under another workflow name),
        so that the old source never delivers into the new settings. True when a source was deleted."""
        current = self._get_source(config.namespace, kafka_source_name(config.topic_in))
        if current is None:
            return False
        if _terminating(current):
            # Stopped a moment ago: its consumer group is deleted only once the source is gone (foreground
            # deletion), and consumer positions are restored after that, never before.
            self._delete_and_wait(config.namespace, kafka_source_name(config.topic_in))
            return True
        changed = immutable_fields_changed(current, kafka_source_body(config, self.settings))
        if not changed:
            return False
        log.info("kafka source recreated: immutable fields change", extra={
            "namespace": config.namespace, "kafka_source": kafka_source_name(config.topic_in), "fields": changed})
        self._delete_and_wait(config.namespace, kafka_source_name(config.topic_in))
        return True

    def wire(self, config: StepConfig) -> dict[str, Any]:
        info = self.source_info(config)
        model_ready = self.wait_for_inference_service()
        if model_ready is not None:
            info["model_ready"] = model_ready
        body = kafka_source_body(config, self.settings)
        name, namespace = body["metadata"]["name"], config.namespace
        api = self.custom_api
        group, version, plural = KAFKA_SOURCE_API_GROUP, KAFKA_SOURCE_API_VERSION, KAFKA_SOURCE_PLURAL
        # 409 means different things: AlreadyExists on a create (a re-publish: replace the spec), a stale
        # resourceVersion on a replace (a concurrent writer: read again), or a create racing a deletion (the object
        # is gone when read). Each is resolved by reading the current state and trying again, with backoff, bounded.
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            if attempt > 1:
                self._sleep(min(_CONFLICT_BACKOFF_S * 2 ** (attempt - 2), _CONFLICT_BACKOFF_MAX_S))
            try:
                api.create_namespaced_custom_object(group, version, namespace, plural, body)
                log.info("kafka source created", extra={"namespace": namespace, "kafka_source": name})
                return info
            except Exception as error:
                if _status(error) != 409:
                    raise
            current = self._get_source(namespace, name)
            if current is None:
                continue  # a conflict with a deletion in progress: create again
            if _terminating(current) or immutable_fields_changed(current, body):
                # The webhook would refuse the update: recreate (release_conflicting normally did this already).
                self._delete_and_wait(namespace, name)
                continue
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            try:
                api.replace_namespaced_custom_object(group, version, namespace, plural, name, body)
                log.info("kafka source replaced", extra={"namespace": namespace, "kafka_source": name})
                return info
            except Exception as error:
                if _status(error) != 409:
                    raise
            finally:
                body["metadata"].pop("resourceVersion", None)
        raise SourceConflict(f"KafkaSource {namespace}/{name}: still 409 Conflict after {_CONFLICT_ATTEMPTS} attempts")

    def _get_source(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom_api.get_namespaced_custom_object(
                KAFKA_SOURCE_API_GROUP, KAFKA_SOURCE_API_VERSION, namespace, KAFKA_SOURCE_PLURAL, name)
        except Exception as error:
            if _status(error) == 404:
                return None
            raise

    def _delete(self, namespace: str, name: str) -> bool:
        """Delete a KafkaSource in the foreground: the object stays (terminating) until its dependents are gone,
        among them Knative's internal ConsumerGroup whose finalizer deletes the Kafka consumer group. So "the source
        is gone" also means "its consumer group is deleted", and offsets committed after that stay. False: none."""
        try:
            self.custom_api.delete_namespaced_custom_object(
                KAFKA_SOURCE_API_GROUP, KAFKA_SOURCE_API_VERSION, namespace, KAFKA_SOURCE_PLURAL, name,
                propagation_policy="Foreground")
        except Exception as error:
            if _status(error) != 404:
                raise
            return False
        return True

    def _delete_and_wait(self, namespace: str, name: str) -> None:
        """Delete a KafkaSource and wait (bounded) until it is gone: a create before that answers 409."""
        self._delete(namespace, name)
        deadline = time.monotonic() + _DELETION_WAIT_S
        while self._get_source(namespace, name) is not None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"KafkaSource {namespace}/{name} still terminating after {_DELETION_WAIT_S:.0f} s")
            self._sleep(0.5)

    def unwire(self, config: StepConfig | None, namespace: str, topic_in: str) -> bool:
        name = kafka_source_name(topic_in)
        if not self._delete(namespace, name):
            return False
        log.info("kafka source deleted", extra={"namespace": namespace, "kafka_source": name})
        return True

    def describe(self, config: StepConfig) -> dict[str, Any]:
        """The KafkaSource's live state (its Ready condition), for the status API."""
        try:
            obj = self.custom_api.get_namespaced_custom_object(
                KAFKA_SOURCE_API_GROUP, KAFKA_SOURCE_API_VERSION, config.namespace, KAFKA_SOURCE_PLURAL,
                kafka_source_name(config.topic_in))
        except Exception as error:
            if _status(error) == 404:
                return {"source_present": False}
            return {"source_error": type(error).__name__}
        ready, why = ready_condition(obj)
        return {"source_present": True, "source_ready": ready, **({"source_not_ready": why} if why else {})}

    def resume(self, configs: list[StepConfig]) -> None:
        """KafkaSources outlive the controller: nothing to restart."""

    def close(self) -> None:
        pass

    def wait_for_inference_service(self) -> bool | None:
        """Bounded wait until the configured InferenceService is Ready; None when none is configured."""
        if not self.settings.inference_service or self.settings.inference_service_wait_s <= 0:
            return None
        namespace, name = self.settings.inference_service.split("/")
        deadline = time.monotonic() + self.settings.inference_service_wait_s
        why = ""
        while True:
            try:
                obj = self.custom_api.get_namespaced_custom_object(KSERVE_GROUP, KSERVE_VERSION, namespace,
                                                                   KSERVE_PLURAL, name)
                ready, why = ready_condition(obj)
                if ready:
                    return True
            except Exception as error:
                if _status(error) != 404:
                    raise
                why = "InferenceService not found"
            if time.monotonic() >= deadline:
                log.warning("inference service not ready, wiring anyway",
                            extra={"inference_service": self.settings.inference_service, "reason": why})
                return False
            self._sleep(min(2.0, max(0.05, deadline - time.monotonic())))


def kubernetes_custom_api(host: str | None = None, api_client: Any = None) -> Any:
    from kubernetes import client

    from services.core.step_config_k8s import kubernetes_api_client

    return client.CustomObjectsApi(api_client or kubernetes_api_client(host))
