"""Fixtures shared by every test package: real protocol servers on loopback."""

from __future__ import annotations

from typing import Iterator

import os

import pytest

# Every test stack runs S3 (moto) on plain http on loopback: the local platform's S3 endpoint policy
# (services/core/s3_endpoint_policy.py). tests/security checks the production policy with explicit settings.
os.environ.setdefault("EOML_S3_POLICY_ALLOW_HTTP", "true")
os.environ.setdefault("EOML_S3_POLICY_ALLOW_PRIVATE", "true")

from services.local_platform.infra import TansuBroker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A real Kafka-protocol broker (tansu) for the whole session; use unique topic and group names per test."""
    log_path = tmp_path_factory.mktemp("tansu") / "broker.log"
    with TansuBroker(log_path=log_path) as broker:
        yield broker
