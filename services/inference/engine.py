"""The server's state and operations: what every frontend (HTTP, gRPC, metrics) calls.

INTERFACE CONTRACT shared by the frontends. Frontends must not reach past these methods.
Errors are raised as ``protocol.InferenceServerError`` with the kind that maps to Triton's
HTTP status / gRPC code.

Canonical objects:
- model configuration: ``tritonclient.grpc.model_config_pb2.ModelConfig`` (the proto Triton uses);
- statistics: ``tritonclient.grpc.service_pb2.ModelStatistics`` protos;
- metadata / index entries: the dataclasses below.

This module is the model lifecycle (repository, load/unload, polling, readiness) and the request
entry point; the work on one served version lives in ``services.inference.model_version``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from tritonclient.grpc import model_config_pb2, service_pb2

from .batching import BatchingPolicy, ModelScheduler
from .model_config import (
    DEFAULT_MAX_BATCH_SIZE,
    ONNX_PLATFORM,
    ModelConfigError,
    complete_config,
    resolve_instance_groups,
    validate_config,
)
from .protocol import (
    ErrorKind,
    InferenceServerError,
    InferRequest,
    InferResponse,
    invalid,
    not_found,
)
from .repository import ModelDefinition, ModelRepository, directory_fingerprint, read_label_file
from .runtime import cuda_usable, load_instances
from .stats import FAILURE_BACKEND, FAILURE_CANCELED, FAILURE_OTHER, FAILURE_REJECTED, VersionStatistics
from .model_version import InstanceSummary, LoadedVersion, TensorMetadata
from .model_version import classify as classify  # re-exported: the Wrapper's tests compare against it

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
    "classify",
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
#        explicit mode only (UNAVAILABLE otherwise, as Triton); config_json overrides config.pbtxt (Triton's
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


def package_version() -> str:
    try:
        return importlib_metadata.version(PACKAGE_NAME)
    except importlib_metadata.PackageNotFoundError:
        return "0.0.0"


class EngineStartupError(Exception):
    """Models that had to load at start failed (and ``exit_on_error`` is set)."""


def unsupported(message: str) -> InferenceServerError:
    return InferenceServerError(ErrorKind.UNSUPPORTED, message)


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
