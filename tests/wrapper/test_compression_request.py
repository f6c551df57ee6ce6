"""``meta_information.compression``: what a workflow may ask of a compress step, and how a malformed field is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.core.model_card import Codec
from services.wrapper.compression_request import CompressionRequest, compression_request_of, operating_point
from services.wrapper.inputs.types import InputError
from services.wrapper.outputs import OperatingPoint
from services.wrapper.settings import WrapperSettings


def test_absent_field_means_the_deployment_defaults() -> None:
    assert compression_request_of({"other": 1}) is None
    point = operating_point(None, 8, 8, codec=Codec.TRANSFORM_CODES, model_name="m")
    assert point == OperatingPoint(8, quantiser_scale=8)
    assert point.as_dict() == {"levels": 8, "quantiser_scale": 8}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"levels": 3}, OperatingPoint(3, quantiser_scale=16)),
        ({"quantiser_scale": 1}, OperatingPoint(6, quantiser_scale=1)),
        ({"levels": 2, "target_bpp": 1}, OperatingPoint(2, target_bpp=1.0)),
        ({"target_rms_percent": 1.5}, OperatingPoint(6, target_rms_percent=1.5)),
        ({}, OperatingPoint(6, quantiser_scale=16)),
    ],
)
def test_given_fields_win_over_the_defaults(raw: dict, expected: OperatingPoint) -> None:
    request = compression_request_of({"compression": raw})
    assert operating_point(request, 6, 16, codec=Codec.TRANSFORM_CODES, model_name="m") == expected


@pytest.mark.parametrize(
    ("raw", "field", "why"),
    [
        ({"levels": 0}, "compression.levels", "greater than or equal to 1"),
        ({"levels": 9}, "compression.levels", "less than or equal to 8"),
        ({"levels": "4"}, "compression.levels", "valid integer"),
        ({"levels": 2.5}, "compression.levels", "valid integer"),
        ({"quantiser_scale": 5}, "compression.quantiser_scale", "must be one of"),
        ({"quantiser_scale": True}, "compression.quantiser_scale", "valid integer"),
        ({"target_bpp": 0}, "compression.target_bpp", "greater than 0"),
        ({"target_bpp": "1.0"}, "compression.target_bpp", "valid number"),
        ({"target_rms_percent": -1.0}, "compression.target_rms_percent", "greater than 0"),
        ({"target_rms_percent": float("inf")}, "compression.target_rms_percent", "finite"),
        ({"target_bpp": 1.0, "quantiser_scale": 2}, "compression", "at most one of"),
        ({"levels": 4, "bpp": 1.0}, "compression.bpp", "Extra inputs are not permitted"),
        ("fast", "compression", "valid dictionary"),
        ([4], "compression", "valid dictionary"),
    ],
)
def test_malformed_fields_are_input_errors_naming_the_field(raw: object, field: str, why: str) -> None:
    with pytest.raises(InputError) as caught:
        compression_request_of({"compression": raw})
    message = str(caught.value)
    assert message.startswith("meta_information.compression is invalid")
    assert f"{field}: " in message and why in message, message


@pytest.mark.parametrize("rate", ["quantiser_scale", "target_bpp", "target_rms_percent"])
def test_a_residual_vq_compressor_takes_levels_only(rate: str) -> None:
    value = 4 if rate == "quantiser_scale" else 1.0
    request = compression_request_of({"compression": {"levels": 2, rate: value}})
    with pytest.raises(InputError, match=rf"meta_information.compression.{rate} needs a compressor of codec "
                                         r"transform-codes/1 .*model 'rvq' is codec residual-vq/1"):
        operating_point(request, 8, 8, codec=Codec.RESIDUAL_VQ, model_name="rvq")
    levels_only = compression_request_of({"compression": {"levels": 2}})
    assert operating_point(levels_only, 8, 8, codec=Codec.RESIDUAL_VQ, model_name="rvq").levels == 2


def test_request_model_is_strict_and_closed() -> None:
    with pytest.raises(ValidationError):
        CompressionRequest.model_validate({"levels": 1, "extra": None})
    assert CompressionRequest(levels=1).rate_given is None
    assert CompressionRequest(target_bpp=2.0).rate_given == "target_bpp"


def test_default_scale_setting_is_checked_against_the_ladder(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WrapperSettings(task="compress").compress_quantiser_scale == 8
    monkeypatch.setenv("EOML_WRAPPER_COMPRESS_QUANTISER_SCALE", "24")
    assert WrapperSettings(task="compress").compress_quantiser_scale == 24
    monkeypatch.setenv("EOML_WRAPPER_COMPRESS_QUANTISER_SCALE", "5")
    with pytest.raises(ValidationError, match="compress_quantiser_scale"):
        WrapperSettings(task="compress")
