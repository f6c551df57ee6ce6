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

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

from .batching import BatchingPolicy, ModelScheduler
from .model_config import (
    DEFAULT_MAX_BATCH_SIZE,
    ONNX_PLATFORM,
    ModelConfigError,
    complete_config,
    config_datatype,
    full_shape,
    resolve_instance_groups,
    validate_config,
)
from .protocol import (
    ErrorKind,
    InferenceServerError,
    InferOutput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    array_from_raw,
    invalid,
    not_found,
    numpy_dtype,
)
from .repository import ModelDefinition, ModelRepository, directory_fingerprint, read_label_file
from .runtime import OnnxInstance, cuda_usable, load_instances
from .stats import FAILURE_BACKEND, FAILURE_CANCELED, FAILURE_OTHER, FAILURE_REJECTED, VersionStatistics

T = TypeVar("T")

SERVER_NAME = "eo-inference-server"
# Triton's extension names; only what the server really implements is listed.
SERVER_EXTENSIONS = (
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
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
#
# Added by the server core (frontends may use them, none needs them):
#   failure_counts(name, version) -> dict[str, int]   failed requests by Triton's reason label
#        (REJECTED = queue full, CANCELED, BACKEND = ONNX Runtime error, OTHER = invalid request)
#   model_instances(name, version="") -> list[InstanceSummary]   instances, providers, warmup runs
#   begin_shutdown() -> None          not-ready from now on, requests still served (SIGTERM path)
#   async poll_repository() -> None   one poll cycle (what poll mode runs every --repository-poll-secs)
#   InferenceEngine.from_settings(settings)


# --------------------------------------------------------------------------------------------
# Implementation
# --------------------------------------------------------------------------------------------
log = logging.getLogger(__name__)

CONTROL_MODE_NONE = "none"
CONTROL_MODE_POLL = "poll"
CONTROL_MODE_EXPLICIT = "explicit"
CONTROL_MODES = (CONTROL_MODE_NONE, CONTROL_MODE_POLL, CONTROL_MODE_EXPLICIT)

STATE_READY = "READY"
STATE_UNAVAILABLE = "UNAVAILABLE"
STATE_LOADING = "LOADING"
STATE_UNLOADING = "UNLOADING"

PACKAGE_NAME = "eo-inference-platform"
WARMUP_DIRECTORY = "warmup"


def package_version() -> str:
    try:
        return importlib_metadata.version(PACKAGE_NAME)
    except importlib_metadata.PackageNotFoundError:
        return "0.0.0"


class EngineStartupError(Exception):
    """Models that had to load at start failed (and ``exit_on_error`` is set)."""


def unsupported(message: str) -> InferenceServerError:
    return InferenceServerError(ErrorKind.UNSUPPORTED, message)


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    datatype: str
    dtype: np.dtype
    dims: tuple[int, ...]  # client dims, without the batch dimension
    model_dims: tuple[int, ...] | None  # reshape target when the config gives one
    optional: bool
    variable: bool  # some dim is -1: requests may differ in shape


@dataclass(frozen=True, slots=True)
class OutputSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]
    reshaped: bool  # the config reshapes the model's output to ``dims``
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    """What one instance is and has done (for tests and diagnostics)."""

    name: str
    kind: str
    device_id: int
    providers: list[str]
    warmup_runs: int
    executions: int


def classify(
    array: np.ndarray, class_count: int, labels: Sequence[str], batched: bool
) -> np.ndarray:
    """Triton's classification extension: the top ``class_count`` entries per batch row as BYTES
    ``"score:index"`` or ``"score:index:label"``, highest score first (ties: lower index first)."""
    rows = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
    count = min(class_count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :count]
    is_float = rows.dtype.kind == "f"
    result = np.empty((rows.shape[0], count), dtype=np.object_)
    for row_index in range(rows.shape[0]):
        for column, class_index in enumerate(order[row_index]):
            value = rows[row_index, class_index]
            score = f"{float(value):f}" if is_float else f"{int(value)}"
            index = int(class_index)
            if index < len(labels):
                result[row_index, column] = f"{score}:{index}:{labels[index]}".encode("utf-8")
            else:
                result[row_index, column] = f"{score}:{index}".encode("utf-8")
    return result if batched else result.reshape(count)


