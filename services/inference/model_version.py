"""One served model version: its completed config, instances, scheduler and statistics, and the
per-request work on it (validating inputs against the config, resolving outputs, the classification
extension, building the response, warm-up). Model lifecycle (repository, load/unload, readiness)
is ``services.inference.engine``'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tritonclient.grpc import model_config_pb2

from .batching import ModelScheduler
from .model_config import ModelConfigError, config_datatype, full_shape
from .protocol import (
    BF16_DTYPE,
    InferenceServerError,
    InferOutput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    array_from_raw,
    invalid,
    numpy_dtype,
)
from .runtime import OnnxInstance
from .stats import VersionStatistics

log = logging.getLogger(__name__)

WARMUP_DIRECTORY = "warmup"

@dataclass(slots=True)
class TensorMetadata:
    name: str
    datatype: str  # protocol name: FP32, INT64, BYTES ...
    shape: list[int]  # with -1 for the batch dimension (and any variable dimension)



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
    is_float = rows.dtype.kind == "f" or rows.dtype == BF16_DTYPE
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
