"""Fixtures shared by every test package: real protocol servers on loopback."""

from __future__ import annotations

from typing import Iterator

import pytest

from services.local_platform.infra import TansuBroker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A real Kafka-protocol broker (tansu) for the whole session; use unique topic and group names per test."""
    log_path = tmp_path_factory.mktemp("tansu") / "broker.log"
    with TansuBroker(log_path=log_path) as broker:
        yield broker
