"""Fixtures for the controller tests: the upstream KafkaSource CRD schema and a FAKE Kubernetes API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from fake_kubernetes import FakeKubernetesApiServer
from services.core.crd_schema import crd_json_schema

CRD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "crds"
KAFKA_SOURCE_CRD = CRD_DIR / "eventing-kafka-broker-v1.23.0_kafkasources.sources.knative.dev.yaml"


@pytest.fixture(scope="session")
def kafka_source_schema() -> dict[str, Any]:
    """The strict JSON Schema of ``sources.knative.dev/v1beta1`` KafkaSource (unknown fields rejected)."""
    return crd_json_schema(KAFKA_SOURCE_CRD, "v1beta1", strict=True)


@pytest.fixture
def fake_api(kafka_source_schema: dict) -> Iterator[FakeKubernetesApiServer]:
    """A FAKE Kubernetes API server that rejects KafkaSources failing the strict CRD schema (422)."""
    schemas = {("sources.knative.dev/v1beta1", "KafkaSource"): kafka_source_schema}
    with FakeKubernetesApiServer(crd_schemas=schemas) as server:
        yield server


@pytest.fixture
def kube_clients(fake_api: FakeKubernetesApiServer) -> tuple[Any, Any]:
    """(CoreV1Api, CustomObjectsApi) of the official client, pointed at the fake."""
    from kubernetes import client

    api_client = client.ApiClient(client.Configuration(host=fake_api.url))
    return client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
