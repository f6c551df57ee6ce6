"""Triton model configuration (``config.pbtxt``): parsing, auto-completion from the ONNX graph, validation.

The canonical object is Triton's own ``ModelConfig`` proto, so what we read and what we serve on
``/v2/models/<m>/config`` are exactly Triton's fields. Auto-completion follows Triton's ONNX Runtime
backend: inputs/outputs are filled from the graph only when the config lists none, and a graph
whose every tensor has a variable first dimension gets ``max_batch_size`` = the default (4) and a
dynamic batcher when the config says 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from .protocol import CONFIG_TYPE_TO_TRITON

ONNX_BACKEND = "onnxruntime"
ONNX_PLATFORM = "onnxruntime_onnx"
DEFAULT_MODEL_FILENAME = "model.onnx"
# Triton's onnxruntime backend default for ``--backend-config=onnxruntime,default-max-batch-size``.
DEFAULT_MAX_BATCH_SIZE = 4

# ONNX Runtime type strings -> protocol datatype names.
ORT_TYPE_TO_TRITON: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
TRITON_TO_CONFIG_TYPE: dict[str, int] = {
    triton: model_config_pb2.DataType.Value(config_name) for config_name, triton in CONFIG_TYPE_TO_TRITON.items()
}


class ModelConfigError(Exception):
    """Why a model cannot be loaded; the message is what the repository index shows as the reason."""


@dataclass(frozen=True, slots=True)
class OnnxTensorInfo:
    """An input or output of the ONNX graph as ONNX Runtime reports it."""

    name: str
    datatype: str  # protocol name, "" when the ONNX type has no Triton equivalent
    shape: tuple[int, ...]  # -1 for every symbolic or unknown dimension
    onnx_type: str = ""


def config_datatype(data_type: int) -> str:
    """Config enum value (TYPE_FP32) -> protocol datatype name (FP32)."""
    name = model_config_pb2.DataType.Name(data_type)
    try:
        return CONFIG_TYPE_TO_TRITON[name]
    except KeyError:
        raise ModelConfigError(f"unsupported data type {name}") from None


def parse_config_text(text: str, source: str = "config.pbtxt") -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelConfigError(f"failed to parse {source}: {error}") from None
    return config


def parse_config_json(text: str) -> model_config_pb2.ModelConfig:
    """Triton's JSON form of ``ModelConfig`` (as sent in a load request's ``config`` parameter)."""
    config = model_config_pb2.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as error:
        raise ModelConfigError(f"failed to parse the JSON model configuration: {error}") from None
    return config


def full_shape(config: model_config_pb2.ModelConfig, dims: list[int]) -> list[int]:
    """Client-visible shape of a tensor: dims with a leading -1 when the model batches."""
    return ([-1] + list(dims)) if config.max_batch_size > 0 else list(dims)


def _model_shape(config: model_config_pb2.ModelConfig, tensor) -> list[int]:
    """Shape the ONNX graph sees: the reshape target (when given) instead of the client dims."""
    dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    return full_shape(config, dims)


def _shapes_compatible(expected: list[int], actual: tuple[int, ...]) -> bool:
    if len(expected) != len(actual):
        return False
    return all(e == -1 or a == -1 or e == a for e, a in zip(expected, actual))


def _supports_batching(onnx_inputs: list[OnnxTensorInfo], onnx_outputs: list[OnnxTensorInfo]) -> bool:
    return all(len(t.shape) > 0 and t.shape[0] == -1 for t in [*onnx_inputs, *onnx_outputs])


def _complete_tensors(
    config: model_config_pb2.ModelConfig, infos: list[OnnxTensorInfo], target, kind: str
) -> None:
    del target[:]
    for info in infos:
        if not info.datatype:
            raise ModelConfigError(f"model {kind} '{info.name}' has type {info.onnx_type}, which Triton cannot serve")
        entry = target.add()
        entry.name = info.name
        entry.data_type = TRITON_TO_CONFIG_TYPE[info.datatype]
        dims = list(info.shape[1:] if config.max_batch_size > 0 else info.shape)
        if not dims:
            # A scalar per batch row: Triton exposes it as [1] and reshapes to the model's [].
            dims = [1]
            if config.max_batch_size > 0:
                entry.reshape.SetInParent()
        entry.dims.extend(dims)


def complete_config(
    config: model_config_pb2.ModelConfig,
    model_name: str,
    onnx_inputs: list[OnnxTensorInfo],
    onnx_outputs: list[OnnxTensorInfo],
    *,
    gpu_available: bool,
    default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> model_config_pb2.ModelConfig:
    """Return a copy of ``config`` with what Triton auto-completes for an ONNX model filled in."""
    completed = model_config_pb2.ModelConfig()
    completed.CopyFrom(config)
    if not completed.name:
        completed.name = model_name
    elif completed.name != model_name:
        raise ModelConfigError(
            f"the configuration names the model '{completed.name}' but its directory is '{model_name}'"
        )
    if completed.backend and completed.backend != ONNX_BACKEND:
        raise ModelConfigError(
            f"unsupported backend '{completed.backend}': this server runs ONNX models ('{ONNX_BACKEND}') only"
        )
    if completed.platform and completed.platform != ONNX_PLATFORM:
        raise ModelConfigError(
            f"unsupported platform '{completed.platform}': this server runs ONNX models ('{ONNX_PLATFORM}') only"
        )
    completed.backend = ONNX_BACKEND
    completed.platform = ONNX_PLATFORM
    if not completed.default_model_filename:
        completed.default_model_filename = DEFAULT_MODEL_FILENAME
    if not completed.HasField("version_policy"):
        completed.version_policy.latest.num_versions = 1
    elif completed.version_policy.HasField("latest") and completed.version_policy.latest.num_versions == 0:
        completed.version_policy.latest.num_versions = 1

    if completed.max_batch_size < 0:
        raise ModelConfigError(f"max_batch_size must be >= 0, got {completed.max_batch_size}")
    if not completed.input or not completed.output:
        batching = _supports_batching(onnx_inputs, onnx_outputs)
        if batching and completed.max_batch_size == 0:
            completed.max_batch_size = default_max_batch_size
            if completed.max_batch_size > 1 and not completed.HasField("sequence_batching"):
                completed.dynamic_batching.SetInParent()
        elif not batching and completed.max_batch_size != 0:
            raise ModelConfigError(
                "the model does not support batching (every input and output needs a variable first "
                f"dimension) while max_batch_size is {completed.max_batch_size}"
            )
        if not completed.input:
            _complete_tensors(completed, onnx_inputs, completed.input, "input")
        if not completed.output:
            _complete_tensors(completed, onnx_outputs, completed.output, "output")

    reject_queue_policies(completed)
    # Triton serves every config with these optimization defaults filled in.
    optimization = completed.optimization
    if not optimization.HasField("input_pinned_memory"):
        optimization.input_pinned_memory.enable = True
    if not optimization.HasField("output_pinned_memory"):
        optimization.output_pinned_memory.enable = True

    resolve_instance_groups(completed, gpu_available=gpu_available)
    return completed


def reject_queue_policies(config: model_config_pb2.ModelConfig) -> None:
    """Refuse the scheduling policies this server does not implement (request timeouts, REJECT/DELAY timeout
    actions, priority levels), rather than accept and ignore them; only ``max_queue_size`` is honoured."""
    batching = config.dynamic_batching
    policy = batching.default_queue_policy
    unsupported = []
    if policy.default_timeout_microseconds:
        unsupported.append("default_queue_policy.default_timeout_microseconds")
    if policy.allow_timeout_override:
        unsupported.append("default_queue_policy.allow_timeout_override")
    if policy.timeout_action != model_config_pb2.ModelQueuePolicy.REJECT:
        unsupported.append("default_queue_policy.timeout_action")
    if batching.priority_levels or batching.default_priority_level:
        unsupported.append("priority_levels / default_priority_level")
    if batching.priority_queue_policy:
        unsupported.append("priority_queue_policy")
    if unsupported:
        raise ModelConfigError(
            "dynamic_batching sets scheduling policies this server does not implement: "
            + ", ".join(unsupported) + " (only default_queue_policy.max_queue_size is supported)"
        )


def resolve_instance_groups(config: model_config_pb2.ModelConfig, *, gpu_available: bool) -> None:
    """Fill instance groups in place like Triton: one KIND_AUTO instance by default, KIND_AUTO -> GPU
    when one is usable else CPU, names ``<model>_<index>``, count at least 1. Idempotent."""
    if not config.instance_group:
        config.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO)
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.count == 0:
            group.count = 1
        if group.count < 0:
            raise ModelConfigError(f"instance group '{group.name}' has a negative count")
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO:
            group.kind = (
                model_config_pb2.ModelInstanceGroup.KIND_GPU
                if gpu_available
                else model_config_pb2.ModelInstanceGroup.KIND_CPU
            )


def validate_config(
    config: model_config_pb2.ModelConfig,
    onnx_inputs: list[OnnxTensorInfo],
    onnx_outputs: list[OnnxTensorInfo],
) -> None:
    """Check a completed config against the ONNX graph; raise ModelConfigError naming what is wrong."""
    if config.HasField("sequence_batching"):
        raise ModelConfigError("sequence_batching is not supported by this server")
    if config.HasField("ensemble_scheduling"):
        raise ModelConfigError("ensemble models are not supported by this server")
    for preferred in config.dynamic_batching.preferred_batch_size:
        if preferred <= 0 or (config.max_batch_size > 0 and preferred > config.max_batch_size):
            raise ModelConfigError(
                f"dynamic_batching.preferred_batch_size {preferred} must be between 1 and "
                f"max_batch_size ({config.max_batch_size})"
            )
    configured_inputs = _validate_tensors(config, config.input, onnx_inputs, "input")
    missing = [info.name for info in onnx_inputs if info.name not in configured_inputs]
    if missing:
        raise ModelConfigError(
            f"the ONNX model needs input(s) {missing} that the configuration does not list "
            f"(configured: {sorted(configured_inputs)})"
        )
    # Outputs may be a subset of the graph's: a client only gets what the configuration lists.
    _validate_tensors(config, config.output, onnx_outputs, "output")


def _validate_tensors(
    config: model_config_pb2.ModelConfig, tensors, onnx_infos: list[OnnxTensorInfo], kind: str
) -> set[str]:
    """Validate each configured tensor against the graph; returns the configured names (each listed once)."""
    onnx_by_name = {info.name: info for info in onnx_infos}
    configured: set[str] = set()
    for tensor in tensors:
        _validate_tensor(config, tensor, onnx_by_name, kind)
        if tensor.name in configured:
            raise ModelConfigError(f"{kind} '{tensor.name}' appears twice in the configuration")
        configured.add(tensor.name)
    return configured


def _validate_tensor(config: model_config_pb2.ModelConfig, tensor, onnx_by_name: dict, kind: str) -> None:
    if not tensor.name:
        raise ModelConfigError(f"a configuration {kind} has no name")
    info: OnnxTensorInfo | None = onnx_by_name.get(tensor.name)
    if info is None:
        raise ModelConfigError(
            f"configuration {kind} '{tensor.name}' is not an {kind} of the ONNX model "
            f"(model {kind}s: {sorted(onnx_by_name)})"
        )
    if not tensor.dims:
        raise ModelConfigError(f"{kind} '{tensor.name}' has no dims in the configuration")
    if any(d < -1 or d == 0 for d in tensor.dims):
        raise ModelConfigError(f"{kind} '{tensor.name}' has invalid dims {list(tensor.dims)}: use -1 for variable")
    datatype = config_datatype(tensor.data_type)
    if datatype != info.datatype:
        raise ModelConfigError(
            f"{kind} '{tensor.name}' is {datatype} in the configuration but {info.onnx_type} "
            f"({info.datatype or 'unsupported'}) in the ONNX model"
        )
    if tensor.HasField("reshape"):
        fixed_dims = [d for d in tensor.dims if d != -1]
        fixed_reshape = [d for d in tensor.reshape.shape if d != -1]
        if -1 not in tensor.dims and -1 not in tensor.reshape.shape:
            count_dims = _product(fixed_dims)
            count_reshape = _product(fixed_reshape)
            if count_dims != count_reshape:
                raise ModelConfigError(
                    f"{kind} '{tensor.name}': reshape {list(tensor.reshape.shape)} has a different element count "
                    f"than dims {list(tensor.dims)}"
                )
    expected = _model_shape(config, tensor)
    if config.max_batch_size > 0 and (not info.shape or info.shape[0] != -1):
        raise ModelConfigError(
            f"{kind} '{tensor.name}': max_batch_size is {config.max_batch_size}, so the model's first dimension "
            f"must be variable (-1), but the ONNX model expects {list(info.shape)}"
        )
    if not _shapes_compatible(expected, info.shape):
        raise ModelConfigError(
            f"{kind} '{tensor.name}': the configuration gives shape {expected} "
            f"(max_batch_size {config.max_batch_size}), the ONNX model expects {list(info.shape)}"
        )


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def select_versions(policy: model_config_pb2.ModelVersionPolicy, available: list[int]) -> list[int]:
    """Versions to load under ``policy`` from the version directories present, highest first."""
    ordered = sorted(set(available), reverse=True)
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        selected = ordered
    elif which == "specific":
        wanted = sorted(set(policy.specific.versions), reverse=True)
        absent = [v for v in wanted if v not in ordered]
        if absent:
            raise ModelConfigError(
                f"version_policy specific asks for version(s) {sorted(absent)} that have no directory "
                f"(available: {sorted(ordered)})"
            )
        selected = wanted
    else:
        count = policy.latest.num_versions if which == "latest" and policy.latest.num_versions > 0 else 1
        selected = ordered[:count]
    if not selected:
        raise ModelConfigError("no model version to load: the model directory has no numeric version directory")
    return selected
