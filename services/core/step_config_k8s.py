"""The Kubernetes ``StepConfigStore``: a ConfigMap with a step's settings and a Secret with its S3 credentials.

Written by the ML Controller, read by the Wrapper (both in the workflow's namespace, ``ML.Namespace``):

- ConfigMap ``<config name>`` (``json-config-<topic>-<hash>``, see ``step_config_name``), keys:
  ``jsonSuperviserRequest`` = the DSL message WITHOUT credentials (production's key, same shape otherwise),
  ``bootstrapServers`` = the Kafka bootstrap address (production's key), ``stepConfig`` = the ``StepConfig`` as JSON.
- Secret ``<config name>-credentials`` (Opaque): ``aws_access_key_id``, ``aws_secret_access_key``.

A ConfigMap written by the production controller (no ``stepConfig``, credentials inside ``jsonSuperviserRequest``)
is still readable: the configuration is rebuilt from the message and the credentials taken from the Secret if there
is one, else from the message (contracts defect 1 is about writing them there, not about reading old objects).

Kubernetes is called through the official ``kubernetes`` client (synchronous; callers in an event loop run these
methods in a thread).
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from pydantic import SecretStr, ValidationError

from .contracts import WorkflowMessage
from .step_config import StepConfig, StepConfigNotFound, StepCredentials, dns1123_name, step_config_from_message

log = logging.getLogger(__name__)

SUPERVISER_REQUEST_KEY = "jsonSuperviserRequest"
BOOTSTRAP_SERVERS_KEY = "bootstrapServers"
STEP_CONFIG_KEY = "stepConfig"
ACCESS_KEY_ID_KEY = "aws_access_key_id"
SECRET_ACCESS_KEY_KEY = "aws_secret_access_key"
CREDENTIALS_SUFFIX = "-credentials"
# The message's other S3_bucket fields (session token, ...) as one JSON object: their names need not be valid keys.
EXTRA_CREDENTIALS_KEY = "s3BucketExtra"

MANAGED_BY = "eoml-controller"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
PART_OF = "eo-inference-platform"
LABEL_STEP_CONFIG = "eoml.eo4eu.eu/step-config"
LABEL_WORKFLOW = "eoml.eo4eu.eu/workflow"
ANNOTATION_WORKFLOW_NAME = "eoml.eo4eu.eu/workflow-name"
ANNOTATION_TOPIC_IN = "eoml.eo4eu.eu/topic-in"
ANNOTATION_CREDENTIALS_SECRET = "eoml.eo4eu.eu/credentials-secret"
STEP_CONFIG_SELECTOR = f"{LABEL_STEP_CONFIG}=true"
# The KafkaSource of a step names its configuration (services/controller/wiring.py).
ANNOTATION_CONFIG_NAME = "eoml.eo4eu.eu/config-name"
SOURCE_API = ("sources.knative.dev", "v1beta1", "kafkasources")


def credentials_secret_name(config_name: str) -> str:
    """The Secret holding a step's S3 credentials (a DNS-1123 subdomain: up to 253 characters)."""
    return f"{config_name}{CREDENTIALS_SUFFIX}"


def workflow_label(workflow_name: str) -> str:
    """A label value for a workflow name (any string): sanitised, hash-suffixed, at most 63 characters."""
    return dns1123_name(workflow_name)


def step_labels(config: StepConfig) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: PART_OF,
        LABEL_STEP_CONFIG: "true",
        LABEL_WORKFLOW: workflow_label(config.workflow_name),
    }


def step_annotations(config: StepConfig) -> dict[str, str]:
    return {ANNOTATION_WORKFLOW_NAME: config.workflow_name, ANNOTATION_TOPIC_IN: config.topic_in}


