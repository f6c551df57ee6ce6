"""Which inference server the local platform runs: ours, NVIDIA's real Triton, or an external KServe v2 server.

- ``ours`` (default): ``services.inference.cli`` on the repository.
- ``triton``: real Triton from ``make triton-install`` (``.venv-triton``), on the same repository with the
  configs unchanged (``services.inference.real_triton``; ONNX models through the Python-backend shim).
- ``--inference-url HOST:PORT``: a KServe v2 server that is already running (its gRPC address, what the
  Wrappers call); nothing is started for it, the stack waits until it is ready.

Both servers it starts restrict the admin API groups (``ADMIN_API_GROUPS``, as the chart does) with a random key
kept in ``<root>/inference-admin-key`` (mode 0600). The key reaches the server by that file, never by its command
line: ours reads ``--restricted-api-key-file``; real Triton gets it through the preload library of
``services.inference.real_triton``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Mapping

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

INFERENCE_CHOICES = ("ours", "triton")
DEFAULT_TRITON_VENV = Path(".venv-triton")
ADMIN_API_GROUPS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER_KEY = "eoml-admin-key"
ADMIN_KEY_FILE = "inference-admin-key"


def admin_key_file(root: Path) -> Path:
    """``<root>/inference-admin-key``: created once (0600) with a random key, kept across restarts."""
    path = Path(root).absolute() / ADMIN_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    return path


def restricted_api_args() -> list[str]:
    """The restriction options without their value (``<apis>:<key>``): the value comes from the key file."""
    spec = f"{','.join(ADMIN_API_GROUPS)}:{ADMIN_HEADER_KEY}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--inference`` and ``--inference-url`` of ``eo-platform up|demo``."""
    parser.add_argument("--inference", choices=INFERENCE_CHOICES, default="ours",
                        help="inference server to run: ours, or NVIDIA's real Triton (make triton-install)")
    parser.add_argument("--inference-url", default="", metavar="HOST:PORT",
                        help="use this running KServe v2 server (its gRPC address) instead of starting one")


def inference_command(
    kind: str, python: str, repository: Path, ports: Mapping[str, int], root: Path,
    triton_venv: Path = DEFAULT_TRITON_VENV,
) -> tuple[list[str], dict[str, str]]:
    """The inference server process for ``kind`` on loopback ``ports`` (http, grpc, metrics): its command line and
    the environment it needs beyond the stack's. Real Triton is started directly (not through a launcher that
    replaces itself), so the recorded command line is the running process's and ``eo-platform down`` stops it."""
    key_file = admin_key_file(root)
    if kind == "ours":
        return [
            python, "-m", "services.inference.cli", "--model-repository", str(repository),
            "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--http-port", str(ports["http"]),
            "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
            *restricted_api_args(), "--restricted-api-key-file", str(key_file),
        ], {}
    if kind == "triton":
        from services.inference.real_triton import (
            TritonInstallation,
            TritonNotInstalled,
            build_key_preload,
            prepare_backend_directory,
            triton_command,
            triton_environment,
        )

        try:
            installation = TritonInstallation.from_venv(triton_venv)
        except TritonNotInstalled as error:
            raise ValueError(f"{error}; run 'make triton-install' first") from None
        backends = prepare_backend_directory(installation, root / "triton-backends")
        command = triton_command(installation, repository, backends, http_port=ports["http"],
                                 grpc_port=ports["grpc"], metrics_port=ports["metrics"], address="127.0.0.1",
                                 extra_args=restricted_api_args())
        try:
            preload = build_key_preload(root / "triton-preload")
        except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
            raise ValueError(f"real Triton with restricted APIs: {error}") from None
        return command, triton_environment(installation, restricted_api_key_file=key_file, key_preload=preload)
    raise ValueError(f"unknown inference server '{kind}' (one of {', '.join(INFERENCE_CHOICES)})")


def external_grpc_address(url: str) -> str:
    """``HOST:PORT`` from ``--inference-url`` (``grpc://`` accepted; the Wrappers speak gRPC to it)."""
    address = url.removeprefix("grpc://").rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--inference-url must be the gRPC address HOST:PORT of a KServe v2 server, got '{url}'")
    return address


def wait_until_ready(grpc_address: str, timeout_s: float) -> None:
    """Wait until the v2 server at ``grpc_address`` says ServerReady; TimeoutError with the last error otherwise."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    with grpc.insecure_channel(grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2).ready:
                    return
                last_error = "not ready"
            except grpc.RpcError as error:
                last_error = f"{error.code().name}: {error.details()}"
            time.sleep(0.5)
    raise TimeoutError(f"inference server at {grpc_address} not ready within {timeout_s:.0f} s ({last_error})")
