"""Which deliveries run now, which wait for a worker, and which are refused: capacity as queue-proxy sees it.

In front of each Wrapper pod Knative's queue-proxy admits ``containerConcurrency`` (= ``WORKERS``) requests at
once and queues the rest; its ``timeoutSeconds`` counts from a request's arrival, queueing included
(knative/serving ``pkg/queue/sharedmain/handlers.go``, ``pkg/queue/breaker.go``). When it times a request out (504)
it hangs up on the Wrapper and sends the next request at once, but the step of the request it gave up on cannot
be stopped (a step is not cancellable midway). So here:

- a run has *callers* (HTTP requests waiting for its outcome). A run with callers counts against ``workers``; a
  run whose callers all hung up is *orphaned*: it goes on to its durable end (its redelivery then finds it done,
  or joins it while it still runs) but no longer counts against ``workers``. At most ``max_orphaned_runs``
  orphans run at once, so the threads, memory and scratch space stay bounded;
- a request that finds every worker taken waits for one (a queue-proxy admitted it; it must not get an instant
  503), for at most ``worker_wait_s``; only then, or when more requests wait than queue-proxy's own queue holds,
  is it refused (``BUSY``, answered 503);
- a redelivery of an event that is running here (or waiting) joins that run instead of starting another.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")


class Refusal(enum.Enum):
    """Why a delivery was not admitted (answered 503 + Retry-After)."""

    BUSY = "busy"  # no worker within worker_wait_s, or more waiting than queue-proxy's queue holds
    STOPPING = "stopping"  # the process is shutting down


class Departure(enum.Enum):
    """What leaving a run did."""

    WITHDRAWN = "withdrawn"  # it had not started and nobody else waits for it: it never runs
    STILL_WAITED_FOR = "still waited for"  # other callers of the same event wait for it
    ORPHANED = "orphaned"  # it runs on without a caller, outside the workers' count
    FINISHED = "finished"  # it had ended already


@dataclass(eq=False, slots=True)
class _Run(Generic[R]):
    key: str
    work: Callable[[], R]
    outcome: Future[R] = field(default_factory=Future)
    callers: int = 1
    started: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        # Running from now on: a waiter that goes away cannot cancel it for the other waiters.
        self.outcome.set_running_or_notify_cancel()


@dataclass(frozen=True, slots=True)
class Admitted(Generic[R]):
    """One caller's hold on a run, started or waiting for a worker; ``outcome`` resolves with what it returned."""

    run: _Run[R]
    joined: bool  # the event was running (or waiting) here already

    @property
    def outcome(self) -> Future[R]:
        return self.run.outcome

    @property
    def started(self) -> bool:
        return self.run.started


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Refusal


@dataclass(frozen=True, slots=True)
class AdmissionState:
    workers: int
    running: int  # started, with or without callers
    orphaned: int  # started, no caller left
    waiting: int  # admitted, not started
    completed: int


