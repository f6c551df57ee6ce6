"""The machine-readable model card: what a client must do to feed a model correctly and read its output.

It travels in the model's ``config.pbtxt`` as ``parameters`` with keys ``card.<field>`` and string
values, so any client reads it from the server's model-config endpoint (Triton and ours alike):
``GET /v2/models/<m>/config`` -> ``parameters["card.bands"]["string_value"]``.
The human-readable part of the card is the ``README.md`` beside ``config.pbtxt``.

Schema version 2 adds what a generic Wrapper needs to run a Sentinel-2 model it has no code for
(``task: generic``): reflectance scaling, working resolution, tiling with overlap and blending, nodata
handling and the output kind (per-pixel classes or values, per-tile vector or class probabilities).
Version 1 cards (the fields up to ``intended_use``) still read: every version 2 field has a default that
means "as version 1 did". Validation is strict: a card that contradicts itself fails at load with a
message naming the fields; ``check_card_against_config`` adds the checks that need the tensor shapes.
"""

from __future__ import annotations

import math
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.core.rvq_prior import RVQ_PRIOR_FORMAT, is_rvq_prior_text

CARD_PREFIX = "card."
CARD_SCHEMA_VERSION = "2"
SUPPORTED_SCHEMA_VERSIONS = ("1", "2")

# The task-specific Wrapper handlers (each has a production result prefix); ``generic`` cards need none.
Task = Literal["ssl-features", "classify", "compress", "decompress", "uc5-cfactor", "uc6-locust"]
CardTask = Task | Literal["generic"]
InputKind = Literal["sentinel2-l2a", "sentinel2-l1c", "features", "codes", "era5-sequence"]
Normalisation = Literal["standardise", "none"]
OutputKind = Literal["", "pixel-classes", "pixel-values", "tile-vector", "tile-class-probabilities"]
PIXEL_OUTPUT_KINDS = ("pixel-classes", "pixel-values")
TILE_OUTPUT_KINDS = ("tile-vector", "tile-class-probabilities")
SENTINEL2_INPUT_KINDS = ("sentinel2-l2a", "sentinel2-l1c")

# Compressors and decompressors: what their codes are (``card.codec``), and the codes tensor both sides share:
# [latent rows, latent cols, code levels] (batch axis excluded), INT64, -1 where a level is not used.
COMPRESSION_TASKS = ("compress", "decompress")
CODES_TENSOR_DIMS = (60, 60, 8)
DECODED_PATCH_SIZE = 120


class Codec(StrEnum):
    """What a compressor's codes are; the Wrapper picks the file format and entropy coding from it."""

    TRANSFORM_CODES = "transform-codes/1"  # quantised transform coefficients + the card's learned entropy prior
    RESIDUAL_VQ = "residual-vq/1"  # residual-VQ codebook indices, entropy-coded with per-file histograms


# Sentinel-2 MSI band names (the card's ``bands`` of a Sentinel-2 model must be among them).
SENTINEL2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")

# A class raster is uint8; this code marks pixels without data, so class codes are 0..254.
CLASS_NODATA_CODE = 255

_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
_LIST_FIELDS = ("bands", "band_mean", "band_std", "class_names", "class_codes", "class_colours")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class CardError(ValueError):
    """A model card that cannot be used; the message names the fields and what is wrong."""


