"""Fixtures for the inference-server tests: a tiny model repository and real server processes.

``running_server`` starts ``python -m services.inference.cli`` as a subprocess on free loopback
ports and waits until it answers ``/v2/health/ready`` (or ``/live``) with 200::

    def test_something(tiny_repository, running_server):
        server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple")
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from inference_servers import (
    SERVER_START_TIMEOUT_S,
    RunningServer,
    launch_server,
    wait_until_healthy,
    our_server_command,
    start_real_triton,
)
from services.local_platform.infra import free_ports
from tiny_models import build_tiny_repository


@pytest.fixture
def real_triton(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Factory: ``real_triton(repository, *tritonserver_args, wait_for="ready")`` -> RunningServer; stopped after
    the test. Skips when ``make triton-install`` has not run."""
    started: list[RunningServer] = []

    def start(repository: Path, *extra_args: str, wait_for: str | None = "ready") -> RunningServer:
        server = start_real_triton(repository, tmp_path, *extra_args, wait_for=wait_for)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def tiny_repository(tmp_path: Path) -> Path:
    """A Triton model repository with every tiny model of ``tiny_models`` (fresh per test)."""
    return build_tiny_repository(tmp_path / "model_repository")


@pytest.fixture
def running_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Factory: ``running_server(repository, *extra_args, wait_for="ready", env=None)`` -> RunningServer.

    ``wait_for`` is ``"ready"`` (``/v2/health/ready``), ``"live"`` or ``None`` (do not wait).
    Every server started is terminated (SIGTERM, then SIGKILL) when the test ends.
    """
    started: list[RunningServer] = []

    def start(
        repository: Path,
        *extra_args: str,
        wait_for: str | None = "ready",
        env: dict[str, str] | None = None,
        timeout: float = SERVER_START_TIMEOUT_S,
    ) -> RunningServer:
        ports = free_ports(3)
        server = launch_server(
            our_server_command(repository, ports, *extra_args), repository, tmp_path / f"server-{len(started)}.log",
            ports, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, wait_for=None,
        )
        started.append(server)
        if wait_for is not None:
            wait_until_healthy(server, wait_for, timeout)
        return server

    yield start
    for server in started:
        server.stop()
