"""The Wrapper's ``generic`` task and the cloud filter of Sentinel-2 steps, on the card-driven functions of
``services.wrapper.generic_kinds``.

``GenericHandler`` serves any model whose card says ``task: generic`` with a per-pixel ``output_kind``: each
patch or tile the input layer reads (BigEarthNet folders, tar.gz, SAFE products) goes to the card's working grid,
is cut into the card's tiles, those tiles go through the Wrapper's batched, retried inference client, and the
blended outputs become, per patch, next to ``<unit>/<patch>``:

- ``pixel-classes``: ``.classes.tif`` (uint8 class codes, colour table, georeferenced on the working grid) and the
  class fractions in the manifest (``stats.per_input[].patches[]`` and pooled per input);
- ``pixel-values``: ``.values.tif`` (float32, one band per output channel, NaN = no data);
- a ``.quicklook.png`` (true colour, 2-98 % stretch; classes overlaid, the card's first class left clear) unless
  ``EOML_WRAPPER_QUICKLOOKS=never``.

Per-tile kinds (``tile-vector``, ``tile-class-probabilities``) are refused at model check: the task-specific
``ssl-features`` and ``classify`` tasks keep their production formats, which a per-tile record does not carry.

``CloudFilter`` is the optional ``meta_information.cloud_filter`` of a step message (the DSL's contract is
unchanged: ``meta_information`` is a free object, passed on as received). A Sentinel-2 step with one measures
each patch's cloud (and shadow) fraction with the served ``s2-cloud-mask`` and skips (a rejection with the
reason) or flags the patches above ``max_cloud_fraction``; the manifest records every patch's figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from affine import Affine
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.core import tiling
from services.core.model_card import PIXEL_OUTPUT_KINDS, SENTINEL2_INPUT_KINDS, ModelCard
from services.wrapper import generic_kinds
from services.wrapper.inference_client import ModelClient, ModelMismatch, ServedModel
from services.wrapper.inputs import InputPatch
from services.wrapper.inputs.types import InputError
from services.wrapper.outputs import OutputFile, PatchMetadata
from services.wrapper.outputs.rasters import geotiff_bytes
from services.wrapper.outputs.class_raster import CLASS_RASTER_SUFFIX, write_class_geotiff
from services.wrapper.outputs.quicklook import (
    PNG_CONTENT_TYPE,
    TRUE_COLOUR_BANDS,
    QuicklookError,
    class_overlay,
    encode_png,
    true_colour,
)
from services.wrapper.spool import spooled_output

QUICKLOOK_SUFFIX = ".quicklook.png"
VALUE_RASTER_SUFFIX = ".values.tif"
GEOTIFF_CONTENT_TYPE = "image/tiff"
CLOUD_FILTER_FIELD = "cloud_filter"


# ---------------------------------------------------------------------------------------------------------------
# The cloud filter a workflow may ask for


class CloudFilter(BaseModel):
    """``meta_information.cloud_filter`` of a step message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_cloud_fraction: float = Field(ge=0.0, le=1.0, description="patches above it are skipped or flagged")
    action: Literal["skip", "flag"] = "skip"
    # Whether cloud shadow counts as cloud (the mask's ``shadow`` class).
    include_shadow: bool = False


def cloud_filter_of(meta_information: dict[str, Any]) -> CloudFilter | None:
    """The step's cloud filter, or None; ``InputError`` (a permanent failure) when it is malformed."""
    raw = meta_information.get(CLOUD_FILTER_FIELD)
    if raw is None:
        return None
    try:
        return CloudFilter.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in error.errors())
        raise InputError(f"meta_information.{CLOUD_FILTER_FIELD} is invalid ({problems})") from None


