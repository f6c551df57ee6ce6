"""Inference requests carrying W3C trace context (what the Wrapper sends: ``traceparent`` / ``tracestate`` as HTTP
headers and gRPC metadata) are served by our server and by NVIDIA's Triton; Triton started with OpenTelemetry
tracing (``--trace-config mode=opentelemetry``) continues the caller's trace: its ``InferRequest`` spans, exported
over OTLP/HTTP to a local receiver, are children of the caller's span."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from inference_servers import RunningServer
from tiny_models import make_int64_identity

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACE_HEADERS = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01", "tracestate": "eoml=step"}


def _infer_both_protocols(server: RunningServer) -> None:
    rows = np.arange(8, dtype=np.int64).reshape(2, 4)
    http_input = httpclient.InferInput("INPUT0", list(rows.shape), "INT64")
    http_input.set_data_from_numpy(rows)
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer("int64_identity", [http_input], headers=dict(TRACE_HEADERS))  # it adds to the dict
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), rows)
    grpc_input = grpcclient.InferInput("INPUT0", list(rows.shape), "INT64")
    grpc_input.set_data_from_numpy(rows)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer("int64_identity", [grpc_input], headers=dict(TRACE_HEADERS))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), rows)


def test_our_server_serves_requests_with_trace_context(tmp_path: Path, running_server: Callable[..., RunningServer]) -> None:
    repository = tmp_path / "model_repository"
    make_int64_identity(repository)
    _infer_both_protocols(running_server(repository))


class _OtlpReceiver(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        _OtlpReceiver.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_triton_continues_the_callers_trace(tmp_path: Path, real_triton: Callable[..., RunningServer]) -> None:
    repository = tmp_path / "model_repository"
    make_int64_identity(repository)
    receiver = http.server.HTTPServer(("127.0.0.1", 0), _OtlpReceiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    _OtlpReceiver.bodies = []
    try:
        server = real_triton(
            repository, "--trace-config", "mode=opentelemetry", "--trace-config", "rate=1",
            "--trace-config", "level=TIMESTAMPS",
            "--trace-config", f"opentelemetry,url=127.0.0.1:{receiver.server_address[1]}/v1/traces",
        )
        _infer_both_protocols(server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_request_spans(_OtlpReceiver.bodies)) < 2:
            time.sleep(0.5)
    finally:
        receiver.shutdown()
        receiver.server_close()
    # One InferRequest span per request (HTTP and gRPC), each in the caller's trace, child of the caller's span.
    assert _request_spans(_OtlpReceiver.bodies) == [(TRACE_ID, CALLER_SPAN)] * 2


def _request_spans(bodies: list[bytes]) -> list[tuple[str, str]]:
    """(trace id, parent span id) of every ``InferRequest`` span in Triton's OTLP/HTTP exports (JSON encoding)."""
    found = []
    for body in bodies:
        for resource in json.loads(body).get("resourceSpans", []):
            for scope in resource.get("scopeSpans", []):
                found += [(span["traceId"], span.get("parentSpanId", "")) for span in scope.get("spans", [])
                          if span.get("name") == "InferRequest"]
    return found
