"""Which offsets a dispatcher may commit: the contiguous finished prefix of each partition.

Modelled on eventing-kafka-broker ``data-plane/dispatcher/.../impl/consumer/OffsetManager.java``: records finish out
of order (unordered dispatch), but an offset is committed only once every earlier offset of its partition has
finished (a bit set, ``nextClearBit``); "finished" = delivered, dead-lettered, OR the dead-letter sink failed (the
record is then gone from the group: ``RecordDispatcherImpl.onDeadLetterSinkFailure``). The dispatcher commits what
this allows every ``auto.commit.interval.ms`` (5 s), synchronously when partitions are revoked, and on close.
"""

from __future__ import annotations

import threading


class OffsetTracker:
    """Per partition: the next offset to commit, and the finished offsets beyond it. Thread-safe (deliveries finish
    on their own threads; the consumer thread commits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[int, int] = {}
        self._finished: dict[int, set[int]] = {}
        self._committed: dict[int, int] = {}

    def started(self, partition: int, offset: int) -> None:
        """A record was handed to delivery. The first of a partition marks where its uncommitted range starts (a
        consumer resumes at the committed position, and records of a partition arrive in order)."""
        with self._lock:
            self._next.setdefault(partition, offset)
            self._finished.setdefault(partition, set())

    def finished(self, partition: int, offset: int) -> None:
        with self._lock:
            if partition in self._next and offset >= self._next[partition]:
                self._finished[partition].add(offset)

    def committable(self, partitions: set[int] | None = None) -> dict[int, int]:
        """The offset to commit (the next one to consume) per partition whose finished prefix grew since the last
        commit; ``mark_committed`` once the broker took it."""
        result: dict[int, int] = {}
        with self._lock:
            for partition, position in self._next.items():
                if partitions is not None and partition not in partitions:
                    continue
                finished = self._finished[partition]
                while position in finished:
                    finished.remove(position)
                    position += 1
                self._next[partition] = position
                if self._committed.get(partition) != position:
                    result[partition] = position
        return result

    def mark_committed(self, offsets: dict[int, int]) -> None:
        with self._lock:
            self._committed.update(offsets)

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked: their uncommitted records belong to whoever gets the partition next."""
        with self._lock:
            for partition in partitions:
                self._next.pop(partition, None)
                self._finished.pop(partition, None)
                self._committed.pop(partition, None)

    def committed(self) -> dict[int, int]:
        with self._lock:
            return dict(self._committed)