class ModelCard(BaseModel):
    """What a model expects and returns. Empty band lists mean the input is not Sentinel-2 imagery."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- schema version 1
    schema_version: str = CARD_SCHEMA_VERSION
    task: CardTask
    input_kind: InputKind
    bands: list[str] = Field(default_factory=list, description="band order of the input channels")
    band_mean: list[float] = Field(default_factory=list)
    band_std: list[float] = Field(default_factory=list)
    normalisation: Normalisation = "none"
    resampling_20m: Literal["bilinear", "cubic", "nearest", ""] = ""
    patch_size: int = 0
    input_units: str = ""
    output_units: str = ""
    output_range: str = ""
    weights: str = Field(description="where the weights come from: 'seeded-init:seed=N', 'checkpoint:<name>:sha256=<hex>' "
                         "or 'package:<name>==<version>/<file>:sha256=<hex>'")
    intended_use: str = ""

    # --- schema version 2 (defaults = version 1 behaviour)
    output_kind: OutputKind = Field("", description="what the generic Wrapper makes of the output; '' = a task-specific handler")
    output_tensor: str = Field("", description="the output the card describes ('' = the first output)")
    reflectance_scale: float = Field(0.0, description="model input = (DN + offset) * scale; 0 = the model reads raw DN")
    reflectance_offset: Literal["none", "product"] = Field(
        "none", description="'product': add the product's BOA_ADD_OFFSET (L2A baseline >= 04.00: -1000) before scaling")
    working_resolution_m: float = Field(0.0, description="ground sampling distance the model reads; 0 = the 10 m grid")
    resampling: Literal["", "average", "bilinear", "cubic", "nearest"] = Field(
        "", description="how bands are resampled to the working resolution")
    tile_size: int = Field(0, description="square tile side in pixels at the working resolution; 0 = patch_size")
    tile_overlap: float = Field(0.0, description="fraction of the tile shared with its neighbour, in [0, 0.5)")
    tile_padding: Literal["symmetric", "reflect", "edge", "constant"] = "symmetric"
    blending: Literal["tukey", "average", "overwrite"] = Field(
        "tukey", description="how overlapping per-pixel outputs combine: tapered cosine (alpha = 2 x overlap), "
        "uniform average, or the later tile overwrites")
    output_activation: Literal["none", "softmax", "sigmoid"] = Field(
        "none", description="applied by the client to the raw output before blending (softmax over the class axis)")
    nodata_value: float | None = Field(None, description="input value meaning 'no data' when every band holds it")
    nodata_policy: Literal["mask", "reject"] = Field(
        "mask", description="mask: nodata pixels get the output's nodata; reject: an input with any nodata is refused")
    class_names: list[str] = Field(default_factory=list)
    class_codes: list[int] = Field(default_factory=list, description="raster code of each class ('' = 0..n-1)")
    class_colours: list[str] = Field(default_factory=list, description="#rrggbb per class, for the colour table")
    licence: str = ""
    source: str = Field("", description="provenance of the weights: package, URL, paper")
    codec: Literal["", "transform-codes/1", "residual-vq/1"] = Field(
        "", description="compress/decompress: what the codes are (transform-codes/1: quantised transform coefficients "
        "coded with the card's entropy_prior; residual-vq/1: residual-VQ codebook indices); '' = decided by "
        "entropy_prior as schema 2 cards before this field did (a prior: transform-codes/1, none: residual-vq/1)")
    entropy_prior: str = Field(
        "", description="compress/decompress: the learned entropy prior the Wrapper codes the codes with "
        "(transform-codes/1: services.core.transform_codes.LaplaceContextPrior.to_text, required; residual-vq/1: "
        "services.core.rvq_prior.ResidualVqPrior.to_text, optional); '' = none (residual-VQ: per-file histograms)")

    @field_validator(*_LIST_FIELDS, mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("nodata_value", mode="before")
    @classmethod
    def _optional_number(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def problems(self) -> list[str]:
        """Every contradiction inside the card (empty when it is usable)."""
        problems: list[str] = []
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            problems.append(
                f"schema_version {self.schema_version!r} is not supported (supported: {', '.join(SUPPORTED_SCHEMA_VERSIONS)})")
            return problems
        if self.normalisation == "standardise":
            if not (len(self.bands) == len(self.band_mean) == len(self.band_std) > 0):
                problems.append(
                    f"standardise needs bands, band_mean and band_std of one length (got {len(self.bands)}, "
                    f"{len(self.band_mean)}, {len(self.band_std)})")
            if any(not s > 0 or not math.isfinite(s) for s in self.band_std):
                problems.append("band_std must be positive and finite")
        if self.schema_version == "1":
            set_v2 = [name for name in _V2_FIELDS if getattr(self, name) != _V2_DEFAULTS[name]]
            if set_v2:
                problems.append(f"field(s) {', '.join(set_v2)} need schema_version 2")
            if self.task == "generic":
                problems.append("task 'generic' needs schema_version 2")
            return problems
        if self.input_kind in SENTINEL2_INPUT_KINDS:
            unknown = [band for band in self.bands if band not in SENTINEL2_BANDS]
            if not self.bands or unknown:
                problems.append(f"bands {self.bands} are not Sentinel-2 bands (unknown: {unknown})")
        if len(set(self.bands)) != len(self.bands):
            problems.append(f"bands {self.bands} name a band twice")
        if self.reflectance_scale < 0 or not math.isfinite(self.reflectance_scale):
            problems.append(f"reflectance_scale {self.reflectance_scale} must be >= 0 (0 = raw values)")
        if self.reflectance_offset == "product" and self.reflectance_scale == 0:
            problems.append("reflectance_offset 'product' needs a reflectance_scale > 0")
        if self.working_resolution_m < 0 or not math.isfinite(self.working_resolution_m):
            problems.append(f"working_resolution_m {self.working_resolution_m} must be >= 0")
        if self.working_resolution_m > 0 and not self.resampling:
            problems.append("working_resolution_m needs resampling (average, bilinear, cubic or nearest)")
        if self.tile_size < 0 or self.patch_size < 0:
            problems.append("tile_size and patch_size must be >= 0")
        if not 0.0 <= self.tile_overlap < 0.5:
            problems.append(f"tile_overlap {self.tile_overlap} must be in [0, 0.5)")
        if self.nodata_value is not None and not math.isfinite(self.nodata_value):
            problems.append("nodata_value must be a finite number (NaN input is always treated as nodata)")
        if self.task == "generic" and not self.output_kind:
            problems.append("task 'generic' needs an output_kind")
        if self.output_kind in PIXEL_OUTPUT_KINDS:
            if self.input_kind not in SENTINEL2_INPUT_KINDS:
                problems.append(f"output_kind {self.output_kind} needs a Sentinel-2 input_kind")
            if self.effective_tile_size <= 0:
                problems.append(f"output_kind {self.output_kind} needs tile_size > 0")
        problems += self._class_problems()
        problems += self._codec_problems()
        return problems

    def _codec_problems(self) -> list[str]:
        """The codec rule (``resolve_codec``): a field of compress/decompress cards, consistent with the prior
        and the input kind."""
        if self.task not in COMPRESSION_TASKS:
            return [f"{name} is only for compress/decompress cards (task is {self.task!r})"
                    for name in ("codec", "entropy_prior") if getattr(self, name)]
        problems: list[str] = []
        codec = resolve_codec(self)
        rvq_prior = is_rvq_prior_text(self.entropy_prior)
        if codec is Codec.TRANSFORM_CODES and (not self.entropy_prior or rvq_prior):
            problems.append(f"codec {codec} needs an entropy_prior of its own kind (its codes are entropy-coded with "
                            f"the card's learned transform prior; got {'an RVQ prior' if rvq_prior else 'none'})")
        if codec is Codec.RESIDUAL_VQ and self.entropy_prior and not rvq_prior:
            problems.append(f"codec {codec} takes an RVQ prior ({RVQ_PRIOR_FORMAT}: per-level index frequencies) or "
                            "no entropy_prior (per-file histograms, format 1), not a transform prior")
        if self.task == "compress" and self.input_kind not in SENTINEL2_INPUT_KINDS:
            problems.append(f"a compress card reads Sentinel-2 imagery: input_kind {self.input_kind!r} must be one "
                            f"of {', '.join(SENTINEL2_INPUT_KINDS)}")
        if self.task == "decompress" and self.input_kind != "codes":
            problems.append(f"a decompress card reads codes: input_kind {self.input_kind!r} must be 'codes'")
        return problems

    def _class_problems(self) -> list[str]:
        problems: list[str] = []
        names, codes, colours = self.class_names, self.class_codes, self.class_colours
        if self.output_kind == "pixel-classes" and not names:
            problems.append("output_kind pixel-classes needs class_names")
        if not names and (codes or colours):
            problems.append("class_codes and class_colours need class_names")
            return problems
        if len(set(names)) != len(names):
            problems.append(f"class_names {names} name a class twice")
        if codes and len(codes) != len(names):
            problems.append(f"{len(codes)} class_codes for {len(names)} class_names")
        if len(set(codes)) != len(codes):
            problems.append(f"class_codes {codes} repeat a code")
        if any(not 0 <= code < CLASS_NODATA_CODE for code in codes):
            problems.append(f"class_codes must be in 0..{CLASS_NODATA_CODE - 1} ({CLASS_NODATA_CODE} marks nodata)")
        if colours and len(colours) != len(names):
            problems.append(f"{len(colours)} class_colours for {len(names)} class_names")
        bad = [colour for colour in colours if not _COLOUR.match(colour)]
        if bad:
            problems.append(f"class_colours {bad} are not #rrggbb")
        if names and self.output_kind in ("pixel-values", "tile-vector"):
            problems.append(f"class_names make no sense for output_kind {self.output_kind}")
        return problems

    # --- derived values the processing functions use

    @property
    def effective_tile_size(self) -> int:
        return self.tile_size or self.patch_size

    @property
    def codes(self) -> list[int]:
        """The raster code of each class, in output-channel order."""
        return list(self.class_codes) or list(range(len(self.class_names)))

    @property
    def tile_step(self) -> int:
        """Pixels between tile origins (ukis-csmask's convention: int(size - size * overlap))."""
        size = self.effective_tile_size
        return int(size - size * self.tile_overlap)

    @property
    def tile_margin(self) -> int:
        """Padding before the first tile, so the image edge is not at a tile edge (int(size * overlap))."""
        return int(self.effective_tile_size * self.tile_overlap)

    def to_parameters(self) -> dict[str, str]:
        """Flatten into Triton ``parameters`` (string values). Version 2 fields at their default are left out."""
        out: dict[str, str] = {}
        for key, value in self.model_dump().items():
            if key in _V2_FIELDS and value == _V2_DEFAULTS[key]:
                continue
            if key in ("class_names", "class_colours") and any("," in item for item in value):
                raise CardError(f"{key} entries cannot contain ',' (the list separator)")
            if isinstance(value, list):
                value = ",".join(repr(v) if isinstance(v, float) else str(v) for v in value)
            elif isinstance(value, float):
                value = repr(value)
            elif value is None:
                value = ""
            out[CARD_PREFIX + key] = str(value)
        return out

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object]) -> "ModelCard":
        """Read from a config's parameters, in any of the shapes clients see them:
        ``{"card.x": "v"}``, ``{"card.x": {"string_value": "v"}}`` (JSON) or proto ModelParameter.

        A card written before schema versions were checked has no ``card.schema_version``: it is version 1.
        """
        fields: dict[str, object] = {}
        for key, value in parameters.items():
            if not key.startswith(CARD_PREFIX):
                continue
            if isinstance(value, Mapping):
                value = value.get("string_value", "")
            elif hasattr(value, "string_value"):
                value = value.string_value
            fields[key[len(CARD_PREFIX):]] = value
        if not fields:
            raise CardError("the config has no model card (no parameters 'card.*')")
        fields.setdefault("schema_version", "1")
        return cls.model_validate(fields)


