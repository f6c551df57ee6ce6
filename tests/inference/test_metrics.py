"""Prometheus metrics: the exposition text from statistics protos, and /metrics on a real server."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from services.inference.metrics import COUNTER_FAMILIES, render_metrics

COUNTER_NAMES = [
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
]
GAUGE_NAME = "nv_inference_pending_request_count"
SAMPLE_LINE = re.compile(
    r'^(?P<name>[a-z_]+)\{model="(?P<model>(?:[^"\\]|\\.)*)",version="(?P<version>[^"]*)"'
    r'(?:,reason="(?P<reason>[A-Z_]+)")?\} (?P<value>\d+)$'
)


def parse_samples(text: str) -> dict[tuple[str, str, str], int]:
    """``{(metric, model, version): value}``, summed over ``reason`` labels; fails on malformed lines."""
    samples: dict[tuple[str, str, str], int] = {}
    for line in text.splitlines():
        if not line or line.startswith("# "):
            continue
        match = SAMPLE_LINE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        key = (match["name"], match["model"], match["version"])
        samples[key] = samples.get(key, 0) + int(match["value"])
    return samples


def _statistics(name: str, version: str, scale: int) -> service_pb2.ModelStatistics:
    entry = service_pb2.ModelStatistics(name=name, version=version, inference_count=10 * scale,
                                        execution_count=4 * scale)
    stats = entry.inference_stats
    stats.success.count, stats.success.ns = 9 * scale, 9_000_999 * scale
    stats.fail.count, stats.fail.ns = 1 * scale, 5_000 * scale
    stats.queue.count, stats.queue.ns = 9 * scale, 2_000_000 * scale
    stats.compute_input.count, stats.compute_input.ns = 4 * scale, 30_000 * scale
    stats.compute_infer.count, stats.compute_infer.ns = 4 * scale, 6_000_000 * scale
    stats.compute_output.count, stats.compute_output.ns = 4 * scale, 40_000 * scale
    return entry


def test_exposition_text_has_triton_names_types_and_values() -> None:
    pending = {("simple", "1"): 3, ("versioned", "3"): 0}
    text = render_metrics([_statistics("simple", "1", 1), _statistics("versioned", "3", 2)],
                          lambda model, version: pending[(model, version)])
    assert text.endswith("\n")
    for name in COUNTER_NAMES:
        assert f"# TYPE {name} counter\n" in text
        assert re.search(rf"^# HELP {name} \S.*$", text, re.MULTILINE)
    assert f"# TYPE {GAUGE_NAME} gauge\n" in text
    samples = parse_samples(text)
    assert samples[("nv_inference_request_success", "simple", "1")] == 9
    assert samples[("nv_inference_request_failure", "versioned", "3")] == 2
    assert samples[("nv_inference_count", "versioned", "3")] == 20
    assert samples[("nv_inference_exec_count", "simple", "1")] == 4
    assert samples[("nv_inference_request_duration_us", "simple", "1")] == 9_000  # ns -> us, truncated
    assert samples[("nv_inference_queue_duration_us", "versioned", "3")] == 4_000
    assert samples[("nv_inference_compute_input_duration_us", "simple", "1")] == 30
    assert samples[("nv_inference_compute_infer_duration_us", "simple", "1")] == 6_000
    assert samples[("nv_inference_compute_output_duration_us", "versioned", "3")] == 80
    assert samples[(GAUGE_NAME, "simple", "1")] == 3
    assert len(samples) == (len(COUNTER_NAMES) + 1) * 2
    assert [family.name for family in COUNTER_FAMILIES] == COUNTER_NAMES
    # Each family's samples follow its own TYPE line (the format requires grouping by family).
    lines = text.splitlines()
    for name in COUNTER_NAMES + [GAUGE_NAME]:
        start = lines.index(f"# TYPE {name} {'gauge' if name == GAUGE_NAME else 'counter'}")
        assert lines[start + 1].startswith(name + "{") and lines[start + 2].startswith(name + "{")


def test_failure_counter_carries_the_reason_label_when_the_engine_gives_reasons() -> None:
    reasons = {"REJECTED": 2, "BACKEND": 0, "OTHER": 1}
    text = render_metrics([_statistics("simple", "1", 1)], lambda model, version: 0,
                          lambda model, version: reasons)
    for reason, count in reasons.items():
        assert f'nv_inference_request_failure{{model="simple",version="1",reason="{reason}"}} {count}\n' in text
    assert parse_samples(text)[("nv_inference_request_failure", "simple", "1")] == 3
    # A version the engine has no reasons for falls back to the proto's total, without a reason label.
    text = render_metrics([_statistics("simple", "1", 1)], lambda model, version: 0, lambda model, version: {})
    assert 'nv_inference_request_failure{model="simple",version="1"} 1\n' in text


def test_label_values_are_escaped() -> None:
    text = render_metrics([_statistics('we"ird\\name\n', "1", 1)], lambda model, version: 0)
    assert 'model="we\\"ird\\\\name\\n"' in text
    assert parse_samples(text)  # still one well-formed sample per line


def test_no_models_still_lists_every_family() -> None:
    text = render_metrics([], lambda model, version: 0)
    assert parse_samples(text) == {}
    assert text.count("# TYPE ") == len(COUNTER_NAMES) + 1


def _scrape(server) -> tuple[str, dict[tuple[str, str, str], int]]:
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        assert response.status == 200
        content_type = response.headers["Content-Type"]
        return content_type, parse_samples(response.read().decode("utf-8"))


def test_metrics_endpoint_counters_move_with_inferences(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple")
    content_type, before = _scrape(server)
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    assert (GAUGE_NAME, "simple", "1") in before

    client = triton_http.InferenceServerClient(server.http_url)
    infer_input = triton_http.InferInput("INPUT0", [1, 4], "FP32")
    infer_input.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    successes = 3
    for _ in range(successes):
        client.infer("simple", [infer_input])
    bad_input = triton_http.InferInput("INPUT0", [1, 5], "FP32")  # wrong shape: rejected by the engine
    bad_input.set_data_from_numpy(np.ones((1, 5), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("simple", [bad_input])
    client.close()

    _, after = _scrape(server)

    def delta(name: str) -> int:
        return after[(name, "simple", "1")] - before[(name, "simple", "1")]

    assert delta("nv_inference_request_success") == successes
    # The wrong-shape request is refused before it reaches the model: like Triton, it is no inference failure.
    assert delta("nv_inference_request_failure") == 0
    assert delta("nv_inference_count") == successes
    assert 1 <= delta("nv_inference_exec_count") <= successes
    assert delta("nv_inference_request_duration_us") > 0
    assert delta("nv_inference_compute_infer_duration_us") > 0
    assert after[(GAUGE_NAME, "simple", "1")] == 0  # nothing in flight any more
    for name in COUNTER_NAMES:
        assert delta(name) >= 0, f"counter {name} went down"

    # The same numbers as the statistics endpoint.
    stats = triton_http.InferenceServerClient(server.http_url).get_inference_statistics("simple")
    success = stats["model_stats"][0]["inference_stats"]["success"]
    assert after[("nv_inference_request_success", "simple", "1")] == success["count"]
    assert after[("nv_inference_request_failure", "simple", "1")] == (
        stats["model_stats"][0]["inference_stats"]["fail"]["count"]
    )

    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        assert response.status == 200  # scraping again works: nothing is consumed by a scrape
