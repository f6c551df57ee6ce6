"""Model inputs from what the input layer read, as the model card says: plain functions, no I/O.

Sentinel-2 (``input_kind: sentinel2-l2a``): 60 m bands are not used, 20 m bands are upsampled to the 10 m grid with
the card's ``resampling_20m`` (bilinear when the card leaves it empty, as D3.4 says), bands are stacked in the
card's ``bands`` order and normalised with the card's statistics. A patch that cannot be turned into a valid input
raises ``PatchInvalid`` with a reason for people; the caller rejects that patch and goes on with the others.

UC6 (``input_kind: era5-sequence``), input layout chosen here (documented in the README): one float32 GeoTIFF with
8 bands, band ``2 t + v + 1`` = time step ``t`` (0 oldest .. 3) of variable ``v`` (0 precipitation in mm/day,
1 2-m temperature in K), or one ``.npy`` float32/float64 array [4, 2, H, W] in the same order. Cells equal to the
GeoTIFF's nodata value, or non-finite, are missing; a 12 x 12 window with any missing cell is not inferred.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from services.core import sentinel2
from services.core.metrics import Stage, timed_stage
from services.core.model_card import ModelCard
from services.wrapper.inputs.decode_limits import DecodeLimitExceeded, check_npy, check_raster
from services.wrapper.inputs.types import BAND_RESOLUTION_M, PATCH_SIZE_10M

SENTINEL2_NODATA = 0  # L2A digital number of a pixel without data
UC6_TIME_STEPS = 4
UC6_VARIABLES = 2


class PatchInvalid(ValueError):
    """One patch (or input file) cannot become a model input; the message says why."""


def check_sentinel2_card(card: ModelCard, input_dims: tuple[int, ...]) -> None:
    """The card and the model's input tensor agree on a Sentinel-2 stack [bands, 120, 120] of known bands."""
    if card.input_kind != "sentinel2-l2a":
        raise ValueError(f"model card input_kind is {card.input_kind!r}, expected 'sentinel2-l2a'")
    unknown = [band for band in card.bands if band not in BAND_RESOLUTION_M]
    if not card.bands or unknown:
        raise ValueError(f"model card bands {card.bands} are not Sentinel-2 L2A bands (unknown: {unknown})")
    coarse = [band for band in card.bands if BAND_RESOLUTION_M[band] > 20]
    if coarse:
        raise ValueError(f"model card asks for 60 m bands {coarse}; the Wrapper stacks 10 m and 20 m bands only")
    if len(input_dims) == 3 and input_dims[0] != len(card.bands):
        raise ValueError(f"model input has {input_dims[0]} channels but the card lists {len(card.bands)} bands")


@timed_stage(Stage.PREPROCESS)
def sentinel2_input(bands: Mapping[str, np.ndarray], card: ModelCard, size: int = PATCH_SIZE_10M) -> np.ndarray:
    """float32 [len(card.bands), size, size] from one patch's bands at their native resolutions.

    Raises ``PatchInvalid`` for a missing band, a band of the wrong size or type, non-finite values, or a band
    without any data (all 0: an empty tile gives no meaningful input; production divided by its maximum: NaN).
    """
    for band in card.bands:
        array = bands.get(band)
        if array is None:
            continue  # stack_bands names every missing band at once
        if array.dtype.kind not in "uif":
            raise PatchInvalid(f"band {band} has dtype {array.dtype}; expected an integer or float raster")
        if array.size and not np.any(array != SENTINEL2_NODATA):
            raise PatchInvalid(f"band {band} holds no data (every pixel is {SENTINEL2_NODATA})")
    try:
        stack = sentinel2.stack_bands(bands, card.bands, card.resampling_20m or "bilinear", size=size)
    except ValueError as error:
        raise PatchInvalid(str(error)) from None
    normalised = sentinel2.normalise(stack, card)
    if not np.isfinite(normalised).all():  # e.g. float input near the float32 limits
        raise PatchInvalid("normalised input has non-finite values")
    return normalised


@dataclass(frozen=True, slots=True)
class Era5Stack:
    """A UC6 input read from one file: raw values [4, 2, H, W] float32 (NaN = missing) and its georeferencing."""

    values: np.ndarray
    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float] | None


def read_era5_stack(data: bytes, name: str) -> Era5Stack:
    """Read a UC6 input file (``.tif``/``.tiff`` with 8 bands, or ``.npy`` [4, 2, H, W]); ``PatchInvalid`` if unusable."""
    lower = name.lower()
    if lower.endswith(".npy"):
        try:
            check_npy(data)
        except DecodeLimitExceeded as error:
            raise PatchInvalid(str(error)) from None
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise PatchInvalid(f"is not a readable .npy array ({error})") from None
        if array.dtype.kind != "f":
            raise PatchInvalid(f"array has dtype {array.dtype}; expected float32 or float64")
        if array.ndim != 4 or array.shape[:2] != (UC6_TIME_STEPS, UC6_VARIABLES):
            raise PatchInvalid(f"array has shape {list(array.shape)}; expected [4, 2, H, W]")
        return Era5Stack(values=array.astype(np.float32), crs_wkt=None, transform=None)
    if lower.endswith((".tif", ".tiff")):
        return _read_era5_geotiff(data)
    raise PatchInvalid("is neither a .tif/.tiff GeoTIFF nor a .npy array")


def _read_era5_geotiff(data: bytes) -> Era5Stack:
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    from services.wrapper.gdal_policy import GTIFF, NotTheClaimedFormat, open_raster_bytes

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with open_raster_bytes(data, GTIFF) as dataset:  # GTiff only: a .tif holding VRT XML is refused
                count = dataset.count
                dtype = dataset.dtypes[0]
                if count != UC6_TIME_STEPS * UC6_VARIABLES:
                    raise PatchInvalid(f"GeoTIFF has {count} bands; expected 8 (4 time steps x precipitation, temperature)")
                if dtype not in ("float32", "float64"):
                    raise PatchInvalid(f"GeoTIFF bands are {dtype}; expected float32 or float64")
                try:
                    check_raster(dataset)
                except DecodeLimitExceeded as error:
                    raise PatchInvalid(str(error)) from None
                array = dataset.read().astype(np.float32)
                nodata = dataset.nodata
                crs_wkt = dataset.crs.to_wkt() if dataset.crs else None
                transform = tuple(dataset.transform)[:6] if crs_wkt is not None else None
    except NotTheClaimedFormat as error:
        raise PatchInvalid(f"is not a readable GeoTIFF ({error.found}; only GDAL's GTiff driver opens it)") from None
    except RasterioError as error:
        raise PatchInvalid(f"is not a readable GeoTIFF ({error})") from None
    if nodata is not None and np.isfinite(nodata):
        array[array == np.float32(nodata)] = np.nan
    height, width = array.shape[1:]
    return Era5Stack(
        values=array.reshape(UC6_TIME_STEPS, UC6_VARIABLES, height, width),
        crs_wkt=crs_wkt,
        transform=transform,  # type: ignore[arg-type]
    )


@timed_stage(Stage.PREPROCESS)
def era5_input(stack: Era5Stack, card: ModelCard) -> np.ndarray:
    """The card's per-variable standardisation of a [4, 2, H, W] stack (NaN stays NaN: those windows are skipped)."""
    if card.input_kind != "era5-sequence":
        raise ValueError(f"model card input_kind is {card.input_kind!r}, expected 'era5-sequence'")
    with np.errstate(invalid="ignore"):
        return sentinel2.normalise(stack.values, card)