@dataclass
class CloudMeter:
    """Cloud fractions of patches with the served cloud-mask model (its card: a ``pixel-classes`` model with
    classes ``cloud`` and, for ``include_shadow``, ``shadow``)."""

    client: ModelClient
    served: ServedModel
    rule: CloudFilter
    batch_size: int
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, client: ModelClient, rule: CloudFilter) -> "CloudMeter":
        served = client.resolve()
        card = served.card
        needed = ["cloud", "shadow"] if rule.include_shadow else ["cloud"]
        if card.output_kind != "pixel-classes" or any(name not in card.class_names for name in needed):
            raise ModelMismatch(
                f"model {served.name!r} cannot measure clouds: it needs output_kind pixel-classes with classes "
                f"{needed}, its card says {card.output_kind!r} {list(card.class_names)}"
            )
        return cls(client, served, rule, max(1, served.max_batch_size))

    def judge(self, patch: InputPatch) -> str | None:
        """Measure one patch; the rejection reason when the rule skips it, else None (recorded either way)."""
        scene = scene_bands(patch)
        try:
            result = generic_kinds.process_scene(
                scene, self.served.card, lambda rows: self.client.infer(self.served, rows), self.batch_size
            )
        except generic_kinds.InputRejected as error:
            self.records.append({"patch_id": patch.patch_id, "error": str(error)})
            return None  # no verdict: the step's own model decides whether the patch is usable
        assert isinstance(result, generic_kinds.PixelClassResult)
        cloud = result.fractions.get("cloud", 0.0)
        shadow = result.fractions.get("shadow", 0.0)
        measured = generic_kinds.class_share(result, ["cloud", "shadow"] if self.rule.include_shadow else ["cloud"])
        above = measured > self.rule.max_cloud_fraction
        record: dict[str, Any] = {"patch_id": patch.patch_id, "cloud_fraction": round(cloud, 6),
                                  "shadow_fraction": round(shadow, 6)}
        if above:
            record["skipped" if self.rule.action == "skip" else "flagged"] = True
        self.records.append(record)
        if above and self.rule.action == "skip":
            what = "cloud + shadow" if self.rule.include_shadow else "cloud"
            return (f"{what} fraction {measured:.3f} is above the workflow's max_cloud_fraction "
                    f"{self.rule.max_cloud_fraction} (skipped by meta_information.cloud_filter)")
        return None

    def manifest_entry(self) -> dict[str, Any]:
        skipped = sum(1 for r in self.records if r.get("skipped"))
        flagged = sum(1 for r in self.records if r.get("flagged"))
        return {**self.rule.model_dump(), "model": self.served.name, "model_version": self.served.version,
                "measured": len(self.records), "skipped": skipped, "flagged": flagged, "patches": self.records}


# ---------------------------------------------------------------------------------------------------------------
# Patches and quicklooks


def scene_bands(patch: InputPatch) -> generic_kinds.SceneBands:
    """An input patch as the generic kinds read it (SAFE tiles carry their product's BOA_ADD_OFFSET)."""
    return generic_kinds.SceneBands(bands=patch.bands, transform=patch.transform, crs=patch.crs,
                                    boa_add_offset=patch.boa_add_offset)


def true_colour_bands(patch: InputPatch) -> dict[str, np.ndarray] | None:
    """The 10 m B04/B03/B02 of a patch (None when one is missing: no quicklook then)."""
    if not all(band in patch.bands for band in TRUE_COLOUR_BANDS):
        return None
    return {band: patch.bands[band] for band in TRUE_COLOUR_BANDS}


def spool_bytes(spool_dir: str, data: bytes, suffix: str, content_type: str) -> OutputFile:
    with spooled_output(spool_dir, suffix, content_type) as (target, made):
        target.write(data)
    return made[0]


def true_colour_quicklook(bands: dict[str, np.ndarray], max_side: int) -> bytes | None:
    try:
        return encode_png(true_colour(bands, max_side=max_side))
    except QuicklookError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# The generic task


@dataclass(frozen=True, slots=True)
class GenericPatch:
    """What a patch's tiles need once they come back from the model."""

    unit: Any  # handlers.InputUnit
    patch: PatchMetadata
    grid: tiling.TileGrid
    grid_info: generic_kinds.WorkingStack  # values left out: nodata mask and georeferencing only
    rgb: dict[str, np.ndarray] | None


def check_generic_model(served: ServedModel) -> None:
    """``ModelMismatch`` unless the card is one ``GenericHandler`` serves and the tensors fit it."""
    card = served.card
    if card.output_kind not in PIXEL_OUTPUT_KINDS:
        raise ModelMismatch(
            f"model {served.name!r} card has output_kind {card.output_kind!r}; the generic task serves per-pixel "
            f"kinds ({', '.join(sorted(PIXEL_OUTPUT_KINDS))})"
        )
    if card.input_kind not in SENTINEL2_INPUT_KINDS:
        raise ModelMismatch(f"model {served.name!r} card input_kind {card.input_kind!r} is not Sentinel-2")
    size = card.effective_tile_size
    expected_input = (len(card.bands), size, size)
    if served.input.datatype != "FP32" or served.input.dims != expected_input:
        raise ModelMismatch(f"model {served.name!r} input is {served.input.datatype} {list(served.input.dims)}; "
                            f"its card needs FP32 {list(expected_input)}")
    dims = served.output.dims
    if card.output_kind == "pixel-classes":
        fits = dims == (len(card.class_names), size, size)
    else:
        fits = dims[-2:] == (size, size) and len(dims) in (2, 3)
    if not fits:
        raise ModelMismatch(f"model {served.name!r} output dims {list(dims)} do not fit its card "
                            f"({card.output_kind}, tile {size})")


