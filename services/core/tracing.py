"""W3C trace context through a workflow, recorded with OpenTelemetry.

How a trace travels (one trace per workflow, one span tree per step):

1. A step message arrives as a CloudEvent. Its ``traceparent`` / ``tracestate`` extension attributes (the
   CloudEvents distributed-tracing extension: Kafka headers ``ce_traceparent``, HTTP headers ``ce-traceparent``)
   carry the context of whoever sent the event; the transport's own HTTP ``traceparent`` header (a tracing
   Knative sets one) is the fallback. ``context_of_event`` reads them.
2. The Wrapper opens a ``step`` span under that context and a child span per stage (``stage``).
3. Inference requests carry the current context as ``traceparent`` (HTTP header / gRPC metadata):
   ``http_headers``. Triton with ``--trace-config mode=opentelemetry`` continues it; our server and a Triton
   without tracing ignore it.
4. The next-step record carries it as ``ce_traceparent`` / ``ce_tracestate`` Kafka headers (``kafka_headers``),
   so the next step's span is a child of this step's: the two steps are one trace.

Recording: ``configure_tracing`` installs the OpenTelemetry SDK once per process. Spans are exported only when
the standard variables ask for it: ``OTEL_TRACES_EXPORTER=otlp`` or an ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the OTLP/HTTP exporter reads every other ``OTEL_EXPORTER_OTLP_*``
variable itself); ``OTEL_SDK_DISABLED=true`` turns recording off (contexts still pass through unchanged);
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_TRACES_SAMPLER`` work as the SDK documents.
Without an exporter the spans still get ids, so the context handed on names this process's span.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Kafka header names of the CloudEvents Kafka binding (``ce_`` + attribute name).
KAFKA_TRACEPARENT = "ce_traceparent"
KAFKA_TRACESTATE = "ce_tracestate"
TRACER_NAME = "eoml"

_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: TracerProvider | None = None  # process configuration, set once


def _otlp_requested(environ: Mapping[str, str]) -> bool:
    exporters = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    if "none" in exporters:
        return False
    return "otlp" in exporters or bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service_name: str, processors: Sequence[SpanProcessor] = (),
                      environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Install the SDK tracer provider for this process (the first call does; later ones only add
    ``processors``, e.g. a test's ``SimpleSpanProcessor`` over an in-memory exporter). None when
    ``OTEL_SDK_DISABLED=true``: nothing is recorded, contexts pass through unchanged."""
    global _provider
    env = os.environ if environ is None else environ
    with _lock:
        if _provider is None:
            if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
                return None
            resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name})
            _provider = TracerProvider(resource=resource)
            if _otlp_requested(env):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
                log.info("traces exported over OTLP", extra={"service": service_name})
            trace.set_tracer_provider(_provider)
        for processor in processors:
            _provider.add_span_processor(processor)
        return _provider


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def event_trace_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    """``traceparent``/``tracestate`` of a CloudEvent's attributes (lower-cased names without ``ce-``, as
    ``services.wrapper.service.Delivery`` keeps them). A Kafka record that is no binary-mode CloudEvent reaches a
    KafkaSource sink with its headers as ``kafkaheader<name>`` extensions: ``kafkaheaderce_traceparent``."""
    found: dict[str, str] = {}
    for name in (TRACEPARENT, TRACESTATE):
        value = attributes.get(name) or attributes.get(f"kafkaheaderce_{name}")
        if value:
            found[name] = value
    return found


def context_of_event(attributes: Mapping[str, str], transport_headers: Mapping[str, str] | None = None) -> Context:
    """The trace context an event carries (``event_trace_attributes``), else the transport's ``traceparent``
    header. An invalid or absent value gives an empty context (the step starts a new trace)."""
    carrier = event_trace_attributes(attributes)
    if not carrier and transport_headers:
        lowered = {name.lower(): value for name, value in transport_headers.items()}
        carrier = {name: lowered[name] for name in (TRACEPARENT, TRACESTATE) if lowered.get(name)}
    return _propagator.extract(carrier)


def context_of_kafka_headers(headers: Sequence[tuple[str, bytes | str | None]] | None) -> Context:
    """The trace context of a Kafka record with CloudEvents binary-mode headers (``ce_traceparent``)."""
    attributes: dict[str, str] = {}
    for name, value in headers or ():
        if name in (KAFKA_TRACEPARENT, KAFKA_TRACESTATE) and value is not None:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            attributes[name[len("ce_"):]] = text
    return context_of_event(attributes)


def _current_carrier() -> dict[str, str]:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def http_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current span, for an HTTP request or gRPC metadata; empty
    outside a recorded span."""
    return _current_carrier()


def kafka_headers() -> dict[str, str]:
    """The current span's context as CloudEvents Kafka headers (``ce_traceparent``, ``ce_tracestate``); empty
    outside a recorded span."""
    return {f"ce_{name}": value for name, value in sorted(_current_carrier().items())}


@contextmanager
def step_span(name: str, parent: Context, attributes: Mapping[str, str | int]) -> Iterator[Span]:
    """A server span for one delivery, child of the event's context, current while the block runs."""
    token = otel_context.attach(parent)
    try:
        with tracer().start_as_current_span(name, kind=SpanKind.CONSUMER, attributes=dict(attributes)) as span:
            yield span
    finally:
        otel_context.detach(token)


@contextmanager
def stage(name: str, **attributes: str | int) -> Iterator[Span]:
    """A child span of the current one for one stage of a step (download, inference, write, announce)."""
    with tracer().start_as_current_span(name, attributes=attributes) as span:
        yield span


def mark_failed(span: Span, reason: str) -> None:
    """Record an outcome that is a failure without an exception (a step that ends CRITICAL)."""
    span.set_status(Status(StatusCode.ERROR, reason[:200]))


__all__ = [
    "KAFKA_TRACEPARENT",
    "KAFKA_TRACESTATE",
    "TRACEPARENT",
    "configure_tracing",
    "context_of_event",
    "context_of_kafka_headers",
    "event_trace_attributes",
    "http_headers",
    "kafka_headers",
    "mark_failed",
    "stage",
    "step_span",
    "tracer",
]
