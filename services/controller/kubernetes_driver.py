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
_REPLACE_ATTEMPTS = 5
# A deleted KafkaSource lingers until Knative's finalizer has removed its consumer group; bounded wait for that.
_DELETION_WAIT_S = 60.0


def _status(error: Exception) -> int | None:
    return getattr(error, "status", None)


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
        name = body["metadata"]["name"]
        api = self.custom_api
        group, version, plural, namespace = KAFKA_SOURCE_API_GROUP, KAFKA_SOURCE_API_VERSION, KAFKA_SOURCE_PLURAL, \
            config.namespace
        try:
            api.create_namespaced_custom_object(group, version, namespace, plural, body)
            log.info("kafka source created", extra={"namespace": namespace, "kafka_source": name})
            return info
        except Exception as error:
            if _status(error) != 409:
                raise
        # A re-publish: replace the spec. Custom resources need the current resourceVersion; a concurrent writer
        # makes the replace fail with 409, so read and try again (bounded).
        for attempt in range(1, _REPLACE_ATTEMPTS + 1):
            current = api.get_namespaced_custom_object(group, version, namespace, plural, name)
            if immutable_fields_changed(current, body):
                # The webhook would refuse the update: recreate (release_conflicting normally did this already).
                self._delete_and_wait(namespace, name)
                api.create_namespaced_custom_object(group, version, namespace, plural, body)
                log.info("kafka source recreated", extra={"namespace": namespace, "kafka_source": name})
                return info
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            try:
                api.replace_namespaced_custom_object(group, version, namespace, plural, name, body)
                log.info("kafka source replaced", extra={"namespace": namespace, "kafka_source": name})
                return info
            except Exception as error:
                if _status(error) != 409 or attempt == _REPLACE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _get_source(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom_api.get_namespaced_custom_object(
                KAFKA_SOURCE_API_GROUP, KAFKA_SOURCE_API_VERSION, namespace, KAFKA_SOURCE_PLURAL, name)
        except Exception as error:
            if _status(error) == 404:
                return None
            raise

    def _delete_and_wait(self, namespace: str, name: str) -> None:
        """Delete a KafkaSource and wait (bounded) until it is gone: a create before that answers 409."""
        try:
            self.custom_api.delete_namespaced_custom_object(
                KAFKA_SOURCE_API_GROUP, KAFKA_SOURCE_API_VERSION, namespace, KAFKA_SOURCE_PLURAL, name)
        except Exception as error:
            if _status(error) != 404:
                raise
        deadline = time.monotonic() + _DELETION_WAIT_S
        while self._get_source(namespace, name) is not None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"KafkaSource {namespace}/{name} still terminating after {_DELETION_WAIT_S:.0f} s")
            self._sleep(0.5)

    def unwire(self, config: StepConfig | None, namespace: str, topic_in: str) -> bool:
        name = kafka_source_name(topic_in)
        try:
            self.custom_api.delete_namespaced_custom_object(
                KAFKA_SOURCE_API_GROUP, KAFKA_SOURCE_API_VERSION, namespace, KAFKA_SOURCE_PLURAL, name)
        except Exception as error:
            if _status(error) == 404:
                return False
            raise
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
