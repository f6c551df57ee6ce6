"""The Wrapper's side of the inference server: model resolution (card, batch size, tensors) and retried inference.

``tritonclient`` over gRPC (default) or HTTP with binary tensors. What the Wrapper needs to know about a model is
read from the server, never hard-coded: the ready versions (model metadata), the tensors and ``max_batch_size``
(model config), the model card (config ``parameters``, ``card.*``) and, for outputs with a label file, the labels
(one classification-extension request). It is cached per (model, version), so a reloaded model with a new version
is read again while an unchanged one costs one metadata call per step.

Retries: UNAVAILABLE (server down or restarting, queue full), and "model not found" while the server reports itself
not ready (a restarted server loading its models), are retried with exponential backoff, bounded by
``max_attempts`` and by ``max_total_s``; anything else fails at once with the server's message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.model_card import ModelCard
from services.core.metrics import Stage, timed_stage
from services.core.settings import ENV_PREFIX

log = logging.getLogger(__name__)

T = TypeVar("T")

# gRPC's default message limit (4 MiB) is too small for a batch of Sentinel-2 tiles (576 KB each); reconnect
# backoff is capped low so that a restarted server is found again within seconds, not minutes.
GRPC_CHANNEL_ARGS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
_NUMPY_DTYPES: Mapping[str, type[np.generic]] = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
    "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "UINT16": np.uint16, "BOOL": np.bool_,
}


class InferenceError(Exception):
    """Inference failed for a reason retrying does not fix (bad request, model error, wrong model)."""


class InferenceUnavailable(InferenceError):
    """The server stayed unavailable through every retry the policy allows."""


class ModelMismatch(InferenceError):
    """The served model is not what the task needs (card task, tensors, dtypes, shapes)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 6
    max_total_s: float = 60.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def backoff(self, retry: int) -> float:
        """Delay before retry number ``retry`` (1-based): exponential, with +-20 % jitter against herds."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (retry - 1))
        return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    datatype: str  # KServe v2 name: FP32, INT64, ...
    dims: tuple[int, ...]  # without the batch axis
    label_filename: str = ""

    @property
    def numpy_dtype(self) -> np.dtype:
        try:
            return np.dtype(_NUMPY_DTYPES[self.datatype])
        except KeyError:
            raise ModelMismatch(f"tensor {self.name!r} has datatype {self.datatype}, which the Wrapper does not handle") from None


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One version of a model as the server serves it."""

    name: str
    version: str
    card: ModelCard
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    labels: tuple[str, ...] = ()  # of the first output with a label file, in class-index order

    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    @property
    def output(self) -> TensorInfo:
        return self.outputs[0]


def _status(error: BaseException) -> str:
    status = getattr(error, "status", None)
    return str(status() if callable(status) else status or "")


def is_unavailable(error: BaseException) -> bool:
    """True for errors a retry may fix: the server is down, restarting, loading the model, or its queue is full."""
    if isinstance(error, (ConnectionError, TimeoutError, OSError)):
        return True
    status = _status(error)
    if status in ("StatusCode.UNAVAILABLE", "503"):
        return True
    # tritonclient.http reports transport failures without a status.
    message = str(error).lower()
    return not status and any(s in message for s in ("connection refused", "connection reset", "failed to connect"))


def describe(error: BaseException) -> str:
    """The server's message, without tritonclient's repr noise."""
    message = getattr(error, "message", None)
    text = message() if callable(message) else str(error)
    status = _status(error)
    return f"{status}: {text}" if status and status not in text else text


def call_with_retry(
    call: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    transient: Callable[[BaseException], bool] = is_unavailable,
) -> T:
    """``call()``, retried on transient errors within ``policy``; ``InferenceUnavailable`` when the bound is reached."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classified right below
            if not transient(error):
                raise InferenceError(f"{what} failed: {describe(error)}") from None
            elapsed = time.monotonic() - started
            delay = policy.backoff(attempt)
            if attempt >= policy.max_attempts or elapsed + delay > policy.max_total_s:
                raise InferenceUnavailable(
                    f"{what}: inference server unavailable after {attempt} attempt(s) in {elapsed:.1f} s "
                    f"(retry bound {policy.max_total_s:g} s): {describe(error)}"
                ) from None
            log.warning(
                "inference server unavailable, retrying",
                extra={"what": what, "attempt": attempt, "delay_s": round(delay, 2), "error": describe(error)},
            )
            sleep(delay)


def _int_list(values: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


class RestrictedApiHeader(BaseSettings):
    """``EOML_WRAPPER_INFERENCE_RESTRICTED_HEADER=<key>=<value>``: the header of the inference server's restricted API
    groups (Triton's ``--http-restricted-api`` / ``--grpc-restricted-protocol``). The Wrappers use only open groups
    (health, metadata, model-config, inference), so normally it is unset."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}WRAPPER_", extra="ignore")

    inference_restricted_header: SecretStr = SecretStr("")

    def headers(self, protocol: str) -> dict[str, str]:
        key, separator, value = self.inference_restricted_header.get_secret_value().partition("=")
        if not separator or not key.strip():
            return {}
        # Triton reads a restricted gRPC protocol's key from the metadata triton-grpc-protocol-<key>.
        name = f"triton-grpc-protocol-{key.strip()}" if protocol == "grpc" else key.strip()
        return {name: value}


