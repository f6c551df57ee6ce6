"""Consumer positions of a step that outlive its source: re-publication never replays the input topic.

Deleting a KafkaSource deletes its consumer group: the source owns an internal ConsumerGroup object
(eventing-kafka-broker v1.23 ``control-plane/pkg/reconciler/source/source.go``, ``kmeta.NewControllerRef``) whose
finalizer deletes the Kafka group (``control-plane/pkg/reconciler/consumergroup/consumergroup.go`` ``FinalizeKind``
-> ``deleteConsumerGroupMetadata``), and step sources start a new group at ``earliest``. So
without help, a stop-then-republish (same group, deleted in between) and a republish under a new workflow name (a new
group, ``eoml-<workflow>-<topic>``) would deliver every retained record of the topic again.

The positions are kept in Kafka itself, in a deterministic per-topic group that no consumer ever joins:
``eoml-positions-<dns1123(topic)>``. Before a step's source is deleted the controller copies the step group's
committed offsets there (``save``); before a source is created it commits them for the step's group (``seed``), so
the new source starts where the old one stopped instead of at ``initialOffset``. Kafka's own offset store needs no
volume, backup or schema of ours, and it is bounded the same way as every consumer group: offsets of a group with no
members expire ``offsets.retention.minutes`` after it became empty (KIP-211; 7 days by default); after that a
re-created source starts at ``initialOffset`` again. Offsets below the topic's log start (retention deleted those
records) are harmless: the consumer resets to the earliest record still there.

Known window: the source keeps consuming until it is deleted, so records whose offsets it commits between ``save``
and its deletion are delivered again after a re-publication (at least once; the Wrapper answers a redelivered
completed input as a duplicate).

Through the admin API (``ListConsumerGroupOffsets``, ``AlterConsumerGroupOffsets``). tansu 0.6, the local broker,
implements both, but drops the connection on an alter of a group that was deleted before (the offsets are stored
nevertheless); there, and wherever the admin call fails, the offsets are committed by a consumer that joins no group
(the same ``OffsetCommit``, which tansu answers).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

from services.core.kafka import admin_config, consumer_config
from services.core.step_config import dns1123_name

from .wiring import CONSUMER_GROUP_PREFIX

log = logging.getLogger(__name__)

Offsets = dict[int, int]  # partition -> next offset to consume


def positions_group(topic: str) -> str:
    """The group that holds a topic's step positions between two sources: ``eoml-positions-<dns1123(topic)>``."""
    return f"{CONSUMER_GROUP_PREFIX}-positions-{dns1123_name(topic)}"


class ConsumerPositions:
    """Reads and commits consumer-group offsets through the Kafka admin API (bounded by ``timeout_s`` per call)."""

    def __init__(self, bootstrap_servers: str, timeout_s: float = 15.0, admin: Any = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.timeout_s = timeout_s
        self._admin = admin

    def _client(self) -> Any:
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient(admin_config(self.bootstrap_servers))
        return self._admin

    def _partitions(self, topic: str) -> list[int]:
        metadata = self._client().list_topics(topic, timeout=self.timeout_s)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None:
            return []  # no such topic yet: nothing was consumed
        return sorted(described.partitions)

    def committed(self, group: str, topic: str) -> Offsets:
        """The group's committed offsets on ``topic`` (partitions without a commit left out)."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        partitions = self._partitions(topic)
        if not partitions:
            return {}
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
        futures = self._client().list_consumer_group_offsets([request], request_timeout=self.timeout_s)
        answer = futures[group].result(self.timeout_s)
        return {tp.partition: tp.offset for tp in answer.topic_partitions
                if tp.topic == topic and tp.error is None and tp.offset >= 0}

    def commit(self, group: str, topic: str, offsets: Offsets) -> None:
        """Commit ``offsets`` for ``group`` (which must have no active member: a deleted or never started source)."""
        if not offsets:
            return
        from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition

        partitions = [TopicPartition(topic, p, o) for p, o in sorted(offsets.items())]
        try:
            futures = self._client().alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, partitions)],
                                                                  request_timeout=self.timeout_s)
            answer = futures[group].result(self.timeout_s)
        except KafkaException as error:
            # tansu 0.6 stores the offsets of a group deleted before but then drops the connection instead of
            # answering (its storage looks the deleted group up). A consumer that joins no group commits the same
            # OffsetCommit request and gets an answer: the fallback, for any broker that fails the admin call.
            log.warning("offset commit through the admin API failed, committing as a consumer",
                        extra={"consumer_group": group, "topic": topic, "error": str(error)[:300]})
            self._admin = None  # its connection was dropped: the next call starts a fresh client
            self._commit_as_consumer(group, partitions)
            return
        failed = [tp for tp in answer.topic_partitions if tp.error is not None]
        if failed:
            raise RuntimeError(f"offsets of {group!r} on {topic!r} not committed: {failed[0].error}"[:300])

    def _commit_as_consumer(self, group: str, partitions: list[Any]) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(consumer_config(self.bootstrap_servers, group,
                                            **{"socket.timeout.ms": int(self.timeout_s * 1000)}))
        try:
            answer = consumer.commit(offsets=partitions, asynchronous=False)
        finally:
            consumer.close()
        failed = [tp for tp in answer or [] if tp.error is not None]
        if failed:
            raise RuntimeError(f"offsets of {group!r} not committed: {failed[0].error}"[:300])

    def save(self, group: str, topic: str) -> Offsets:
        """Before the source of ``group`` is deleted: keep its positions in the topic's positions group (never moving
        one back). Returns what the positions group holds now. ``PositionsUnavailable`` when Kafka fails."""
        with _kafka_trouble_is_transient(topic):
            return self._save(group, topic)

    def seed(self, group: str, topic: str) -> Offsets:
        """Before a source of ``group`` is created: commit the topic's kept positions for it, where they are ahead of
        what the group has. Returns the group's positions (empty: the source starts at ``initialOffset``).
        ``PositionsUnavailable`` when Kafka fails."""
        with _kafka_trouble_is_transient(topic):
            return self._seed(group, topic)

    def _save(self, group: str, topic: str) -> Offsets:
        kept = self.committed(positions_group(topic), topic)
        merged = _ahead(kept, self.committed(group, topic))
        if merged != kept:
            self.commit(positions_group(topic), topic, merged)
        log.info("consumer positions saved", extra={"consumer_group": group, "topic": topic,
                                                    "positions_group": positions_group(topic), "offsets": merged})
        return merged

    def _seed(self, group: str, topic: str) -> Offsets:
        own = self.committed(group, topic)
        wanted = _ahead(own, self.committed(positions_group(topic), topic))
        if wanted != own:
            self.commit(group, topic, wanted)
            log.info("consumer positions restored", extra={"consumer_group": group, "topic": topic,
                                                           "offsets": wanted})
        return wanted


class PositionsUnavailable(ConnectionError):
    """Kafka failed while positions were read or committed: a temporary failure, the message is handled again."""


@contextmanager
def _kafka_trouble_is_transient(topic: str) -> Iterator[None]:
    from confluent_kafka import KafkaException

    try:
        yield
    except (KafkaException, RuntimeError) as error:
        raise PositionsUnavailable(f"consumer positions of {topic!r}: {str(error)[:200]}") from None


def _ahead(base: Offsets, other: Offsets) -> Offsets:
    """Per partition the further of the two positions."""
    return {p: max(base.get(p, -1), other.get(p, -1)) for p in sorted(set(base) | set(other))}
