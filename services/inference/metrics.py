"""Prometheus metrics endpoint with Triton's metric names, derived from the engine's statistics.

``GET /metrics`` answers the text exposition format 0.0.4. Every value is computed at scrape time
from ``engine.model_statistics()`` (the same numbers as ``/v2/models/stats``), so the two can
never disagree and nothing is counted twice. Durations are the statistics' nanoseconds in
microseconds, as Triton exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from aiohttp import web
from tritonclient.grpc import service_pb2

from .http_server import error_middleware
from .protocol import InferenceServerError

if TYPE_CHECKING:
    from .engine import InferenceEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NANOSECONDS_PER_MICROSECOND = 1000


@dataclass(frozen=True, slots=True)
class MetricFamily:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    value: Callable[[service_pb2.ModelStatistics], int]


def _us(nanoseconds: int) -> int:
    return nanoseconds // NANOSECONDS_PER_MICROSECOND


COUNTER_FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily(
        "nv_inference_request_success", "counter",
        "Number of inference requests that succeeded, over all batch sizes",
        lambda s: s.inference_stats.success.count,
    ),
    MetricFamily(
        "nv_inference_request_failure", "counter",
        "Number of inference requests that failed, over all batch sizes",
        lambda s: s.inference_stats.fail.count,
    ),
    MetricFamily(
        "nv_inference_count", "counter",
        "Number of inferences performed (a batch of n requests counts n)",
        lambda s: s.inference_count,
    ),
    MetricFamily(
        "nv_inference_exec_count", "counter",
        "Number of model executions performed (a batch of n requests counts 1)",
        lambda s: s.execution_count,
    ),
    MetricFamily(
        "nv_inference_request_duration_us", "counter",
        "Cumulative end-to-end duration of successful inference requests in microseconds",
        lambda s: _us(s.inference_stats.success.ns),
    ),
    MetricFamily(
        "nv_inference_queue_duration_us", "counter",
        "Cumulative time requests waited in the scheduler queue in microseconds",
        lambda s: _us(s.inference_stats.queue.ns),
    ),
    MetricFamily(
        "nv_inference_compute_input_duration_us", "counter",
        "Cumulative time spent preparing model inputs in microseconds",
        lambda s: _us(s.inference_stats.compute_input.ns),
    ),
    MetricFamily(
        "nv_inference_compute_infer_duration_us", "counter",
        "Cumulative time spent executing the model in microseconds",
        lambda s: _us(s.inference_stats.compute_infer.ns),
    ),
    MetricFamily(
        "nv_inference_compute_output_duration_us", "counter",
        "Cumulative time spent extracting model outputs in microseconds",
        lambda s: _us(s.inference_stats.compute_output.ns),
    ),
)
FAILURE_FAMILY_NAME = "nv_inference_request_failure"
PENDING_REQUEST_FAMILY = (
    "nv_inference_pending_request_count",
    "gauge",
    "Number of requests waiting to be executed, per model version, at the time of the scrape",
)


def escape_label_value(value: str) -> str:
    """Label values per the exposition format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(statistics: service_pb2.ModelStatistics, reason: str = "") -> str:
    labels = f'model="{escape_label_value(statistics.name)}",version="{escape_label_value(statistics.version)}"'
    if reason:
        labels += f',reason="{escape_label_value(reason)}"'
    return "{" + labels + "}"


def render_metrics(
    statistics: Iterable[service_pb2.ModelStatistics],
    pending_request_count: Callable[[str, str], int],
    failure_counts: Callable[[str, str], dict[str, int]] | None = None,
) -> str:
    """The exposition text for ``statistics``; ``pending_request_count(model, version)`` feeds the gauge.

    With ``failure_counts(model, version) -> {reason: count}``, the failure counter carries Triton's
    ``reason`` label (one sample per reason); without it, one sample per version from the proto.
    """
    entries = list(statistics)
    lines: list[str] = []
    for family in COUNTER_FAMILIES:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for entry in entries:
            if family.name == FAILURE_FAMILY_NAME and failure_counts is not None:
                by_reason = failure_counts(entry.name, entry.version)
                if by_reason:
                    lines.extend(
                        f"{family.name}{_labels(entry, reason)} {count}" for reason, count in sorted(by_reason.items())
                    )
                    continue
            lines.append(f"{family.name}{_labels(entry)} {family.value(entry)}")
    name, kind, help_text = PENDING_REQUEST_FAMILY
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{_labels(entry)} {pending_request_count(entry.name, entry.version)}" for entry in entries)
    return "\n".join(lines) + "\n"


def engine_metrics_text(engine: InferenceEngine) -> str:
    """Scrape ``engine`` once."""

    def pending(model: str, version: str) -> int:
        # A version can be unloaded between the statistics call and this one: it has nothing pending.
        try:
            return int(engine.pending_request_count(model, version))
        except InferenceServerError:
            return 0

    # ``failure_counts`` (per Triton reason label) is an engine addition beyond the frontend contract.
    failure_counts = getattr(engine, "failure_counts", None)

    def failures(model: str, version: str) -> dict[str, int]:
        try:
            return dict(failure_counts(model, version)) if failure_counts is not None else {}
        except InferenceServerError:
            return {}

    return render_metrics(engine.model_statistics(), pending, failures if failure_counts is not None else None)


def create_metrics_app(engine: InferenceEngine) -> web.Application:
    """``GET /metrics`` for Prometheus, over ``engine``."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=engine_metrics_text(engine).encode("utf-8"), headers={"Content-Type": CONTENT_TYPE}
        )

    app = web.Application(middlewares=[error_middleware])
    app.add_routes([web.get("/metrics", metrics)])
    return app