def config_map_body(config: StepConfig) -> dict[str, Any]:
    """The ConfigMap of a step: settings only, never credentials."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config.config_name,
            "namespace": config.namespace,
            "labels": step_labels(config),
            "annotations": {
                **step_annotations(config),
                ANNOTATION_CREDENTIALS_SECRET: credentials_secret_name(config.config_name),
            },
        },
        "data": {
            SUPERVISER_REQUEST_KEY: json.dumps(config.message, separators=(",", ":"), ensure_ascii=False),
            BOOTSTRAP_SERVERS_KEY: config.bootstrap_servers,
            STEP_CONFIG_KEY: config.model_dump_json(),
        },
    }


def secret_body(config: StepConfig, credentials: StepCredentials) -> dict[str, Any]:
    def encoded(value: str) -> str:
        return base64.b64encode(value.encode("utf-8")).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": credentials_secret_name(config.config_name),
            "namespace": config.namespace,
            "labels": {**step_labels(config), LABEL_STEP_CONFIG: "credentials"},
            "annotations": step_annotations(config),
        },
        "data": {
            ACCESS_KEY_ID_KEY: encoded(credentials.aws_access_key_id.get_secret_value()),
            SECRET_ACCESS_KEY_KEY: encoded(credentials.aws_secret_access_key.get_secret_value()),
            **({EXTRA_CREDENTIALS_KEY: encoded(json.dumps(credentials.revealed_extra()))} if credentials.extra else {}),
        },
    }


def _status(error: Exception) -> int | None:
    return getattr(error, "status", None)


def step_config_from_config_map(data: dict[str, str]) -> tuple[StepConfig, StepCredentials | None]:
    """The step configuration held in a ConfigMap's ``data``; credentials only when an old ConfigMap holds them."""
    if STEP_CONFIG_KEY in data:
        return StepConfig.model_validate_json(data[STEP_CONFIG_KEY]), None
    if SUPERVISER_REQUEST_KEY not in data:
        raise ValueError(f"ConfigMap has neither {STEP_CONFIG_KEY!r} nor {SUPERVISER_REQUEST_KEY!r}")
    # Written by the production controller: the verbatim message, credentials included.
    try:
        message = WorkflowMessage.model_validate_json(data[SUPERVISER_REQUEST_KEY])
        return step_config_from_message(message, data.get(BOOTSTRAP_SERVERS_KEY, ""))
    except ValidationError as error:
        # Field locations only: the message may hold credentials, so pydantic's input echo stays out.
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in error.errors()})
        raise ValueError(f"{SUPERVISER_REQUEST_KEY} is not a valid workflow message (fields: {fields})") from None


