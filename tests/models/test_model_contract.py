"""Every model, in torch and in ONNX Runtime, has the production tensor contract and agrees across the two."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import export
from models.specs import SPECS, ModelSpec

pytestmark = pytest.mark.slow

SPEC_IDS = [spec.name for spec in SPECS]


def outputs_of(module: torch.nn.Module, inputs: list[np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*export.to_torch(inputs))
    return [r.numpy() for r in ([result] if isinstance(result, torch.Tensor) else result)]


def check_ranges(spec: ModelSpec, outputs: list[np.ndarray]) -> None:
    for tensor, value in zip(spec.outputs, outputs):
        if spec.output_range is not None:
            low, high = spec.output_range
            assert value.min() >= low and value.max() <= high, tensor.name
        if tensor.datatype == "INT64":  # RVQ codes
            assert value.min() >= 0 and value.max() < 10000
        if tensor.name == "representation_2048":  # ReLU then average pooling
            assert value.min() >= 0


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_torch_module_shapes_dtypes_and_ranges(spec: ModelSpec, artefacts) -> None:
    module = artefacts.torch_module(spec.name)
    for batch in (1, 3):
        outputs = outputs_of(module, spec.random_inputs(np.random.default_rng(batch), batch))
        assert len(outputs) == len(spec.outputs)
        for tensor, value in zip(spec.outputs, outputs):
            assert value.shape == (batch, *tensor.dims), tensor.name
            assert value.dtype == tensor.numpy_dtype, tensor.name
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), tensor.name
        check_ranges(spec, outputs)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_onnx_signature_and_outputs(spec: ModelSpec, artefacts) -> None:
    session = artefacts.session(spec.name)
    onnx_types = {"FP32": "tensor(float)", "INT64": "tensor(int64)"}
    for declared, tensors in ((session.get_inputs(), spec.inputs), (session.get_outputs(), spec.outputs)):
        assert [d.name for d in declared] == [t.name for t in tensors]
        for d, tensor in zip(declared, tensors):
            assert d.type == onnx_types[tensor.datatype]
            assert isinstance(d.shape[0], str), "batch axis must be dynamic"
            assert list(d.shape[1:]) == list(tensor.dims)
    for batch in (1, 5):
        inputs = spec.random_inputs(np.random.default_rng(10 + batch), batch)
        outputs = session.run(None, {t.name: a for t, a in zip(spec.inputs, inputs)})
        for tensor, value in zip(spec.outputs, outputs):
            assert value.shape == (batch, *tensor.dims) and value.dtype == tensor.numpy_dtype
        check_ranges(spec, outputs)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_onnx_runtime_matches_pytorch(spec: ModelSpec, artefacts) -> None:
    metadata = export.onnx_metadata(artefacts.onnx_path(spec.name))
    assert metadata[export.METADATA_MODEL] == spec.name
    assert metadata[export.METADATA_WEIGHTS] == export.resolve_weights(spec, None)[0]
    checks = export.check_parity(spec, artefacts.torch_module(spec.name), artefacts.session(spec.name))
    assert [check["batch"] for check in checks] == [1, 4]
    for check in checks:
        for name, result in check["outputs"].items():
            assert result["passed"], (check["batch"], name, result)


def test_seeded_initialisation_is_deterministic() -> None:
    spec = next(s for s in SPECS if s.name == "uc6-locust")
    first, second = spec.family.create_seeded(spec.seed), spec.family.create_seeded(spec.seed)
    other = spec.family.create_seeded(spec.seed + 1)
    for (name, a), (_, b), (_, c) in zip(first.state_dict().items(), second.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values()))


def test_parity_comparison_detects_disagreement() -> None:
    """The comparison used by export and the test above fails when the runtimes disagree."""
    probe = next(s for s in SPECS if s.name == "Bigearth-net-linear-label")
    reference = np.random.default_rng(0).uniform(0, 1, size=(4, 43)).astype(np.float32)
    assert export.compare_outputs(probe, [reference], [reference + 1e-6])["classes_probability"]["passed"]
    shifted = reference.copy()
    shifted[2, 7] += 0.01
    result = export.compare_outputs(probe, [reference], [shifted])["classes_probability"]
    assert not result["passed"] and result["max_abs_error"] == pytest.approx(0.01, rel=1e-3)
    assert not export.compare_outputs(probe, [reference], [reference[:3]])["classes_probability"]["passed"]

    compressor = next(s for s in SPECS if s.name == "Bigearth-net-compression-compress-pytorch")
    codes = np.random.default_rng(1).integers(0, 10000, size=(1, 60, 60, 8))
    assert export.compare_outputs(compressor, [codes], [codes.copy()])["int64_latent32_15"]["equal_fraction"] == 1.0
    changed = codes.copy()
    changed[0, :10, :10, :] += 1  # 800 of 28800 codes differ: 2.8 %
    assert not export.compare_outputs(compressor, [codes], [changed])["int64_latent32_15"]["passed"]
