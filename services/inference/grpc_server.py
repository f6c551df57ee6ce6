"""Triton's gRPC frontend (``inference.GRPCInferenceService``) over the inference engine.

The servicer is built on the protobuf stubs shipped in ``tritonclient`` so that the wire format is
exactly Triton's: ``tritonclient.grpc`` (sync and aio) and ``perf_analyzer -i grpc`` talk to this
server as they talk to Triton. The conversions between protobuf messages and the transport-free
types of :mod:`services.inference.protocol` are plain functions; the servicer only routes RPCs to
the engine and turns ``InferenceServerError`` into gRPC status codes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, NoReturn

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from . import triton_parameters
from .restricted_api import Restriction, grpc_refusal
from .triton_parameters import pop_classification, reject_shared_memory
from .protocol import (
    ErrorKind,
    InferenceServerError,
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    array_from_raw,
    array_to_raw,
    element_count,
    invalid,
    not_found,
    numpy_dtype,
)

if TYPE_CHECKING:
    from .engine import InferenceEngine, ModelMetadata, RepositoryIndexEntry, ServerMetadata

log = logging.getLogger(__name__)

# Triton's own clients allow 2 GiB messages; 64 MiB is what a batch of Sentinel-2 tiles needs at least
# (one FP32 10x120x120 tile is 576 KiB), so a smaller limit is refused rather than silently applied.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MIN_MAX_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_BYTES

# Requests of one stream whose responses are not written yet. Past this the server stops reading
# the stream, so HTTP/2 flow control pushes back on a client that sends faster than it reads.
STREAM_MAX_IN_FLIGHT = 256

# Which InferTensorContents field carries each datatype (Triton's mapping: the narrow integer types
# travel widened to 32 bits). FP16 has no typed field: it can only be sent as raw contents.
CONTENTS_FIELD_BY_DATATYPE: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
CONTENTS_FIELDS = tuple(dict.fromkeys(CONTENTS_FIELD_BY_DATATYPE.values()))
# The datatype each contents field holds on the wire (narrow integers are widened into it).
DATATYPE_OF_CONTENTS_FIELD = {
    "bool_contents": "BOOL",
    "int_contents": "INT32",
    "int64_contents": "INT64",
    "uint_contents": "UINT32",
    "uint64_contents": "UINT64",
    "fp32_contents": "FP32",
    "fp64_contents": "FP64",
    "bytes_contents": "BYTES",
}


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def parameters_from_proto(parameters: Any) -> dict[str, Any]:
    """A protobuf map of ``InferParameter`` / ``ModelRepositoryParameter`` as plain Python values."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def set_parameters(target: Any, values: dict[str, Any]) -> None:
    """Write plain Python values into a protobuf map of ``InferParameter``."""
    for key, value in values.items():
        parameter = target[key]
        if isinstance(value, bool):  # before int: bool is an int subclass
            parameter.bool_param = value
        elif isinstance(value, (int, np.integer)):
            if value >= 2**63:
                parameter.uint64_param = int(value)
            else:
                parameter.int64_param = int(value)
        elif isinstance(value, (float, np.floating)):
            parameter.double_param = float(value)
        elif isinstance(value, bytes):
            parameter.string_param = value.decode("utf-8", errors="replace")
        else:
            parameter.string_param = str(value)


# --------------------------------------------------------------------------------------------
# ModelInferRequest -> InferRequest
# --------------------------------------------------------------------------------------------

_MODEL_VERSION_PATTERN = re.compile(r"[0-9]+")


def checked_model_version(model_name: str, version: str) -> str:
    """Triton's frontends accept "" (the newest ready version) or an integer; anything else is the
    client's mistake (INVALID_ARGUMENT), not an unknown version (NOT_FOUND)."""
    if version and not _MODEL_VERSION_PATTERN.fullmatch(version):
        raise invalid(
            f"invalid model version '{version}' for model '{model_name}': the version must be an integral value"
        )
    return version


def _checked_shape(tensor: Any, model_name: str) -> list[int]:
    shape = list(tensor.shape)
    if shape and min(shape) < 0:
        raise invalid(f"input '{tensor.name}' for model '{model_name}' has a negative dimension in shape {shape}")
    return shape


