"""Tiny ONNX models in a Triton model repository, built with ``onnx.helper`` (no torch).

Each builder writes ``<repository>/<name>/config.pbtxt`` and ``<repository>/<name>/<version>/model.onnx``
(plus a label file where the model has one) and returns the model directory. Outputs are simple
functions of the input so tests can compute the expected result with numpy:

- ``simple``          FP32 INPUT0 [4] -> OUTPUT0 = x + 1, OUTPUT1 = x * 2; max_batch_size 8, dynamic batching
- ``int64_identity``  INT64 INPUT0 [4] -> OUTPUT0 = x; max_batch_size 8, no dynamic batching
- ``string_identity`` BYTES INPUT0 [-1] -> OUTPUT0 = x; max_batch_size 8
- ``classifier``      FP32 INPUT0 [5] -> PROBABILITY = sigmoid(x), labels in ``labels.txt``; max_batch_size 8
- ``fixed_shape``     FP32 INPUT0 [2, 3] -> OUTPUT0 = x * 3; max_batch_size 0 (no batch dimension)
- ``versioned``       FP32 INPUT0 [4] -> OUTPUT0 = x + <version>; versions 1, 2 and 3, version_policy specific {1, 3}
- ``slow``            FP32 INPUT0 [256] -> OUTPUT0 = x after ~20 ms of batch-independent MatMul work;
                      max_batch_size 8, dynamic batching (2 ms queue delay), one intra-op thread

Use :func:`build_tiny_repository` for all of them or the single builders for a custom set;
:func:`write_config` writes a ``config.pbtxt`` from a ``ModelConfig`` proto or from text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2

# Old enough for any onnxruntime (CPU or GPU build) the tests may meet; new enough for every op used.
ONNX_OPSET = 17
ONNX_IR_VERSION = 8

CLASSIFIER_LABELS = ["water", "forest", "urban", "cropland", "grassland"]
SLOW_WIDTH = 256
SLOW_WORK_SIZE = 512
VERSIONED_VERSIONS = (1, 2, 3)
VERSIONED_POLICY_VERSIONS = (1, 3)


def write_config(model_dir: Path, config: model_config_pb2.ModelConfig | str) -> Path:
    """Write ``config.pbtxt`` into ``model_dir`` from a proto or from text (validated by parsing it)."""
    if isinstance(config, str):
        text_format.Parse(config, model_config_pb2.ModelConfig())
        text = config
    else:
        text = text_format.MessageToString(config)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(text)
    return path


def write_onnx(model_dir: Path, version: int, graph: onnx.GraphProto, filename: str = "model.onnx") -> Path:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="eo-inference-tests",
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    path = version_dir / filename
    onnx.save(model, str(path))
    return path


def _batched_shape(dims: list[int | str], batched: bool) -> list[int | str]:
    return (["batch"] + dims) if batched else dims


def _tensor_config(name: str, data_type: int, dims: list[int], label_filename: str = "") -> dict:
    entry: dict = {"name": name, "data_type": data_type, "dims": dims}
    if label_filename:
        entry["label_filename"] = label_filename
    return entry


def make_config(
    name: str,
    *,
    max_batch_size: int,
    inputs: list[dict],
    outputs: list[dict],
    dynamic_batching: bool = False,
    preferred_batch_size: list[int] | None = None,
    max_queue_delay_microseconds: int = 0,
    max_queue_size: int = 0,
    instance_count: int = 1,
    version_policy: model_config_pb2.ModelVersionPolicy | None = None,
) -> model_config_pb2.ModelConfig:
    """A ``ModelConfig`` for an ONNX model on CPU, as a test would write it by hand."""
    config = model_config_pb2.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    for entry in inputs:
        config.input.append(model_config_pb2.ModelInput(**entry))
    for entry in outputs:
        config.output.append(model_config_pb2.ModelOutput(**entry))
    config.instance_group.append(
        model_config_pb2.ModelInstanceGroup(count=instance_count, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    )
    if dynamic_batching:
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.preferred_batch_size.extend(preferred_batch_size or [])
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
        if max_queue_size:
            config.dynamic_batching.default_queue_policy.max_queue_size = max_queue_size
    if version_policy is not None:
        config.version_policy.CopyFrom(version_policy)
    return config


def make_simple(
    repository: Path,
    name: str = "simple",
    *,
    max_batch_size: int = 8,
    dynamic_batching: bool = True,
    instance_count: int = 1,
    write_model_config: bool = True,
) -> Path:
    """FP32 INPUT0 [4] -> OUTPUT0 = x + 1, OUTPUT1 = x * 2."""
    model_dir = repository / name
    batched = max_batch_size > 0
    shape = _batched_shape([4], batched)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "one"], ["OUTPUT0"]),
            helper.make_node("Mul", ["INPUT0", "two"], ["OUTPUT1"]),
        ],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, shape),
        ],
        initializer=[
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
        ],
    )
    write_onnx(model_dir, 1, graph)
    if write_model_config:
        write_config(
            model_dir,
            make_config(
                name,
                max_batch_size=max_batch_size,
                inputs=[_tensor_config("INPUT0", model_config_pb2.TYPE_FP32, [4])],
                outputs=[
                    _tensor_config("OUTPUT0", model_config_pb2.TYPE_FP32, [4]),
                    _tensor_config("OUTPUT1", model_config_pb2.TYPE_FP32, [4]),
                ],
                dynamic_batching=dynamic_batching,
                instance_count=instance_count,
            ),
        )
    return model_dir


def make_int64_identity(repository: Path, name: str = "int64_identity") -> Path:
    """INT64 INPUT0 [4] -> OUTPUT0 = x, no dynamic batching (requests run one per free instance)."""
    model_dir = repository / name
    shape = _batched_shape([4], True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.INT64, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.INT64, shape)],
    )
    write_onnx(model_dir, 1, graph)
    write_config(
        model_dir,
        make_config(
            name,
            max_batch_size=8,
            inputs=[_tensor_config("INPUT0", model_config_pb2.TYPE_INT64, [4])],
            outputs=[_tensor_config("OUTPUT0", model_config_pb2.TYPE_INT64, [4])],
        ),
    )
    return model_dir


def make_string_identity(repository: Path, name: str = "string_identity") -> Path:
    """BYTES INPUT0 [-1] -> OUTPUT0 = x (ONNX string tensors; exercises the BYTES codecs)."""
    model_dir = repository / name
    shape: list[int | str] = ["batch", "length"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, shape)],
    )
    write_onnx(model_dir, 1, graph)
    write_config(
        model_dir,
        make_config(
            name,
            max_batch_size=8,
            inputs=[_tensor_config("INPUT0", model_config_pb2.TYPE_STRING, [-1])],
            outputs=[_tensor_config("OUTPUT0", model_config_pb2.TYPE_STRING, [-1])],
            dynamic_batching=True,
        ),
    )
    return model_dir


def make_classifier(repository: Path, name: str = "classifier") -> Path:
    """FP32 INPUT0 [5] -> PROBABILITY = sigmoid(x); ``labels.txt`` names the 5 classes."""
    model_dir = repository / name
    shape = _batched_shape([len(CLASSIFIER_LABELS)], True)
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["INPUT0"], ["PROBABILITY"])],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("PROBABILITY", TensorProto.FLOAT, shape)],
    )
    write_onnx(model_dir, 1, graph)
    (model_dir / "labels.txt").write_text("\n".join(CLASSIFIER_LABELS) + "\n")
    write_config(
        model_dir,
        make_config(
            name,
            max_batch_size=8,
            inputs=[_tensor_config("INPUT0", model_config_pb2.TYPE_FP32, [len(CLASSIFIER_LABELS)])],
            outputs=[
                _tensor_config(
                    "PROBABILITY", model_config_pb2.TYPE_FP32, [len(CLASSIFIER_LABELS)], label_filename="labels.txt"
                )
            ],
            dynamic_batching=True,
        ),
    )
    return model_dir


def make_fixed_shape(repository: Path, name: str = "fixed_shape") -> Path:
    """FP32 INPUT0 [2, 3] -> OUTPUT0 = x * 3 with ``max_batch_size: 0``: the shape has no batch dimension."""
    model_dir = repository / name
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "three"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")],
    )
    write_onnx(model_dir, 1, graph)
    write_config(
        model_dir,
        make_config(
            name,
            max_batch_size=0,
            inputs=[_tensor_config("INPUT0", model_config_pb2.TYPE_FP32, [2, 3])],
            outputs=[_tensor_config("OUTPUT0", model_config_pb2.TYPE_FP32, [2, 3])],
        ),
    )
    return model_dir


def make_versioned(
    repository: Path,
    name: str = "versioned",
    *,
    versions: Iterable[int] = VERSIONED_VERSIONS,
    version_policy: model_config_pb2.ModelVersionPolicy | None = None,
) -> Path:
    """FP32 INPUT0 [4] -> OUTPUT0 = x + <version>, so a response shows which version computed it.

    Without an explicit policy the config says ``specific { versions: [1, 3] }``.
    """
    model_dir = repository / name
    shape = _batched_shape([4], True)
    for version in versions:
        graph = helper.make_graph(
            [helper.make_node("Add", ["INPUT0", "offset"], ["OUTPUT0"])],
            f"{name}_v{version}",
            [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape)],
            initializer=[numpy_helper.from_array(np.array(float(version), dtype=np.float32), "offset")],
        )
        write_onnx(model_dir, version, graph)
    if version_policy is None:
        version_policy = model_config_pb2.ModelVersionPolicy(
            specific=model_config_pb2.ModelVersionPolicy.Specific(versions=list(VERSIONED_POLICY_VERSIONS))
        )
    write_config(
        model_dir,
        make_config(
            name,
            max_batch_size=8,
            inputs=[_tensor_config("INPUT0", model_config_pb2.TYPE_FP32, [4])],
            outputs=[_tensor_config("OUTPUT0", model_config_pb2.TYPE_FP32, [4])],
            version_policy=version_policy,
        ),
    )
    return model_dir


def make_slow(
    repository: Path,
    name: str = "slow",
    *,
    work_matmuls: int = 16,
    max_batch_size: int = 8,
    preferred_batch_size: list[int] | None = None,
    max_queue_delay_microseconds: int = 2000,
    max_queue_size: int = 0,
    instance_count: int = 1,
    dynamic_batching: bool = True,
) -> Path:
    """FP32 INPUT0 [256] -> OUTPUT0 = x, after a fixed amount of work (about 20 ms on one core).

    The work is a chain of ``work_matmuls`` 512x512 MatMuls on an identity matrix that depends on
    the input only through ``0 * sum(x)`` (so ONNX Runtime cannot fold it into a constant); its
    result is added back as ``0 * sum(...)``, which leaves the output exactly equal to the input.
    The cost hardly depends on the batch size: requests queue up behind a busy instance, and a
    merged batch costs about as much as a single request.
    """
    model_dir = repository / name
    shape = _batched_shape([SLOW_WIDTH], max_batch_size > 0)
    nodes = [
        helper.make_node("ReduceSum", ["INPUT0"], ["input_sum"], keepdims=0),
        helper.make_node("Mul", ["input_sum", "zero"], ["input_zero"]),
        helper.make_node("Add", ["work_matrix", "input_zero"], ["work_0"]),
    ]
    for step in range(work_matmuls):
        nodes.append(helper.make_node("MatMul", [f"work_{step}", "work_matrix"], [f"work_{step + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"work_{work_matmuls}"], ["work_sum"], keepdims=0),
        helper.make_node("Mul", ["work_sum", "zero"], ["work_zero"]),
        helper.make_node("Add", ["INPUT0", "work_zero"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape)],
        initializer=[
            numpy_helper.from_array(np.eye(SLOW_WORK_SIZE, dtype=np.float32), "work_matrix"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    write_onnx(model_dir, 1, graph)
    config = make_config(
        name,
        max_batch_size=max_batch_size,
        inputs=[_tensor_config("INPUT0", model_config_pb2.TYPE_FP32, [SLOW_WIDTH])],
        outputs=[_tensor_config("OUTPUT0", model_config_pb2.TYPE_FP32, [SLOW_WIDTH])],
        dynamic_batching=dynamic_batching,
        preferred_batch_size=preferred_batch_size,
        max_queue_delay_microseconds=max_queue_delay_microseconds,
        max_queue_size=max_queue_size,
        instance_count=instance_count,
    )
    # One thread per instance: the test machine is small and shared, and the timing stays predictable.
    config.parameters["intra_op_thread_count"].string_value = "1"
    write_config(model_dir, config)
    return model_dir


TINY_MODEL_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "simple": make_simple,
    "int64_identity": make_int64_identity,
    "string_identity": make_string_identity,
    "classifier": make_classifier,
    "fixed_shape": make_fixed_shape,
    "versioned": make_versioned,
    "slow": make_slow,
}


def build_tiny_repository(repository: Path, models: Iterable[str] | None = None) -> Path:
    """Build the named tiny models (all of them by default) into ``repository``."""
    repository.mkdir(parents=True, exist_ok=True)
    for name in models if models is not None else TINY_MODEL_BUILDERS:
        TINY_MODEL_BUILDERS[name](repository)
    return repository


def make_bf16_square(repository: Path, name: str = "bf16_square") -> Path:
    """BF16 INPUT0 [3] -> OUTPUT0 = x * x (computed in FP32, cast back to BF16); max_batch_size 8."""
    model_dir = repository / name
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "as_float"], ["squared"]),
        helper.make_node("Cast", ["squared"], ["OUTPUT0"], to=TensorProto.BFLOAT16),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.BFLOAT16, ["batch", 3])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.BFLOAT16, ["batch", 3])],
    )
    write_onnx(model_dir, 1, graph)
    write_config(model_dir, make_config(
        name, max_batch_size=8, dynamic_batching=True,
        inputs=[_tensor_config("INPUT0", model_config_pb2.TYPE_BF16, [3])],
        outputs=[_tensor_config("OUTPUT0", model_config_pb2.TYPE_BF16, [3])],
    ))
    return model_dir
