"""The server's state and operations: what every frontend (HTTP, gRPC, metrics) calls.

INTERFACE CONTRACT shared by the frontends. Frontends must not reach past these methods.
Errors are raised as ``protocol.InferenceServerError`` with the kind that maps to Triton's
HTTP status / gRPC code.

Canonical objects:
- model configuration: ``tritonclient.grpc.model_config_pb2.ModelConfig`` (the proto Triton uses);
- statistics: ``tritonclient.grpc.service_pb2.ModelStatistics`` protos;
- metadata / index entries: the dataclasses below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2, service_pb2

from .protocol import InferRequest, InferResponse

SERVER_NAME = "eo-inference-server"
# Triton's extension names; only what the server really implements is listed.
SERVER_EXTENSIONS = (
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
)


@dataclass(slots=True)
class TensorMetadata:
    name: str
    datatype: str  # protocol name: FP32, INT64, BYTES ...
    shape: list[int]  # with -1 for the batch dimension (and any variable dimension)


@dataclass(slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(slots=True)
class RepositoryIndexEntry:
    name: str
    version: str  # "" when the model has no loaded version
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING
    reason: str = ""


@dataclass(slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str] = field(default_factory=list)


__all__ = [
    "SERVER_NAME",
    "SERVER_EXTENSIONS",
    "TensorMetadata",
    "ModelMetadata",
    "RepositoryIndexEntry",
    "ServerMetadata",
    "model_config_pb2",
    "service_pb2",
    "InferRequest",
    "InferResponse",
]

# The engine class itself (``InferenceEngine``) is defined below by the server-core work with
# exactly these public methods; all are safe to call from the event loop thread:
#
#   async start() -> None            load models per control mode, warm up, start polling if mode=poll
#   async stop() -> None             drain queues, stop instances
#   is_live() -> bool
#   is_ready() -> bool               live and every model that should be loaded is READY
#   server_metadata() -> ServerMetadata
#   model_ready(name: str, version: str = "") -> bool
#   model_metadata(name: str, version: str = "") -> ModelMetadata        NOT_FOUND if unknown/not ready
#   model_config(name: str, version: str = "") -> model_config_pb2.ModelConfig
#   model_statistics(name: str = "", version: str = "") -> list[service_pb2.ModelStatistics]
#   async infer(request: InferRequest) -> InferResponse
#        validates names, dtypes, shapes (batch dim vs max_batch_size), byte sizes; applies the
#        classification extension (RequestedOutput.class_count) using the label file; goes through
#        the dynamic batcher; UNAVAILABLE when the queue is full.
#   repository_index(ready_only: bool = False) -> list[RepositoryIndexEntry]
#   async load_model(name: str, config_json: str | None = None) -> None
#        explicit mode only (UNSUPPORTED otherwise); config_json overrides config.pbtxt (Triton's
#        JSON form of ModelConfig); reloading a loaded model replaces it without dropping requests.
#   async unload_model(name: str, unload_dependents: bool = False) -> None
#   pending_request_count(name: str, version: str) -> int       for nv_inference_pending_request_count
