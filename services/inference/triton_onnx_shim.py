"""A CPU ONNX Runtime backend for real NVIDIA Triton, written for Triton's Python backend.

Used only where Triton's C++ ONNX Runtime backend (``libtriton_onnxruntime.so``) is missing, as in
the ``nvidia-pytriton`` wheel that ``make triton`` installs. ``services.inference.real_triton``
copies this file to ``<backend-directory>/onnxruntime/model.py``; Triton then serves every model
whose config says ``backend: "onnxruntime"`` or ``platform: "onnxruntime_onnx"`` through it, with
the repository's configs unchanged.

What it does, per model instance (one stub process each):
- opens ``<model directory>/<version>/<default_model_filename or model.onnx>`` in one
  ``onnxruntime.InferenceSession`` on the CPU, with the config's ``intra_op_thread_count``,
  ``inter_op_thread_count``, ``execution_mode`` parameters and ``optimization.graph.level``;
- runs the requests Triton hands to one ``execute`` call as few batches as it can: requests whose
  non-batch shapes agree are concatenated along the batch axis (so ``dynamic_batching`` really
  batches), run once and split back by rows;
- applies the config's input/output ``reshape``; converts BYTES tensors to ONNX strings and back;
- answers a request whose batch fails with that error, without failing the other batches.

What it does not do: execution accelerators (CUDA, TensorRT, OpenVINO) and the C++ backend's
other parameters are ignored. Classification, statistics, queueing and the protocol are Triton's.

This module runs inside Triton's stub process: it imports only numpy, onnxruntime and Triton's
``triton_python_backend_utils``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests, linters): only the plain functions are usable
    pb_utils = None

DEFAULT_MODEL_FILENAME = "model.onnx"

# Triton config type -> numpy dtype, for the types ONNX models use here.
CONFIG_TYPE_TO_NUMPY = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}
# ONNX Runtime type string -> Triton config type (auto-complete of configs without tensors).
ORT_TYPE_TO_CONFIG = {
    "tensor(bool)": "TYPE_BOOL",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING",
}
GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def _parameter(config: dict[str, Any], key: str) -> str | None:
    entry = config.get("parameters", {}).get(key)
    return entry.get("string_value") if isinstance(entry, dict) else None


def session_options(config: dict[str, Any]) -> ort.SessionOptions:
    """ORT options from the config, read as Triton's ONNX Runtime backend reads them."""
    options = ort.SessionOptions()
    intra = _parameter(config, "intra_op_thread_count")
    inter = _parameter(config, "inter_op_thread_count")
    if intra:
        options.intra_op_num_threads = int(intra)
    if inter:
        options.inter_op_num_threads = int(inter)
    if _parameter(config, "execution_mode") == "1":
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    level = int(config.get("optimization", {}).get("graph", {}).get("level", 0) or 0)
    options.graph_optimization_level = GRAPH_LEVELS.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    # Triton's stub process serves one request batch at a time: ORT's spinning workers only burn CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def model_file(model_directory: Path, version: str, config: dict[str, Any]) -> Path:
    return model_directory / version / (config.get("default_model_filename") or DEFAULT_MODEL_FILENAME)