class KubernetesStepConfigStore:
    """``StepConfigStore`` on the Kubernetes API (ConfigMap + Secret per step, in the step's namespace)."""

    def __init__(self, core_api: Any, custom_api: Any = None) -> None:
        # ``core_api``: a ``kubernetes.client.CoreV1Api``; injected so tests point it at a fake API server.
        self.core_api = core_api
        # ``custom_api`` (the controller's): ``list`` finds the steps through their KafkaSources and reads each
        # ConfigMap by name, so the controller needs no list/watch on ConfigMaps and Secrets.
        self.custom_api = custom_api

    @classmethod
    def from_environment(cls) -> "KubernetesStepConfigStore":
        """In-cluster service-account credentials, or the local kubeconfig outside a cluster."""
        return cls(kubernetes_core_api())

    # -- writes ------------------------------------------------------------------------------------------------

    def put(self, namespace: str, config: StepConfig, credentials: StepCredentials) -> None:
        if config.namespace != namespace:
            raise ValueError(
                f"step {config.config_name!r} belongs to namespace {config.namespace!r}, not {namespace!r}")
        # The Secret first: a ConfigMap that exists always has its credentials next to it.
        self._create_or_replace("secret", namespace, credentials_secret_name(config.config_name),
                                secret_body(config, credentials))
        self._create_or_replace("config_map", namespace, config.config_name, config_map_body(config))
        log.info("step configuration stored", extra={"namespace": namespace, "config_name": config.config_name,
                                                      "workflow": config.workflow_name})

    def _create_or_replace(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> None:
        create = getattr(self.core_api, f"create_namespaced_{kind}")
        replace = getattr(self.core_api, f"replace_namespaced_{kind}")
        try:
            create(namespace, body)
        except Exception as error:  # kubernetes.client.ApiException; 409: exists, so this is a re-publish
            if _status(error) != 409:
                raise
            # ConfigMaps and Secrets accept an update without resourceVersion (last writer wins): a re-publish
            # is meant to overwrite whatever is there.
            replace(name, namespace, body)

    def delete(self, namespace: str, config_name: str) -> bool:
        deleted = False
        for kind, name in (("config_map", config_name), ("secret", credentials_secret_name(config_name))):
            try:
                getattr(self.core_api, f"delete_namespaced_{kind}")(name, namespace)
                deleted = True
            except Exception as error:
                if _status(error) != 404:
                    raise
        if deleted:
            log.info("step configuration deleted", extra={"namespace": namespace, "config_name": config_name})
        return deleted

    # -- reads -------------------------------------------------------------------------------------------------

    def get(self, namespace: str, config_name: str) -> tuple[StepConfig, StepCredentials]:
        try:
            config_map = self.core_api.read_namespaced_config_map(config_name, namespace)
        except Exception as error:
            if _status(error) == 404:
                raise StepConfigNotFound(f"no step configuration {config_name!r} in namespace {namespace!r}") from None
            raise
        config, inline_credentials = step_config_from_config_map(dict(config_map.data or {}))
        try:
            secret = self.core_api.read_namespaced_secret(credentials_secret_name(config_name), namespace)
        except Exception as error:
            if _status(error) != 404:
                raise
            if inline_credentials is None:
                raise StepConfigNotFound(
                    f"step configuration {config_name!r} in namespace {namespace!r} has no credentials Secret"
                ) from None
            return config, inline_credentials
        data = dict(secret.data or {})
        try:
            credentials = StepCredentials(
                aws_access_key_id=SecretStr(base64.b64decode(data[ACCESS_KEY_ID_KEY]).decode("utf-8")),
                aws_secret_access_key=SecretStr(base64.b64decode(data[SECRET_ACCESS_KEY_KEY]).decode("utf-8")),
                extra=json.loads(base64.b64decode(data[EXTRA_CREDENTIALS_KEY])) if EXTRA_CREDENTIALS_KEY in data else {},
            )
        except KeyError as missing:
            # Only the key name goes into the message, never a value.
            raise ValueError(f"credentials Secret of {config_name!r} lacks key {missing.args[0]!r}") from None
        return config, credentials

    def list(self, namespace: str | None = None) -> list[StepConfig]:
        if self.custom_api is not None:
            return self._list_through_sources(namespace)
        if namespace:
            items = self.core_api.list_namespaced_config_map(namespace, label_selector=STEP_CONFIG_SELECTOR).items
        else:
            items = self.core_api.list_config_map_for_all_namespaces(label_selector=STEP_CONFIG_SELECTOR).items
        configs = []
        for item in items:
            try:
                configs.append(step_config_from_config_map(dict(item.data or {}))[0])
            except ValueError as error:
                log.warning("unreadable step ConfigMap skipped",
                            extra={"namespace": item.metadata.namespace, "configmap": item.metadata.name,
                                   "reason": str(error)[:300]})
        return sorted(configs, key=lambda c: (c.namespace, c.config_name))

    def _list_through_sources(self, namespace: str | None) -> list[StepConfig]:
        """The steps whose KafkaSource exists (the controller lists those), each ConfigMap read by name: the
        controller's Role needs no list/watch on ConfigMaps or Secrets."""
        group, version, plural = SOURCE_API
        if namespace:
            sources = self.custom_api.list_namespaced_custom_object(group, version, namespace, plural,
                                                                    label_selector=STEP_CONFIG_SELECTOR)
        else:
            sources = self.custom_api.list_cluster_custom_object(group, version, plural,
                                                                 label_selector=STEP_CONFIG_SELECTOR)
        configs = []
        for source in sources.get("items", []):
            metadata = source.get("metadata", {})
            name = (metadata.get("annotations") or {}).get(ANNOTATION_CONFIG_NAME, "")
            if not name:
                continue
            try:
                config_map = self.core_api.read_namespaced_config_map(name, metadata.get("namespace", ""))
                configs.append(step_config_from_config_map(dict(config_map.data or {}))[0])
            except ValueError as error:
                log.warning("unreadable step ConfigMap skipped", extra={"namespace": metadata.get("namespace"),
                                                                        "configmap": name,
                                                                        "reason": str(error)[:300]})
            except Exception as error:
                if _status(error) != 404:  # a source whose configuration is gone: nothing to resume
                    raise
        return sorted(configs, key=lambda c: (c.namespace, c.config_name))


def kubernetes_api_client(host: str | None = None) -> Any:
    """An ``ApiClient``: ``host`` (no auth: tests, a local proxy), else in-cluster config, else the kubeconfig."""
    from kubernetes import client, config

    if host:
        configuration = client.Configuration(host=host)
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def kubernetes_core_api(host: str | None = None, api_client: Any = None) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api_client or kubernetes_api_client(host))