_V1_FIELDS = (
    "schema_version", "task", "input_kind", "bands", "band_mean", "band_std", "normalisation", "resampling_20m",
    "patch_size", "input_units", "output_units", "output_range", "weights", "intended_use",
)
_V2_FIELDS = tuple(name for name in ModelCard.model_fields if name not in _V1_FIELDS)
_V2_DEFAULTS: dict[str, Any] = {
    name: (field.default_factory() if field.default_factory is not None else field.default)  # type: ignore[call-arg]
    for name, field in ModelCard.model_fields.items()
    if name in _V2_FIELDS
}


# ---------------------------------------------------------------------------------------------
# The card against the model's tensors (config.pbtxt)


def resolve_codec(card: ModelCard) -> Codec:
    """The codec of a compress or decompress card: ``card.codec`` when set, else the rule of schema 2 cards written
    before the field existed (an entropy prior: transform codes; none: residual-VQ codes). The one place that
    decides it: the Wrapper's compress and decompress steps and their rate control all ask here.
    ``CardError`` for any other task."""
    if card.task not in COMPRESSION_TASKS:
        raise CardError(f"a {card.task!r} card has no codec (only compress/decompress cards do)")
    if card.codec:
        return Codec(card.codec)
    # A card without the field and with an RVQ prior cannot be told apart from a mistake: it is read as transform
    # codes, which its prior then contradicts (a clear refusal, not a guess).
    return Codec.TRANSFORM_CODES if card.entropy_prior else Codec.RESIDUAL_VQ