def array_from_contents(tensor: Any, model_name: str, shape: list[int]) -> np.ndarray:
    """Decode an input sent in the typed ``contents`` fields instead of raw bytes."""
    datatype = tensor.datatype
    contents = tensor.contents
    filled = [name for name in CONTENTS_FIELDS if len(getattr(contents, name)) > 0]
    expected_field = CONTENTS_FIELD_BY_DATATYPE.get(datatype)
    if expected_field is None:
        raise invalid(
            f"input '{tensor.name}' for model '{model_name}' has datatype '{datatype}', which cannot be "
            "sent in typed contents; send it in raw_input_contents"
        )
    for name in filled:
        if name != expected_field:
            raise invalid(
                f"unexpected explicit tensor data for input '{tensor.name}' for model '{model_name}' of "
                f"type '{DATATYPE_OF_CONTENTS_FIELD[name]}' ({name}), expected datatype '{datatype}'"
            )
    values = getattr(contents, expected_field)
    count = element_count(shape)
    if len(values) != count:
        raise invalid(
            f"input '{tensor.name}' for model '{model_name}' has {len(values)} elements in {expected_field} "
            f"but shape {shape} needs {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    wire_dtype = numpy_dtype(DATATYPE_OF_CONTENTS_FIELD[expected_field])
    # Narrow integer types arrive widened to 32 bits; astype keeps their low bytes as Triton does.
    return np.array(values, dtype=wire_dtype).astype(numpy_dtype(datatype), copy=False).reshape(shape)


def infer_request_from_proto(request: service_pb2.ModelInferRequest) -> InferRequest:
    """Decode a ``ModelInferRequest``; raises INVALID_ARGUMENT naming the input that is wrong."""
    model_name = request.model_name
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise invalid(
            f"model '{model_name}': expected {len(request.inputs)} raw_input_contents (one per input, "
            f"in input order), got {len(raw_contents)}"
        )
    inputs: list[InferInput] = []
    for index, tensor in enumerate(request.inputs):
        # Most requests carry no tensor parameters: the map is only searched when it has entries.
        tensor_parameters = tensor.parameters
        if tensor_parameters:
            reject_shared_memory(tensor_parameters, f"input '{tensor.name}'")
        shape = _checked_shape(tensor, model_name)
        has_contents = tensor.HasField("contents")
        if raw_contents:
            if has_contents:
                raise invalid(
                    f"contents field must not be specified when using raw_input_contents for "
                    f"'{tensor.name}' for model '{model_name}'"
                )
            try:
                data = array_from_raw(raw_contents[index], tensor.datatype, shape)
            except InferenceServerError as err:
                raise InferenceServerError(
                    err.kind, f"input '{tensor.name}' for model '{model_name}': {err.message}"
                ) from None
        elif has_contents:
            data = array_from_contents(tensor, model_name, shape)
        else:
            raise invalid(f"unable to find data for input tensor '{tensor.name}' for model '{model_name}' in request")
        inputs.append(
            InferInput(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=shape,
                data=data,
                parameters=parameters_from_proto(tensor_parameters) if tensor_parameters else {},
            )
        )
    outputs: list[RequestedOutput] = []
    for tensor in request.outputs:
        tensor_parameters = tensor.parameters
        parameters = parameters_from_proto(tensor_parameters) if tensor_parameters else {}
        if parameters:
            reject_shared_memory(parameters, f"output '{tensor.name}'")
        class_count = pop_classification(parameters, tensor.name)
        outputs.append(RequestedOutput(name=tensor.name, class_count=class_count, parameters=parameters))
    return InferRequest(
        model_name=model_name,
        model_version=checked_model_version(model_name, request.model_version),
        id=request.id,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters_from_proto(request.parameters) if request.parameters else {},
    )


# --------------------------------------------------------------------------------------------
# InferResponse / engine objects -> protobuf
# --------------------------------------------------------------------------------------------


def fill_infer_response(target: service_pb2.ModelInferResponse, response: InferResponse) -> None:
    """Write ``response`` into ``target`` in place (so a stream response embeds it without a copy).

    Like Triton, every output's data goes to ``raw_output_contents``, in output order.
    """
    target.model_name = response.model_name
    target.model_version = response.model_version
    target.id = response.id
    if response.parameters:
        set_parameters(target.parameters, response.parameters)
    raw_contents: list[bytes] = []
    for output in response.outputs:
        tensor = target.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if output.parameters:
            set_parameters(tensor.parameters, output.parameters)
        raw_contents.append(array_to_raw(output.data))
    target.raw_output_contents.extend(raw_contents)


def infer_response_to_proto(response: InferResponse) -> service_pb2.ModelInferResponse:
    message = service_pb2.ModelInferResponse()
    fill_infer_response(message, response)
    return message


FINAL_RESPONSE_PARAMETER = "triton_final_response"


def stream_infer_response(response: InferResponse) -> service_pb2.ModelStreamInferResponse:
    """A stream's answer to one request; like Triton it says ``triton_final_response: true`` (each request of
    a non-decoupled model has exactly one response)."""
    stream_response = service_pb2.ModelStreamInferResponse()
    fill_infer_response(stream_response.infer_response, response)
    stream_response.infer_response.parameters[FINAL_RESPONSE_PARAMETER].bool_param = True
    return stream_response


def stream_error_response(request_id: str, message: str) -> service_pb2.ModelStreamInferResponse:
    """A failed request on a stream: the error text, and the request id so the client can match it."""
    stream_response = service_pb2.ModelStreamInferResponse(error_message=message)
    stream_response.infer_response.id = request_id
    return stream_response


def server_metadata_to_proto(metadata: ServerMetadata) -> service_pb2.ServerMetadataResponse:
    return service_pb2.ServerMetadataResponse(
        name=metadata.name, version=metadata.version, extensions=list(metadata.extensions)
    )


def model_metadata_to_proto(metadata: ModelMetadata) -> service_pb2.ModelMetadataResponse:
    tensor = service_pb2.ModelMetadataResponse.TensorMetadata
    return service_pb2.ModelMetadataResponse(
        name=metadata.name,
        versions=list(metadata.versions),
        platform=metadata.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs],
    )


