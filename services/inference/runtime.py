"""ONNX Runtime sessions: one per model instance, each driven by its own single worker thread
(:class:`InstanceWorker`).

Maps Triton's instance groups and ONNX Runtime backend options onto ORT:
- ``instance_group {count, kind, gpus}``: KIND_CPU -> CPU EP; KIND_GPU -> CUDA EP (TensorRT EP first
  when ``optimization.execution_accelerators.gpu_execution_accelerator { name: "tensorrt" }``), one
  group's ``count`` instances on each listed (or each visible) GPU, as Triton does.
- ``parameters``: ``intra_op_thread_count``, ``inter_op_thread_count``, ``execution_mode``,
  ``enable_mem_arena``, ``enable_mem_pattern``, and any key starting ``session.`` passed through as an
  ORT session config entry (e.g. ``session.intra_op.allow_spinning``).
- ``optimization { graph { level } }``: -1 basic, 1 basic+extended, 2 none, unset/0 all (Triton's mapping).
Default intra-op threads: the CPUs this process may use divided by the total instance count, at
least 1, so instances do not oversubscribe the cores.
Default session config entries (:data:`DEFAULT_SESSION_CONFIG_ENTRIES`, a ``session.*`` parameter of
the config wins): intra-op threads do not spin-wait between runs (see there why).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2

from .model_config import ORT_TYPE_TO_TRITON, ModelConfigError, OnnxTensorInfo
from .protocol import BF16_DTYPE

log = logging.getLogger(__name__)

T = TypeVar("T")

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"

KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
KIND_AUTO = model_config_pb2.ModelInstanceGroup.KIND_AUTO

_GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_TRUE_STRINGS = {"1", "true", "yes", "on"}

# ORT's intra-op workers busy-wait after every parallel section (spinning) to pick up the next one a
# little sooner. In this server they share the cores with the event loop that decodes, batches and
# answers requests, and with every other instance: under load a spinning worker holds a core the
# loop needs. Measured on 2 cores with uc6-locust at 16 concurrent gRPC requests (bench/grpc_profile.py):
# the spinning worker used ~0.8 of a core and the server did ~1.4x fewer requests/s; ResNet-101 runs
# were not slower without it. A model's config can still turn it on
# (parameters { key: "session.intra_op.allow_spinning" value { string_value: "1" } }).
DEFAULT_SESSION_CONFIG_ENTRIES: dict[str, str] = {"session.intra_op.allow_spinning": "0"}
_TENSORRT_OPTION_NAMES = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}


def available_cpu_count() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, int(quota)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


@lru_cache(maxsize=1)
def gpu_device_count() -> int:
    """Visible CUDA devices, asked of the driver (no CUDA toolkit or torch needed); 0 without a GPU."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    if driver.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_usable() -> bool:
    """onnxruntime-gpu is installed and at least one GPU is visible."""
    return CUDA_PROVIDER in ort.get_available_providers() and gpu_device_count() > 0


@dataclass(frozen=True, slots=True)
class InstancePlacement:
    """Where one instance runs: its name (Triton's ``<group>_<n>``), device kind and id."""

    name: str
    group: str
    kind: str  # "CPU" or "GPU"
    device_id: int = 0


def plan_instances(config: model_config_pb2.ModelConfig) -> list[InstancePlacement]:
    """Expand the (completed) instance groups into instances, checking that GPUs exist when asked for."""
    placements: list[InstancePlacement] = []
    for group in config.instance_group:
        if group.kind in (KIND_GPU, KIND_AUTO):
            if not cuda_usable():
                reason = (
                    "onnxruntime has no CUDA execution provider (install onnxruntime-gpu)"
                    if CUDA_PROVIDER not in ort.get_available_providers()
                    else "no GPU is visible"
                )
                raise ModelConfigError(f"instance group '{group.name}' is KIND_GPU but {reason}")
            devices = list(group.gpus) or list(range(gpu_device_count()))
            index = 0
            for device in devices:
                if device < 0 or device >= gpu_device_count():
                    raise ModelConfigError(
                        f"instance group '{group.name}' asks for GPU {device}, "
                        f"but {gpu_device_count()} GPU(s) are visible"
                    )
                for _ in range(group.count):
                    placements.append(InstancePlacement(f"{group.name}_{index}", group.name, "GPU", device))
                    index += 1
        elif group.kind == KIND_CPU:
            for index in range(group.count):
                placements.append(InstancePlacement(f"{group.name}_{index}", group.name, "CPU"))
        else:
            kind_name = model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)
            raise ModelConfigError(f"instance group '{group.name}': kind {kind_name} is not supported")
    if not placements:
        raise ModelConfigError("the configuration asks for no instance")
    return placements


