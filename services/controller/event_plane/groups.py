"""Consumer-group lifecycle of a KafkaSource, through the Kafka admin and consumer APIs (tansu supports them:
DeleteGroups, OffsetCommit without a subscription, OffsetFetch).

Modelled on eventing-kafka-broker: ``control-plane/pkg/reconciler/consumergroup/consumergroup.go`` (``FinalizeKind``
-> ``deleteConsumerGroupMetadata`` -> admin ``DeleteConsumerGroup``: deleting a KafkaSource deletes its group and
so its committed offsets; up to 5 tries, then the finalizer is cleared anyway) and
``control-plane/pkg/kafka/offset/offsets.go`` (``reconcileInitialOffset``: ``latest`` commits the newest offset of
each partition that has no committed offset yet; ``earliest`` leaves them uncommitted and the consumer starts with
``auto.offset.reset=earliest``). Offsets committed for a group before its source exists are used as they are: that
is how positions can be carried over a re-creation (``commit_group_offsets``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from services.core.kafka import admin_config, consumer_config

log = logging.getLogger(__name__)

DELETE_TRIES = 5  # consumergroup.go


def _offset_consumer(bootstrap_servers: str, group: str) -> Any:
    from confluent_kafka import Consumer

    return Consumer(consumer_config(bootstrap_servers, group, **{"client.id": f"eoml-offsets-{group}"}))


def partitions_of(bootstrap_servers: str, topic: str, timeout_s: float = 10.0) -> list[int]:
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient(admin_config(bootstrap_servers)).list_topics(topic, timeout=timeout_s)
    described = metadata.topics.get(topic)
    if described is None or described.error is not None:
        return []
    return sorted(described.partitions)


def committed_group_offsets(bootstrap_servers: str, group: str, topic: str,
                            timeout_s: float = 10.0) -> dict[int, int]:
    """The group's committed position per partition of ``topic`` (partitions without one are left out)."""
    from confluent_kafka import TopicPartition

    partitions = partitions_of(bootstrap_servers, topic, timeout_s)
    if not partitions:
        return {}
    consumer = _offset_consumer(bootstrap_servers, group)
    try:
        answer = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout_s)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in answer if tp.offset >= 0}


def commit_group_offsets(bootstrap_servers: str, group: str, topic: str, offsets: Mapping[int, int],
                         timeout_s: float = 10.0) -> None:
    """Commit ``offsets`` (partition -> next offset to consume) for ``group``, e.g. positions carried over from a
    source that is being re-created. The group must have no active member (its dispatcher not yet started)."""
    from confluent_kafka import TopicPartition

    if not offsets:
        return
    consumer = _offset_consumer(bootstrap_servers, group)
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in sorted(offsets.items())],
                        asynchronous=False)
    finally:
        consumer.close()


def commit_latest_where_none(bootstrap_servers: str, group: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """offsets.go ``reconcileInitialOffset`` for ``initialOffset: latest``: every partition without a committed
    offset gets the current end offset committed; partitions with one keep it. Returns what was committed."""
    from confluent_kafka import TopicPartition

    partitions = partitions_of(bootstrap_servers, topic, timeout_s)
    consumer = _offset_consumer(bootstrap_servers, group)
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout_s)
        missing = [tp.partition for tp in committed if tp.offset < 0]
        newest = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1] for p in missing}
        if newest:
            consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in newest.items()], asynchronous=False)
    finally:
        consumer.close()
    return newest


def delete_consumer_group(bootstrap_servers: str, group: str, timeout_s: float = 10.0) -> bool:
    """consumergroup.go ``DeleteConsumerGroup``: True once the broker deleted the group (or it did not exist);
    False after ``DELETE_TRIES`` failures (logged; the source is gone anyway, as upstream clears its finalizer)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(admin_config(bootstrap_servers))
    error_text = ""
    for attempt in range(1, DELETE_TRIES + 1):
        try:
            admin.delete_consumer_groups([group], request_timeout=timeout_s)[group].result()
            log.info("consumer group deleted", extra={"consumer_group": group})
            return True
        except KafkaException as error:
            code = error.args[0].code() if error.args and hasattr(error.args[0], "code") else None
            if code == KafkaError.GROUP_ID_NOT_FOUND:
                return True
            error_text = str(error)[:300]
        except Exception as error:  # an admin call that did not get an answer: retried like a refused one
            error_text = f"{type(error).__name__}: {error}"[:300]
        time.sleep(0.2 * attempt)
    log.error("consumer group not deleted", extra={"consumer_group": group, "error": error_text})
    return False
