"""Kafka client settings and helpers shared by the services (confluent-kafka / librdkafka)."""

from __future__ import annotations

import json
from typing import Any, Mapping

# librdkafka's defaults make a consumer-group join take ~23 s against our brokers; these make it ~3 s.
FAST_GROUP_SETTINGS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def producer_config(bootstrap_servers: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "enable.idempotence": True,  # no duplicates from producer retries
        "acks": "all",
        "linger.ms": 5,
    }
    config.update(overrides)
    return config


def consumer_config(bootstrap_servers: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        # Offsets are committed by hand after the record was handled (at-least-once, nothing lost).
        "enable.auto.commit": False,
        **FAST_GROUP_SETTINGS,
    }
    config.update(overrides)
    return config


def encode_json(value: Mapping[str, Any] | list[Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def publish_json(producer: Any, topic: str, value: Mapping[str, Any], key: str = "key",
                 headers: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> None:
    """Produce one JSON record and wait until the broker acknowledged it (raises on failure)."""
    errors: list[Any] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    producer.produce(
        topic,
        key=key.encode("utf-8"),
        value=encode_json(value),
        headers=[(k, v.encode("utf-8")) for k, v in (headers or {}).items()],
        on_delivery=on_delivery,
    )
    remaining = producer.flush(timeout_s)
    if remaining:
        raise TimeoutError(f"{remaining} record(s) to {topic!r} not acknowledged within {timeout_s} s")
    if errors:
        raise RuntimeError(f"publishing to {topic!r} failed: {errors[0]}")


def poll_record(consumer: Any, timeout_s: float, log: Any, topic: str) -> Any:
    """The next record, or None (nothing yet, or an error that was logged). A topic nobody has written to yet is
    normal at the start of a workflow, so that error is not even logged."""
    from confluent_kafka import KafkaError

    message = consumer.poll(timeout_s)
    if message is None:
        return None
    error = message.error()
    if error is not None:
        if error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.warning("consumer error", extra={"topic": topic, "error": str(error)})
        return None
    return message
