"""Rate control per workflow: the optional ``meta_information.compression`` of a ``compress`` step message.

The DSL's contract is unchanged (``meta_information`` is a free object, passed on as received); a compress step
reads this one field of it::

    "meta_information": {"compression": {"levels": 4, "target_bpp": 1.0}}

- ``levels``: 1..8, the number of code levels kept (default ``EOML_WRAPPER_COMPRESS_LEVELS``, 8);
- at most one of ``quantiser_scale`` (one of ``QUANTISER_SCALES``: 1 keeps the served codes exactly, larger is
  coarser), ``target_bpp`` (> 0: the finest scale whose file is within it) and ``target_rms_percent`` (> 0, % of
  10,000 DN: the coarsest scale whose estimated RMS error is within it); none = ``quantiser_scale``
  ``EOML_WRAPPER_COMPRESS_QUANTISER_SCALE`` (8).

A malformed field is an ``InputError`` naming it (the step fails for good: dead letter and a CRITICAL event), like
a malformed ``cloud_filter``. Scales and targets need a compressor whose codec (``card.codec``, resolved by
``services.core.model_card.resolve_codec``) is ``transform-codes/1`` (format 2); a ``residual-vq/1`` compressor
(format 1) takes ``levels`` only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.core.model_card import Codec
from services.core.transform_codes import LEVELS, QUANTISER_SCALES
from services.wrapper.inputs.types import InputError
from services.wrapper.outputs.compressed import OperatingPoint

COMPRESSION_FIELD = "compression"
_RATE_FIELDS = ("quantiser_scale", "target_bpp", "target_rms_percent")


class CompressionRequest(BaseModel):
    """``meta_information.compression`` of a step message, as given."""

    # strict: "4" or true for a number is a workflow's mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    levels: int | None = Field(None, ge=1, le=LEVELS, description="code levels kept, 1..8")
    quantiser_scale: int | None = Field(None, description=f"one of {list(QUANTISER_SCALES)}")
    target_bpp: float | None = Field(None, gt=0, allow_inf_nan=False, description="bits per pixel of the file")
    target_rms_percent: float | None = Field(None, gt=0, allow_inf_nan=False, description="% of 10,000 DN")

    @field_validator("quantiser_scale")
    @classmethod
    def _on_the_ladder(cls, value: int | None) -> int | None:
        if value is not None and value not in QUANTISER_SCALES:
            raise ValueError(f"must be one of {list(QUANTISER_SCALES)}")
        return value

    @model_validator(mode="after")
    def _one_rate(self) -> "CompressionRequest":
        given = [name for name in _RATE_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(_RATE_FIELDS)}; got {', '.join(given)}")
        return self

    @property
    def rate_given(self) -> str | None:
        """The rate field the workflow gave, if any."""
        return next((name for name in _RATE_FIELDS if getattr(self, name) is not None), None)


def compression_request_of(meta_information: dict[str, Any]) -> CompressionRequest | None:
    """The step's ``compression`` field, or None; ``InputError`` (a permanent failure) naming the bad field."""
    raw = meta_information.get(COMPRESSION_FIELD)
    if raw is None:
        return None
    try:
        return CompressionRequest.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join([COMPRESSION_FIELD, *(str(p) for p in e['loc'])])}: {e['msg']}" for e in error.errors()
        )
        raise InputError(f"meta_information.{COMPRESSION_FIELD} is invalid ({problems})") from None


def operating_point(request: CompressionRequest | None, default_levels: int, default_scale: int,
                    codec: Codec, model_name: str) -> OperatingPoint:
    """The operating point of a compress step: the workflow's request completed with the deployment's defaults.

    ``InputError`` when the request asks for a scale or a target from a compressor whose codes are not transform
    codes (``codec`` of its card: residual-VQ indices have no quantiser scale)."""
    request = request or CompressionRequest()
    rate = request.rate_given
    if rate is not None and codec is not Codec.TRANSFORM_CODES:
        raise InputError(
            f"meta_information.{COMPRESSION_FIELD}.{rate} needs a compressor of codec {Codec.TRANSFORM_CODES} "
            f"(with an entropy prior); model {model_name!r} is codec {codec} (its files keep residual-VQ codes): "
            "give only levels"
        )
    levels = request.levels if request.levels is not None else default_levels
    if rate is None:
        return OperatingPoint(levels, quantiser_scale=default_scale)
    return OperatingPoint(levels, **{rate: getattr(request, rate)})


__all__ = ["COMPRESSION_FIELD", "CompressionRequest", "compression_request_of", "operating_point"]
