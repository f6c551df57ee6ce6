"""Server processes for the inference tests: our server and NVIDIA's real Triton on free loopback ports.

Plain functions (no fixtures) so that module-scoped fixtures and tests can share them; ``conftest.py``
wraps them in fixtures. (Not in conftest.py itself: another test package's conftest shares that module name.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.inference.real_triton import (
    TritonInstallation,
    TritonNotInstalled,
    prepare_backend_directory,
    triton_command,
    triton_environment,
)
from services.local_platform.infra import free_ports

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 15.0
# make triton-install puts real Triton here; EOML_TEST_TRITON_VENV points elsewhere.
TRITON_VENV = Path(os.environ.get("EOML_TEST_TRITON_VENV", PROJECT_ROOT / ".venv-triton"))


@dataclass
class RunningServer:
    """One server subprocess: its addresses (``host:port``, as tritonclient wants them) and its log."""

    process: subprocess.Popen
    http_url: str
    grpc_url: str
    metrics_url: str
    repository: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = SERVER_STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait for the exit status; kills the process if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_until_healthy(server: RunningServer, wait_for: str, timeout: float = SERVER_START_TIMEOUT_S) -> None:
    """Wait until ``/v2/health/<wait_for>`` answers 200; RuntimeError with the server's log otherwise."""
    health_path = f"/v2/health/{wait_for}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"inference server exited with status {server.process.returncode} before {health_path} answered 200"
                f"\n--- server log ---\n{server.log()}"
            )
        try:
            status, _ = server.http_get(health_path, timeout=1.0)
            if status == 200:
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"inference server did not answer 200 on {health_path} within {timeout} s"
                       f"\n--- server log ---\n{server.log()}")


def launch_server(
    command: list[str], repository: Path, log_path: Path, ports: tuple[int, int, int],
    *, env: dict[str, str] | None = None, wait_for: str | None = "ready", timeout: float = SERVER_START_TIMEOUT_S,
) -> RunningServer:
    """Start ``command`` (a server listening on ``ports``: HTTP, gRPC, metrics) and wait for its health endpoint."""
    http_port, grpc_port, metrics_port = ports
    if env is None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = RunningServer(
        process=process,
        http_url=f"127.0.0.1:{http_port}",
        grpc_url=f"127.0.0.1:{grpc_port}",
        metrics_url=f"127.0.0.1:{metrics_port}",
        repository=repository,
        log_path=log_path,
        args=command,
    )
    if wait_for is not None:
        wait_until_healthy(server, wait_for, timeout)
    return server


def our_server_command(repository: Path, ports: tuple[int, int, int], *extra_args: str) -> list[str]:
    http_port, grpc_port, metrics_port = ports
    return [
        sys.executable, "-m", "services.inference.cli",
        "--model-repository", str(repository),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
        *extra_args,
    ]


def real_triton_installation() -> TritonInstallation:
    """The real Triton of ``make triton-install``; skips the test when it is not installed."""
    try:
        return TritonInstallation.from_venv(TRITON_VENV)
    except TritonNotInstalled as error:
        pytest.skip(f"real Triton is not installed: {error}")


def start_real_triton(
    repository: Path, work_dir: Path, *extra_args: str, wait_for: str | None = "ready"
) -> RunningServer:
    """NVIDIA's tritonserver (the wheel's binary, ONNX models through our Python-backend shim) on free loopback
    ports; ``extra_args`` go to tritonserver (``--model-control-mode=explicit`` ...)."""
    installation = real_triton_installation()
    backends = prepare_backend_directory(installation, work_dir / "triton-backends")
    ports = free_ports(3)
    command = triton_command(
        installation, repository, backends, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
        address="127.0.0.1", extra_args=extra_args,
    )
    return launch_server(command, repository, work_dir / f"triton-{ports[0]}.log", ports,
                         env=triton_environment(installation), wait_for=wait_for)
