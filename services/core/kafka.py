"""Kafka client settings and helpers shared by the services (confluent-kafka / librdkafka).

Every producer, consumer and admin client of the platform gets its librdkafka configuration from
``kafka_client_config`` (through ``producer_config``, ``consumer_config`` or ``admin_config``), so that the cluster's
security settings (TLS, SASL: ``EOML_KAFKA_*``, see ``KafkaSecuritySettings``) reach every one of them.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Mapping

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import ENV_PREFIX

# librdkafka's defaults make a consumer-group join take ~23 s against our brokers; these make it ~3 s.
FAST_GROUP_SETTINGS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


class KafkaSecuritySettings(BaseSettings):
    """How every Kafka client of the platform authenticates: ``EOML_KAFKA_*``; unset = plaintext, no SASL.

    On Kubernetes the chart fills these from the Secrets named in ``kafka.net`` (the same ones the KafkaSources
    reference): the password arrives as an environment variable from a Secret, certificates as mounted files.
    """

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}KAFKA_", extra="ignore", hide_input_in_errors=True)

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str = ""
    # SecretStr: no repr, log line or validation error ever shows it; only the librdkafka config holds the value.
    sasl_password: SecretStr = SecretStr("")
    # PEM files: the CA that signed the brokers' certificates, and a client certificate + key for mutual TLS.
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @model_validator(mode="after")
    def _complete(self) -> "KafkaSecuritySettings":
        if self.uses_sasl and not (self.sasl_username and self.sasl_password.get_secret_value()):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username and sasl_password")
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ValueError("ssl_certificate_location and ssl_key_location go together (mutual TLS)")
        return self

    def librdkafka(self) -> dict[str, Any]:
        """The librdkafka properties for these settings (empty for plaintext)."""
        config: dict[str, Any] = {}
        if self.security_protocol == "PLAINTEXT":
            return config
        config["security.protocol"] = self.security_protocol
        if self.uses_sasl:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
        if self.uses_tls:
            for key, value in (("ssl.ca.location", self.ssl_ca_location),
                               ("ssl.certificate.location", self.ssl_certificate_location),
                               ("ssl.key.location", self.ssl_key_location)):
                if value:
                    config[key] = value
        return config


def kafka_client_config(bootstrap_servers: str, security: KafkaSecuritySettings | None = None,
                        **overrides: Any) -> dict[str, Any]:
    """The base librdkafka configuration of every Kafka client of the platform: the brokers and the security
    settings (from ``EOML_KAFKA_*`` unless given), then ``overrides``. Never log the result: it holds the password."""
    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers}
    config.update((security or KafkaSecuritySettings()).librdkafka())
    config.update(overrides)
    return config


def producer_config(bootstrap_servers: str, security: KafkaSecuritySettings | None = None,
                    **overrides: Any) -> dict[str, Any]:
    return kafka_client_config(bootstrap_servers, security, **{
        "enable.idempotence": True,  # no duplicates from producer retries
        "acks": "all",
        "linger.ms": 5,
        **overrides,
    })


def consumer_config(bootstrap_servers: str, group_id: str, security: KafkaSecuritySettings | None = None,
                    **overrides: Any) -> dict[str, Any]:
    return kafka_client_config(bootstrap_servers, security, **{
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        # Offsets are committed by hand after the record was handled (at-least-once, nothing lost).
        "enable.auto.commit": False,
        **FAST_GROUP_SETTINGS,
        **overrides,
    })


def admin_config(bootstrap_servers: str, security: KafkaSecuritySettings | None = None,
                 **overrides: Any) -> dict[str, Any]:
    return kafka_client_config(bootstrap_servers, security, **overrides)


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


def ensure_topics(bootstrap_servers: str, topics: list[str], partitions: int = 1, timeout_s: float = 15.0,
                  replication_factor: int = -1) -> None:
    """Create the topics that do not exist yet (an admin call: nothing relies on a broker auto-creating topics;
    replication factor -1 = the cluster's default.replication.factor).
    Raises ``RuntimeError`` naming the first topic that could not be created (already existing ones are fine)."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic

    wanted = sorted(set(topics))
    if not wanted:
        return
    admin = AdminClient(admin_config(bootstrap_servers))
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
                                   for t in wanted],
                                  request_timeout=timeout_s)
    for topic, future in futures.items():
        try:
            future.result(timeout_s)
        except Exception as error:  # noqa: BLE001 - KafkaException or a timeout
            kafka_error = error.args[0] if error.args else None
            if getattr(kafka_error, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"topic {topic!r} not created: {error}"[:300]) from None
