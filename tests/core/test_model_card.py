"""The model card schema: version 1 cards still read, version 2 validated strictly, checked against the tensors."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.core.model_card import (
    CARD_SCHEMA_VERSION,
    CLASS_NODATA_CODE,
    CardError,
    Codec,
    ModelCard,
    check_card_against_config,
    class_colour_table,
    load_card,
    resolve_codec,
)

# The uc5-cfactor card as committed before schema version 2 (config.pbtxt parameters, verbatim values).
V1_PARAMETERS = {
    "card.schema_version": "1",
    "card.task": "uc5-cfactor",
    "card.input_kind": "sentinel2-l2a",
    "card.bands": "B02,B03,B04,B05,B06,B07,B08,B8A,B11,B12",
    "card.band_mean": "429.943,614.217,590.236,950.684,1792.463,2075.468,2218.946,2266.46,1594.427,1009.327",
    "card.band_std": "572.416,582.879,675.887,729.898,1096.015,1273.454,1365.456,1356.138,1079.191,818.867",
    "card.normalisation": "standardise",
    "card.resampling_20m": "bilinear",
    "card.patch_size": "24",
    "card.input_units": "L2A digital numbers",
    "card.output_units": "RUSLE cover-management factor C (dimensionless)",
    "card.output_range": "[0, 1]",
    "card.weights": "seeded-init:seed=5",
    "card.intended_use": "UC5 soil erosion",
}


def mask_card(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "task": "generic",
        "input_kind": "sentinel2-l2a",
        "bands": ["B02", "B03", "B04", "B08", "B11", "B12"],
        "band_mean": [0.1] * 6,
        "band_std": [0.2] * 6,
        "normalisation": "standardise",
        "reflectance_scale": 1e-4,
        "reflectance_offset": "product",
        "working_resolution_m": 30.0,
        "resampling": "average",
        "tile_size": 64,
        "tile_overlap": 0.2,
        "output_activation": "softmax",
        "nodata_value": 0.0,
        "output_kind": "pixel-classes",
        "class_names": ["clear", "cloud", "shadow"],
        "class_codes": [0, 1, 2],
        "class_colours": ["#000000", "#ffffff", "#808080"],
        "weights": "package:x==1/m.onnx:sha256=" + "0" * 64,
    }
    fields.update(overrides)
    return fields


def config_json(input_dims: list[int], output_dims: list[int], card: ModelCard, label_filename: str = "") -> dict:
    output: dict[str, Any] = {"name": "out", "data_type": "TYPE_FP32", "dims": [str(d) for d in output_dims]}
    if label_filename:
        output["label_filename"] = label_filename
    return {
        "name": "m",
        "input": [{"name": "in", "data_type": "TYPE_FP32", "dims": [str(d) for d in input_dims]}],
        "output": [output],
        "parameters": {key: {"string_value": value} for key, value in card.to_parameters().items()},
    }


def test_a_version_1_card_still_reads_with_version_1_behaviour() -> None:
    card = ModelCard.from_parameters(V1_PARAMETERS)
    assert card.schema_version == "1" and card.task == "uc5-cfactor" and card.patch_size == 24
    assert card.bands[-1] == "B12" and card.band_std[0] == 572.416
    # Every version 2 field is at the default that means "as version 1".
    assert (card.output_kind, card.reflectance_scale, card.working_resolution_m, card.tile_overlap) == ("", 0.0, 0.0, 0.0)
    assert card.effective_tile_size == 24
    # Written back, it is the same version 1 card (no version 2 keys appear).
    assert card.to_parameters() == V1_PARAMETERS


def test_a_card_without_schema_version_is_version_1() -> None:
    parameters = {k: v for k, v in V1_PARAMETERS.items() if k != "card.schema_version"}
    assert ModelCard.from_parameters(parameters).schema_version == "1"


def test_a_version_1_card_cannot_use_version_2_fields() -> None:
    with pytest.raises(CardError, match="tile_overlap need schema_version 2"):
        load_card({**V1_PARAMETERS, "card.tile_overlap": "0.2"})


def test_an_unknown_schema_version_is_refused() -> None:
    with pytest.raises(CardError, match="schema_version '3' is not supported"):
        load_card({**V1_PARAMETERS, "card.schema_version": "3"})


def test_no_card_at_all_is_a_clear_error() -> None:
    with pytest.raises(CardError, match="no model card"):
        load_card({"intra_op_thread_count": {"string_value": "1"}})


def test_version_2_card_round_trips_through_parameters_in_every_client_shape() -> None:
    card = ModelCard(**mask_card())
    assert card.schema_version == CARD_SCHEMA_VERSION == "2"
    parameters = card.to_parameters()
    assert parameters["card.class_names"] == "clear,cloud,shadow" and parameters["card.nodata_value"] == "0.0"
    assert "card.blending" not in parameters  # version 2 defaults are left out
    assert ModelCard.from_parameters(parameters) == card
    assert ModelCard.from_parameters({k: {"string_value": v} for k, v in parameters.items()}) == card
    proto = model_config_pb2.ModelConfig()
    for key, value in parameters.items():
        proto.parameters[key].string_value = value
    assert ModelCard.from_parameters(proto.parameters) == card
    assert (card.tile_step, card.tile_margin, card.codes) == (int(64 - 64 * 0.2), int(64 * 0.2), [0, 1, 2])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"class_colours": ["#000000", "#ffffff"]}, "2 class_colours for 3 class_names"),
        ({"class_colours": ["#000000", "white", "#808080"]}, r"class_colours \['white'\] are not #rrggbb"),
        ({"class_codes": [0, 1]}, "2 class_codes for 3 class_names"),
        ({"class_codes": [0, 1, 1]}, "repeat a code"),
        ({"class_codes": [0, 1, CLASS_NODATA_CODE]}, "255 marks nodata"),
        ({"class_names": [], "class_codes": [], "class_colours": []}, "pixel-classes needs class_names"),
        ({"tile_overlap": 0.5}, r"tile_overlap 0.5 must be in \[0, 0.5\)"),
        ({"tile_size": 0}, "needs tile_size > 0"),
        ({"resampling": ""}, "working_resolution_m needs resampling"),
        ({"reflectance_scale": 0.0}, "reflectance_offset 'product' needs a reflectance_scale > 0"),
        ({"output_kind": ""}, "task 'generic' needs an output_kind"),
        ({"bands": ["B02", "B03", "B04", "B08", "B11", "SWIR"]}, "not Sentinel-2 bands"),
        ({"band_std": [0.2] * 5 + [0.0]}, "band_std must be positive"),
        ({"band_mean": [0.1] * 5}, "bands, band_mean and band_std of one length"),
        ({"output_kind": "tile-vector"}, "class_names make no sense for output_kind tile-vector"),
        ({"input_kind": "features", "bands": [], "band_mean": [], "band_std": [], "normalisation": "none"},
         "pixel-classes needs a Sentinel-2 input_kind"),
    ],
)
def test_contradictory_cards_fail_at_load_naming_the_problem(overrides: dict, message: str) -> None:
    parameters = ModelCard.model_construct(**mask_card()).model_dump()
    parameters.update(overrides)
    with pytest.raises(ValueError, match=message):
        ModelCard(**parameters)


def test_the_card_is_checked_against_the_model_tensors() -> None:
    card = ModelCard(**mask_card())
    assert check_card_against_config(config_json([6, 64, 64], [3, 64, 64], card)) == card
    with pytest.raises(CardError, match=r"card tile_size 64 does not match the model input dims \[6, 128, 128\]"):
        check_card_against_config(config_json([6, 128, 128], [3, 128, 128], card))
    with pytest.raises(CardError, match=r"input in dims \[4, 64, 64\] do not match \[6 bands"):
        check_card_against_config(config_json([4, 64, 64], [3, 64, 64], card))
    with pytest.raises(CardError, match=r"output out dims \[2, 64, 64\] do not match pixel-classes \[3 classes"):
        check_card_against_config(config_json([6, 64, 64], [2, 64, 64], card))
    renamed = ModelCard(**mask_card(output_tensor="logits"))
    with pytest.raises(CardError, match="output_tensor 'logits' is not an output"):
        check_card_against_config(config_json([6, 64, 64], [3, 64, 64], renamed))


def test_tile_kinds_are_checked_against_output_length_and_labels() -> None:
    features = dict(input_kind="features", bands=[], band_mean=[], band_std=[], normalisation="none",
                    reflectance_scale=0.0, reflectance_offset="none", working_resolution_m=0.0, resampling="",
                    tile_size=0, nodata_value=None, class_codes=[], class_colours=[])
    probabilities = ModelCard(**mask_card(**features, output_kind="tile-class-probabilities", class_names=["a", "b"]))
    check_card_against_config(config_json([2048], [2], probabilities))
    with pytest.raises(CardError, match="has 3 classes but the card names 2"):
        check_card_against_config(config_json([2048], [3], probabilities))
    labelled = ModelCard(**mask_card(**features, output_kind="tile-class-probabilities", class_names=[]))
    with pytest.raises(CardError, match="need class_names or a label_filename"):
        check_card_against_config(config_json([2048], [3], labelled))
    config = config_json([2048], [3], labelled, label_filename="labels.txt")
    check_card_against_config(config, {"labels.txt": 3})
    with pytest.raises(CardError, match="has 3 classes but labels.txt has 4 labels"):
        check_card_against_config(config, {"labels.txt": 4})
    vector = ModelCard(**mask_card(**features, output_kind="tile-vector", class_names=[]))
    with pytest.raises(CardError, match=r"dims \[4, 4\] are not a per-tile vector"):
        check_card_against_config(config_json([2048], [4, 4], vector))


def test_check_reads_the_triton_proto_too() -> None:
    card = ModelCard(**mask_card())
    text = 'name: "m"\ninput [{ name: "in" data_type: TYPE_FP32 dims: [6, 32, 32] }]\n' \
           'output [{ name: "out" data_type: TYPE_FP32 dims: [3, 32, 32] }]\n'
    proto = text_format.Parse(text, model_config_pb2.ModelConfig())
    for key, value in card.to_parameters().items():
        proto.parameters[key].string_value = value
    with pytest.raises(CardError, match="card tile_size 64 does not match"):
        check_card_against_config(proto)


def test_colour_table_from_the_card() -> None:
    card = ModelCard(**mask_card(class_colours=["#102030", "#ffffff", "#00ff00"]))
    table = class_colour_table(card)
    assert table[0] == (0x10, 0x20, 0x30, 255) and table[2] == (0, 255, 0, 255)
    assert table[CLASS_NODATA_CODE] == (0, 0, 0, 0)
    grey = class_colour_table(ModelCard(**mask_card(class_colours=[])))
    assert grey[0] == (0, 0, 0, 255) and grey[2] == (255, 255, 255, 255)


# ---------------------------------------------------------------------------------------------------------------
# The codec of compress/decompress cards: the card field, or the schema 2 fallback on the entropy prior


def codec_card(task: str = "compress", **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "task": task,
        "input_kind": "sentinel2-l2a" if task == "compress" else "codes",
        "bands": ["B02", "B03", "B04"],
        "band_mean": [1.0] * 3,
        "band_std": [2.0] * 3,
        "normalisation": "standardise",
        "weights": "seeded-init:seed=1",
    }
    fields.update(overrides)
    return fields


PRIOR_TEXT = "laplace-context/1:..."  # the card checks the kind by its prefix; the Wrapper parses it (tests/wrapper)
RVQ_PRIOR_TEXT = "rvq-level-frequencies/1:..."


@pytest.mark.parametrize("task", ["compress", "decompress"])
@pytest.mark.parametrize(
    ("codec", "prior", "expected"),
    [
        ("", "", Codec.RESIDUAL_VQ),  # schema 2 cards before the field: no prior = residual-VQ codes
        ("", PRIOR_TEXT, Codec.TRANSFORM_CODES),  # a prior = transform codes
        ("residual-vq/1", "", Codec.RESIDUAL_VQ),
        ("transform-codes/1", PRIOR_TEXT, Codec.TRANSFORM_CODES),
        ("residual-vq/1", RVQ_PRIOR_TEXT, Codec.RESIDUAL_VQ),  # an optional static prior of the indices
    ],
)
def test_the_codec_is_the_card_field_or_the_prior_fallback(task: str, codec: str, prior: str, expected: Codec) -> None:
    card = ModelCard(**codec_card(task, codec=codec, entropy_prior=prior))
    assert resolve_codec(card) is expected
    # It survives config.pbtxt parameters: set, it is written; unset, the fallback decides again.
    again = ModelCard.from_parameters(card.to_parameters())
    assert resolve_codec(again) is expected and again.codec == codec


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"codec": "transform-codes/1"}, "codec transform-codes/1 needs an entropy_prior"),
        ({"codec": "residual-vq/1", "entropy_prior": PRIOR_TEXT}, "codec residual-vq/1 takes an RVQ prior .* not a "
                                                                  "transform prior"),
        ({"codec": "transform-codes/1", "entropy_prior": RVQ_PRIOR_TEXT}, "needs an entropy_prior of its own kind "
                                                                         r"\(.*got an RVQ prior\)"),
        ({"entropy_prior": RVQ_PRIOR_TEXT}, "codec transform-codes/1 needs an entropy_prior of its own kind"),
        ({"codec": "wavelets/2"}, "codec"),
        ({"input_kind": "codes"}, "a compress card reads Sentinel-2 imagery: input_kind 'codes'"),
        ({"task": "decompress", "input_kind": "sentinel2-l2a"}, "a decompress card reads codes: input_kind 'sentinel2-l2a' must be 'codes'"),
        ({"task": "ssl-features", "codec": "residual-vq/1"}, "codec is only for compress/decompress cards"),
        ({"task": "ssl-features", "entropy_prior": PRIOR_TEXT}, "entropy_prior is only for compress/decompress cards"),
    ],
)
def test_codec_rules_refuse_contradictory_compression_cards(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelCard(**codec_card(**overrides))
    with pytest.raises(CardError, match=message):  # and through the loader, as the Wrapper and the check read cards
        load_card({"card.schema_version": "2", **{f"card.{k}": ",".join(map(str, v)) if isinstance(v, list) else v
                                                  for k, v in codec_card(**overrides).items()}})


def test_a_codec_is_a_version_2_field_and_other_tasks_have_none() -> None:
    with pytest.raises(ValueError, match="codec need schema_version 2"):
        ModelCard(**codec_card(schema_version="1", codec="residual-vq/1"))
    with pytest.raises(CardError, match="'classify' card has no codec"):
        resolve_codec(ModelCard(**codec_card(task="classify", input_kind="features", bands=[], band_mean=[],
                                             band_std=[], normalisation="none")))


def _codes_config(card: ModelCard, codes_dims: list[int], patch_dims: list[int]) -> dict:
    if card.task == "compress":
        return config_json([3, 120, 120], codes_dims, card)
    return config_json(codes_dims, patch_dims, card)


@pytest.mark.parametrize("task", ["compress", "decompress"])
def test_the_codes_tensor_is_checked_against_the_card(task: str) -> None:
    card = ModelCard(**codec_card(task, codec="residual-vq/1"))
    assert check_card_against_config(_codes_config(card, [60, 60, 8], [3, 120, 120])) == card
    role = "output" if task == "compress" else "input"
    with pytest.raises(CardError, match=rf"{role} \w+ dims \[60, 60, 4\] are not the codes tensor \[60, 60, 8\] "
                                        r"\(codec residual-vq/1\)"):
        check_card_against_config(_codes_config(card, [60, 60, 4], [3, 120, 120]))
    if task == "decompress":
        with pytest.raises(CardError, match=r"output out dims \[4, 120, 120\] do not match the decoded patch"):
            check_card_against_config(_codes_config(card, [60, 60, 8], [4, 120, 120]))