def repository_index_to_proto(entries: list[RepositoryIndexEntry]) -> service_pb2.RepositoryIndexResponse:
    model_index = service_pb2.RepositoryIndexResponse.ModelIndex
    return service_pb2.RepositoryIndexResponse(
        models=[model_index(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in entries]
    )


def load_config_override(request: service_pb2.RepositoryModelLoadRequest) -> str | None:
    """The ``config`` JSON override of a load request; rejects what this server cannot honour."""
    return triton_parameters.load_config_override(request.model_name, parameters_from_proto(request.parameters))


def unload_dependents_flag(request: service_pb2.RepositoryModelUnloadRequest) -> bool:
    return triton_parameters.unload_dependents(request.model_name, parameters_from_proto(request.parameters))


def _reject_repository_name(repository_name: str) -> None:
    # The server serves one repository; naming one is Triton's multi-repository form.
    if repository_name:
        raise InferenceServerError(
            ErrorKind.UNSUPPORTED,
            f"'repository_name' specification is not supported (got '{repository_name}')",
        )


# --------------------------------------------------------------------------------------------
# The servicer
# --------------------------------------------------------------------------------------------


def grpc_status_code(kind: ErrorKind) -> grpc.StatusCode:
    return grpc.StatusCode[kind.grpc_code_name]


def _internal_error_message(rpc: str, exc: BaseException) -> str:
    return f"internal error in {rpc}: {type(exc).__name__}: {exc}"


class TritonGrpcServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC of ``inference.GRPCInferenceService`` as an asyncio handler over one engine."""

    def __init__(self, engine: InferenceEngine) -> None:
        self._engine = engine

    async def _abort(
        self, context: grpc.aio.ServicerContext, rpc: str, error: Exception, model_name: str = ""
    ) -> NoReturn:
        """End the RPC with the status Triton would send; the server keeps serving."""
        if isinstance(error, InferenceServerError):
            # The client is told; at INFO a client sending bad requests would flood the log.
            log.debug(
                "grpc request rejected",
                extra={"rpc": rpc, "model": model_name, "code": error.kind.grpc_code_name, "error": error.message},
            )
            await context.abort(grpc_status_code(error.kind), error.message)
        # Anything else is a bug: the client gets INTERNAL with what went wrong, the log the traceback.
        log.error("grpc request failed", exc_info=error, extra={"rpc": rpc, "model": model_name})
        await context.abort(grpc.StatusCode.INTERNAL, _internal_error_message(rpc, error))
        raise AssertionError("context.abort returned")  # abort always raises

    # ---- health and metadata -------------------------------------------------------------

    async def ServerLive(self, request, context):  # type: ignore[override]
        try:
            return service_pb2.ServerLiveResponse(live=self._engine.is_live())
        except Exception as error:  # noqa: BLE001 - _abort maps every error to a status
            await self._abort(context, "ServerLive", error)

    async def ServerReady(self, request, context):  # type: ignore[override]
        try:
            return service_pb2.ServerReadyResponse(ready=self._engine.is_ready())
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "ServerReady", error)

    async def ModelReady(self, request, context):  # type: ignore[override]
        try:
            version = checked_model_version(request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=self._engine.model_ready(request.name, version))
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "ModelReady", error, request.name)

    async def ServerMetadata(self, request, context):  # type: ignore[override]
        try:
            return server_metadata_to_proto(self._engine.server_metadata())
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "ServerMetadata", error)

    async def ModelMetadata(self, request, context):  # type: ignore[override]
        try:
            version = checked_model_version(request.name, request.version)
            return model_metadata_to_proto(self._engine.model_metadata(request.name, version))
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "ModelMetadata", error, request.name)

    async def ModelConfig(self, request, context):  # type: ignore[override]
        try:
            version = checked_model_version(request.name, request.version)
            return service_pb2.ModelConfigResponse(config=self._engine.model_config(request.name, version))
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "ModelConfig", error, request.name)

    async def ModelStatistics(self, request, context):  # type: ignore[override]
        try:
            version = checked_model_version(request.name, request.version)
            stats = self._engine.model_statistics(request.name, version)
            return service_pb2.ModelStatisticsResponse(model_stats=stats)
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "ModelStatistics", error, request.name)

    # ---- inference -------------------------------------------------------------------------

    async def ModelInfer(self, request, context):  # type: ignore[override]
        # The hot path: decode, engine, encode in this one coroutine (no helper coroutine in between).
        try:
            return await self._engine.infer(infer_request_from_proto(request), infer_response_to_proto)
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "ModelInfer", error, request.model_name)

    async def _stream_response(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelStreamInferResponse:
        """One request of a stream answered; failures become ``error_message`` and the stream goes on."""
        try:
            return await self._engine.infer(infer_request_from_proto(request), stream_infer_response)
        except InferenceServerError as err:
            log.debug(
                "grpc stream request rejected",
                extra={"rpc": "ModelStreamInfer", "model": request.model_name, "error": err.message},
            )
            return stream_error_response(request.id, err.message)
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the stream
            log.exception("grpc stream request failed", extra={"rpc": "ModelStreamInfer", "model": request.model_name})
            return stream_error_response(request.id, _internal_error_message("ModelStreamInfer", exc))

    async def ModelStreamInfer(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[service_pb2.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Requests of a stream run concurrently (so the dynamic batcher can group them) while
        responses are written in request order, as Triton does for non-decoupled models."""
        in_order: asyncio.Queue[asyncio.Task[service_pb2.ModelStreamInferResponse] | None] = asyncio.Queue()
        in_flight = asyncio.Semaphore(STREAM_MAX_IN_FLIGHT)
        read_failure: list[BaseException] = []

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    await in_flight.acquire()
                    in_order.put_nowait(asyncio.create_task(self._stream_response(request)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - surfaced to the writer below
                read_failure.append(exc)
            finally:
                in_order.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        awaited: asyncio.Task[service_pb2.ModelStreamInferResponse] | None = None
        try:
            while (awaited := await in_order.get()) is not None:
                stream_response = await awaited
                in_flight.release()
                yield stream_response
            if read_failure:
                raise read_failure[0]
        finally:
            # The client went away or the server stops: nobody will read what is still running.
            reader.cancel()
            if awaited is not None:
                awaited.cancel()
            while not in_order.empty():
                pending = in_order.get_nowait()
                if pending is not None:
                    pending.cancel()

    # ---- model repository ------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):  # type: ignore[override]
        try:
            _reject_repository_name(request.repository_name)
            return repository_index_to_proto(self._engine.repository_index(ready_only=request.ready))
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "RepositoryIndex", error)

    async def RepositoryModelLoad(self, request, context):  # type: ignore[override]
        try:
            _reject_repository_name(request.repository_name)
            config_json = load_config_override(request)
            await self._engine.load_model(request.model_name, config_json)
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "RepositoryModelLoad", error, request.model_name)
        log.info(
            "model loaded over grpc",
            extra={"model": request.model_name, "config_override": config_json is not None},
        )
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):  # type: ignore[override]
        try:
            _reject_repository_name(request.repository_name)
            await self._engine.unload_model(request.model_name, unload_dependents_flag(request))
        except Exception as error:  # noqa: BLE001
            await self._abort(context, "RepositoryModelUnload", error, request.model_name)
        log.info("model unloaded over grpc", extra={"model": request.model_name})
        return service_pb2.RepositoryModelUnloadResponse()

    # ---- not implemented: shared memory, trace, log settings -------------------------------
    # The status RPCs answer honestly (no region is ever registered); everything that would
    # change state answers UNIMPLEMENTED.

    async def _unimplemented(self, rpc: str, context: grpc.aio.ServicerContext, what: str) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc}: {what} is not supported by this server")
        raise AssertionError("context.abort returned")

    async def SystemSharedMemoryStatus(self, request, context):  # type: ignore[override]
        if request.name:
            await self._abort(
                context,
                "SystemSharedMemoryStatus",
                not_found(f"Unable to find system shared memory region: '{request.name}'"),
            )
        return service_pb2.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request, context):  # type: ignore[override]
        return await self._unimplemented("SystemSharedMemoryRegister", context, "system shared memory")

    async def SystemSharedMemoryUnregister(self, request, context):  # type: ignore[override]
        return await self._unimplemented("SystemSharedMemoryUnregister", context, "system shared memory")

    async def CudaSharedMemoryStatus(self, request, context):  # type: ignore[override]
        if request.name:
            await self._abort(
                context,
                "CudaSharedMemoryStatus",
                not_found(f"Unable to find cuda shared memory region: '{request.name}'"),
            )
        return service_pb2.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request, context):  # type: ignore[override]
        return await self._unimplemented("CudaSharedMemoryRegister", context, "CUDA shared memory")

    async def CudaSharedMemoryUnregister(self, request, context):  # type: ignore[override]
        return await self._unimplemented("CudaSharedMemoryUnregister", context, "CUDA shared memory")

    async def TraceSetting(self, request, context):  # type: ignore[override]
        return await self._unimplemented("TraceSetting", context, "tracing")

    async def LogSettings(self, request, context):  # type: ignore[override]
        return await self._unimplemented("LogSettings", context, "changing or reading log settings")


