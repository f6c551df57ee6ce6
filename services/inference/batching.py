"""Scheduling requests onto the instances of one model version, with Triton's dynamic batching.

Everything here runs on the event-loop thread except :func:`execute_batch`, which runs on the
chosen instance's own worker thread and hands its result back with ``call_soon_threadsafe``.

Dynamic batching (``dynamic_batching { ... }`` and max_batch_size > 0), as Triton's dynamic batcher:
- requests queue in arrival order; when an instance is free, the batch is the longest prefix of the
  queue whose rows fit the cap (the largest preferred batch size when preferred sizes are given,
  else max_batch_size) and whose non-batch shapes match the first request's;
- the batch is sent at once when it reaches the cap, cannot grow (the next request does not fit),
  or when a preferred size was formed (the largest one formed is sent);
- otherwise the batcher waits until the oldest request has been queued for
  ``max_queue_delay_microseconds``, then sends what it has, up to max_batch_size (0 = send at once);
- batches run concurrently, one per free instance.
Without dynamic batching (or with max_batch_size 0), each request runs alone on the next free instance.

The queue delay is kept to the microsecond (:class:`DeadlineTimer`): the event loop's own timers
round up to whole milliseconds, ten times the 100 us a tiny model's config asks for.

The queue is bounded by ``dynamic_batching.default_queue_policy.max_queue_size`` when set, else by the
server default (``--default-max-queue-size``); 0 is unbounded, as in Triton. A request that finds a
bounded queue full is rejected at once with UNAVAILABLE (HTTP 503) and never waits. When the queue
delay runs out before a preferred size forms, the batch takes the queued requests up to
max_batch_size, past the largest preferred size, as Triton's dynamic batcher does.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from tritonclient.grpc import model_config_pb2

from .protocol import ErrorKind, InferenceServerError, unavailable
from .runtime import OnnxInstance
from .stats import RequestTimings, VersionStatistics

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    max_batch_size: int  # 0: requests carry no batch dimension
    dynamic: bool
    preferred_batch_sizes: frozenset[int]
    batch_cap: int  # largest batch the batcher forms: max preferred size, else max_batch_size
    max_queue_delay_s: float
    max_queue_size: int  # 0: unbounded

    @classmethod
    def from_config(
        cls, config: model_config_pb2.ModelConfig, instance_count: int, server_default_queue_size: int = 0
    ) -> "BatchingPolicy":
        dynamic = config.HasField("dynamic_batching") and config.max_batch_size > 0
        settings = config.dynamic_batching
        preferred = frozenset(size for size in settings.preferred_batch_size if size > 0) if dynamic else frozenset()
        queue_size = settings.default_queue_policy.max_queue_size if dynamic else 0
        if queue_size <= 0:
            queue_size = server_default_queue_size  # 0: unbounded, as Triton's max_queue_size 0 is
        return cls(
            max_batch_size=config.max_batch_size,
            dynamic=dynamic,
            preferred_batch_sizes=preferred,
            batch_cap=max(preferred) if preferred else max(1, config.max_batch_size),
            max_queue_delay_s=settings.max_queue_delay_microseconds / 1e6 if dynamic else 0.0,
            max_queue_size=queue_size,
        )


@dataclass(slots=True, eq=False)
class QueuedRequest:
    feeds: dict[str, np.ndarray]
    rows: int  # batch rows (1 for a model without batch dimension)
    shape_key: Any  # requests batch together only when their keys are equal
    future: asyncio.Future
    deadline_ns: int  # time.monotonic_ns() at which its queue delay is over
    enqueued_ns: int  # perf_counter_ns(), for statistics
    dispatched_ns: int = 0


@dataclass(slots=True)
class ExecutedRequest:
    outputs: dict[str, np.ndarray]
    timings: RequestTimings


def _to_bytes_array(array: np.ndarray) -> np.ndarray:
    """ORT returns string tensors as ``str`` objects; the protocol's BYTES are ``bytes``."""
    converted = np.empty(array.shape, dtype=np.object_)
    flat = converted.reshape(-1)
    for index, item in enumerate(array.reshape(-1)):
        flat[index] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return converted


def execute_batch(
    instance: OnnxInstance, batch: list[QueuedRequest], batched: bool
) -> tuple[list[dict[str, np.ndarray]], int, int, int]:
    """Concatenate the requests' inputs, run the session, split the outputs back (worker thread).

    Returns the outputs per request and the input/infer/output durations in nanoseconds.
    """
    started = time.perf_counter_ns()
    if len(batch) == 1:
        feeds = batch[0].feeds
    else:
        feeds = {name: np.concatenate([request.feeds[name] for request in batch]) for name in batch[0].feeds}
    inputs_ready = time.perf_counter_ns()
    results = instance.run(feeds)
    inferred = time.perf_counter_ns()
    names = instance.output_names
    results = [_to_bytes_array(array) if array.dtype == np.object_ else array for array in results]
    if len(batch) == 1:
        per_request = [dict(zip(names, results))]
    else:
        total_rows = sum(request.rows for request in batch)
        for name, array in zip(names, results):
            if not batched or array.ndim == 0 or array.shape[0] != total_rows:
                raise InferenceServerError(
                    ErrorKind.INTERNAL,
                    f"output '{name}' has shape {list(array.shape)}: its first dimension should be the batch "
                    f"size {total_rows}",
                )
        per_request = []
        offset = 0
        for request in batch:
            end = offset + request.rows
            per_request.append({name: array[offset:end] for name, array in zip(names, results)})
            offset = end
    finished = time.perf_counter_ns()
    instance.executions += 1
    return per_request, inputs_ready - started, inferred - inputs_ready, finished - inferred