class _WithHeaders:
    """A tritonclient client whose calls all carry ``headers`` (every tritonclient call takes ``headers=``)."""

    _CALLS = frozenset({"is_server_live", "is_server_ready", "is_model_ready", "get_server_metadata",
                        "get_model_metadata", "get_model_config", "infer", "get_inference_statistics",
                        "get_model_repository_index", "load_model", "unload_model"})

    def __init__(self, client: Any, headers: dict[str, str]) -> None:
        self._client = client
        self._headers = headers

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name not in self._CALLS:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            return attribute(*args, headers={**self._headers, **(kwargs.pop("headers", None) or {})}, **kwargs)

        return call


class ModelClient:
    """Thread-safe access to one model on one server (a tritonclient client per calling thread)."""

    def __init__(
        self,
        url: str,
        protocol: str,
        model_name: str,
        model_version: str = "",
        retry: RetryPolicy | None = None,
        request_timeout_s: float = 300.0,
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"inference protocol must be grpc or http, got {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.model_name = model_name
        self.model_version = model_version
        self.retry = retry or RetryPolicy()
        self.request_timeout_s = request_timeout_s
        # One tritonclient client per thread: tritonclient.http clients are bound to the thread (gevent hub) that
        # made them. Callers use long-lived threads (the step workers and the runtime's inference pool).
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._cache: dict[tuple[str, str], ServedModel] = {}
        self._cache_lock = threading.Lock()
        self._headers = RestrictedApiHeader().headers(protocol)

    # ---- client pool ---------------------------------------------------------------------------------------

    def _new_client(self) -> Any:
        client = self._new_tritonclient()
        return _WithHeaders(client, self._headers) if self._headers else client

    def _new_tritonclient(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            return grpcclient.InferenceServerClient(self.url, channel_args=GRPC_CHANNEL_ARGS)
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(
            self.url, connection_timeout=10.0, network_timeout=self.request_timeout_s
        )

    @contextmanager
    def _client(self) -> Iterator[Any]:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        yield client

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a client of a finished thread may refuse; nothing to release then
                pass

    # ---- health ------------------------------------------------------------------------------------------

    def _server_ready(self) -> bool:
        try:
            with self._client() as client:
                if self.protocol == "grpc":
                    return bool(client.is_server_ready(client_timeout=5.0))
                return bool(client.is_server_ready())
        except Exception:  # noqa: BLE001 - unreachable is not ready
            return False

    def _transient(self, error: BaseException) -> bool:
        """UNAVAILABLE, or "model not found" from a server that is still loading its models (a restart)."""
        if is_unavailable(error):
            return True
        return _status(error) in ("StatusCode.NOT_FOUND", "400", "404") and not self._server_ready()


    def model_ready(self) -> tuple[bool, str]:
        """(ready, reason) without retrying: for readiness probes."""
        try:
            with self._client() as client:
                if self.protocol == "grpc":
                    ready = client.is_model_ready(self.model_name, self.model_version, client_timeout=5.0)
                else:
                    ready = client.is_model_ready(self.model_name, self.model_version)
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            return False, f"inference server {self.url} not reachable: {describe(error)}"
        if not ready:
            return False, f"model {self.model_name!r} is not ready on {self.url}"
        return True, "ready"

    # ---- model resolution ----------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        with self._client() as client:
            if self.protocol == "grpc":
                return client.get_model_metadata(self.model_name, as_json=True, client_timeout=30.0)
            return client.get_model_metadata(self.model_name)

    def _config(self, version: str) -> dict[str, Any]:
        with self._client() as client:
            if self.protocol == "grpc":
                return client.get_model_config(self.model_name, version, as_json=True, client_timeout=30.0)["config"]
            return client.get_model_config(self.model_name, version)

    def resolve(self) -> ServedModel:
        """The model version this step will use (the configured one, else the newest ready), from cache if known."""
        metadata = call_with_retry(
            self._metadata, self.retry, f"reading metadata of model {self.model_name!r}", transient=self._transient
        )
        versions = [str(v) for v in metadata.get("versions", [])]
        if self.model_version:
            if versions and self.model_version not in versions:
                raise InferenceError(
                    f"model {self.model_name!r} version {self.model_version} is not ready (ready: {', '.join(versions)})"
                )
            version = self.model_version
        elif versions:
            version = max(versions, key=lambda v: (int(v) if v.isdigit() else -1, v))
        else:
            raise InferenceError(f"model {self.model_name!r} has no ready version")
        key = (self.model_name, version)
        with self._cache_lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        config = call_with_retry(
            lambda: self._config(version), self.retry, f"reading config of model {self.model_name!r}",
            transient=self._transient,
        )
        served = self._served_from_config(config, version)
        if any(t.label_filename for t in served.outputs):
            served = self._with_labels(served)
        with self._cache_lock:
            self._cache[key] = served
        log.info(
            "model resolved",
            extra={"model": served.name, "version": version, "max_batch_size": served.max_batch_size,
                   "card_task": served.card.task, "weights": served.card.weights, "labels": len(served.labels)},
        )
        return served

    def _served_from_config(self, config: Mapping[str, Any], version: str) -> ServedModel:
        def tensors(entries: Sequence[Mapping[str, Any]]) -> tuple[TensorInfo, ...]:
            return tuple(
                TensorInfo(
                    name=str(entry["name"]),
                    datatype=str(entry.get("data_type", "")).removeprefix("TYPE_").replace("STRING", "BYTES"),
                    dims=_int_list(entry.get("dims", [])),
                    label_filename=str(entry.get("label_filename", "")),
                )
                for entry in entries
            )

        try:
            card = ModelCard.from_parameters(config.get("parameters", {}))
        except ValueError as error:
            raise ModelMismatch(f"model {self.model_name!r} version {version} has no valid model card: {error}") from None
        inputs, outputs = tensors(config.get("input", [])), tensors(config.get("output", []))
        if not inputs or not outputs:
            raise ModelMismatch(f"model {self.model_name!r} config declares no input or no output")
        return ServedModel(
            name=self.model_name,
            version=version,
            card=card,
            max_batch_size=int(config.get("max_batch_size", 0)),
            inputs=inputs,
            outputs=outputs,
        )

    def _with_labels(self, served: ServedModel) -> ServedModel:
        """Labels of the labelled output, read through the classification extension on one all-zero input row."""
        output = next(t for t in served.outputs if t.label_filename)
        if len(output.dims) != 1:
            raise ModelMismatch(f"labelled output {output.name!r} must be a vector, has dims {list(output.dims)}")
        class_count = output.dims[0]
        rows = np.zeros((1, *served.input.dims), dtype=served.input.numpy_dtype)
        entries = self.infer_raw(served, rows, output.name, class_count=class_count)
        labels: dict[int, str] = {}
        for entry in np.asarray(entries).reshape(-1):
            text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
            parts = text.split(":", 2)
            if len(parts) == 3 and parts[1].isdigit():
                labels[int(parts[1])] = parts[2]
        if sorted(labels) != list(range(class_count)) or not all(labels.values()):
            raise ModelMismatch(
                f"model {served.name!r} output {output.name!r}: the classification extension returned labels for "
                f"{len(labels)} of {class_count} classes"
            )
        return ServedModel(
            name=served.name, version=served.version, card=served.card, max_batch_size=served.max_batch_size,
            inputs=served.inputs, outputs=served.outputs, labels=tuple(labels[i] for i in range(class_count)),
        )

    # ---- inference -----------------------------------------------------------------------------------------

    def infer_raw(self, served: ServedModel, rows: np.ndarray, output_name: str, class_count: int = 0,
                  headers: Mapping[str, str] | None = None) -> np.ndarray:
        """One request (retried on UNAVAILABLE): ``rows`` [N, *input dims] -> the output [N, ...].

        ``headers`` go with the request (HTTP headers / gRPC metadata): the step's ``traceparent``."""
        tensor = served.input
        extra = {"headers": dict(headers)} if headers else {}

        def call() -> np.ndarray:
            with self._client() as client:
                if self.protocol == "grpc":
                    import tritonclient.grpc as grpcclient

                    infer_input = grpcclient.InferInput(tensor.name, list(rows.shape), tensor.datatype)
                    infer_input.set_data_from_numpy(rows)
                    requested = grpcclient.InferRequestedOutput(output_name, class_count=class_count)
                    result = client.infer(
                        served.name, [infer_input], model_version=served.version, outputs=[requested],
                        client_timeout=self.request_timeout_s, **extra,
                    )
                else:
                    import tritonclient.http as httpclient

                    infer_input = httpclient.InferInput(tensor.name, list(rows.shape), tensor.datatype)
                    infer_input.set_data_from_numpy(rows, binary_data=True)
                    requested = httpclient.InferRequestedOutput(output_name, binary_data=True, class_count=class_count)
                    result = client.infer(served.name, [infer_input], model_version=served.version, outputs=[requested],
                                          **extra)
                output = result.as_numpy(output_name)
            if output is None:
                raise InferenceError(f"model {served.name!r} returned no output {output_name!r}")
            return output

        return call_with_retry(call, self.retry, f"inference on model {served.name!r}", transient=self._transient)

    @timed_stage(Stage.INFERENCE)
    def infer(self, served: ServedModel, rows: np.ndarray, headers: Mapping[str, str] | None = None) -> np.ndarray:
        """``rows`` [N, *input dims] -> the first output [N, *output dims], checked for shape and dtype."""
        output = served.output
        result = self.infer_raw(served, rows, output.name, headers=headers)
        expected = (rows.shape[0], *output.dims)
        if tuple(result.shape) != expected or result.dtype != output.numpy_dtype:
            raise InferenceError(
                f"model {served.name!r} returned {output.name} {result.dtype} {list(result.shape)}, "
                f"expected {output.numpy_dtype} {list(expected)}"
            )
        return result