def _tensors(config: Any, kind: str) -> list[tuple[str, list[int], str]]:
    """(name, dims without batch, label_filename) of the config's inputs or outputs: proto or JSON dict."""
    entries = config.get(kind, []) if isinstance(config, Mapping) else getattr(config, kind)
    out = []
    for entry in entries:
        if isinstance(entry, Mapping):
            out.append((str(entry["name"]), [int(d) for d in entry.get("dims", [])], str(entry.get("label_filename", ""))))
        else:
            out.append((entry.name, [int(d) for d in entry.dims], getattr(entry, "label_filename", "")))
    return out


def _parameters(config: Any) -> Mapping[str, object]:
    return config.get("parameters", {}) if isinstance(config, Mapping) else config.parameters


def card_tensor_problems(card: ModelCard, config: Any, label_count: int | None = None) -> list[str]:
    """What the card says that the model's configured tensors contradict.

    ``config``: a Triton ModelConfig proto or its JSON form (``GET /v2/models/<m>/config``). Input tensors
    are [channels, rows, cols] (batch axis excluded), per-pixel outputs [classes or values, rows, cols]
    (or [rows, cols] for one value), per-tile outputs [length]. ``label_count`` is the number of lines of
    the output's label file, when it has one.
    """
    problems: list[str] = []
    inputs, outputs = _tensors(config, "input"), _tensors(config, "output")
    if card.input_kind in SENTINEL2_INPUT_KINDS and card.schema_version != "1" and card.bands:
        if len(inputs) != 1:
            problems.append(f"a Sentinel-2 card needs exactly one input tensor, the config has {len(inputs)}")
        else:
            name, dims, _ = inputs[0]
            if len(dims) != 3 or dims[0] != len(card.bands):
                problems.append(f"input {name} dims {dims} do not match [{len(card.bands)} bands, rows, cols]")
            elif card.effective_tile_size and dims[1:] != [card.effective_tile_size] * 2:
                problems.append(
                    f"card tile_size {card.effective_tile_size} does not match the model input dims {dims} "
                    f"(expected [{len(card.bands)}, {card.effective_tile_size}, {card.effective_tile_size}])")
    problems += _codes_tensor_problems(card, inputs, outputs)
    if not card.output_kind:
        return problems
    if card.output_tensor:
        chosen = [t for t in outputs if t[0] == card.output_tensor]
        if not chosen:
            problems.append(f"output_tensor {card.output_tensor!r} is not an output of the model ({[t[0] for t in outputs]})")
            return problems
    elif not outputs:
        problems.append("the config declares no output")
        return problems
    else:
        chosen = outputs[:1]
    name, dims, label_filename = chosen[0]
    tile = card.effective_tile_size
    classes = len(card.class_names)
    if card.output_kind == "pixel-classes":
        if dims != [classes, tile, tile]:
            problems.append(
                f"output {name} dims {dims} do not match pixel-classes [{classes} classes, {tile}, {tile}] "
                f"({classes} class_names, tile_size {tile})")
    elif card.output_kind == "pixel-values":
        if dims[-2:] != [tile, tile] or len(dims) not in (2, 3):
            problems.append(f"output {name} dims {dims} do not match pixel-values [values, {tile}, {tile}] or [{tile}, {tile}]")
    elif card.output_kind == "tile-vector":
        if len(dims) != 1 or dims[0] < 1:
            problems.append(f"output {name} dims {dims} are not a per-tile vector [length]")
    elif card.output_kind == "tile-class-probabilities":
        if len(dims) != 1:
            problems.append(f"output {name} dims {dims} are not per-tile class probabilities [classes]")
        elif classes and dims[0] != classes:
            problems.append(f"output {name} has {dims[0]} classes but the card names {classes}")
        elif not classes and not label_filename:
            problems.append(f"output {name}: tile-class-probabilities need class_names or a label_filename")
        elif not classes and label_count is not None and label_count != dims[0]:
            problems.append(f"output {name} has {dims[0]} classes but {label_filename} has {label_count} labels")
    return problems