class RunAdmission(Generic[R]):
    """Runs of ``work`` in threads, at most ``workers`` with callers plus ``max_orphaned`` without."""

    def __init__(self, workers: int, max_orphaned: int, max_waiting: int, thread_name_prefix: str = "step") -> None:
        self.workers = workers
        self.max_orphaned = max_orphaned
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(max_workers=workers + max_orphaned, thread_name_prefix=thread_name_prefix)
        self._lock = threading.Lock()
        self._runs: dict[str, _Run[R]] = {}  # by run key, started or waiting
        self._waiting: deque[_Run[R]] = deque()
        self._stopping = False
        self._completed = 0

    def admit(self, key: str, work: Callable[[], R]) -> Admitted[R] | Refused:
        """Start ``work`` (or queue it for the next free worker), join the run of ``key``, or refuse."""
        with self._lock:
            if self._stopping:
                return Refused(Refusal.STOPPING)
            existing = self._runs.get(key)
            if existing is not None:
                existing.callers += 1
                return Admitted(existing, joined=True)
            if len(self._waiting) >= self.max_waiting:
                return Refused(Refusal.BUSY)
            run: _Run[R] = _Run(key, work)
            self._runs[key] = run
            self._waiting.append(run)
            startable = self._startable_locked()
        self._start(startable)
        return Admitted(run, joined=False)

    def leave(self, admitted: Admitted[R]) -> Departure:
        """The caller is gone (hung up, or gave up waiting): the run no longer counts against ``workers`` for it."""
        with self._lock:
            departure, startable = self._leave_locked(admitted.run)
        if departure is Departure.ORPHANED:
            log.warning("caller gone: the run goes on outside the workers' count", extra={"run_key": admitted.run.key})
        self._start(startable)
        return departure

    def withdraw_if_waiting(self, admitted: Admitted[R]) -> bool:
        """Leave a run that has not started (True); False when it started meanwhile (keep waiting for it)."""
        with self._lock:
            if admitted.run.started or admitted.run.finished:
                return False
            self._leave_locked(admitted.run)
            return True

    def _leave_locked(self, run: _Run[R]) -> tuple[Departure, list[_Run[R]]]:
        if run.finished:
            return Departure.FINISHED, []
        run.callers -= 1
        if run.callers > 0:
            return Departure.STILL_WAITED_FOR, []
        if not run.started:
            self._waiting.remove(run)
            del self._runs[run.key]
            return Departure.WITHDRAWN, []
        return Departure.ORPHANED, self._startable_locked()  # an orphan frees its worker for a waiting delivery

    def _startable_locked(self) -> list[_Run[R]]:
        running = [run for run in self._runs.values() if run.started]
        with_callers = sum(1 for run in running if run.callers > 0)
        total = len(running)
        chosen: list[_Run[R]] = []
        while self._waiting and not self._stopping and with_callers < self.workers \
                and total < self.workers + self.max_orphaned:
            run = self._waiting.popleft()
            run.started = True
            chosen.append(run)
            with_callers += 1
            total += 1
        return chosen

    def _start(self, runs: list[_Run[R]]) -> None:
        for run in runs:
            self._pool.submit(self._execute, run)

    def _execute(self, run: _Run[R]) -> None:
        result: R | None = None
        failure: BaseException | None = None
        try:
            result = run.work()
        except BaseException as error:  # noqa: BLE001 - a bug: the HTTP shell answers 500, Kafka redelivers
            log.exception("delivery worker raised", extra={"run_key": run.key})
            failure = error
        # The worker is free before anyone is answered: the source's next delivery finds room.
        with self._lock:
            run.finished = True
            self._runs.pop(run.key, None)
            self._completed += 1
            startable = self._startable_locked()
        self._resolve(run, result, failure)
        self._start(startable)

    def _resolve(self, run: _Run[R], result: R | None, failure: BaseException | None = None) -> None:
        with self._lock:  # shutdown may have answered it already
            if run.outcome.done():
                return
            if failure is not None:
                run.outcome.set_exception(failure)
            else:
                run.outcome.set_result(result)  # type: ignore[arg-type]

    # ---- state and shutdown ---------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def state(self) -> AdmissionState:
        with self._lock:
            running = [run for run in self._runs.values() if run.started]
            return AdmissionState(self.workers, len(running), sum(1 for run in running if run.callers == 0),
                                  len(self._waiting), self._completed)

    def stop(self, refusal_result: R) -> list[Future[R]]:
        """Admit nothing more; runs still waiting end with ``refusal_result``. The running runs' outcomes."""
        with self._lock:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for run in waiting:
                run.finished = True
                del self._runs[run.key]
            running = [run.outcome for run in self._runs.values()]
        for run in waiting:
            self._resolve(run, refusal_result)
        return running

    def answer_unfinished(self, result: R) -> int:
        """Answer the callers of runs still going with ``result`` (they run on until the process exits)."""
        with self._lock:
            unfinished = [run for run in self._runs.values() if not run.outcome.done()]
        for run in unfinished:
            self._resolve(run, result)
        return len(unfinished)

    def close(self, wait: bool) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=False)
