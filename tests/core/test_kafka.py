import json
import time
import uuid

from confluent_kafka import Consumer, Producer

from services.core.kafka import consumer_config, producer_config, publish_json


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