def _codes_tensor_problems(card: ModelCard, inputs: list[tuple[str, list[int], str]],
                           outputs: list[tuple[str, list[int], str]]) -> list[str]:
    """A compressor's output and a decompressor's input are the codes tensor; a decompressor's output is the patch."""
    if card.task not in COMPRESSION_TASKS or card.schema_version == "1":
        return []
    codes = list(CODES_TENSOR_DIMS)
    tensors = outputs if card.task == "compress" else inputs
    role = "output" if card.task == "compress" else "input"
    if len(tensors) != 1:
        return [f"a {card.task} card needs exactly one {role} tensor (the codes), the config has {len(tensors)}"]
    problems: list[str] = []
    name, dims, _ = tensors[0]
    if dims != codes:
        problems.append(f"{role} {name} dims {dims} are not the codes tensor {codes} (codec {resolve_codec(card)})")
    if card.task == "decompress" and card.bands and len(outputs) == 1:
        name, dims, _ = outputs[0]
        patch = [len(card.bands), DECODED_PATCH_SIZE, DECODED_PATCH_SIZE]
        if dims != patch:
            problems.append(f"output {name} dims {dims} do not match the decoded patch {patch}")
    return problems


def check_card_against_config(config: Any, label_counts: Mapping[str, int] | None = None) -> ModelCard:
    """Load the card from a model config and check it against the config's tensors; raise ``CardError``.

    ``label_counts``: label file name -> number of labels (the repository test reads them from disk).
    """
    try:
        card = ModelCard.from_parameters(_parameters(config))
    except CardError:
        raise
    except ValueError as error:
        raise CardError(f"invalid model card: {_pydantic_message(error)}") from None
    label_count = None
    if label_counts:
        outputs = _tensors(config, "output")
        chosen = [t for t in outputs if t[0] == card.output_tensor] or outputs[:1]
        if chosen and chosen[0][2]:
            label_count = label_counts.get(chosen[0][2])
    problems = card_tensor_problems(card, config, label_count)
    if problems:
        raise CardError("model card does not fit the model's tensors: " + "; ".join(problems))
    return card


