"""The committed Triton repository files are exactly what the specs render, and Triton's proto parses them."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from models import repository
from models.specs import SPECS, ModelSpec, checkpoint_weights
from services.core.bigearthnet import BIGEARTHNET_19_LABELS, BIGEARTHNET_43_LABELS
from services.core.model_card import ModelCard

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
SPEC_IDS = [spec.name for spec in SPECS]
CHECKPOINT_WEIGHTS = re.compile(r"^checkpoint:(?P<file>[^:]+\.pt):sha256=[0-9a-f]{64}$")


def committed_config(spec: ModelSpec) -> model_config_pb2.ModelConfig:
    return repository.parse_config((REPOSITORY / spec.name / "config.pbtxt").read_text())


def committed_weights(spec: ModelSpec) -> str:
    """The weights string the committed card states: seeded (the spec's seed), the family's bundled checkpoint (its
    sha256 as committed), or a --checkpoint-dir checkpoint named after the model."""
    weights = ModelCard.from_parameters(committed_config(spec).parameters).weights
    if weights.startswith("seeded-init"):
        assert weights == spec.seeded_weights
        return weights
    match = CHECKPOINT_WEIGHTS.match(weights)
    bundled = spec.family.bundled_checkpoint if spec.family is not None else None
    if bundled is not None:
        assert weights == checkpoint_weights(bundled.name, hashlib.sha256(bundled.read_bytes()).hexdigest()), weights
    else:
        assert match and match["file"] == f"{spec.name}.pt", weights
    return weights


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_committed_files_equal_the_rendered_ones(spec: ModelSpec) -> None:
    for relative, text in repository.model_files(spec, committed_weights(spec)).items():
        path = REPOSITORY / relative
        assert path.is_file(), f"{relative} missing: run python -m models.export --write-configs"
        assert path.read_text() == text, f"{relative} is stale: run python -m models.export --write-configs"


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_config_parses_with_the_triton_proto_and_matches_the_contract(spec: ModelSpec) -> None:
    config = committed_config(spec)
    assert config.name == spec.name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0
    data_types = {"FP32": model_config_pb2.TYPE_FP32, "INT64": model_config_pb2.TYPE_INT64}
    for declared, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
        assert [(t.name, t.data_type, list(t.dims)) for t in declared] == [
            (t.name, data_types[t.datatype], list(t.dims)) for t in tensors
        ]
    preferred = list(config.dynamic_batching.preferred_batch_size)
    assert preferred and max(preferred) <= config.max_batch_size
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_AUTO)]
    assert ModelCard.from_parameters(config.parameters) == spec.card(committed_weights(spec))


def test_contract_names_and_dims_are_the_production_ones() -> None:
    """Contracts doc section 5 (plus our UC5 choice and the 19-class probe)."""
    expected = {
        "Bigearth-net-ssl-label": ([("input_sentinel2_10_bands_120", [10, 120, 120])], [("representation_2048", [2048])]),
        "Bigearth-net-linear-label": ([("representation_2048", [2048])], [("classes_probability", [43])]),
        "Bigearth-net-linear-label-19": ([("representation_2048", [2048])], [("classes_probability", [19])]),
        "Bigearth-net-compression-compress-pytorch": (
            [("input_sentinel2_10_bands_120", [10, 120, 120])],
            [("int64_latent32_15", [60, 60, 8])],
        ),
        "Bigearth-net-compression-decompress-pytorch": (
            [("int64_latent32_15", [60, 60, 8])],
            [("output_sentinel2_10_bands_120", [10, 120, 120])],
        ),
        "Bigearth-net-rvq-compress": (
            [("input_sentinel2_10_bands_120", [10, 120, 120])],
            [("int64_latent32_15", [60, 60, 8])],
        ),
        "Bigearth-net-rvq-decompress": (
            [("int64_latent32_15", [60, 60, 8])],
            [("output_sentinel2_10_bands_120", [10, 120, 120])],
        ),
        "uc5-cfactor": ([("input_sentinel2_10_bands_24", [10, 24, 24])], [("c_factor", [1])]),
        "uc6-locust": ([("input", [4, 2, 12, 12])], [("probability", [1])]),
    }
    for spec in SPECS:
        config = committed_config(spec)
        got = ([(t.name, list(t.dims)) for t in config.input], [(t.name, list(t.dims)) for t in config.output])
        assert got == expected[spec.name]
    assert committed_config(next(s for s in SPECS if s.name == "uc6-locust")).dynamic_batching.max_queue_delay_microseconds <= 100


@pytest.mark.parametrize(
    ("name", "labels"),
    [("Bigearth-net-linear-label", BIGEARTHNET_43_LABELS), ("Bigearth-net-linear-label-19", BIGEARTHNET_19_LABELS)],
)
def test_classifiers_have_label_files_in_index_order(name: str, labels: tuple[str, ...]) -> None:
    spec = next(s for s in SPECS if s.name == name)
    (output,) = committed_config(spec).output
    assert output.label_filename == "labels.txt"
    lines = (REPOSITORY / name / "labels.txt").read_text().splitlines()
    assert len(lines) == output.dims[0] == len(labels)
    assert lines == list(labels)


def test_label_files_only_on_classifier_outputs() -> None:
    for spec in SPECS:
        has_labels = any(out.label_filename for out in committed_config(spec).output)
        assert has_labels == (spec.card_fields["task"] == "classify"), spec.name


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_readme_is_the_human_card(spec: ModelSpec) -> None:
    text = (REPOSITORY / spec.name / "README.md").read_text()
    weights = committed_weights(spec)
    for tensor in (*spec.inputs, *spec.outputs):
        assert f"`{tensor.name}`" in text
    assert weights in text
    card = spec.card(weights)
    for band in card.bands:
        assert band in text
    if card.patch_size:
        assert f"{card.patch_size} x {card.patch_size}" in text


def test_decompressor_card_documents_the_unused_level_convention() -> None:
    text = (REPOSITORY / "Bigearth-net-compression-decompress-pytorch" / "README.md").read_text()
    assert "-1 marks an unused level" in text
    card = ModelCard.from_parameters(
        committed_config(next(s for s in SPECS if s.name == "Bigearth-net-compression-decompress-pytorch")).parameters
    )
    assert "-1 = level not used" in card.input_units


def test_sentinel2_cards_declare_the_simclr_order_and_bigearthnet_statistics() -> None:
    from services.core import sentinel2

    for spec in SPECS:
        card = ModelCard.from_parameters(committed_config(spec).parameters)
        if card.input_kind != "sentinel2-l2a":
            continue
        assert card.bands == list(sentinel2.SIMCLR_BAND_ORDER)
        assert card.band_mean == [sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in card.bands]
        assert card.band_std == [sentinel2.BIGEARTHNET_BAND_STD[b] for b in card.bands]
        assert card.normalisation == "standardise" and card.resampling_20m == "bilinear"


def test_render_config_escapes_strings() -> None:
    spec = SPECS[0]
    fields = {**spec.card_fields, "intended_use": 'a "quoted"\nline \\ with backslash'}
    odd = dataclasses.replace(spec, card_fields=fields)
    config = repository.parse_config(repository.render_config(odd, "seeded-init:seed=1"))
    assert ModelCard.from_parameters(config.parameters).intended_use == fields["intended_use"]
