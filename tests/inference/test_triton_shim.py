"""The parts of the Python-backend ONNX Runtime shim that run without Triton (the rest runs inside real Triton in
test_conformance.py), and the backend directory the launcher lays out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.inference import triton_onnx_shim as shim
from services.inference.real_triton import SHIM_SOURCE, TritonInstallation, TritonNotInstalled, prepare_backend_directory


def test_session_options_follow_the_config_as_tritons_onnxruntime_backend_reads_it() -> None:
    config = {
        "parameters": {"intra_op_thread_count": {"string_value": "3"}, "inter_op_thread_count": {"string_value": "2"},
                       "execution_mode": {"string_value": "1"}},
        "optimization": {"graph": {"level": 1}},
    }
    options = shim.session_options(config)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 2)
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    defaults = shim.session_options({})
    assert defaults.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert defaults.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_model_file_and_string_conversions() -> None:
    assert shim.model_file(Path("/m/simple"), "2", {}) == Path("/m/simple/2/model.onnx")
    assert shim.model_file(Path("/m/simple"), "1", {"default_model_filename": "net.onnx"}) == Path("/m/simple/1/net.onnx")
    words = np.array([[b"ab", "é".encode()]], dtype=np.object_)
    as_text = shim._to_ort(words, "TYPE_STRING")
    assert as_text.tolist() == [["ab", "é"]]
    assert shim._from_ort(as_text, "TYPE_STRING").tolist() == words.tolist()
    numbers = np.ones(3, np.float32)
    assert shim._to_ort(numbers, "TYPE_FP32") is numbers


def test_backend_directory_holds_the_python_backend_and_the_shim(tmp_path: Path) -> None:
    try:
        installation = TritonInstallation.from_venv(Path(__file__).resolve().parents[2] / ".venv-triton")
    except TritonNotInstalled as error:
        pytest.skip(str(error))
    backends = prepare_backend_directory(installation, tmp_path / "backends")
    names = {path.relative_to(backends).as_posix() for path in backends.rglob("*") if path.is_file()}
    assert names == {"python/libtriton_python.so", "python/triton_python_backend_utils.py",
                     "python/triton_python_backend_stub", "onnxruntime/model.py"}
    assert not any(path.is_symlink() for path in backends.rglob("*"))  # Triton refuses libraries outside the dir
    assert (backends / "onnxruntime" / "model.py").read_bytes() == SHIM_SOURCE.read_bytes()
    assert prepare_backend_directory(installation, tmp_path / "backends") == backends  # again: unchanged
    with pytest.raises(TritonNotInstalled, match="make triton-install"):
        TritonInstallation.from_venv(tmp_path / "no-venv")
