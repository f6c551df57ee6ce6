"""The local platform's choice of inference server (services/local_platform/inference_backends.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.local_platform.inference_backends import (
    external_grpc_address,
    inference_command,
    wait_until_ready,
)
from services.local_platform.infra import free_port

PORTS = {"http": 18000, "grpc": 18001, "metrics": 18002}


def test_ours_and_triton_serve_the_same_repository_on_the_same_ports(tmp_path: Path) -> None:
    ours, ours_env = inference_command("ours", "python", Path("/repo"), PORTS, tmp_path)
    assert ours_env == {} and ours[:3] == ["python", "-m", "services.inference.cli"]
    for option, value in (("--model-repository", "/repo"), ("--http-port", "18000"), ("--grpc-port", "18001"),
                          ("--metrics-port", "18002")):
        assert ours[ours.index(option) + 1] == value
    with pytest.raises(ValueError, match="make triton-install"):
        inference_command("triton", "python", Path("/repo"), PORTS, tmp_path, triton_venv=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown inference server"):
        inference_command("torchserve", "python", Path("/repo"), PORTS, tmp_path)


def test_triton_command_when_installed(tmp_path: Path) -> None:
    venv = Path(__file__).resolve().parents[2] / ".venv-triton"
    if not (venv / ".installed").exists():
        pytest.skip("real Triton is not installed (make triton-install)")
    triton, env = inference_command("triton", "python", Path("/repo"), PORTS, tmp_path, triton_venv=venv)
    # tritonserver itself, so that the PID the stack records runs the command it records (eo-platform down).
    assert Path(triton[0]).name == "tritonserver" and "--grpc-port=18001" in triton
    assert f"--backend-directory={tmp_path / 'triton-backends'}" in triton
    assert (tmp_path / "triton-backends" / "onnxruntime" / "model.py").is_file()
    assert env["PATH"].startswith(str(venv / "bin")) and "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]


def test_external_url_is_a_grpc_address() -> None:
    assert external_grpc_address("grpc://triton.eoml.svc:8001/") == "triton.eoml.svc:8001"
    assert external_grpc_address("127.0.0.1:9001") == "127.0.0.1:9001"
    for bad in ("http://host", "host", "host:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            external_grpc_address(bad)


def test_waiting_for_an_external_server(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository)
    wait_until_ready(server.grpc_url, timeout_s=10)
    with pytest.raises(TimeoutError, match="not ready"):
        wait_until_ready(f"127.0.0.1:{free_port()}", timeout_s=1)
