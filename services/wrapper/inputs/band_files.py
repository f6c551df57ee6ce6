"""BigEarthNet band files (``<patch>/<patch>_<BAND>.tif``): recognising their paths, decoding them, making patches.

Shared by the two layouts that carry patch folders: tar.gz archives and plain S3 prefixes.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from services.core.metrics import Stage, timed_stage
from services.wrapper.gdal_policy import GTIFF, NotTheClaimedFormat, open_raster_bytes
from services.wrapper.inputs.plain_geotiff import decode_plain_geotiff
from services.wrapper.inputs.decode_limits import MAX_BAND_FILE_PIXELS, DecodeLimitExceeded, check_raster
from services.wrapper.inputs.types import (
    BAND_RESOLUTION_M,
    InputPatch,
    PatchRejection,
    patch_band_shape,
)

_BAND_SUFFIX = re.compile(r"_(?P<band>B(?:0[1-9]|1[12]|8A))\.tiff?$")  # L2A: no B10
# The 10 m bands, in the order their georeferencing is preferred for the patch's grid.
_GRID_BANDS = ("B02", "B03", "B04", "B08")


@dataclass(frozen=True, slots=True)
class BandFilePath:
    """A path recognised as ``<dir>/<patch>/<patch>_<BAND>.tif``."""

    patch_dir: str  # the folder path, e.g. "2017/S2A_MSIL2A_..._39_24" (no trailing slash)
    patch_name: str  # the folder's own name
    band: str


def parse_band_file_path(path: str) -> BandFilePath | None:
    """Recognise a band file of a BigEarthNet patch folder, or return None.

    The file name must be the folder name plus ``_<BAND>.tif``: that is what makes a folder a patch, and it keeps
    ``labels_metadata.json`` and unrelated TIFFs out.
    """
    folder, _, file_name = path.rpartition("/")
    if not folder:
        return None
    patch_name = folder.rpartition("/")[2]
    match = _BAND_SUFFIX.search(file_name)
    if match is None or file_name[: match.start()] != patch_name or not patch_name:
        return None
    return BandFilePath(patch_dir=folder, patch_name=patch_name, band=match.group("band"))


@dataclass(frozen=True, slots=True)
class DecodedBand:
    array: np.ndarray
    crs: str | None
    transform: Affine | None


class BandDecodeError(ValueError):
    """A band file that is not a readable single-band uint16 raster."""


@timed_stage(Stage.DECODE)
def decode_band_file(data: bytes) -> DecodedBand:
    """Decode one band file held in memory (GeoTIFF or plain TIFF), keeping georeferencing when present.

    Only GDAL's GTiff driver may open it (``gdal_policy``): a file of any other format is a ``BandDecodeError``
    that says what the file starts with, never a dataset of another driver. Plain single-band uint16 (Geo)TIFFs,
    what BigEarthNet ships, take tifffile's faster path when it reads them exactly as GDAL would
    (``plain_geotiff``); every other file, and every refusal, goes through GDAL.
    """
    plain = decode_plain_geotiff(data, MAX_BAND_FILE_PIXELS)
    if plain is not None:
        return DecodedBand(array=plain.array, crs=plain.crs, transform=plain.transform)
    return decode_band_file_with_gdal(data)


def decode_band_file_with_gdal(data: bytes) -> DecodedBand:
    """``decode_band_file`` through GDAL's GTiff driver alone (every file the fast path does not take)."""
    try:
        with warnings.catch_warnings():
            # BigEarthNet v1 mock patches are plain TIFFs; no georeferencing is a normal case, recorded as None.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with open_raster_bytes(data, GTIFF) as dataset:
                if dataset.count != 1:
                    raise BandDecodeError(f"has {dataset.count} bands, expected 1")
                if dataset.dtypes[0] != "uint16":
                    raise BandDecodeError(f"is {dataset.dtypes[0]}, expected uint16")
                try:
                    check_raster(dataset, MAX_BAND_FILE_PIXELS)
                except DecodeLimitExceeded as error:
                    raise BandDecodeError(str(error)) from None
                array = dataset.read(1)
                crs = dataset.crs.to_string() if dataset.crs else None
                transform = dataset.transform if crs is not None else None
    except NotTheClaimedFormat as error:
        raise BandDecodeError(str(error)) from None
    except RasterioError as error:
        raise BandDecodeError(f"is not a readable raster ({error})") from None
    return DecodedBand(array=array, crs=crs, transform=transform)


def assemble_patch(patch_id: str, source: str, band_files: Mapping[str, bytes]) -> InputPatch | PatchRejection:
    """Decode a patch's band files and check each one is what a BigEarthNet patch holds; any fault rejects it.

    A missing band is not a fault here: the patch comes out with what it has and stacking decides.
    """
    if not band_files:
        return PatchRejection(patch_id, source, "no band files")
    bands: dict[str, np.ndarray] = {}
    grids: dict[str, DecodedBand] = {}
    for band in sorted(band_files):
        try:
            decoded = decode_band_file(band_files[band])
        except BandDecodeError as error:
            return PatchRejection(patch_id, source, f"band {band} {error}")
        expected_shape = patch_band_shape(band)
        if decoded.array.shape != expected_shape:
            height, width = decoded.array.shape
            return PatchRejection(
                patch_id,
                source,
                f"band {band} is {height}x{width}, expected {expected_shape[0]}x{expected_shape[1]} "
                f"({BAND_RESOLUTION_M[band]} m)",
            )
        bands[band] = decoded.array
        grids[band] = decoded
    crs, transform = _patch_grid(grids)
    return InputPatch(patch_id=patch_id, source=source, bands=bands, crs=crs, transform=transform)


def _patch_grid(grids: Mapping[str, DecodedBand]) -> tuple[str | None, Affine | None]:
    # The patch's grid is the 10 m grid; a patch without any 10 m band has no grid the models use.
    for band in _GRID_BANDS:
        decoded = grids.get(band)
        if decoded is not None and decoded.crs is not None:
            return decoded.crs, decoded.transform
    return None, None


def band_file_size_fault(band: str, size: int, limit: int) -> str | None:
    """The rejection reason for a band file over the size limit, or None."""
    if size > limit:
        return f"band {band} file is {size} bytes, over the limit of {limit} bytes"
    return None


__all__ = [
    "BandDecodeError",
    "BandFilePath",
    "DecodedBand",
    "assemble_patch",
    "band_file_size_fault",
    "decode_band_file",
    "decode_band_file_with_gdal",
    "parse_band_file_path",
]
