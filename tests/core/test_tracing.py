"""W3C trace context in and out of a step (services/core/tracing.py), recorded by the OpenTelemetry SDK.

Spans go to an in-memory exporter; the OTLP path is checked in a subprocess that exports to a local HTTP receiver
(the SDK's provider is set once per process).
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.core import tracing

PROJECT_ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
UPSTREAM_SPAN = "00f067aa0ba902b7"
UPSTREAM_TRACEPARENT = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    assert tracing.configure_tracing("test", [processor]) is not None
    yield exporter
    exporter.shutdown()


def _parse(traceparent: str) -> tuple[str, str]:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled (bit 2 may say the trace id is random)
    return trace_id, span_id


def test_a_step_continues_the_events_trace_and_hands_it_to_inference_and_the_next_record(spans: InMemorySpanExporter) -> None:
    parent = tracing.context_of_event({"traceparent": UPSTREAM_TRACEPARENT, "id": "e-1"})
    with tracing.step_span("step classify", parent, {"eoml.run_id": "r-1"}):
        with tracing.stage("inference"):
            inference_headers = tracing.http_headers()
        with tracing.stage("announce"):
            record_headers = tracing.kafka_headers()

    finished = {span.name: span for span in spans.get_finished_spans()}
    step, inference, announce = finished["step classify"], finished["inference"], finished["announce"]
    assert format(step.context.trace_id, "032x") == UPSTREAM_TRACE
    assert format(step.parent.span_id, "016x") == UPSTREAM_SPAN and step.parent.is_remote
    assert inference.parent.span_id == step.context.span_id == announce.parent.span_id
    assert step.attributes["eoml.run_id"] == "r-1"

    # The inference request names the inference stage's span; the next-step record the announce stage's.
    assert _parse(inference_headers["traceparent"]) == (UPSTREAM_TRACE, format(inference.context.span_id, "016x"))
    assert list(record_headers) == ["ce_traceparent"]
    assert _parse(record_headers["ce_traceparent"]) == (UPSTREAM_TRACE, format(announce.context.span_id, "016x"))

    # The next step, reading that record's headers, is a child of this step's announce stage: one trace.
    as_received = [(name, value.encode()) for name, value in record_headers.items()]  # confluent-kafka's form
    with tracing.step_span("step next", tracing.context_of_kafka_headers(as_received), {}):
        pass
    following = next(span for span in spans.get_finished_spans() if span.name == "step next")
    assert following.context.trace_id == step.context.trace_id
    assert following.parent.span_id == announce.context.span_id


def test_without_a_valid_traceparent_a_step_starts_its_own_trace(spans: InMemorySpanExporter) -> None:
    for attributes in ({}, {"traceparent": "00-zz-not-a-trace-context"}, {"traceparent": f"00-{'0' * 32}-{UPSTREAM_SPAN}-01"}):
        with tracing.step_span("step", tracing.context_of_event(attributes), {}):
            headers = tracing.http_headers()
        span = spans.get_finished_spans()[-1]
        assert span.parent is None
        trace_id, _ = _parse(headers["traceparent"])
        assert trace_id == format(span.context.trace_id, "032x") != UPSTREAM_TRACE


def test_the_transport_traceparent_is_used_when_the_event_has_none(spans: InMemorySpanExporter) -> None:
    with tracing.step_span("step", tracing.context_of_event({}, {"Traceparent": UPSTREAM_TRACEPARENT}), {}):
        pass
    assert format(spans.get_finished_spans()[-1].context.trace_id, "032x") == UPSTREAM_TRACE
    # The event's own extension attribute wins over the transport's header.
    own = f"00-{'1' * 32}-{'2' * 16}-01"
    with tracing.step_span("step", tracing.context_of_event({"traceparent": own}, {"traceparent": UPSTREAM_TRACEPARENT}), {}):
        pass
    assert format(spans.get_finished_spans()[-1].context.trace_id, "032x") == "1" * 32


def test_outside_a_span_nothing_is_injected() -> None:
    assert tracing.http_headers() == {} and tracing.kafka_headers() == {}


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Receiver.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


_EXPORT_ONE_SPAN = """
from services.core import tracing
from opentelemetry import trace
assert tracing.configure_tracing("otlp-check") is not None
with tracing.step_span("exported-step", tracing.context_of_event({}), {}):
    pass
trace.get_tracer_provider().shutdown()  # flushes the batch processor
"""


@pytest.mark.parametrize("variables, exported", [
    ({}, False),  # off by default
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:{port}"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:{port}/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:{port}"}, False),
])
def test_otlp_export_follows_the_standard_variables(variables: dict[str, str], exported: bool) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Receiver.received = []
    try:
        port = server.server_address[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update({name: value.format(port=port) for name, value in variables.items()})
        subprocess.run([sys.executable, "-c", _EXPORT_ONE_SPAN], cwd=PROJECT_ROOT, env=env, check=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    if exported:
        assert [path for path, _ in _Receiver.received] == ["/v1/traces"]
        assert b"exported-step" in _Receiver.received[0][1] and b"otlp-check" in _Receiver.received[0][1]
    else:
        assert _Receiver.received == []
