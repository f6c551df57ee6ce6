"""Settings of the ML Controller: ``EOML_CONTROLLER_*`` environment variables."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.core.settings import ENV_PREFIX, ServiceSettings, comma_or_json_list


class ControllerSettings(ServiceSettings):
    # hide_input_in_errors: a bad setting is reported by name; its value (it may be a credential) is not shown.
    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}CONTROLLER_", extra="ignore",
                                      hide_input_in_errors=True)

    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    # Written into every step configuration (production's ``bootstrapServers``) and used by the Kafka consumers.
    bootstrap_servers: str = "127.0.0.1:9092"
    system_topic: str = "system.ML"
    # ``consume`` mode: the controller's own consumer group on ``system_topic``.
    consumer_group: str = "eoml-controller"

    # The namespaces workflows may run in (``ML.Namespace``), comma-separated or JSON. Empty: any namespace, and
    # stored steps are listed cluster-wide. Set: other namespaces are refused, and only these are listed (what a
    # namespaced Role allows).
    workflow_namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)

    source_driver: Literal["kubernetes", "local"] = "kubernetes"
    store: Literal["kubernetes", "local"] = "kubernetes"
    store_root: str = "build/step-configs"
    # Local event plane: ``ML.ServiceName`` -> the Wrapper's base URL (JSON object in the environment).
    wrapper_urls: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # Empty: in-cluster service account, else the kubeconfig. A URL: that API server without auth (kubectl proxy).
    kubernetes_host: str = ""

    # Delivery of step messages to the Wrappers (KafkaSource ``spec.delivery``, and the local event plane).
    # Retries are bounded (contracts defect 3); with exponential backoff from 1 s (waits 2, 4, ... 256 s), 8 retries
    # span ~8.5 minutes, which covers a Wrapper restart or a full Wrapper without sending the input to the
    # dead-letter topic.
    delivery_retry: int = Field(8, ge=0, le=30)
    delivery_backoff_policy: Literal["exponential", "linear"] = "exponential"
    delivery_backoff_delay_s: float = Field(1.0, gt=0, le=3600)
    # Per attempt. The Wrapper answers only when the step's outcome is durable, so this bounds a whole step: it must
    # be at least the Wrapper's longest step (a full Sentinel-2 granule, plus up to the Wrapper's inference-outage
    # wait, 900 s by default). A shorter timeout aborts a running step and delivers it again (duplicate work).
    delivery_timeout_s: float = Field(3600.0, gt=0, le=86400)
    # KafkaSource ``spec.ordering`` of the step sources. ``unordered``: up to ``max.poll.records`` steps of one
    # partition in flight at once (a long step does not hold back the next, and more Wrapper pods get work); offsets
    # are still committed only up to the first unfinished record, so nothing is lost. ``ordered``: one at a time.
    # The local event plane models both (services/controller/event_plane/dispatcher.py).
    source_ordering: Literal["ordered", "unordered"] = "unordered"
    # KafkaSource ``spec.net`` of the step sources (TLS/SASL): Secret references only, never values; the Secrets
    # must exist in every workflow namespace (a KafkaSource reads them from its own namespace). JSON in the
    # environment; {} = plaintext.
    kafka_net: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    # Failures of the controller itself (a message refused, a step not wired) go here as CRITICAL notifications.
    notify_topic: str = "monitoring.notify"
    # Whether ``<Topics.in><dead_letter_suffix>`` is created (Kafka admin call) when a step is wired.
    create_dead_letter_topics: bool = True
    dead_letter_suffix: str = ".dlq"
    # Where KafkaSources send what failed every retry: an absolute URI, or else this controller's own
    # ``/dead-letter`` endpoint (Knative Service ``controller_service_name`` in ``controller_namespace``), which
    # writes the record to ``<Topics.in><dead_letter_suffix>``.
    dead_letter_uri: str = ""
    controller_service_name: str = "eoml-controller"
    controller_namespace: str = "eoml-system"
    # The sink a step is wired to: the Wrapper's Knative Service ``ML.ServiceName`` in ``ML.Namespace``.
    wrapper_api_version: str = "serving.knative.dev/v1"
    wrapper_kind: str = "Service"
    # Knative's sender identity (feature flag authentication-oidc): a KafkaSource sends an OIDC token only to a
    # sink with an audience, and Knative Services publish none, so the controller sets ``spec.sink.audience``:
    # this template with {namespace} and {service} of the step (the Wrapper verifies it); "" = no token.
    wrapper_audience_template: str = ""
    # The audience of this controller's /dead-letter (its EOML_AUTH_AUDIENCE); "" = no token.
    dead_letter_audience: str = ""

    # Optional: wait (bounded) until this KServe InferenceService ("namespace/name") is Ready before wiring a step.
    # 0 s: do not wait. Not ready in time: the step is wired anyway (deliveries are retried and the Wrapper answers
    # 503 until its model is ready) and the status API says so.
    inference_service: str = ""
    inference_service_wait_s: float = Field(0.0, ge=0, le=3600)

    @field_validator("wrapper_urls", mode="before")
    @classmethod
    def _json_map(cls, value: object) -> object:
        if isinstance(value, str):
            stripped = value.strip()
            return json.loads(stripped) if stripped else {}
        return value

    @field_validator("kafka_net", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if isinstance(value, str):
            stripped = value.strip()
            return json.loads(stripped) if stripped else {}
        return value

    @field_validator("kafka_net")
    @classmethod
    def _secret_references_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_kafka_net(value)
        return value

    @field_validator("workflow_namespaces", mode="before")
    @classmethod
    def _name_list(cls, value: object) -> object:
        return comma_or_json_list(value)

    @field_validator("inference_service")
    @classmethod
    def _namespaced(cls, value: str) -> str:
        if value and value.count("/") != 1:
            raise ValueError("inference_service must be 'namespace/name'")
        return value


_NET_FIELDS = {"sasl": ("enable", "user", "password", "type"), "tls": ("enable", "caCert", "cert", "key")}


def check_kafka_net(net: dict[str, Any]) -> None:
    """A KafkaSource ``spec.net`` with Secret references only: ``{"secretKeyRef": {"name": ..., "key": ...}}`` for
    every credential, booleans for ``enable``. A literal value (a password pasted in) is refused, naming the field
    but never showing the value."""
    for section, content in net.items():
        if section not in _NET_FIELDS or not isinstance(content, dict):
            raise ValueError(f"kafka_net: unknown section {section!r} (sasl, tls)")
        for name, item in content.items():
            if name not in _NET_FIELDS[section]:
                raise ValueError(f"kafka_net.{section}: unknown field {name!r}")
            if name == "enable":
                if not isinstance(item, bool):
                    raise ValueError(f"kafka_net.{section}.enable must be a boolean")
                continue
            reference = item.get("secretKeyRef") if isinstance(item, dict) and set(item) == {"secretKeyRef"} \
                else None
            if not (isinstance(reference, dict) and isinstance(reference.get("name"), str)
                    and isinstance(reference.get("key"), str) and set(reference) <= {"name", "key", "optional"}):
                raise ValueError(f"kafka_net.{section}.{name} must be {{secretKeyRef: {{name, key}}}} (a Secret "
                                 "reference, never a value)")