def _to_ort_strings(array: np.ndarray, name: str) -> np.ndarray:
    """ONNX Runtime takes string tensors as ``str`` objects (UTF-8 inside); the protocol carries bytes."""
    converted = np.empty(array.shape, dtype=np.object_)
    flat = converted.reshape(-1)
    for index, item in enumerate(array.reshape(-1)):
        if isinstance(item, (bytes, bytearray, memoryview)):
            try:
                flat[index] = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise invalid(
                    f"BYTES input '{name}' element {index} is not valid UTF-8; ONNX string tensors hold UTF-8 text"
                ) from None
        else:
            flat[index] = str(item)
    return converted


class LoadedVersion:
    """One ready model version: its completed config, instances, scheduler and statistics."""

    def __init__(
        self,
        model_name: str,
        version: int,
        config: model_config_pb2.ModelConfig,
        instances: list[OnnxInstance],
        scheduler: ModelScheduler,
        statistics: VersionStatistics,
        labels: dict[str, tuple[str, ...]],
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.version_name = str(version)
        self.config = config
        self.instances = instances
        self.scheduler = scheduler
        self.statistics = statistics
        self.max_batch_size = config.max_batch_size
        self.batched = config.max_batch_size > 0
        self.inputs: dict[str, InputSpec] = {}
        for tensor in config.input:
            dims = tuple(tensor.dims)
            self.inputs[tensor.name] = InputSpec(
                name=tensor.name,
                datatype=config_datatype(tensor.data_type),
                dtype=numpy_dtype(config_datatype(tensor.data_type)),
                dims=dims,
                model_dims=tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None,
                optional=tensor.optional,
                variable=-1 in dims,
            )
        self.outputs: dict[str, OutputSpec] = {
            tensor.name: OutputSpec(
                name=tensor.name,
                datatype=config_datatype(tensor.data_type),
                dims=tuple(tensor.dims),
                reshaped=tensor.HasField("reshape"),
                labels=labels.get(tensor.name, ()),
            )
            for tensor in config.output
        }
        self.required_inputs = [spec.name for spec in self.inputs.values() if not spec.optional]
        # Requests batch together only when their shapes agree; with fixed dims and no optional
        # inputs they always do, and the shape key is skipped.
        self.needs_shape_key = any(spec.variable or spec.optional for spec in self.inputs.values())
        self.default_outputs = [(spec, 0) for spec in self.outputs.values()]

    # -- request path ------------------------------------------------------------------------

    def prepare_inputs(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int, Any]:
        """Validate the request's inputs against the config; return the feeds, batch rows, shape key."""
        model = self.model_name
        feeds: dict[str, np.ndarray] = {}
        rows = 0 if self.batched else 1
        first_input = ""
        for item in request.inputs:
            spec = self.inputs.get(item.name)
            if spec is None:
                raise invalid(
                    f"unexpected inference input '{item.name}' for model '{model}': "
                    f"the model's inputs are {list(self.inputs)}"
                )
            if item.name in feeds:
                raise invalid(f"input '{item.name}' appears more than once in the request for model '{model}'")
            if item.datatype != spec.datatype:
                raise invalid(
                    f"inference input '{item.name}' data-type is '{item.datatype}', "
                    f"but model '{model}' expects '{spec.datatype}'"
                )
            shape = [int(dim) for dim in item.shape]
            if shape and min(shape) < 0:
                raise invalid(f"input '{item.name}' has a negative dimension in shape {shape}")
            if self.batched:
                expected_rank = len(spec.dims) + 1
                if len(shape) != expected_rank:
                    raise invalid(
                        f"unexpected shape for input '{item.name}' for model '{model}'. "
                        f"Expected {[-1, *spec.dims]}, got {shape}"
                    )
                batch = shape[0]
                if batch < 1 or batch > self.max_batch_size:
                    raise invalid(
                        f"inference request batch-size must be <= {self.max_batch_size} for '{model}' "
                        f"(and >= 1), got {batch} for input '{item.name}'"
                    )
                if rows and batch != rows:
                    raise invalid(
                        f"input '{item.name}' has batch size {batch} but input '{first_input}' has {rows}: "
                        "every input of a request needs the same batch size"
                    )
                rows = batch
                first_input = first_input or item.name
                sample_shape = shape[1:]
            else:
                sample_shape = shape
            # Fixed dims (the common case) compare as one tuple; variable ones dimension by dimension.
            if (tuple(sample_shape) != spec.dims) if not spec.variable else (
                len(sample_shape) != len(spec.dims)
                or any(expected != -1 and expected != actual for expected, actual in zip(spec.dims, sample_shape))
            ):
                expected_shape = [-1, *spec.dims] if self.batched else list(spec.dims)
                raise invalid(
                    f"unexpected shape for input '{item.name}' for model '{model}'. "
                    f"Expected {expected_shape}, got {shape}"
                )
            data = item.data
            if not isinstance(data, np.ndarray):
                data = np.asarray(data, dtype=spec.dtype)
            expected_count = math.prod(shape)
            if data.size != expected_count:
                if spec.datatype == "BYTES":
                    raise invalid(
                        f"unexpected number of string elements {data.size} for inference input '{item.name}' "
                        f"of model '{model}', expecting {expected_count} for shape {shape}"
                    )
                raise invalid(
                    f"unexpected total byte size {data.size * spec.dtype.itemsize} for inference input "
                    f"'{item.name}' of model '{model}', expecting {expected_count * spec.dtype.itemsize} "
                    f"({spec.datatype}, shape {shape})"
                )
            if spec.datatype == "BYTES":
                data = _to_ort_strings(data, item.name)
            elif data.dtype != spec.dtype:
                if data.dtype.kind != spec.dtype.kind or data.dtype.itemsize != spec.dtype.itemsize:
                    raise invalid(
                        f"input '{item.name}' data is {data.dtype}, which does not match its datatype {spec.datatype}"
                    )
                data = data.astype(spec.dtype)  # same kind and size: byte order only
            if tuple(data.shape) != tuple(shape):
                data = data.reshape(shape)
            if spec.model_dims is not None:
                data = data.reshape(([rows] if self.batched else []) + list(spec.model_dims))
            feeds[item.name] = data
        if len(feeds) < len(self.required_inputs):
            missing = [name for name in self.required_inputs if name not in feeds]
            if missing:
                raise invalid(
                    f"expected {len(self.required_inputs)} inputs but got {len(feeds)} inputs for model "
                    f"'{model}'; missing required input(s) {missing}"
                )
        if self.needs_shape_key:
            shape_key = tuple(
                feeds[name].shape[1:] if name in feeds else None for name in self.inputs
            )
        else:
            shape_key = ()
        return feeds, rows, shape_key

    def resolve_outputs(self, requested: list[RequestedOutput]) -> list[tuple[OutputSpec, int]]:
        if not requested:
            return self.default_outputs
        resolved: list[tuple[OutputSpec, int]] = []
        seen: set[str] = set()
        for item in requested:
            spec = self.outputs.get(item.name)
            if spec is None:
                raise invalid(
                    f"unexpected inference output '{item.name}' for model '{self.model_name}': "
                    f"the model's outputs are {list(self.outputs)}"
                )
            if item.name in seen:
                raise invalid(f"output '{item.name}' is requested more than once")
            seen.add(item.name)
            class_count = int(item.class_count or 0)
            if class_count < 0:
                raise invalid(f"class_count for output '{item.name}' must be >= 0, got {class_count}")
            if class_count and spec.datatype == "BYTES":
                raise invalid(f"classification is not available for BYTES output '{item.name}'")
            resolved.append((spec, class_count))
        return resolved

    def build_response(
        self,
        request: InferRequest,
        outputs: dict[str, np.ndarray],
        resolved: list[tuple[OutputSpec, int]],
        rows: int,
    ) -> InferResponse:
        response_outputs: list[InferOutput] = []
        for spec, class_count in resolved:
            array = outputs[spec.name]
            if spec.reshaped and list(spec.dims).count(-1) <= 1:
                array = array.reshape(((rows,) if self.batched else ()) + spec.dims)
            datatype = spec.datatype
            if class_count:
                array = classify(array, class_count, spec.labels, self.batched)
                datatype = "BYTES"
            response_outputs.append(InferOutput(spec.name, datatype, list(array.shape), array))
        return InferResponse(
            model_name=self.model_name,
            model_version=self.version_name,
            id=request.id,
            outputs=response_outputs,
        )

    # -- metadata ----------------------------------------------------------------------------

    def tensor_metadata(self) -> tuple[list[TensorMetadata], list[TensorMetadata]]:
        inputs = [
            TensorMetadata(spec.name, spec.datatype, full_shape(self.config, list(spec.dims)))
            for spec in self.inputs.values()
        ]
        outputs = [
            TensorMetadata(spec.name, spec.datatype, full_shape(self.config, list(spec.dims)))
            for spec in self.outputs.values()
        ]
        return inputs, outputs

    def instance_summaries(self) -> list[InstanceSummary]:
        return [
            InstanceSummary(
                name=instance.name,
                kind=instance.placement.kind,
                device_id=instance.placement.device_id,
                providers=list(instance.providers) if instance.session is not None else [],
                warmup_runs=instance.warmup_runs,
                executions=instance.executions,
            )
            for instance in self.instances
        ]

    # -- warmup ------------------------------------------------------------------------------

    def zero_sample(self) -> dict[str, np.ndarray]:
        """One batch row of zeros (empty strings for BYTES), variable dims as 1."""
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs.values():
            if spec.optional:
                continue
            dims = spec.model_dims if spec.model_dims is not None else spec.dims
            shape = ([1] if self.batched else []) + [dim if dim > 0 else 1 for dim in dims]
            if spec.datatype == "BYTES":
                feeds[spec.name] = np.full(shape, "", dtype=np.object_)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return feeds

    def configured_warmup_samples(self, model_directory: Path) -> list[tuple[str, int, dict[str, np.ndarray]]]:
        """The config's ``model_warmup`` entries as (name, repeat count, feeds)."""
        samples: list[tuple[str, int, dict[str, np.ndarray]]] = []
        for warmup in self.config.model_warmup:
            label = warmup.name or f"warmup_{len(samples)}"
            batch = max(1, warmup.batch_size) if self.batched else 0
            feeds: dict[str, np.ndarray] = {}
            for name, spec_input in warmup.inputs.items():
                spec = self.inputs.get(name)
                if spec is None:
                    raise ModelConfigError(f"model_warmup '{label}' names input '{name}', which the model does not have")
                datatype = config_datatype(spec_input.data_type)
                if datatype != spec.datatype:
                    raise ModelConfigError(
                        f"model_warmup '{label}' gives input '{name}' as {datatype}, the model expects {spec.datatype}"
                    )
                sample_dims = [int(d) for d in spec_input.dims]
                shape = ([batch] if self.batched else []) + sample_dims
                feeds[name] = self._warmup_data(label, name, spec, spec_input, shape, sample_dims, model_directory)
            missing = [name for name in self.required_inputs if name not in feeds]
            if missing:
                raise ModelConfigError(f"model_warmup '{label}' gives no data for input(s) {missing}")
            samples.append((label, max(1, warmup.count), feeds))
        return samples

    def _warmup_data(
        self,
        label: str,
        name: str,
        spec: InputSpec,
        spec_input: model_config_pb2.ModelWarmup.Input,
        shape: list[int],
        sample_dims: list[int],
        model_directory: Path,
    ) -> np.ndarray:
        which = spec_input.WhichOneof("input_data_type")
        if which == "input_data_file":
            path = model_directory / WARMUP_DIRECTORY / spec_input.input_data_file
            try:
                raw = path.read_bytes()
            except OSError as error:
                raise ModelConfigError(f"model_warmup '{label}': cannot read {path}: {error}") from None
            try:
                sample = array_from_raw(raw, spec.datatype, sample_dims)
            except InferenceServerError as error:
                raise ModelConfigError(f"model_warmup '{label}' input '{name}': {error.message}") from None
            # The file holds one sample; a batched warmup repeats it for every row, as Triton does.
            data = np.broadcast_to(sample, shape).copy() if self.batched else sample.reshape(shape)
        elif which == "random_data" and spec.datatype != "BYTES":
            generator = np.random.default_rng(0)
            if spec.dtype.kind == "f":
                data = generator.random(shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                data = generator.integers(0, 2, shape).astype(spec.dtype)
            else:
                data = generator.integers(0, 100, shape).astype(spec.dtype)
        elif spec.datatype == "BYTES":
            data = np.full(shape, b"", dtype=np.object_)
        else:
            data = np.zeros(shape, dtype=spec.dtype)
        if spec.datatype == "BYTES":
            data = _to_ort_strings(data, name)
        if spec.model_dims is not None:
            data = data.reshape(([shape[0]] if self.batched else []) + list(spec.model_dims))
        return data

    def _warm_instance(
        self, instance: OnnxInstance, samples: list[tuple[str, int, dict[str, np.ndarray]]]
    ) -> None:
        """Runs on the instance's own thread before the version becomes READY."""
        try:
            instance.run(self.zero_sample())
            instance.warmup_runs += 1
        except Exception as error:
            # Zeros are not a valid input for every model; only the config's own warmup must succeed.
            log.warning(
                "warmup with zeros failed",
                extra={"model": self.model_name, "version": self.version_name, "instance": instance.name,
                       "error": str(error)},
            )
        for label, count, feeds in samples:
            for _ in range(count):
                try:
                    instance.run(feeds)
                except Exception as error:
                    raise ModelConfigError(f"model_warmup '{label}' failed on {instance.name}: {error}") from None
                instance.warmup_runs += 1

    async def warm_up(self, model_directory: Path) -> None:
        samples = self.configured_warmup_samples(model_directory)
        await asyncio.gather(
            *(
                asyncio.wrap_future(instance.worker.submit(self._warm_instance, instance, samples))
                for instance in self.instances
            )
        )

    async def close(self, drain: bool = True) -> None:
        await self.scheduler.close(drain=drain)


@dataclass(eq=False)
class ServedModel:
    """The versions of one model that answer requests together (one load's result)."""

    definition: ModelDefinition
    versions: dict[int, LoadedVersion]

    @property
    def newest(self) -> LoadedVersion:
        return self.versions[max(self.versions)]

    async def close(self, drain: bool = True) -> None:
        await asyncio.gather(*(version.close(drain) for version in self.versions.values()))


@dataclass(eq=False)
class ModelRecord:
    """What the engine knows about one model name, loaded or not."""

    name: str
    serving: ServedModel | None = None
    # Repository-index rows: version ("" when unknown) -> (state, reason).
    states: dict[str, tuple[str, str]] = field(default_factory=dict)
    required: bool = False  # readiness waits for it (startup models and successful loads)
    fingerprint: tuple | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class InferenceEngine:
    """The server's models and operations; see the contract at the top of this module."""

    def __init__(
        self,
        model_repositories: Iterable[str | Path],
        *,
        model_control_mode: str = CONTROL_MODE_NONE,
        startup_models: Iterable[str] = (),
        repository_poll_secs: float = 15.0,
        exit_on_error: bool = True,
        strict_readiness: bool = True,
        default_max_queue_size: int = 0,
        default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        load_concurrency: int = 2,
    ) -> None:
        if model_control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode must be one of {CONTROL_MODES}, got '{model_control_mode}'")
        self.repository = ModelRepository([Path(path) for path in model_repositories])
        self.model_control_mode = model_control_mode
        self.startup_models = list(startup_models)
        self.repository_poll_secs = repository_poll_secs
        self.exit_on_error = exit_on_error
        self.strict_readiness = strict_readiness
        self.default_max_queue_size = default_max_queue_size
        self.default_max_batch_size = default_max_batch_size
        self._load_concurrency = max(1, load_concurrency)
        self._records: dict[str, ModelRecord] = {}
        self._statistics: dict[tuple[str, str], VersionStatistics] = {}
        self._background: set[asyncio.Task] = set()
        self._poll_task: asyncio.Task | None = None
        self._load_slots: asyncio.Semaphore | None = None
        self._started = False
        self._stopping = False
        self._server_version = package_version()

    @classmethod
    def from_settings(cls, settings: Any) -> "InferenceEngine":
        """Build from ``services.inference.settings.InferenceServerSettings``."""
        return cls(
            settings.model_repository,
            model_control_mode=settings.model_control_mode,
            startup_models=settings.load_model,
            repository_poll_secs=settings.repository_poll_secs,
            exit_on_error=settings.exit_on_error,
            strict_readiness=settings.strict_readiness,
            default_max_queue_size=settings.default_max_queue_size,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models the control mode asks for (warmed up), then start polling in poll mode."""
        self._load_slots = asyncio.Semaphore(self._load_concurrency)
        present = self.repository.scan()
        if self.model_control_mode == CONTROL_MODE_EXPLICIT:
            names: list[str] = []
            for name in self.startup_models:
                for expanded in (sorted(present) if name == "*" else [name]):
                    if expanded not in names:
                        names.append(expanded)
        else:
            names = sorted(present)
        for name in names:
            self._record(name).required = True
        results = await asyncio.gather(*(self._load_or_reason(name) for name in names))
        failures = {name: reason for name, reason in zip(names, results) if reason}
        if failures and self.exit_on_error:
            await self.stop()
            raise EngineStartupError(
                "failed to load model(s): " + "; ".join(f"'{name}': {reason}" for name, reason in failures.items())
            )
        self._started = True
        if self.model_control_mode == CONTROL_MODE_POLL:
            self._poll_task = asyncio.create_task(self._poll_forever(), name="repository-poll")
        log.info(
            "inference engine started",
            extra={"mode": self.model_control_mode, "models": sorted(set(names) - set(failures)),
                   "failed": sorted(failures)},
        )

    def begin_shutdown(self) -> None:
        """Report not-ready from now on (load balancers stop sending), while requests still run."""
        self._stopping = True

    async def stop(self) -> None:
        """Finish queued and running requests of every model, then release all instances."""
        self._stopping = True
        if self._poll_task is not None:
            self._poll_task.cancel()
            try:
                await self._poll_task
            except asyncio.CancelledError:
                pass
            self._poll_task = None
        closing = []
        for record in self._records.values():
            if record.serving is not None:
                served, record.serving = record.serving, None
                record.states = {v: (STATE_UNAVAILABLE, "server stopped") for v in record.states}
                closing.append(served.close(drain=True))
        await asyncio.gather(*closing, return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        if not self._started or self._stopping:
            return False
        if not self.strict_readiness:
            return True
        return all(record.serving is not None for record in self._records.values() if record.required)

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=self._server_version, extensions=list(SERVER_EXTENSIONS))

    # -- model queries -----------------------------------------------------------------------

    def _record(self, name: str) -> ModelRecord:
        record = self._records.get(name)
        if record is None:
            record = self._records[name] = ModelRecord(name)
        return record

    def _serving_version(self, name: str, version: str = "") -> LoadedVersion:
        record = self._records.get(name)
        served = record.serving if record is not None else None
        if served is None:
            raise not_found(f"Request for unknown model: '{name}' is not found or not ready")
        if not version:
            return served.newest
        try:
            number = int(version)
        except ValueError:
            raise not_found(f"Request for unknown model: '{name}' has no version '{version}'") from None
        loaded = served.versions.get(number)
        if loaded is None:
            raise not_found(
                f"Request for unknown model: '{name}' version {version} is not found or not ready "
                f"(ready versions: {sorted(served.versions)})"
            )
        return loaded

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self._serving_version(name, version)
        except InferenceServerError:
            return False
        return True

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        loaded = self._serving_version(name, version)
        served = self._records[name].serving
        assert served is not None
        inputs, outputs = loaded.tensor_metadata()
        return ModelMetadata(
            name=name,
            versions=[str(v) for v in sorted(served.versions)],
            platform=loaded.config.platform or ONNX_PLATFORM,
            inputs=inputs,
            outputs=outputs,
        )

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        config = model_config_pb2.ModelConfig()
        config.CopyFrom(self._serving_version(name, version).config)
        return config

    def model_statistics(self, name: str = "", version: str = "") -> list[service_pb2.ModelStatistics]:
        if name:
            record = self._records.get(name)
            if record is None or record.serving is None:
                # Triton: INVALID_ARGUMENT (400), unlike the other per-model queries' NOT_FOUND.
                raise invalid(f"requested model '{name}' is not available")
            if version:
                versions = [self._serving_version(name, version)]
            else:
                served = self._records[name].serving
                assert served is not None
                versions = [served.versions[v] for v in sorted(served.versions)]
        else:
            versions = [
                record.serving.versions[v]
                for _, record in sorted(self._records.items())
                if record.serving is not None
                for v in sorted(record.serving.versions)
            ]
        return [loaded.statistics.to_proto() for loaded in versions]

    def pending_request_count(self, name: str, version: str) -> int:
        """Requests queued (not yet executing) for one version; 0 for anything not loaded."""
        try:
            return self._serving_version(name, version).scheduler.queued_count
        except InferenceServerError:
            return 0

    def failure_counts(self, name: str, version: str) -> dict[str, int]:
        """Failed requests by Triton's reason label (REJECTED, CANCELED, BACKEND, OTHER)."""
        statistics = self._statistics.get((name, version))
        return dict(statistics.failures) if statistics is not None else {}

    def model_instances(self, name: str, version: str = "") -> list[InstanceSummary]:
        return self._serving_version(name, version).instance_summaries()

    def repository_index(self, ready_only: bool = False) -> list[RepositoryIndexEntry]:
        names = set(self.repository.scan()) | {name for name, r in self._records.items() if r.states}
        entries: list[RepositoryIndexEntry] = []
        for name in sorted(names):
            record = self._records.get(name)
            if record is None or not record.states:
                if not ready_only:
                    entries.append(RepositoryIndexEntry(name=name, version="", state="", reason=""))
                continue
            for version, (state, reason) in sorted(
                record.states.items(), key=lambda item: (int(item[0]) if item[0].isdigit() else -1)
            ):
                if ready_only and state != STATE_READY:
                    continue
                entries.append(RepositoryIndexEntry(name=name, version=version, state=state, reason=reason))
        return entries

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, request: InferRequest, encode: Callable[[InferResponse], T] | None = None) -> Any:
        """Run ``request``; returns the response, or ``encode(response)`` when a frontend passes its encoder,
        so that success is counted only once the wire response exists (as Triton counts it)."""
        received_ns = time.perf_counter_ns()
        loaded = self._serving_version(request.model_name, request.model_version)
        statistics = loaded.statistics
        # A request that fails validation never reaches the scheduler: Triton does not count it as an
        # inference failure either (nv_inference_request_failure, statistics' fail count).
        feeds, rows, shape_key = loaded.prepare_inputs(request)
        resolved = loaded.resolve_outputs(request.outputs)
        try:
            executed = await loaded.scheduler.submit(feeds, rows, shape_key)
        except InferenceServerError as error:
            reason = FAILURE_REJECTED if error.kind is ErrorKind.UNAVAILABLE else FAILURE_BACKEND
            statistics.record_failure(time.perf_counter_ns() - received_ns, reason)
            raise
        except asyncio.CancelledError:
            statistics.record_failure(time.perf_counter_ns() - received_ns, FAILURE_CANCELED)
            raise
        try:
            response = loaded.build_response(request, executed.outputs, resolved, rows)
            result = encode(response) if encode is not None else response
        except InferenceServerError:
            statistics.record_failure(time.perf_counter_ns() - received_ns, FAILURE_OTHER)
            raise
        statistics.record_success(rows, time.perf_counter_ns() - received_ns, executed.timings)
        return result

    # -- model control -----------------------------------------------------------------------

    def _require_explicit_mode(self) -> None:
        # Triton answers UNAVAILABLE here (503 / UNAVAILABLE), not UNSUPPORTED.
        if self.model_control_mode != CONTROL_MODE_EXPLICIT:
            raise InferenceServerError(
                ErrorKind.UNAVAILABLE,
                f"explicit model load / unload is not allowed in model control mode '{self.model_control_mode}'",
            )

    async def load_model(self, name: str, config_json: str | None = None) -> None:
        self._require_explicit_mode()
        await self._load(name, config_json, force=config_json is not None)

    async def unload_model(self, name: str, unload_dependents: bool = False) -> None:
        # No ensembles here, so no model depends on another: unload_dependents changes nothing.
        self._require_explicit_mode()
        record = self._records.get(name)
        if record is None or (record.serving is None and not record.states):
            return  # Triton answers success for a model it does not know or has not loaded
        await self._unload(name)

    async def poll_repository(self) -> None:
        """One poll cycle: load new models, reload changed ones, unload removed ones."""
        present = self.repository.scan()
        tasks = []
        for name, directory in present.items():
            record = self._records.get(name)
            fingerprint = directory_fingerprint(directory)
            if record is None or record.fingerprint != fingerprint:
                tasks.append(self._load_or_reason(name))
        for name, record in list(self._records.items()):
            if name not in present and (record.serving is not None or record.required):
                # Gone from disk: unload it, and stop waiting for it if it never loaded.
                tasks.append(self._unload(name))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.repository_poll_secs)
            try:
                await self.poll_repository()
            except Exception:
                log.exception("repository poll failed")

    async def _load_or_reason(self, name: str) -> str:
        """Load, returning "" on success or the reason it failed (never raises)."""
        try:
            await self._load(name, None, force=False)
        except InferenceServerError as error:
            return error.message
        except Exception as error:  # a bug must not take the other models down
            log.exception("unexpected error while loading a model", extra={"model": name})
            return str(error)
        return ""

    async def _load(self, name: str, config_json: str | None, force: bool) -> None:
        if name not in self._records and self.repository.locate(name) is None:
            # Nothing to remember about a name that is neither known nor in the repository. Triton answers
            # INTERNAL ("failed to poll from model repository"), a load that fails later INVALID_ARGUMENT.
            raise InferenceServerError(
                ErrorKind.INTERNAL, f"failed to load '{name}': no model directory '{name}' in the model repository"
            )
        record = self._record(name)
        async with record.lock:
            directory = self.repository.locate(name)
            fingerprint = directory_fingerprint(directory) if directory is not None else None
            unchanged = (
                record.serving is not None
                and record.fingerprint == fingerprint
                # A model loaded with an override goes back to its config.pbtxt on a plain load.
                and not record.serving.definition.config_overridden
            )
            if not force and unchanged:
                record.required = True
                return  # unchanged: Triton does not reload either
            if record.serving is None:
                record.states = {"": (STATE_LOADING, "")}
            started = time.perf_counter()
            definition = None
            try:
                if directory is None:
                    raise ModelConfigError(f"no model directory '{name}' in the model repository")
                definition = self.repository.read_definition(name, config_json)
                served = await self._build(definition)
            except (ModelConfigError, InferenceServerError) as error:
                reason = error.message if isinstance(error, InferenceServerError) else str(error)
                record.fingerprint = fingerprint
                if record.serving is None:
                    failed_version = getattr(error, "failed_version", None)
                    if definition is not None and failed_version is not None:
                        # As Triton 2.51: one failing version fails the model's load; the index shows that
                        # version's reason and the others as unloaded.
                        record.states = {
                            str(v): (STATE_UNAVAILABLE, reason if v == failed_version else "unloaded")
                            for v in definition.version_paths
                        }
                    else:
                        record.states = {"": (STATE_UNAVAILABLE, reason)}
                log.error("model failed to load", extra={"model": name, "reason": reason,
                                                        "still_serving_previous": record.serving is not None})
                raise InferenceServerError(ErrorKind.INVALID_ARGUMENT, f"failed to load '{name}': {reason}") from None
            previous = record.serving
            record.serving = served
            record.fingerprint = fingerprint
            record.required = True
            record.states = {str(v): (STATE_READY, "") for v in served.versions}
            if previous is not None:
                for version in previous.versions:
                    if version not in served.versions:
                        record.states[str(version)] = (STATE_UNAVAILABLE, "unloaded")
            log.info(
                "model loaded",
                extra={"model": name, "versions": sorted(served.versions), "reload": previous is not None,
                       "seconds": round(time.perf_counter() - started, 3)},
            )
        if previous is not None:
            # Requests already holding the previous versions finish on them; new ones see the new ones.
            self._in_background(previous.close(drain=True))

    async def _unload(self, name: str) -> None:
        record = self._record(name)
        async with record.lock:
            record.required = False
            served, record.serving = record.serving, None
            if served is None:
                return
            record.states = {str(v): (STATE_UNLOADING, "") for v in served.versions}
            await served.close(drain=True)
            record.states = {str(v): (STATE_UNAVAILABLE, "unloaded") for v in served.versions}
            log.info("model unloaded", extra={"model": name, "versions": sorted(served.versions)})

    def _in_background(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _build(self, definition: ModelDefinition) -> ServedModel:
        assert self._load_slots is not None, "start() first"
        versions: dict[int, LoadedVersion] = {}
        try:
            async with self._load_slots:
                for version, path in sorted(definition.version_paths.items(), reverse=True):
                    try:
                        versions[version] = await self._build_version(definition, version, path)
                    except (ModelConfigError, InferenceServerError) as error:
                        error.failed_version = version  # type: ignore[union-attr]
                        raise
        except BaseException:
            await asyncio.gather(*(v.close(drain=False) for v in versions.values()), return_exceptions=True)
            raise
        return ServedModel(definition=definition, versions=versions)

    async def _build_version(self, definition: ModelDefinition, version: int, path: Path) -> LoadedVersion:
        gpu_available = cuda_usable()
        config = model_config_pb2.ModelConfig()
        config.CopyFrom(definition.config)
        if not config.name:
            config.name = definition.name
        resolve_instance_groups(config, gpu_available=gpu_available)
        instances = await asyncio.to_thread(load_instances, config, path)
        scheduler: ModelScheduler | None = None
        try:
            onnx_inputs, onnx_outputs = instances[0].describe()
            config = complete_config(
                config,
                definition.name,
                onnx_inputs,
                onnx_outputs,
                gpu_available=gpu_available,
                default_max_batch_size=self.default_max_batch_size,
            )
            validate_config(config, onnx_inputs, onnx_outputs)
            labels = {
                tensor.name: tuple(read_label_file(definition.directory, tensor.label_filename))
                for tensor in config.output
                if tensor.label_filename
            }
            output_names = [tensor.name for tensor in config.output]
            for instance in instances:
                instance.output_names = output_names
            key = (definition.name, str(version))
            statistics = self._statistics.get(key)
            if statistics is None:
                statistics = self._statistics[key] = VersionStatistics(definition.name, str(version))
            policy = BatchingPolicy.from_config(config, len(instances), self.default_max_queue_size)
            scheduler = ModelScheduler(definition.name, instances, policy, statistics)
            loaded = LoadedVersion(definition.name, version, config, instances, scheduler, statistics, labels)
            await loaded.warm_up(definition.directory)
        except BaseException:
            if scheduler is not None:
                scheduler.release_timer()
            for instance in instances:
                await asyncio.to_thread(instance.close)
            raise
        log.info(
            "model version ready",
            extra={"model": definition.name, "version": version, "instances": len(instances),
                   "providers": instances[0].providers, "max_batch_size": config.max_batch_size,
                   "dynamic_batching": policy.dynamic, "max_queue_size": policy.max_queue_size},
        )
        return loaded
