"""The ``eo-inference-server`` command: settings, start, readiness, graceful shutdown, startup failures."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from services.inference.cli import parse_settings
from services.inference.model_config import parse_config_text
from tiny_models import SLOW_WIDTH, build_tiny_repository, make_slow, write_config

# Not imported from conftest: another test package has a conftest module of the same name.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_settings_come_from_options_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EOML_INFERENCE_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("EOML_INFERENCE_HTTP_PORT", "9000")
    monkeypatch.setenv("EOML_INFERENCE_LOAD_MODEL", "a,b")
    monkeypatch.setenv("EOML_INFERENCE_MODEL_CONTROL_MODE", "explicit")
    settings = parse_settings(["--grpc-port", "9001", "--allow-metrics=false", "--log-verbose", "1"])
    assert settings.model_repository == [str(tmp_path)]
    assert (settings.http_port, settings.grpc_port) == (9000, 9001)
    assert settings.load_model == ["a", "b"] and settings.model_control_mode == "explicit"
    assert settings.allow_metrics is False and settings.allow_http is True
    assert settings.log_level == "DEBUG"
    assert settings.grpc_max_message_size == settings.http_max_body_size == 64 * 1024 * 1024
    assert settings.effective_metrics_address == settings.http_address

    settings = parse_settings(["--model-repository", "x", "--model-repository", "y", "--http-port", "1"])
    assert settings.model_repository == ["x", "y"] and settings.http_port == 1  # the option wins


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grpc-max-message-size", "1024"], "grpc_max_message_size"),
        (["--model-control-mode", "none", "--load-model", "a"], "explicit"),
        (["--allow-http", "maybe"], "true or false"),
    ],
)
def test_invalid_settings_exit_with_usage_status(tmp_path: Path, args: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--model-repository", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_repository_setting_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("EOML_INFERENCE_MODEL_REPOSITORY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_settings([])
    assert exit_info.value.code == 2
    assert "model repository" in capsys.readouterr().err


def test_server_serves_then_stops_on_sigterm_with_status_0(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository, "--log-format", "text")
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_live() and client.is_server_ready()
    infer_input = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    infer_input.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    np.testing.assert_array_equal(client.infer("simple", [infer_input]).as_numpy("OUTPUT0"), [[1, 2, 3, 4]])
    with socket.create_connection(("127.0.0.1", int(server.grpc_url.split(":")[1])), timeout=5):
        pass  # gRPC listens too
    client.close()
    assert server.stop(signal.SIGTERM) == 0
    assert "server stopped" in server.log()


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path, running_server) -> None:
    # About half a second per execution, no batching: four requests keep the server busy for ~2 s.
    make_slow(tmp_path, work_matmuls=400, dynamic_batching=False)
    server = running_server(tmp_path, "--log-format", "text")
    inputs = [np.full((1, SLOW_WIDTH), i, np.float32) for i in range(4)]
    results: dict[int, object] = {}

    def send(index: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
        try:
            infer_input = httpclient.InferInput("INPUT0", [1, SLOW_WIDTH], "FP32")
            infer_input.set_data_from_numpy(inputs[index])
            results[index] = client.infer("slow", [infer_input]).as_numpy("OUTPUT0")
        except Exception as error:  # recorded and asserted below
            results[index] = error
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    # Wait until all four requests reached the server and some are still queued (the metrics say
    # so: one runs at a time, so "queued + executed >= 3" means the fourth has arrived), then stop it.
    deadline = time.monotonic() + 60
    queued = executed = 0
    while time.monotonic() < deadline and not (queued + executed >= len(inputs) - 1 and queued > 0):
        body = _get(f"http://{server.metrics_url}/metrics")
        queued = _metric(body, "nv_inference_pending_request_count")
        executed = _metric(body, "nv_inference_exec_count")
        time.sleep(0.02)
    assert queued > 0 and queued + executed >= len(inputs) - 1, server.log()
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=120)
    assert server.process.wait(timeout=60) == 0, server.log()
    for index, x in enumerate(inputs):
        assert isinstance(results[index], np.ndarray), results[index]
        np.testing.assert_array_equal(results[index], x)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _metric(exposition: str, family: str) -> int:
    match = re.search(rf'^{family}{{model="slow",version="1"}} (\d+)', exposition, re.MULTILINE)
    return int(match.group(1)) if match else 0


def test_environment_selects_explicit_mode_and_disabled_frontends(tiny_repository: Path, running_server) -> None:
    server = running_server(
        tiny_repository, "--allow-grpc=false",
        env={"EOML_INFERENCE_MODEL_CONTROL_MODE": "explicit", "EOML_INFERENCE_LOAD_MODEL": "simple,classifier"},
    )
    client = httpclient.InferenceServerClient(server.http_url)
    ready = {entry["name"] for entry in client.get_model_repository_index() if entry.get("state") == "READY"}
    assert ready == {"simple", "classifier"}
    client.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(server.grpc_url.split(":")[1])), timeout=2).close()


def test_startup_failures_exit_with_status_1_and_say_why(tmp_path: Path, running_server) -> None:
    repository = build_tiny_repository(tmp_path / "repo", ["simple"])
    config = parse_config_text((repository / "simple" / "config.pbtxt").read_text())
    config.output[0].name = "SCORES"
    write_config(repository / "simple", config)
    server = running_server(repository, "--log-format", "text", wait_for=None)
    assert server.process.wait(timeout=60) == 1
    assert "SCORES" in server.log()

    # Without exit-on-error the server runs, live but not ready.
    server = running_server(repository, "--exit-on-error=false", wait_for="live")
    status, _ = server.http_get("/v2/health/ready")
    assert status != 200

    missing = subprocess.run(
        [sys.executable, "-m", "services.inference.cli", "--model-repository", str(tmp_path / "nope"),
         "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert missing.returncode == 1
    assert "not a directory" in missing.stderr
