"""Helpers for the platform tests: unique workflow plans, reading topics and buckets back."""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

from services.local_platform.demo import EventCollector, s3_client
from services.local_platform.stack import PlatformState
from services.local_platform.workflows import WorkflowPlan, demo_workflows, sample_patch_names


def plans(kinds: list[str], patches: int = 3, offset: int = 0) -> list[WorkflowPlan]:
    run_id = secrets.token_hex(3)
    names = sample_patch_names()[offset: offset + patches]
    return demo_workflows(run_id, f"eoml-test-{run_id}", names, kinds)


def collector_for(state: PlatformState, workflows: list[WorkflowPlan]) -> EventCollector:
    return EventCollector(state.bootstrap_servers, state.notify_topic, [t for p in workflows for t in p.topics],
                          {p.name for p in workflows}).start()


def records_on(collector: EventCollector, topic: str) -> list[Any]:
    with collector.changed:
        return [r.value for r in collector.records if r.topic == topic]


def wait_for(collector: EventCollector, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    if not collector.wait(predicate, timeout_s):
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def count_records(bootstrap_servers: str, topics: list[str], idle_s: float = 3.0, timeout_s: float = 60.0) -> dict[str, int]:
    """How many records each topic holds, read from the beginning by partition assignment (no consumer group)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from services.core.kafka import consumer_config

    consumer = Consumer(consumer_config(bootstrap_servers, f"test-count-{secrets.token_hex(4)}"))
    counts = dict.fromkeys(topics, 0)
    try:
        metadata = consumer.list_topics(timeout=10)
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for topic in topics
                         if topic in metadata.topics for partition in metadata.topics[topic].partitions])
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            counts[message.topic()] += 1
            last = time.monotonic()
    finally:
        consumer.close()
    return counts


def keys_under(state: PlatformState, bucket: str, prefix: str) -> list[str]:
    client = s3_client(state)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(entry["Key"] for entry in page.get("Contents", []))
    return sorted(keys)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
