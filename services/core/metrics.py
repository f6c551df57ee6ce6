"""Prometheus metrics of the Wrapper and the controller: every ``eoml_*`` series is defined here, once.

Each service instance owns a ``WrapperMetrics`` / ``ControllerMetrics`` with its own ``CollectorRegistry`` (no
process-global registry: tests and several services in one process count apart). The registry is served on
``GET /metrics`` of the service's HTTP app (``metrics_route``), without authentication, like the metrics ports of
Knative's queue-proxy and KServe: the series carry no credentials, message bodies or object keys.

Per-stage time of a step. The step's ``StageClock`` is the current one of the step's context (a ``ContextVar``, set
by ``WrapperMetrics.step`` around ``run_step``, carried into the inference threads by ``batching``), so that code
deep in input reading marks its stage with one line, ``with stage(Stage.DECODE):`` or ``@timed_stage(...)``,
without a metrics object in every signature. Stages nest: time in an inner stage is not counted again in the outer
one (reading the input is ``download`` minus its ``decode`` and ``preprocess``). Inference time is summed over the
step's concurrent requests, so a step's stage times may add up to more than its duration.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Awaitable, Callable, Iterator, ParamSpec, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

P = ParamSpec("P")
T = TypeVar("T")

PREFIX = "eoml_"
# Step durations: a few patches take under a second, a granule many minutes.
STEP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class Stage(str, Enum):
    DOWNLOAD = "download"  # listing and reading the input from S3 (less what decode/preprocess took)
    DECODE = "decode"  # band files, JPEG 2000 windows, .codes files into arrays
    PREPROCESS = "preprocess"  # arrays into model input rows
    INFERENCE = "inference"  # inference requests, retries of an unavailable server included
    WRITE = "write"  # encoding results and uploading them, the manifest
    ANNOUNCE = "announce"  # the next-step record and the announced marker


class StepResult(str, Enum):
    """A delivery's step outcome as counted (``pipeline.StepStatus`` by another name, lower case)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # CRITICAL: on record (dead-letter record)
    RETRIED = "retried"  # RETRY: answered 5xx, Kafka redelivers
    DUPLICATE = "duplicate"
    IGNORED = "ignored"

    @classmethod
    def of(cls, status: str) -> "StepResult":
        return _STEP_RESULTS[status]


_STEP_RESULTS = {"SUCCESS": StepResult.SUCCEEDED, "CRITICAL": StepResult.FAILED, "RETRY": StepResult.RETRIED,
                 "DUPLICATE": StepResult.DUPLICATE, "IGNORED": StepResult.IGNORED}


class ErrorSource(str, Enum):
    S3 = "s3"
    KAFKA = "kafka"


class StageClock:
    """Exclusive time per stage of one step; each thread has its own stack of open stages."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[Stage, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        stack: list[list[Any]] = self._local.__dict__.setdefault("stack", [])
        now = time.monotonic()
        if stack:  # pause the enclosing stage
            self._add(stack[-1][0], now - stack[-1][1])
        stack.append([stage, now])
        try:
            yield
        finally:
            now = time.monotonic()
            self._add(stage, now - stack.pop()[1])
            if stack:
                stack[-1][1] = now

    def _add(self, stage: Stage, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def iterate(self, stage: Stage, items: Iterator[T] | Any) -> Iterator[T]:
        """``items`` with the time spent producing each one counted to ``stage`` (a lazily read input)."""
        iterator = iter(items)
        while True:
            with self.stage(stage):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item


@dataclass
class _StepScope:
    metrics: "WrapperMetrics"
    task: str
    clock: StageClock = field(default_factory=StageClock)


_CURRENT_STEP: contextvars.ContextVar[_StepScope | None] = contextvars.ContextVar("eoml_current_step", default=None)


@contextmanager
def stage(name: Stage) -> Iterator[None]:
    """Count the block's time to ``name`` in the current step (nothing outside a step)."""
    scope = _CURRENT_STEP.get()
    if scope is None:
        yield
        return
    with scope.clock.stage(name):
        yield


