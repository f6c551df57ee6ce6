"""The machine-readable model card: what a client must do to feed a model correctly.

It travels in the model's ``config.pbtxt`` as ``parameters`` with keys ``card.<field>`` and string
values, so any client reads it from the server's model-config endpoint (Triton and ours alike):
``GET /v2/models/<m>/config`` -> ``parameters["card.bands"]["string_value"]``.
The human-readable part of the card is the ``README.md`` beside ``config.pbtxt``.
"""

from __future__ import annotations

from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CARD_PREFIX = "card."
CARD_SCHEMA_VERSION = "1"

Task = Literal["ssl-features", "classify", "compress", "decompress", "uc5-cfactor", "uc6-locust"]
Normalisation = Literal["standardise", "none"]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ModelCard(BaseModel):
    """What a model expects and returns. Empty band lists mean the input is not Sentinel-2 imagery."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: str = CARD_SCHEMA_VERSION
    task: Task
    input_kind: Literal["sentinel2-l2a", "features", "codes", "era5-sequence"]
    bands: list[str] = Field(default_factory=list, description="band order of the input channels")
    band_mean: list[float] = Field(default_factory=list)
    band_std: list[float] = Field(default_factory=list)
    normalisation: Normalisation = "none"
    resampling_20m: Literal["bilinear", "cubic", "nearest", ""] = ""
    patch_size: int = 0
    input_units: str = ""
    output_units: str = ""
    output_range: str = ""
    weights: str = Field(description="where the weights come from: 'seeded-init:seed=N' or 'checkpoint:<name>:sha256=<hex>'")
    intended_use: str = ""

    @field_validator("bands", "band_mean", "band_std", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        if self.normalisation == "standardise":
            if not (len(self.bands) == len(self.band_mean) == len(self.band_std) > 0):
                raise ValueError("standardise needs bands, band_mean and band_std of one length")
            if any(s <= 0 for s in self.band_std):
                raise ValueError("band_std must be positive")
        return self

    def to_parameters(self) -> dict[str, str]:
        """Flatten into Triton ``parameters`` (string values)."""
        out: dict[str, str] = {}
        for key, value in self.model_dump().items():
            if isinstance(value, list):
                value = ",".join(repr(v) if isinstance(v, float) else str(v) for v in value)
            out[CARD_PREFIX + key] = str(value)
        return out

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object]) -> "ModelCard":
        """Read from a config's parameters, in any of the shapes clients see them:
        ``{"card.x": "v"}``, ``{"card.x": {"string_value": "v"}}`` (JSON) or proto ModelParameter."""
        fields: dict[str, object] = {}
        for key, value in parameters.items():
            if not key.startswith(CARD_PREFIX):
                continue
            if isinstance(value, Mapping):
                value = value.get("string_value", "")
            elif hasattr(value, "string_value"):
                value = value.string_value
            fields[key[len(CARD_PREFIX):]] = value
        return cls.model_validate(fields)
