"""Batched, pipelined inference over a stream of work items, in input order.

Each ``Work`` brings k >= 1 model-input rows (a patch: 1 row; a UC5 tile: 25 crops; a features file: N vectors).
Rows of consecutive items are packed into batches of ``batch_size`` rows, up to ``in_flight`` batches are at the
server at once, and each item comes back with its k output rows once they are all in. When none of this call's
batches is outstanding (at the start, or when input arrives slower than the server infers), the rows at hand are
sent at once as a smaller batch, so the server never waits for a batch to fill. Items (and rejections,
which need no inference) come out in the order they went in, so a consumer can write one input unit after the
other. While the server works on batch n, the calling thread already reads and preprocesses batch n + 1.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import numpy as np

from services.core.metrics import in_current_context
W = TypeVar("W")
R = TypeVar("R")


@dataclass(slots=True)
class Work(Generic[W]):
    """Rows for the model plus whatever the result writer needs (``context``)."""

    rows: np.ndarray | None  # [k, *input dims]; released once sent
    context: W
    row_count: int = 0

    def __post_init__(self) -> None:
        if self.rows is None or self.rows.ndim < 1 or self.rows.shape[0] < 1:
            raise ValueError("a work item needs at least one input row")
        self.row_count = int(self.rows.shape[0])


@dataclass(slots=True)
class _Slot:
    item: Any  # a Work or a pass-through item
    needs: int  # output rows still missing
    outputs: np.ndarray | None = None
    filled: int = 0


@dataclass(slots=True)
class _Batch:
    future: Future[np.ndarray]
    parts: list[tuple[_Slot, int, int]] = field(default_factory=list)  # (slot, first row in slot, rows)


def batched_inference(
    items: Iterable[Work[W] | R],
    infer: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    in_flight: int,
    executor: Executor | None = None,
) -> Iterator[tuple[Work[W], np.ndarray] | R]:
    """(work, outputs [k, ...]) per ``Work`` and every other item unchanged, all in input order.

    ``infer`` maps rows [n, ...] to outputs [n, ...] and runs on ``executor`` (shared by a process's steps, so
    that its threads, and the clients they hold, live on), or on a pool of this call's own. At most
    ``in_flight`` batches of this call are outstanding at once. ``infer``'s exceptions propagate after the
    requests already sent have finished, so no request outlives the call.
    """
    if batch_size < 1 or in_flight < 1:
        raise ValueError("batch_size and in_flight must be >= 1")
    slots: deque[_Slot] = deque()
    batches: deque[_Batch] = deque()
    pending: list[tuple[_Slot, int, np.ndarray]] = []  # rows not yet sent: (slot, first row in slot, rows)
    pending_rows = 0
    own_executor = executor is None
    pool: Executor = executor if executor is not None else ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="infer")

    def send(rows_wanted: int) -> None:
        nonlocal pending_rows
        chunks: list[np.ndarray] = []
        parts: list[tuple[_Slot, int, int]] = []
        taken = 0
        while taken < rows_wanted:
            slot, first, rows = pending[0]
            use = min(rows.shape[0], rows_wanted - taken)
            chunks.append(rows[:use])
            parts.append((slot, first, use))
            taken += use
            if use == rows.shape[0]:
                pending.pop(0)
            else:
                pending[0] = (slot, first + use, rows[use:])
        pending_rows -= taken
        batch_rows = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        batches.append(_Batch(pool.submit(in_current_context(infer), np.ascontiguousarray(batch_rows)), parts))

    def finish_oldest() -> None:
        batch = batches.popleft()
        outputs = batch.future.result()
        offset = 0
        for slot, first, count in batch.parts:
            if slot.outputs is None:
                slot.outputs = np.empty((slot.item.row_count, *outputs.shape[1:]), dtype=outputs.dtype)
            slot.outputs[first:first + count] = outputs[offset:offset + count]
            offset += count
            slot.filled += count
            slot.needs -= count

    def ready() -> Iterator[tuple[Work[W], np.ndarray] | R]:
        while slots and slots[0].needs == 0:
            slot = slots.popleft()
            if isinstance(slot.item, Work):
                yield slot.item, slot.outputs  # type: ignore[misc]
            else:
                yield slot.item

    try:
        for item in items:
            if not isinstance(item, Work):
                slots.append(_Slot(item, needs=0))
                yield from ready()
                continue
            slot = _Slot(item, needs=item.row_count)
            slots.append(slot)
            assert item.rows is not None
            pending.append((slot, 0, item.rows))
            item.rows = None  # the batch copies what it needs; nothing keeps a patch's input alive after that
            pending_rows += slot.needs
            while pending_rows >= batch_size:
                if len(batches) >= in_flight:
                    finish_oldest()
                    yield from ready()
                send(batch_size)
            while batches and batches[0].future.done():
                finish_oldest()
                yield from ready()
            if pending_rows and not batches:
                # The server has nothing of this step to work on (the start, or input slower than inference):
                # send what is there rather than let it wait for a full batch.
                send(pending_rows)
        if pending_rows:
            send(pending_rows)
        while batches:
            finish_oldest()
            yield from ready()
        yield from ready()
    finally:
        # On an error or an early stop, requests already sent finish (they cannot be recalled) before returning.
        if own_executor:
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            for batch in batches:
                batch.future.cancel()
            wait([batch.future for batch in batches])