def _runtime_error(error: Exception) -> InferenceServerError:
    if isinstance(error, InferenceServerError):
        return error
    if isinstance(error, (ort_errors.InvalidArgument, ort_errors.InvalidGraph)):
        return InferenceServerError(ErrorKind.INVALID_ARGUMENT, f"onnx runtime error: {error}")
    return InferenceServerError(ErrorKind.INTERNAL, f"onnx runtime error: {error}")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1  # what time.monotonic_ns() reads on Linux
_TFD_TIMER_ABSTIME = 1


def _load_timerfd() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """libc's timerfd_create / timerfd_settime (Linux), or None where there is no such call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return create, settime


_TIMERFD = _load_timerfd()


class DeadlineTimer:
    """Runs ``callback`` on the event loop once ``time.monotonic_ns()`` reaches the armed deadline.

    Both asyncio (epoll's timeout) and uvloop (libuv) round a timer up to whole milliseconds, so a
    100 us queue delay would hold a lone request for about 1 ms. On Linux the deadline is a timerfd
    the loop watches like a socket: the kernel wakes the loop at the deadline to the microsecond.
    Elsewhere it falls back to ``loop.call_at``. Arming again replaces the deadline; loop thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._fd = -1
        if _TIMERFD is not None:
            fd = _TIMERFD[0](_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._spec = _Itimerspec()
                loop.add_reader(fd, self._on_fired)
        self.deadline_ns = 0  # 0: not armed

    @property
    def precise(self) -> bool:
        return self._fd >= 0

    def arm(self, deadline_ns: int) -> None:
        self.deadline_ns = deadline_ns
        if self._fd >= 0:
            # A zero it_value would disarm the timer: a deadline at 0 ns is long past anyway.
            value = self._spec.it_value
            value.tv_sec, value.tv_nsec = divmod(max(deadline_ns, 1), 1_000_000_000)
            if _TIMERFD[1](self._fd, _TFD_TIMER_ABSTIME, self._spec, None) != 0:  # type: ignore[index]
                error = ctypes.get_errno()
                raise OSError(error, f"timerfd_settime: {os.strerror(error)}")
            return
        if self._handle is not None:
            self._handle.cancel()
        delay_s = max(0, deadline_ns - time.monotonic_ns()) / 1e9
        self._handle = self._loop.call_at(self._loop.time() + delay_s, self._on_fired)

    def close(self) -> None:
        """Disarm and release the timer (the callback is not called any more)."""
        self.deadline_ns = 0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _on_fired(self) -> None:
        if self._fd >= 0:
            try:
                os.read(self._fd, 8)  # the expiration count: reading it quiets the descriptor
            except BlockingIOError:
                return  # re-armed to a later deadline after it fired: that one is still to come
        elif self.deadline_ns and time.monotonic_ns() < self.deadline_ns:
            # uvloop's clock has millisecond resolution, so call_at can fire up to 1 ms early: never
            # run the callback before the deadline, wait out the remainder instead.
            self.arm(self.deadline_ns)
            return
        self._handle = None
        self.deadline_ns = 0
        self._callback()


class ModelScheduler:
    """The queue and the instances of one loaded model version."""

    def __init__(
        self,
        model_name: str,
        instances: list[OnnxInstance],
        policy: BatchingPolicy,
        statistics: VersionStatistics,
    ) -> None:
        self.model_name = model_name
        self.policy = policy
        self.instances = list(instances)
        self._statistics = statistics
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[QueuedRequest] = collections.deque()
        # A stack: the most recently used instance goes first, its memory is warm.
        self._idle: list[OnnxInstance] = list(reversed(self.instances))
        self._executing = 0
        self._delay_ns = round(policy.max_queue_delay_s * 1e9)
        self._timer = DeadlineTimer(self._loop, self._dispatch) if policy.dynamic and self._delay_ns > 0 else None
        self._drain_waiters: list[asyncio.Future] = []
        self._closed = False

    @property
    def queued_count(self) -> int:
        return len(self._queue)

    @property
    def executing_count(self) -> int:
        return self._executing

    async def submit(self, feeds: dict[str, np.ndarray], rows: int, shape_key: Any = ()) -> ExecutedRequest:
        """Queue a validated request and wait for its outputs; UNAVAILABLE at once when the queue is full."""
        if self._closed:
            raise unavailable(f"model '{self.model_name}' is unloading")
        if self.policy.max_queue_size and len(self._queue) >= self.policy.max_queue_size:
            raise unavailable(
                f"exceeds maximum queue size: model '{self.model_name}' already has "
                f"{len(self._queue)} requests waiting (max_queue_size {self.policy.max_queue_size})"
            )
        future = self._loop.create_future()
        request = QueuedRequest(
            feeds, rows, shape_key, future, time.monotonic_ns() + self._delay_ns, time.perf_counter_ns()
        )
        self._queue.append(request)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away: drop the request if it is still waiting (a running batch finishes).
            try:
                self._queue.remove(request)
            except ValueError:
                pass
            self._wake_drain_waiters()  # an unload may be waiting for exactly this request
            raise

    def _ready_batch_size(self) -> int:
        """How many requests from the head of the queue to send now; 0 = wait (timer armed)."""
        policy = self.policy
        if not policy.dynamic:
            return 1
        head = self._queue[0]
        if self._timer is not None and time.monotonic_ns() >= head.deadline_ns:
            # The oldest request has waited its queue delay (typically behind a busy instance): like Triton's
            # dynamic batcher, the batch takes what is queued up to max_batch_size, past the preferred sizes.
            return self._count_up_to(policy.max_batch_size, head.shape_key)
        rows = 0
        count = 0
        preferred_count = 0
        can_grow = True
        for request in self._queue:
            if rows + request.rows > policy.batch_cap or request.shape_key != head.shape_key:
                can_grow = False
                break
            rows += request.rows
            count += 1
            if rows in policy.preferred_batch_sizes:
                preferred_count = count
            if rows == policy.batch_cap:
                can_grow = False
                break
        if count == 0:
            # The head alone exceeds the preferred cap (still <= max_batch_size): it runs by itself.
            return 1
        if preferred_count:
            return preferred_count
        timer = self._timer
        if not can_grow or timer is None:
            return count
        deadline_ns = head.deadline_ns
        # An armed earlier deadline stays: it belongs to a request still ahead in the queue.
        if not timer.deadline_ns or deadline_ns < timer.deadline_ns:
            timer.arm(deadline_ns)
        return 0

    def _count_up_to(self, max_rows: int, shape_key: Any) -> int:
        rows = 0
        count = 0
        for request in self._queue:
            if rows + request.rows > max_rows or request.shape_key != shape_key:
                break
            rows += request.rows
            count += 1
        return max(1, count)

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            count = self._ready_batch_size()
            if count == 0:
                return
            batch = [self._queue.popleft() for _ in range(count)]
            instance = self._idle.pop()
            now = time.perf_counter_ns()
            for request in batch:
                request.dispatched_ns = now
            self._executing += len(batch)
            instance.worker.post(self._run_on_instance, instance, batch)

    def _run_on_instance(self, instance: OnnxInstance, batch: list[QueuedRequest]) -> None:
        try:
            result = execute_batch(instance, batch, self.policy.max_batch_size > 0)
            error: InferenceServerError | None = None
        except Exception as exc:  # reported to every request of the batch, never lost
            result = None
            error = _runtime_error(exc)
        try:
            self._loop.call_soon_threadsafe(self._finish, instance, batch, result, error)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _finish(
        self,
        instance: OnnxInstance,
        batch: list[QueuedRequest],
        result: tuple[list[dict[str, np.ndarray]], int, int, int] | None,
        error: InferenceServerError | None,
    ) -> None:
        self._idle.append(instance)
        self._executing -= len(batch)
        if result is not None:
            per_request, input_ns, infer_ns, output_ns = result
            rows = sum(request.rows for request in batch)
            self._statistics.record_execution(rows, input_ns, infer_ns, output_ns)
            for request, outputs in zip(batch, per_request):
                if not request.future.done():
                    timings = RequestTimings(
                        queue_ns=request.dispatched_ns - request.enqueued_ns,
                        compute_input_ns=input_ns,
                        compute_infer_ns=infer_ns,
                        compute_output_ns=output_ns,
                        batch_size=rows,
                    )
                    request.future.set_result(ExecutedRequest(outputs, timings))
        else:
            log.warning("inference failed", extra={"model": self.model_name, "error": error.message if error else ""})
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error or InferenceServerError(ErrorKind.INTERNAL, "inference failed"))
        if not self._closed:
            self._dispatch()
        self._wake_drain_waiters()

    def _wake_drain_waiters(self) -> None:
        if self._queue or self._executing:
            return
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def release_timer(self) -> None:
        """Give the queue-delay timer back to the system (a scheduler that is never closed, e.g. when its
        model fails warm-up, would otherwise keep a descriptor on the event loop)."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    async def drain(self) -> None:
        """Wait until every queued and running request has finished."""
        if not self._queue and self._executing == 0:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def close(self, drain: bool = True) -> None:
        """Stop taking requests, optionally finish the queued ones, then release the instances."""
        if drain:
            await self.drain()
        self._closed = True
        self.release_timer()
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(unavailable(f"model '{self.model_name}' was unloaded"))
        if self._executing:
            await self.drain()
        for instance in self.instances:
            await asyncio.to_thread(instance.close)
