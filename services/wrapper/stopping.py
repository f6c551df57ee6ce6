"""What a step meets when its Wrapper process is stopping: ``ProcessStopping``, a transient failure.

Once shutdown has waited ``SHUTDOWN_TIMEOUT_S`` for running steps, the shared inference pool stops taking
requests; a step that then asks for inference gets ``ProcessStopping`` (not the executor's ``RuntimeError``), which
``pipeline.is_transient`` counts as transient: nothing is put on record (no dead-letter record, no failed marker,
no CRITICAL), the delivery is answered 503 or not at all, Kafka redelivers it and the next pod writes the same
bytes into the same run folder.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ProcessStopping(Exception):
    """The Wrapper process is stopping: the step is to be delivered again, to this pod's successor."""


class StoppableExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose ``submit`` after ``shutdown`` raises ``ProcessStopping``."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        try:
            return super().submit(fn, *args, **kwargs)
        except RuntimeError:
            # The stock executor raises RuntimeError after shutdown (its own or the interpreter's).
            raise ProcessStopping("the Wrapper is stopping: the step will be delivered again") from None
