"""Shared, lazily built model artefacts for the model tests.

ONNX files come from ``model_repository/`` when they were exported from the current sources with the
weights ``make models`` uses (seeded, or the bundled trained checkpoint; ONNX metadata: weights string and
source fingerprint); otherwise the model is exported once into a session temp directory. Torch modules are
built once per session (compress and decompress share theirs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime
import pytest
from torch import nn

from models import export, repository
from models.specs import SPECS, get_spec

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@dataclass
class ModelArtefacts:
    build_dir: Path
    fingerprint: str = field(default_factory=export.source_fingerprint)
    modules: export.TrainingModules = field(default_factory=export.TrainingModules)
    _onnx: dict[str, Path] = field(default_factory=dict)
    _sessions: dict[str, onnxruntime.InferenceSession] = field(default_factory=dict)

    def torch_module(self, name: str) -> nn.Module:
        spec = get_spec(name)
        _, checkpoint = export.resolve_weights(spec, None)
        training_module, _ = self.modules.get(spec, checkpoint)
        return export.serving_module(spec, training_module)

    def onnx_path(self, name: str) -> Path:
        if name not in self._onnx:
            spec = get_spec(name)
            committed = repository.onnx_path(REPOSITORY, spec)
            weights, _ = export.resolve_weights(spec, None)
            if committed.is_file() and self._is_current(committed, weights):
                self._onnx[name] = committed
            else:
                report = export.export_model(spec, self.build_dir, self.modules, None, self.fingerprint)
                assert report.passed, report.error
                self._onnx[name] = repository.onnx_path(self.build_dir, spec)
        return self._onnx[name]

    def session(self, name: str) -> onnxruntime.InferenceSession:
        if name not in self._sessions:
            self._sessions[name] = export.ort_session(self.onnx_path(name))
        return self._sessions[name]

    def _is_current(self, path: Path, weights: str) -> bool:
        metadata = export.onnx_metadata(path)
        return (
            metadata.get(export.METADATA_WEIGHTS) == weights
            and metadata.get(export.METADATA_FINGERPRINT) == self.fingerprint
        )


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> ModelArtefacts:
    return ModelArtefacts(build_dir=tmp_path_factory.mktemp("model_repository"))


MODEL_NAMES = [spec.name for spec in SPECS]