def _stub_model_path() -> Path | None:
    """The model path Triton passed to this stub process (its first argument): ``<model dir>/<version>/model.py``.

    ``auto_complete_config`` runs before Triton tells the model where it lives, so this is the only
    way to find the ONNX file then.
    """
    try:
        arguments = Path("/proc/self/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return Path(os.fsdecode(arguments[1])) if len(arguments) > 1 and arguments[1] else None


def _to_ort(array: np.ndarray, config_type: str) -> np.ndarray:
    if config_type != "TYPE_STRING":
        return array
    converted = np.empty(array.shape, dtype=np.object_)
    flat = converted.reshape(-1)
    for index, item in enumerate(array.reshape(-1)):
        flat[index] = bytes(item).decode("utf-8") if isinstance(item, (bytes, bytearray)) else str(item)
    return converted


def _from_ort(array: np.ndarray, config_type: str) -> np.ndarray:
    if config_type != "TYPE_STRING":
        return array
    converted = np.empty(array.shape, dtype=np.object_)
    flat = converted.reshape(-1)
    for index, item in enumerate(array.reshape(-1)):
        flat[index] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return converted


class TritonPythonModel:
    """One model instance: one ONNX Runtime session."""

    @staticmethod
    def auto_complete_config(auto_complete_model_config):  # noqa: ANN001, ANN205 - Triton's signature
        """Fill in inputs and outputs from the ONNX graph when the config leaves them out."""
        config = auto_complete_model_config.as_dict()
        if config.get("input") and config.get("output"):
            return auto_complete_model_config
        stub_path = _stub_model_path()
        if stub_path is None:
            return auto_complete_model_config
        path = model_file(stub_path.parent.parent, stub_path.parent.name, config)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        batched = int(config.get("max_batch_size", 0)) > 0
        for method, tensors, present in (
            (auto_complete_model_config.add_input, session.get_inputs(), config.get("input")),
            (auto_complete_model_config.add_output, session.get_outputs(), config.get("output")),
        ):
            if present:
                continue
            for tensor in tensors:
                dims = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in tensor.shape]
                method({"name": tensor.name, "data_type": ORT_TYPE_TO_CONFIG[tensor.type],
                        "dims": dims[1:] if batched else dims})
        return auto_complete_model_config

    def initialize(self, args: dict[str, str]) -> None:
        self.config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.config.get("name", ""))
        path = model_file(Path(args["model_repository"]), args["model_version"], self.config)
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options(self.config), providers=["CPUExecutionProvider"]
        )
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        self.inputs = [
            (tensor["name"], tensor["data_type"], tensor.get("reshape", {}).get("shape"))
            for tensor in self.config.get("input", [])
        ]
        self.outputs = [
            (tensor["name"], tensor["data_type"],
             [int(d) for d in tensor["dims"]] if "reshape" in tensor else None)
            for tensor in self.config.get("output", [])
        ]
        self.output_names = [name for name, _, _ in self.outputs]

    def _feeds(self, request) -> tuple[dict[str, np.ndarray], int]:  # noqa: ANN001 - pb_utils.InferenceRequest
        feeds: dict[str, np.ndarray] = {}
        rows = 1
        for name, config_type, model_shape in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue  # optional input left out: Triton has already checked the required ones
            array = _to_ort(tensor.as_numpy(), config_type)
            if self.batched:
                rows = array.shape[0]
            if model_shape is not None:
                array = array.reshape(([rows] if self.batched else []) + [int(d) for d in model_shape])
            feeds[name] = array
        return feeds, rows

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results))

    def _responses(self, outputs: dict[str, np.ndarray], row_counts: list[int], requests: list) -> list:
        responses = []
        start = 0
        for request, rows in zip(requests, row_counts):
            wanted = set(request.requested_output_names()) or set(self.output_names)
            tensors = []
            for name, config_type, dims in self.outputs:
                if name not in wanted:
                    continue
                array = outputs[name][start:start + rows] if self.batched else outputs[name]
                if dims is not None:
                    array = array.reshape(([rows] if self.batched else []) + dims)
                tensors.append(pb_utils.Tensor(name, _from_ort(np.ascontiguousarray(array), config_type)))
            start += rows
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def execute(self, requests: list) -> list:
        """Requests with the same non-batch shapes run as one batch; the answers keep the requests' order."""
        prepared = [self._feeds(request) for request in requests]
        groups: dict[tuple, list[int]] = {}
        for index, (feeds, _) in enumerate(prepared):
            key = tuple((name, array.shape[1:] if self.batched else array.shape) for name, array in feeds.items())
            groups.setdefault(key if self.batched else (index,), []).append(index)
        responses: list = [None] * len(requests)
        for members in groups.values():
            try:
                if len(members) == 1:
                    feeds = prepared[members[0]][0]
                else:
                    feeds = {
                        name: np.concatenate([prepared[m][0][name] for m in members], axis=0)
                        for name in prepared[members[0]][0]
                    }
                outputs = self._run(feeds)
                answered = self._responses(
                    outputs, [prepared[m][1] for m in members], [requests[m] for m in members]
                )
            except Exception as error:  # noqa: BLE001 - the batch's requests get the error, the rest go on
                failure = pb_utils.TritonError(f"onnxruntime execution failed: {error}")
                answered = [pb_utils.InferenceResponse(output_tensors=[], error=failure) for _ in members]
            for member, response in zip(members, answered):
                responses[member] = response
        return responses

    def finalize(self) -> None:
        self.session = None
