"""Settings of the ML Controller: ``EOML_CONTROLLER_*`` environment variables."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.core.settings import ENV_PREFIX, ServiceSettings


class ControllerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}CONTROLLER_", extra="ignore")

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
    # Retries are bounded (contracts defect 3); with exponential backoff from 1 s, 8 retries span ~4 minutes, which
    # covers a Wrapper restart without sending its input to the dead-letter topic.
    delivery_retry: int = Field(8, ge=0, le=30)
    delivery_backoff_policy: Literal["exponential", "linear"] = "exponential"
    delivery_backoff_delay_s: float = Field(1.0, gt=0, le=3600)
    # Per request. The Wrapper answers 202 as soon as its bounded pool took the message, so this is far above its
    # p99 (milliseconds); it only has to cover a congested node.
    delivery_timeout_s: float = Field(30.0, gt=0, le=3600)
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

    @field_validator("workflow_namespaces", mode="before")
    @classmethod
    def _name_list(cls, value: object) -> object:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [item.strip() for item in stripped.split(",") if item.strip()]
        return value

    @field_validator("inference_service")
    @classmethod
    def _namespaced(cls, value: str) -> str:
        if value and value.count("/") != 1:
            raise ValueError("inference_service must be 'namespace/name'")
        return value
