"""Triton's restricted APIs: API groups that answer only requests carrying a header ``key: value``.

Options, as Triton 2.51 spells them (each may be repeated; an API group may appear in one option only):

    --http-restricted-api=<api>[,<api>...]:<key>=<value>       HTTP header  <key>: <value>
    --grpc-restricted-protocol=<api>[,<api>...]:<key>=<value>  gRPC metadata triton-grpc-protocol-<key>: <value>

Refusals are Triton's, checked against the real server by ``tests/inference/test_conformance.py``:
HTTP 403 ``{"error": "This API is restricted, expecting header '<key>'"}``; gRPC UNAVAILABLE
``This protocol is restricted, expecting header 'triton-grpc-protocol-<key>'``. The value is a
secret: it never appears in an error message or a log line.

Our extension, so the value never sits on a command line (``ps`` shows every process's arguments): a spec without
``=<value>`` (``<api>[,<api>...]:<key>``) takes the restricted-API key that reached the server by file
(``--restricted-api-key-file`` / ``EOML_INFERENCE_RESTRICTED_API_KEY_FILE``) or by environment
(``EOML_INFERENCE_RESTRICTED_API_KEY``). Real Triton reads these options from argv only; for it,
``triton_restricted_key_preload.c`` completes the same value-less spec from a key file inside the process.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Iterable, Mapping

API_GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"

# Which group each RPC of inference.GRPCInferenceService belongs to (Triton's grpc_server.cc).
GRPC_METHOD_GROUPS = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}


@dataclass(frozen=True)
class Restriction:
    """The header a restricted group requires. ``value`` is a secret (kept out of repr)."""

    key: str
    value: str

    def __repr__(self) -> str:
        return f"Restriction(key={self.key!r}, value=<redacted>)"

    def admits(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.value.encode())


def parse_restrictions(specs: Iterable[str], option: str, key_value: str | None = None) -> dict[str, Restriction]:
    """``{group: Restriction}`` from option values; ValueError with Triton's wording for a bad one. A spec without
    ``=<value>`` takes ``key_value`` (the key read from a file or the environment); without one it is refused."""
    restrictions: dict[str, Restriction] = {}
    for spec in specs:
        groups_part, colon, setting = spec.partition(":")
        key, equals, value = setting.partition("=")
        if colon and not equals and key_value:
            equals, value = "=", key_value
        if not colon or not equals or not groups_part or not key:
            raise ValueError(f"{option} option format is '<config name>:<setting>=<value>'. Got {spec.split(':')[0]}")
        for group in (name.strip() for name in groups_part.split(",")):
            if group not in API_GROUPS:
                raise ValueError(f"unknown restricted api '{group}' (one of {', '.join(API_GROUPS)})")
            if group in restrictions:
                raise ValueError(f"restricted api '{group}' can not be specified in multiple config groups")
            restrictions[group] = Restriction(key=key, value=value)
    return restrictions


def http_api_group(method: str, path: str) -> str | None:
    """The API group of an HTTP request (Triton's http_server.cc routing), None for no endpoint."""
    parts = [part for part in path.split("/") if part]
    if not parts or parts[0] != "v2":
        return None
    if len(parts) == 1:
        return "metadata"
    head = parts[1]
    if head == "health":
        return "health"
    if head == "repository":
        return "model-repository"
    if head in ("systemsharedmemory", "cudasharedmemory"):
        return "shared-memory"
    if head == "trace":
        return "trace"
    if head == "logging":
        return "logging"
    if head == "models":
        if len(parts) == 3 and parts[2] == "stats":
            return "statistics"
        rest = parts[3:]
        if len(rest) >= 2 and rest[0] == "versions":
            rest = rest[2:]
        action = rest[0] if rest else ""
        return {"": "metadata", "ready": "health", "infer": "inference", "config": "model-config",
                "stats": "statistics"}.get(action)
    return None


def http_refusal(restrictions: Mapping[str, Restriction], method: str, path: str,
                 headers: Mapping[str, str]) -> str | None:
    """The error message when the request is refused, None when it may go on (``headers`` case-insensitive)."""
    group = http_api_group(method, path)
    restriction = restrictions.get(group) if group else None
    if restriction is None or restriction.admits(headers.get(restriction.key)):
        return None
    return f"This API is restricted, expecting header '{restriction.key}'"


def grpc_refusal(restrictions: Mapping[str, Restriction], method: str,
                 metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """Like :func:`http_refusal` for a gRPC call; ``method`` is the full path ``/inference.GRPC.../ModelInfer``."""
    group = GRPC_METHOD_GROUPS.get(method.rsplit("/", 1)[-1])
    restriction = restrictions.get(group) if group else None
    if restriction is None:
        return None
    header = GRPC_HEADER_PREFIX + restriction.key.lower()
    presented = next(
        (value if isinstance(value, str) else value.decode("utf-8", "replace")
         for name, value in (metadata or ()) if name.lower() == header),
        None,
    )
    if restriction.admits(presented):
        return None
    return f"This protocol is restricted, expecting header '{GRPC_HEADER_PREFIX}{restriction.key}'"