def _parameter(config: model_config_pb2.ModelConfig, key: str) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value.strip()
    return None


def _int_parameter(config: model_config_pb2.ModelConfig, key: str) -> int | None:
    value = _parameter(config, key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ModelConfigError(f"parameter '{key}' must be an integer, got '{value}'") from None


def session_config_entries(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    """The ORT session config entries a session of this model gets: the server's defaults, overridden
    by the config's ``session.*`` parameters (what a peer or a ceiling must use to compare fairly)."""
    entries = dict(DEFAULT_SESSION_CONFIG_ENTRIES)
    for key, value in config.parameters.items():
        if key.startswith("session."):
            entries[key] = value.string_value
    return entries


def session_options(config: model_config_pb2.ModelConfig, total_instances: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    intra = _int_parameter(config, "intra_op_thread_count")
    options.intra_op_num_threads = intra if intra and intra > 0 else max(1, available_cpu_count() // total_instances)
    inter = _int_parameter(config, "inter_op_thread_count")
    if inter is not None and inter > 0:
        options.inter_op_num_threads = inter
    mode = _int_parameter(config, "execution_mode")
    if mode is not None:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if mode == 1 else ort.ExecutionMode.ORT_SEQUENTIAL
    for key, attribute in (("enable_mem_arena", "enable_cpu_mem_arena"), ("enable_mem_pattern", "enable_mem_pattern")):
        value = _parameter(config, key)
        if value is not None:
            setattr(options, attribute, value.lower() in _TRUE_STRINGS)
    level = config.optimization.graph.level if config.optimization.HasField("graph") else 0
    options.graph_optimization_level = _GRAPH_LEVELS.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for key, value in session_config_entries(config).items():
        options.add_session_config_entry(key, value)
    # ORT would otherwise log every fallback node at warning level into the server log.
    options.log_severity_level = 3
    return options


def execution_providers(
    config: model_config_pb2.ModelConfig, placement: InstancePlacement
) -> list[tuple[str, dict[str, str]]]:
    if placement.kind == "CPU":
        return [(CPU_PROVIDER, {})]
    providers: list[tuple[str, dict[str, str]]] = []
    cuda_options: dict[str, str] = {"device_id": str(placement.device_id)}
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        name = accelerator.name.lower()
        if name == "tensorrt":
            if TENSORRT_PROVIDER not in ort.get_available_providers():
                raise ModelConfigError("the configuration asks for TensorRT but onnxruntime has no TensorRT provider")
            trt_options: dict[str, str] = {"device_id": str(placement.device_id)}
            for key, value in accelerator.parameters.items():
                if key == "precision_mode":
                    if value.upper() == "FP16":
                        trt_options["trt_fp16_enable"] = "True"
                    elif value.upper() == "INT8":
                        trt_options["trt_int8_enable"] = "True"
                else:
                    trt_options[_TENSORRT_OPTION_NAMES.get(key, key)] = value
            providers.append((TENSORRT_PROVIDER, trt_options))
        elif name == "cuda":
            cuda_options.update(dict(accelerator.parameters.items()))
        else:
            raise ModelConfigError(f"unknown GPU execution accelerator '{accelerator.name}'")
    providers.append((CUDA_PROVIDER, cuda_options))
    providers.append((CPU_PROVIDER, {}))
    return providers


ORT_BF16_TYPE = "tensor(bfloat16)"
ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def _ort_value_array(value: ort.OrtValue) -> np.ndarray:
    """A CPU OrtValue as a numpy array (a copy); bfloat16 read from its buffer as ml_dtypes.bfloat16."""
    if value.data_type() != ORT_BF16_TYPE:
        return value.numpy()
    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else b""
    return np.frombuffer(raw, dtype=np.uint16).copy().view(BF16_DTYPE).reshape(shape)


def describe_tensors(args: list) -> list[OnnxTensorInfo]:
    described: list[OnnxTensorInfo] = []
    for arg in args:
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or []))
        described.append(OnnxTensorInfo(arg.name, ORT_TYPE_TO_TRITON.get(arg.type, ""), shape, arg.type))
    return described


def create_session(
    path: Path, options: ort.SessionOptions, providers: list[tuple[str, dict[str, str]]]
) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(
            str(path),
            sess_options=options,
            providers=[name for name, _ in providers],
            provider_options=[opts for _, opts in providers],
        )
    except Exception as error:  # ORT raises several exception types (Fail, InvalidGraph, ...)
        raise ModelConfigError(f"ONNX Runtime cannot load {path}: {error}") from None
    wanted = providers[0][0]
    if wanted != CPU_PROVIDER and wanted not in session.get_providers():
        raise ModelConfigError(
            f"ONNX Runtime could not enable {wanted} for {path} (session runs on {session.get_providers()})"
        )
    return session


class InstanceWorker:
    """The one thread that runs an instance's work, item after item, in the order posted.

    What a ``ThreadPoolExecutor(max_workers=1)`` does, for less per item: :meth:`post` is one queue
    put (no ``Future``, no lock, no thread-count check), which matters when a tiny model runs a
    thousand batches a second. :meth:`submit` gives a ``Future`` where the caller wants the result.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._closed = False
        # A daemon thread: a server that exits without unloading its models must not hang on it.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` on the worker thread; it must report its own errors (they are only logged)."""
        if self._closed:
            raise RuntimeError(f"worker {self.name} is shut down")
        self._items.put((function, args))

    def submit(self, function: Callable[..., T], *args: Any) -> "Future[T]":
        """Run ``function(*args)`` on the worker thread; the future holds its result or exception."""
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(function(*args))
            except BaseException as error:  # handed to the caller through the future
                future.set_exception(error)

        self.post(run)
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Run what was posted, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._items.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        items = self._items
        while (item := items.get()) is not None:
            function, args = item
            try:
                function(*args)
            except BaseException:  # a posted function that raised: keep serving the next items
                log.exception("instance worker item failed", extra={"worker": self.name})


@dataclass(eq=False)
class OnnxInstance:
    """One ORT session and the single thread that runs it (ORT releases the GIL while it computes)."""

    placement: InstancePlacement
    session: ort.InferenceSession
    output_names: list[str]
    worker: InstanceWorker = field(init=False)
    warmup_runs: int = 0
    executions: int = 0

    def __post_init__(self) -> None:
        self.worker = InstanceWorker(f"instance-{self.placement.name}")
        self._run_options = ort.RunOptions()
        # ONNX Runtime's numpy bridge has no bfloat16: models with BF16 tensors go through OrtValues.
        session = self.session
        self._bf16_inputs = (
            {arg.name for arg in session.get_inputs() if arg.type == ORT_BF16_TYPE} if session is not None else set()
        )
        self._uses_bf16 = session is not None and (
            bool(self._bf16_inputs) or any(arg.type == ORT_BF16_TYPE for arg in session.get_outputs())
        )

    @property
    def name(self) -> str:
        return self.placement.name

    def describe(self) -> tuple[list[OnnxTensorInfo], list[OnnxTensorInfo]]:
        return describe_tensors(self.session.get_inputs()), describe_tensors(self.session.get_outputs())

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the session on the calling thread (meant to be this instance's worker thread)."""
        if self._uses_bf16:
            return self._run_with_ort_values(feeds)
        return self.session.run(self.output_names, feeds, self._run_options)

    def _run_with_ort_values(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        values = {
            name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(array).view(np.uint16), ONNX_BFLOAT16
            ) if name in self._bf16_inputs else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            for name, array in feeds.items()
        }
        outputs = self.session.run_with_ort_values(self.output_names, values, self._run_options)
        return [_ort_value_array(value) for value in outputs]

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        # Drop the session now rather than at the next GC: GPU memory is released with it.
        self.session = None  # type: ignore[assignment]


def load_instances(
    config: model_config_pb2.ModelConfig, model_path: Path, output_names: list[str] | None = None
) -> list[OnnxInstance]:
    """Create one session per planned instance (blocking: call from a worker thread).

    ``output_names`` may be set later (after the config is completed from the graph)."""
    placements = plan_instances(config)
    options = session_options(config, len(placements))
    instances: list[OnnxInstance] = []
    try:
        for placement in placements:
            session = create_session(model_path, options, execution_providers(config, placement))
            instances.append(OnnxInstance(placement, session, list(output_names or [])))
    except BaseException:
        for instance in instances:
            instance.close()
        raise
    return instances