def generic_patch_work(card: ModelCard, unit: Any, patch: InputPatch) -> tuple[np.ndarray, GenericPatch]:
    """The tiles [N, C, T, T] of one patch and what blending them back needs; ``InputRejected`` if unusable."""
    scene = scene_bands(patch)
    stack = generic_kinds.working_stack(scene, card)
    image = generic_kinds.model_input(stack, card, scene.boa_add_offset)
    grid = tiling.tile_grid(image.shape[1], image.shape[2], card.effective_tile_size, card.tile_overlap)
    tiles = tiling.cut_tiles(image, grid, card.tile_padding)
    info = generic_kinds.WorkingStack(np.empty((0,), np.float32), stack.nodata, stack.transform, stack.crs,
                                      stack.resolution_m)
    return tiles, GenericPatch(unit, PatchMetadata.from_input_patch(patch), grid, info, true_colour_bands(patch))


def blend_patch(card: ModelCard, context: GenericPatch, outputs: np.ndarray
                ) -> generic_kinds.PixelClassResult | generic_kinds.PixelValueResult:
    if outputs.ndim == 3:  # one value per pixel: [N, T, T]
        outputs = outputs[:, None]
    blended = tiling.blend_tiles(generic_kinds.activate(outputs, card), context.grid, card.tile_overlap,
                                 card.blending)
    if card.output_kind == "pixel-classes":
        return generic_kinds.pixel_classes(blended, context.grid_info.nodata, card, context.grid_info)
    return generic_kinds.pixel_values(blended, context.grid_info.nodata, context.grid_info)


def write_value_geotiff(values: np.ndarray, crs: str | None, transform: Affine | None, model: str,
                        model_version: str, created_iso: str) -> bytes:
    """float32 [V, H, W] GeoTIFF (NaN = no data, DEFLATE), tagged with the model and the event time."""
    return geotiff_bytes(values.astype(np.float32), crs, transform, nodata=float("nan"), compress="deflate",
                         tags={"model": model, "model_version": model_version, "created": created_iso})


def patch_outputs(
    served: ServedModel, context: GenericPatch, outputs: np.ndarray, spool_dir: str, created: Any,
    quicklook_max_side: int | None,
) -> tuple[list[OutputFile], dict[str, Any]]:
    """The result files of one patch (spooled) and its manifest entry."""
    card = served.card
    result = blend_patch(card, context, outputs)
    crs = context.patch.crs_wkt
    files: list[OutputFile] = []
    entry: dict[str, Any] = {"patch_id": context.patch.patch_id, **generic_kinds.manifest_entry(result)}
    if isinstance(result, generic_kinds.PixelClassResult):
        data = write_class_geotiff(result.codes, crs, result.transform, result.class_names, result.class_codes,
                                   result.colour_table, served.name, served.version, created)
        files.append(spool_bytes(spool_dir, data, CLASS_RASTER_SUFFIX, GEOTIFF_CONTENT_TYPE))
    else:
        stamp = created.isoformat(timespec="seconds")
        data = write_value_geotiff(result.values, crs, result.transform, served.name, served.version, stamp)
        files.append(spool_bytes(spool_dir, data, VALUE_RASTER_SUFFIX, GEOTIFF_CONTENT_TYPE))
    if quicklook_max_side and context.rgb is not None:
        try:
            picture = true_colour(context.rgb, max_side=quicklook_max_side)
            if isinstance(result, generic_kinds.PixelClassResult):
                # The card's first class (the background: "clear" for the cloud mask) stays as it is.
                picture = class_overlay(picture, result.codes, result.colour_table, (result.class_codes[0],))
            files.append(spool_bytes(spool_dir, encode_png(picture), QUICKLOOK_SUFFIX, PNG_CONTENT_TYPE))
        except QuicklookError:
            pass  # a patch without data in its true-colour bands gets no picture
    return files, entry


def pooled_fractions(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Class fractions over every patch of an input, weighted by each patch's pixels with data."""
    totals: dict[str, float] = {}
    pixels = 0.0
    for entry in entries:
        fractions = entry.get("class_fractions")
        if not fractions:
            continue
        rows, cols = entry["shape"][-2:]
        valid = rows * cols * (1.0 - entry.get("nodata_fraction", 0.0))
        pixels += valid
        for name, value in fractions.items():
            totals[name] = totals.get(name, 0.0) + value * valid
    return {name: round(total / pixels, 6) for name, total in totals.items()} if pixels else {}


__all__ = [
    "CLOUD_FILTER_FIELD",
    "CloudFilter",
    "CloudMeter",
    "GenericPatch",
    "QUICKLOOK_SUFFIX",
    "VALUE_RASTER_SUFFIX",
    "check_generic_model",
    "cloud_filter_of",
    "generic_patch_work",
    "patch_outputs",
    "pooled_fractions",
    "spool_bytes",
    "true_colour_bands",
    "true_colour_quicklook",
]
