"""Kafka helpers against a real broker (tansu), and the one function that builds every client's configuration."""

import json
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from pydantic import ValidationError

from services.core.kafka import (
    KafkaSecuritySettings,
    admin_config,
    consumer_config,
    ensure_topics,
    kafka_client_config,
    producer_config,
    publish_json,
)


def test_publish_json_is_acknowledged_and_consumable(kafka_broker):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    producer = Producer(producer_config(kafka_broker.bootstrap_servers))
    publish_json(producer, topic, {"folder": "a/b", "n": 1}, headers={"ce-type": "x"})

    consumer = Consumer(consumer_config(kafka_broker.bootstrap_servers, f"g-{topic}"))
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    message = None
    while message is None and time.monotonic() < deadline:
        candidate = consumer.poll(0.5)
        if candidate is not None and not candidate.error():
            message = candidate
    consumer.close()
    assert message is not None, "record never arrived"
    assert message.key() == b"key"
    assert json.loads(message.value()) == {"folder": "a/b", "n": 1}
    assert dict(message.headers()) == {"ce-type": b"x"}


# -- security settings: one function builds the config of every client ------------------------------------------
# No SASL/TLS-enabled broker runs here (tansu listens in plaintext): these tests check the configuration each client
# gets and that librdkafka accepts it (it validates properties and files when a client is constructed).

SASL_PASSWORD = "kafka-sasl-password-4711"


@pytest.fixture
def sasl_ssl_env(monkeypatch, tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text(_self_signed_ca_pem())
    for name, value in {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512",
                        "SASL_USERNAME": "eoml", "SASL_PASSWORD": SASL_PASSWORD,
                        "SSL_CA_LOCATION": str(ca)}.items():
        monkeypatch.setenv(f"EOML_KAFKA_{name}", value)
    return ca


def test_plaintext_by_default_adds_nothing(monkeypatch) -> None:
    for name in ("SECURITY_PROTOCOL", "SASL_USERNAME", "SASL_PASSWORD"):
        monkeypatch.delenv(f"EOML_KAFKA_{name}", raising=False)
    assert kafka_client_config("k:9092") == {"bootstrap.servers": "k:9092"}


def test_security_settings_reach_every_client_config(sasl_ssl_env) -> None:
    expected = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "eoml",
                "sasl.password": SASL_PASSWORD, "ssl.ca.location": str(sasl_ssl_env)}
    configs = {"producer": producer_config("k:9093"), "consumer": consumer_config("k:9093", "g"),
               "admin": admin_config("k:9093")}
    for name, config in configs.items():
        assert {k: config.get(k) for k in expected} == expected, name
    # The client-specific settings stay, and librdkafka accepts every one of them.
    assert configs["producer"]["enable.idempotence"] is True and configs["consumer"]["group.id"] == "g"
    Producer(configs["producer"]).flush(0)
    Consumer(configs["consumer"]).close()
    AdminClient(configs["admin"])


def test_the_password_never_shows_in_the_settings_repr_or_errors(monkeypatch) -> None:
    settings = KafkaSecuritySettings(security_protocol="SASL_PLAINTEXT", sasl_username="u",
                                     sasl_password=SASL_PASSWORD)
    assert SASL_PASSWORD not in repr(settings) and SASL_PASSWORD not in str(settings.model_dump())
    with pytest.raises(ValidationError) as error:
        KafkaSecuritySettings(security_protocol="SASL_SSL", sasl_username="", sasl_password=SASL_PASSWORD)
    assert SASL_PASSWORD not in str(error.value)
    with pytest.raises(ValidationError):
        KafkaSecuritySettings(security_protocol="SSL", ssl_certificate_location="/c.pem")  # key missing


def test_tls_only_sets_no_sasl_properties() -> None:
    config = kafka_client_config("k:9093", KafkaSecuritySettings(security_protocol="SSL", ssl_ca_location="/ca"))
    assert config == {"bootstrap.servers": "k:9093", "security.protocol": "SSL", "ssl.ca.location": "/ca"}


def test_ensure_topics_creates_explicitly_and_tolerates_existing(kafka_broker) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_broker.bootstrap_servers, [topic, f"{topic}.dlq"])
    ensure_topics(kafka_broker.bootstrap_servers, [f"{topic}.dlq"])  # again: fine
    listed = AdminClient(admin_config(kafka_broker.bootstrap_servers)).list_topics(timeout=10).topics
    assert {topic, f"{topic}.dlq"} <= set(listed)


def _self_signed_ca_pem() -> str:
    """A throwaway CA certificate: librdkafka reads and parses ``ssl.ca.location`` when a client is built."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eoml-test-ca")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(datetime.datetime(2025, 1, 1))
                   .not_valid_after(datetime.datetime(2035, 1, 1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def test_every_kafka_client_of_the_services_is_configured_by_the_one_function() -> None:
    """Static check over services/: each Producer/Consumer/AdminClient is built from producer_config,
    consumer_config or admin_config (so TLS/SASL reaches it), never from a dict of its own."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "services"
    builders = {"producer_config", "consumer_config", "admin_config", "kafka_client_config"}
    clients, offenders = 0, []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in {
                    "Producer", "Consumer", "AdminClient"}:
                clients += 1
                argument = node.args[0] if node.args else None
                name = getattr(getattr(argument, "func", None), "id", "") if isinstance(argument, ast.Call) else ""
                if name not in builders:
                    offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert clients >= 8  # the controller, the event plane, the Wrapper, the local stack and demo
    assert offenders == []
