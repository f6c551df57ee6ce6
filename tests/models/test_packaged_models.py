"""Packaged models (s2-cloud-mask) and the card check of every model directory in the repository.

Card validation where the server loads a model is done here, over the committed repository: every
``config.pbtxt`` must carry a card that loads and fits the config's tensors (and label files), so a broken card
fails the suite before any server sees it.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from models import export, packaged, repository
from models.specs import ALL_SPECS, PACKAGED_SPECS, get_spec
from services.core.model_card import CardError, ModelCard, check_card_against_config

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
CLOUD_MASK = "s2-cloud-mask"


def model_directories() -> list[Path]:
    return sorted(p for p in REPOSITORY.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_every_spec_has_a_directory_and_every_directory_a_spec() -> None:
    assert [p.name for p in model_directories()] == sorted(spec.name for spec in ALL_SPECS)


@pytest.mark.parametrize("directory", model_directories(), ids=lambda p: p.name)
def test_every_committed_card_loads_and_fits_its_tensors(directory: Path) -> None:
    config = repository.parse_config((directory / "config.pbtxt").read_text())
    label_counts = {
        out.label_filename: len((directory / out.label_filename).read_text().splitlines())
        for out in config.output if out.label_filename
    }
    card = check_card_against_config(config, label_counts)
    assert card.schema_version == "2"


@pytest.mark.parametrize("spec", PACKAGED_SPECS, ids=[s.name for s in PACKAGED_SPECS])
def test_packaged_committed_files_equal_the_rendered_ones(spec) -> None:
    for relative, text in repository.model_files(spec, spec.seeded_weights).items():
        assert (REPOSITORY / relative).read_text() == text, f"{relative} is stale: run python -m models.export --write-configs"


def test_cloud_mask_card_and_readme_state_licence_provenance_digest_and_classes() -> None:
    spec = get_spec(CLOUD_MASK)
    config = repository.parse_config((REPOSITORY / CLOUD_MASK / "config.pbtxt").read_text())
    card = ModelCard.from_parameters(config.parameters)
    assert card.weights == f"package:ukis-csmask==1.0.0/ukis_csmask/model_6b_l2a.onnx:sha256={spec.packaged.sha256}"
    assert (card.class_names, card.codes, card.licence) == (["clear", "cloud", "shadow"], [0, 1, 2], "Apache-2.0")
    assert (card.tile_size, card.tile_overlap, card.working_resolution_m, card.blending) == (256, 0.2, 30.0, "tukey")
    assert config.max_batch_size > 0  # the graph's batch axis is symbolic: dynamic batching
    readme = (REPOSITORY / CLOUD_MASK / "README.md").read_text()
    for fact in ("Apache-2.0", "DLR", spec.packaged.sha256, "CloudSEN12+", "0 = clear, 1 = cloud, 2 = cloud shadow"):
        assert fact in readme


def test_cloud_mask_tensors_are_the_package_graphs(tmp_path: Path) -> None:
    """The installed file is the package's, byte for byte, and the config names its tensors as the graph does."""
    spec = get_spec(CLOUD_MASK)
    onnx_file = repository.onnx_path(REPOSITORY, spec)
    assert onnx_file.is_file(), "run make models"
    assert packaged.file_sha256(onnx_file) == spec.packaged.sha256
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    config = repository.parse_config((REPOSITORY / CLOUD_MASK / "config.pbtxt").read_text())
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for tensor, value in zip(declared, values):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert isinstance(dims[0], str), "batch axis must be symbolic for max_batch_size > 0"
            assert all(isinstance(g, str) or g == c for g, c in zip(dims[1:], tensor.dims)), (dims, list(tensor.dims))


def test_install_packaged_into_a_fresh_repository_and_refuse_a_wrong_digest(tmp_path: Path) -> None:
    spec = get_spec(CLOUD_MASK)
    report = export.install_packaged(spec, tmp_path / "repo")
    assert report.passed, report.error
    assert report.onnx_sha256 == spec.packaged.sha256
    assert (tmp_path / "repo" / CLOUD_MASK / "config.pbtxt").read_text() == repository.render_config(spec, spec.seeded_weights)
    with pytest.raises(packaged.PackageFetchError, match="has sha256"):
        packaged.fetch_file(spec.packaged.requirement, spec.packaged.member, tmp_path / "other.onnx", "0" * 64)
    assert not (tmp_path / "other.onnx").exists()
    with pytest.raises(packaged.PackageFetchError, match="has no file"):
        packaged.fetch_file(spec.packaged.requirement, "ukis_csmask/missing.onnx", tmp_path / "missing.onnx")


def test_export_cli_installs_the_packaged_model(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    assert export.main(["--repository", str(tmp_path / "repo"), "--only", CLOUD_MASK, "--report", str(report_path)]) == 0
    (entry,) = json.loads(report_path.read_text())["models"]
    assert entry["passed"] and entry["weights"].startswith("package:ukis-csmask==1.0.0/")


def test_a_card_contradicting_the_tensors_is_refused_with_the_reason() -> None:
    config = repository.parse_config((REPOSITORY / CLOUD_MASK / "config.pbtxt").read_text())
    config.input[0].dims[1] = 128
    config.input[0].dims[2] = 128
    with pytest.raises(CardError, match=r"card tile_size 256 does not match the model input dims \[6, 128, 128\]"):
        check_card_against_config(config)