# --------------------------------------------------------------------------------------------
# Server construction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BoundGrpcServer:
    server: grpc.aio.Server
    port: int  # the port really bound: the one asked for, or the one the OS picked for port 0


def grpc_server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    if max_message_bytes < MIN_MAX_MESSAGE_BYTES:
        raise ValueError(
            f"max_message_bytes must be at least {MIN_MAX_MESSAGE_BYTES} (64 MiB), got {max_message_bytes}"
        )
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class RestrictedProtocolInterceptor(grpc.aio.ServerInterceptor):
    """Triton's ``--grpc-restricted-protocol``: UNAVAILABLE unless the call carries the group's
    ``triton-grpc-protocol-<key>`` metadata; checked before the request is handled."""

    def __init__(self, restrictions: Mapping[str, Restriction]) -> None:
        self._restrictions = dict(restrictions)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        refusal = grpc_refusal(
            self._restrictions, handler_call_details.method, handler_call_details.invocation_metadata
        )
        if refusal is None:
            return await continuation(handler_call_details)

        async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):  # noqa: ANN001
            await context.abort(grpc.StatusCode.UNAVAILABLE, refusal)

        if handler_call_details.method.endswith("/ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


def bind_grpc_server(
    engine: InferenceEngine,
    *,
    address: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    restrictions: Mapping[str, Restriction] | None = None,
) -> BoundGrpcServer:
    """Like :func:`create_grpc_server`, also returning the bound port (for ``address`` ending in ``:0``)."""
    interceptors = [RestrictedProtocolInterceptor(restrictions)] if restrictions else []
    server = grpc.aio.server(options=grpc_server_options(max_message_bytes), interceptors=interceptors)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(TritonGrpcServicer(engine), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the gRPC server to {address}")
    log.info("grpc server bound", extra={"address": address, "port": port, "max_message_bytes": max_message_bytes})
    return BoundGrpcServer(server=server, port=port)


def create_grpc_server(
    engine: InferenceEngine,
    *,
    address: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    restrictions: Mapping[str, Restriction] | None = None,
) -> grpc.aio.Server:
    """The gRPC server over ``engine``, bound to ``address`` but not started: the caller awaits
    ``start()`` and, on shutdown, ``stop(grace)``."""
    return bind_grpc_server(
        engine, address=address, max_message_bytes=max_message_bytes, restrictions=restrictions
    ).server


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "BoundGrpcServer",
    "TritonGrpcServicer",
    "bind_grpc_server",
    "create_grpc_server",
    "fill_infer_response",
    "infer_request_from_proto",
    "infer_response_to_proto",
]