def timed_stage(name: Stage) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator form of ``stage``: the whole call counts to ``name``."""

    def decorate(function: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(function)
        def timed(*args: P.args, **kwargs: P.kwargs) -> T:
            with stage(name):
                return function(*args, **kwargs)

        return timed

    return decorate


def timed_items(name: Stage, items: Any) -> Any:
    """``items`` with the time spent producing them counted to ``name`` in the current step (as is, outside one)."""
    scope = _CURRENT_STEP.get()
    return items if scope is None else scope.clock.iterate(name, items)


def count_error(source: ErrorSource) -> None:
    """One failed S3 or Kafka call in the current step (the step's retries each count)."""
    scope = _CURRENT_STEP.get()
    if scope is not None:
        scope.metrics.errors.labels(task=scope.task, source=source.value).inc()


def counts_errors(source: ErrorSource) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator: every exception the call raises is one ``source`` error of the current step."""

    def decorate(function: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(function)
        def counted(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return function(*args, **kwargs)
            except Exception:
                count_error(source)
                raise

        return counted

    return decorate


def in_current_context(function: Callable[P, T]) -> Callable[P, T]:
    """``function`` to run in another thread with this thread's context (the current step's clock)."""
    context = contextvars.copy_context()
    return functools.partial(context.run, function)  # type: ignore[return-value]


class WrapperMetrics:
    """The Wrapper's series. ``task`` labels every step series (one Wrapper serves one task; a label still lets one
    Prometheus query sum over tasks)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.steps_started = Counter(f"{PREFIX}steps_started", "Deliveries handed to a step run.", ["task"], registry=r)
        self.steps = Counter(f"{PREFIX}steps", "Step runs by outcome: succeeded, failed (dead-lettered), retried "
                             "(answered 5xx), duplicate, ignored.", ["task", "outcome"], registry=r)
        self.patches = Counter(f"{PREFIX}patches", "Patches (or files) processed in succeeded steps.", ["task"],
                               registry=r)
        self.rejections = Counter(f"{PREFIX}rejections", "Patches or files rejected in steps (reported as WARNING).",
                                  ["task"], registry=r)
        self.step_seconds = Histogram(f"{PREFIX}step_duration_seconds", "Wall time of a step run, by outcome.",
                                      ["task", "outcome"], buckets=STEP_BUCKETS, registry=r)
        self.stage_seconds = Histogram(f"{PREFIX}step_stage_seconds", "Time a step run spent in a stage (download, "
                                       "decode, preprocess, inference, write, announce).", ["task", "stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.deliveries = Counter(f"{PREFIX}deliveries", "Deliveries (POSTs) by HTTP answer code.", ["code"],
                                  registry=r)
        self.dead_letters = Counter(f"{PREFIX}dead_letter_records", "Dead-letter records written (permanent "
                                    "failures, unreadable messages).", ["task"], registry=r)
        self.errors = Counter(f"{PREFIX}dependency_errors", "Failed S3 or Kafka calls during steps.",
                              ["task", "source"], registry=r)
        self.runs_in_flight = Gauge(f"{PREFIX}runs_in_flight", "Deliveries running now.", registry=r)
        self.workers = Gauge(f"{PREFIX}workers", "Deliveries this Wrapper runs at once at most.", registry=r)

    @contextmanager
    def step(self, task: str) -> Iterator[StageClock]:
        """Around one ``run_step``: the stage clock of the step is the current one inside the block."""
        scope = _StepScope(self, task)
        self.steps_started.labels(task=task).inc()
        token = _CURRENT_STEP.set(scope)
        try:
            yield scope.clock
        finally:
            _CURRENT_STEP.reset(token)

    def step_ended(self, task: str, status: str, clock: StageClock, patches: int = 0, rejections: int = 0) -> None:
        result = StepResult.of(status)
        self.steps.labels(task=task, outcome=result.value).inc()
        self.step_seconds.labels(task=task, outcome=result.value).observe(time.monotonic() - clock.started)
        for name, seconds in clock.seconds.items():
            self.stage_seconds.labels(task=task, stage=name.value).observe(seconds)
        if result is StepResult.SUCCEEDED:
            self.patches.labels(task=task).inc(patches)
        if rejections:
            self.rejections.labels(task=task).inc(rejections)
        if result is StepResult.FAILED:  # a CRITICAL outcome is one whose dead-letter record was written
            self.dead_letters.labels(task=task).inc()

    def dead_letter(self, task: str) -> None:
        self.dead_letters.labels(task=task).inc()

    def delivery_answered(self, code: int) -> None:
        self.deliveries.labels(code=str(code)).inc()


class ControllerOutcome(str, Enum):
    WIRED = "wired"
    STOPPED = "stopped"  # "unwired"
    REFUSED = "refused"  # an invalid workflow message
    FAILED = "failed"  # the Kubernetes API or store failed (retried when temporary)
    IGNORED = "ignored"


_CONTROLLER_OUTCOMES = {"wired": ControllerOutcome.WIRED, "unwired": ControllerOutcome.STOPPED,
                        "rejected": ControllerOutcome.REFUSED, "failed": ControllerOutcome.FAILED,
                        "ignored": ControllerOutcome.IGNORED}


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.workflow_messages = Counter(
            f"{PREFIX}controller_workflow_messages", "Workflow messages handled, by outcome: wired, stopped, "
            "refused, failed, ignored.", ["outcome"], registry=r)
        self.dead_letters = Counter(f"{PREFIX}controller_dead_letter_records", "Records the controller wrote to a "
                                    "dead-letter topic (KafkaSource dead-letter sink, system.ML consumer).", [],
                                    registry=r)
        self.kafka_errors = Counter(f"{PREFIX}controller_kafka_errors", "Dead-letter writes Kafka refused.", [],
                                    registry=r)
        self.steps_wired = Gauge(f"{PREFIX}controller_steps_wired", "Workflow steps wired now.", registry=r)

    def count_wired(self, steps_in_state: Callable[[str], int]) -> None:
        """The wired-steps gauge reads the controller's registry at each scrape."""
        self.steps_wired.set_function(lambda: steps_in_state("wired"))

    def handled(self, action: str) -> None:
        self.workflow_messages.labels(outcome=_CONTROLLER_OUTCOMES.get(action, ControllerOutcome.IGNORED).value).inc()


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format, with its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metrics_route(registry: CollectorRegistry) -> Callable[[Any], Awaitable[Any]]:
    """An aiohttp handler for ``GET /metrics``."""
    from aiohttp import web

    async def serve_metrics(_request: web.Request) -> web.Response:
        body, content_type = exposition(registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    return serve_metrics


def delivery_counter(metrics: WrapperMetrics) -> Any:
    """aiohttp middleware: every POST's answer code (errors raised as HTTP exceptions included)."""
    from aiohttp import web

    @web.middleware
    async def count_answer(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as error:
            metrics.delivery_answered(error.status)
            raise
        except Exception:
            metrics.delivery_answered(500)
            raise
        metrics.delivery_answered(response.status)
        return response

    return count_answer


def series_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry exports (``_total``, ``_bucket``, ``_count``, ``_sum`` included)."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        kind = family.type
        if kind == "counter":
            names.update({f"{family.name}_total", f"{family.name}_created"})
        elif kind == "histogram":
            names.update({f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum", "created")})
    return names


__all__ = [
    "ControllerMetrics",
    "ErrorSource",
    "Stage",
    "StageClock",
    "StepResult",
    "WrapperMetrics",
    "count_error",
    "counts_errors",
    "delivery_counter",
    "exposition",
    "in_current_context",
    "metrics_route",
    "series_names",
    "stage",
    "timed_items",
    "timed_stage",
]