def _pydantic_message(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        parts = []
        for item in errors():
            location = ".".join(str(part) for part in item.get("loc", ()))
            message = str(item.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{location}: {message}" if location else message)
        return "; ".join(parts)
    return str(error)


def load_card(parameters: Mapping[str, object]) -> ModelCard:
    """``ModelCard.from_parameters`` with a ``CardError`` whose message names every bad field."""
    try:
        return ModelCard.from_parameters(parameters)
    except CardError:
        raise
    except ValueError as error:
        raise CardError(f"invalid model card: {_pydantic_message(error)}") from None


def class_colour_table(card: ModelCard) -> dict[int, tuple[int, int, int, int]]:
    """code -> RGBA for a GeoTIFF colour table (grey levels when the card gives no colours)."""
    colours: Sequence[str] = card.class_colours
    table: dict[int, tuple[int, int, int, int]] = {}
    count = len(card.class_names)
    for index, code in enumerate(card.codes):
        if colours:
            hex_colour = colours[index]
            table[code] = (int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16), 255)
        else:
            level = int(round(255 * index / max(count - 1, 1)))
            table[code] = (level, level, level, 255)
    table[CLASS_NODATA_CODE] = (0, 0, 0, 0)
    return table


# ---------------------------------------------------------------------------------------------
# ``python -m services.core.model_card <model directory>``: check a model directory before serving it


def check_model_directory(directory: str | os.PathLike[str]) -> ModelCard:
    """Load ``<directory>/config.pbtxt`` (Triton's proto) and check its card against its tensors and label files."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    folder = Path(directory)
    config_path = folder / "config.pbtxt"
    if not config_path.is_file():
        raise CardError(f"{config_path} does not exist")
    try:
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise CardError(f"{config_path} is not a Triton model configuration: {error}") from None
    if config.name and config.name != folder.name:
        raise CardError(f"config.pbtxt names the model {config.name!r} but its directory is {folder.name!r}")
    label_counts = {}
    for output in config.output:
        if output.label_filename:
            labels = folder / output.label_filename
            if not labels.is_file():
                raise CardError(f"output {output.name} names label file {output.label_filename}, which does not exist")
            label_counts[output.label_filename] = len(labels.read_text().splitlines())
    return check_card_against_config(config, label_counts)


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m services.core.model_card <model directory> [...]", file=sys.stderr)
        return 2
    failed = False
    for directory in args:
        try:
            card = check_model_directory(directory)
        except CardError as error:
            print(f"{directory}: {error}", file=sys.stderr)
            failed = True
            continue
        kind = card.output_kind or f"task {card.task}"
        if card.task in COMPRESSION_TASKS:
            kind += f", codec {resolve_codec(card)}"
        print(f"{directory}: card schema {card.schema_version} OK ({card.input_kind}, {len(card.bands)} bands, {kind})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
