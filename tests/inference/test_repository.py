"""Repository layout, config.pbtxt parsing, auto-completion and validation against real ONNX graphs."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2

from services.inference.model_config import (
    ModelConfigError,
    complete_config,
    parse_config_json,
    parse_config_text,
    select_versions,
    validate_config,
)
from services.inference.repository import ModelRepository, RepositoryError, directory_fingerprint, read_label_file
from services.inference.runtime import describe_tensors, execution_providers, plan_instances, session_options
from tiny_models import (
    CLASSIFIER_LABELS,
    VERSIONED_POLICY_VERSIONS,
    build_tiny_repository,
    make_fixed_shape,
    make_simple,
    write_config,
)


def graph_io(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return describe_tensors(session.get_inputs()), describe_tensors(session.get_outputs())


def policy(text: str) -> model_config_pb2.ModelVersionPolicy:
    return parse_config_text(f"version_policy {{ {text} }}").version_policy


def test_version_policy_selects_like_triton() -> None:
    available = [1, 2, 3, 7]
    assert select_versions(model_config_pb2.ModelVersionPolicy(), available) == [7]
    assert select_versions(policy("latest { num_versions: 2 }"), available) == [7, 3]
    assert select_versions(policy("all { }"), available) == [7, 3, 2, 1]
    assert select_versions(policy("specific { versions: [1, 3] }"), available) == [3, 1]
    with pytest.raises(ModelConfigError, match=r"\[5\]"):
        select_versions(policy("specific { versions: [1, 5] }"), available)
    with pytest.raises(ModelConfigError, match="no model version"):
        select_versions(model_config_pb2.ModelVersionPolicy(), [])


def test_scan_and_definition_follow_the_layout(tmp_path: Path) -> None:
    repository_dir = build_tiny_repository(tmp_path / "repo", ["simple", "versioned", "classifier"])
    (repository_dir / ".hidden").mkdir()
    (repository_dir / "README.md").write_text("not a model")
    (repository_dir / "versioned" / "notes").mkdir()  # non-numeric: ignored like Triton
    repository = ModelRepository([repository_dir])
    assert sorted(repository.scan()) == ["classifier", "simple", "versioned"]

    definition = repository.read_definition("versioned")
    assert sorted(definition.version_paths) == sorted(VERSIONED_POLICY_VERSIONS)
    assert all(path.name == "model.onnx" and path.is_file() for path in definition.version_paths.values())
    assert read_label_file(definition.directory.parent / "classifier", "labels.txt") == CLASSIFIER_LABELS

    with pytest.raises(ModelConfigError, match="no model directory 'missing'"):
        repository.read_definition("missing")
    assert repository.locate("../repo") is None


def test_default_model_filename_is_honoured(tmp_path: Path) -> None:
    model_dir = make_simple(tmp_path)
    os.rename(model_dir / "1" / "model.onnx", model_dir / "1" / "custom.onnx")
    repository = ModelRepository([tmp_path])
    with pytest.raises(ModelConfigError, match="no model file 'model.onnx'"):
        repository.read_definition("simple")
    config = parse_config_text((model_dir / "config.pbtxt").read_text())
    config.default_model_filename = "custom.onnx"
    write_config(model_dir, config)
    assert repository.read_definition("simple").version_paths[1].name == "custom.onnx"


def test_two_repositories_and_duplicate_names(tmp_path: Path) -> None:
    first = build_tiny_repository(tmp_path / "a", ["simple"])
    second = build_tiny_repository(tmp_path / "b", ["simple", "fixed_shape"])
    repository = ModelRepository([first, second])
    models = repository.scan()
    assert sorted(models) == ["fixed_shape", "simple"]
    assert models["simple"].parent == first  # the first repository wins, the duplicate is logged
    with pytest.raises(RepositoryError):
        ModelRepository([tmp_path / "nope"])


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    model_dir = make_simple(tmp_path)
    before = directory_fingerprint(model_dir)
    assert before == directory_fingerprint(model_dir)
    config = model_dir / "config.pbtxt"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert directory_fingerprint(model_dir) != before


def test_config_without_io_is_completed_from_the_graph(tmp_path: Path) -> None:
    model_dir = make_simple(tmp_path, write_model_config=False)
    inputs, outputs = graph_io(model_dir / "1" / "model.onnx")
    config = complete_config(model_config_pb2.ModelConfig(), "simple", inputs, outputs, gpu_available=False)
    validate_config(config, inputs, outputs)
    assert config.name == "simple"
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    # Every tensor has a variable first dimension: Triton's default max_batch_size 4 and a dynamic batcher.
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("INPUT0", model_config_pb2.TYPE_FP32, [4])]
    assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.latest.num_versions == 1


def test_fixed_shape_graph_completes_without_batching(tmp_path: Path) -> None:
    model_dir = make_fixed_shape(tmp_path)
    inputs, outputs = graph_io(model_dir / "1" / "model.onnx")
    config = complete_config(model_config_pb2.ModelConfig(), "fixed_shape", inputs, outputs, gpu_available=False)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, 3]
    with pytest.raises(ModelConfigError, match="does not support batching"):
        complete_config(
            model_config_pb2.ModelConfig(max_batch_size=8), "fixed_shape", inputs, outputs, gpu_available=False
        )


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c.input[0], "name", "IMAGE"), "configuration input 'IMAGE' is not an input"),
        (lambda c: setattr(c.input[0], "data_type", model_config_pb2.TYPE_INT32), "INT32 in the configuration"),
        (lambda c: c.input[0].dims.append(2), r"expects \[-1, 4\]"),
        (lambda c: setattr(c.output[0], "name", "SCORES"), "configuration output 'SCORES' is not an output"),
        (lambda c: c.dynamic_batching.preferred_batch_size.append(16), "preferred_batch_size 16"),
    ],
)
def test_config_that_contradicts_the_graph_is_refused(tmp_path: Path, edit, message: str) -> None:
    model_dir = make_simple(tmp_path)
    inputs, outputs = graph_io(model_dir / "1" / "model.onnx")
    config = parse_config_text((model_dir / "config.pbtxt").read_text())
    edit(config)
    with pytest.raises(ModelConfigError, match=message):
        validate_config(complete_config(config, "simple", inputs, outputs, gpu_available=False), inputs, outputs)


def test_batching_config_on_a_fixed_first_dimension_is_refused(tmp_path: Path) -> None:
    model_dir = make_fixed_shape(tmp_path)
    inputs, outputs = graph_io(model_dir / "1" / "model.onnx")
    config = parse_config_text((model_dir / "config.pbtxt").read_text())
    config.max_batch_size = 2
    del config.input[0].dims[:]
    config.input[0].dims.append(3)
    with pytest.raises(ModelConfigError, match="first dimension must be variable"):
        validate_config(complete_config(config, "fixed_shape", inputs, outputs, gpu_available=False), inputs, outputs)


def test_name_and_backend_mismatches_are_refused() -> None:
    with pytest.raises(ModelConfigError, match="directory is 'simple'"):
        complete_config(model_config_pb2.ModelConfig(name="other"), "simple", [], [], gpu_available=False)
    with pytest.raises(ModelConfigError, match="unsupported backend 'pytorch'"):
        complete_config(model_config_pb2.ModelConfig(backend="pytorch"), "m", [], [], gpu_available=False)
    with pytest.raises(ModelConfigError, match="failed to parse"):
        parse_config_text("max_batch_size: eight")
    with pytest.raises(ModelConfigError, match="JSON"):
        parse_config_json('{"max_batch_size": "x"}')
    assert parse_config_json('{"max_batch_size": 2, "input": [{"name": "A", "data_type": "TYPE_FP32", "dims": [3]}]}').input[0].dims == [3]


def test_kind_gpu_without_a_gpu_fails_with_a_reason() -> None:
    config = parse_config_text('name: "m" instance_group { name: "g" count: 1 kind: KIND_GPU }')
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    with pytest.raises(ModelConfigError, match="KIND_GPU"):
        plan_instances(config)


def test_instance_groups_and_ort_options_follow_the_config() -> None:
    config = parse_config_text(
        'name: "m" '
        'instance_group { name: "a" count: 2 kind: KIND_CPU } instance_group { name: "b" count: 1 kind: KIND_CPU } '
        'parameters { key: "intra_op_thread_count" value { string_value: "3" } } '
        'parameters { key: "execution_mode" value { string_value: "1" } } '
        'parameters { key: "session.intra_op.allow_spinning" value { string_value: "0" } } '
        "optimization { graph { level: -1 } }"
    )
    placements = plan_instances(config)
    assert [p.name for p in placements] == ["a_0", "a_1", "b_0"]
    assert all(execution_providers(config, p) == [("CPUExecutionProvider", {})] for p in placements)
    options = session_options(config, len(placements))
    assert options.intra_op_num_threads == 3
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"

    defaults = session_options(parse_config_text('name: "m"'), 2)
    assert defaults.intra_op_num_threads >= 1
    assert defaults.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(ModelConfigError, match="integer"):
        session_options(parse_config_text('parameters { key: "intra_op_thread_count" value { string_value: "many" } }'), 1)


@pytest.mark.parametrize(
    ("batching", "named"),
    [
        ("default_queue_policy { default_timeout_microseconds: 1000 }", "default_timeout_microseconds"),
        ("default_queue_policy { allow_timeout_override: true }", "allow_timeout_override"),
        ("default_queue_policy { timeout_action: DELAY }", "timeout_action"),
        ("priority_levels: 2 default_priority_level: 1", "priority_levels"),
        ("priority_levels: 2 priority_queue_policy { key: 1 value { max_queue_size: 4 } }", "priority_queue_policy"),
    ],
)
def test_scheduling_policies_the_server_does_not_implement_are_refused(batching: str, named: str) -> None:
    config = parse_config_text(f"max_batch_size: 8 dynamic_batching {{ {batching} }}")
    with pytest.raises(ModelConfigError, match=named):
        complete_config(config, "", [], [], gpu_available=False)
    bounded = parse_config_text("max_batch_size: 8 dynamic_batching { default_queue_policy { max_queue_size: 4 } }")
    assert complete_config(bounded, "", [], [], gpu_available=False).dynamic_batching.default_queue_policy.max_queue_size == 4
