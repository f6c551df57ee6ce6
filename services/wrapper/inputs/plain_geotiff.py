"""A fast path for the band files BigEarthNet ships: one-page, single-band uint16 (Geo)TIFFs read with tifffile.

Opening a 120 x 120 band through GDAL (``gdal_policy.open_raster_bytes``: a ``/vsimem`` file, a rasterio
environment, a dataset) costs about 1 ms, against ~0.17 ms for tifffile on the same bytes; a patch has 12 band
files, so GDAL alone caps a Wrapper core at ~80 patches/s (issue 21, ``bench/README.md``).

The fast path takes only files whose every property is one it can interpret exactly as GDAL's GTiff driver does:
classic TIFF (either byte order), one image, one sample of 16-bit unsigned integers, chunky, strips or tiles
compressed with none / LZW / Deflate (predictor none or horizontal), and either no georeferencing at all or the
plain GeoTIFF form GDAL reads without ambiguity: one tie point, a pixel scale, ``PixelIsArea``, and a CRS given by
an EPSG code alone (the GeoTIFF 1.1 keys GDAL turns into ``EPSG:<code>``). Anything else, including any file it
cannot parse, returns ``None`` and the caller decodes through GDAL as before, so a file's outcome (pixels,
georeferencing, or the refusal and its message) never depends on the path, and the driver restrictions and
decode limits of ``gdal_policy`` / ``decode_limits`` stay the one rule for everything unusual.
tifffile runs no GDAL driver and opens no other file: it only parses the bytes it is given.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import tifffile
from affine import Affine

log = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")  # classic TIFF only; BigTIFF goes through GDAL
_COMPRESSIONS = {1, 5, 8, 32946}  # none, LZW, Deflate (Adobe), Deflate (old code)
_PREDICTORS = {1, 2}

# GeoTIFF tags and keys (OGC GeoTIFF 1.1, section 7).
_MODEL_PIXEL_SCALE = 33550
_MODEL_TIEPOINT = 33922
_MODEL_TRANSFORMATION = 34264
_GEO_KEY_DIRECTORY = 34735
_GEO_TAGS = {_MODEL_PIXEL_SCALE, _MODEL_TIEPOINT, _MODEL_TRANSFORMATION, _GEO_KEY_DIRECTORY, 34736, 34737}
_GT_MODEL_TYPE, _GT_RASTER_TYPE, _GT_CITATION = 1024, 1025, 1026
_GEOG_CITATION = 2049
_PROJECTED_CS_TYPE, _PCS_CITATION = 3072, 3073
_MODEL_PROJECTED = 1
_PIXEL_IS_AREA = 1
# Keys that only name or restate what a projected EPSG code defines; any other key (a geographic CRS type included)
# could modify or replace the CRS: GDAL then.
_PLAIN_KEYS = {_GT_MODEL_TYPE, _GT_RASTER_TYPE, _GT_CITATION, _GEOG_CITATION, _PROJECTED_CS_TYPE, _PCS_CITATION}
# Unit keys GDAL writes beside the EPSG code; they are plain only when they restate the code's own units.
_GEOG_ANGULAR_UNITS, _PROJ_LINEAR_UNITS = 2054, 3076
_DEGREE, _METRE = 9102, 9001
_RESTATED_UNITS = {_GEOG_ANGULAR_UNITS: _DEGREE, _PROJ_LINEAR_UNITS: _METRE}


def _metric_projected_code(code: int) -> bool:
    """The projected CRSs of Sentinel-2 data (metre units): WGS 84 / UTM north and south, ETRS89 / UTM, ETRS89-LAEA."""
    return 32601 <= code <= 32660 or 32701 <= code <= 32760 or 25828 <= code <= 25838 or code == 3035


@dataclass(frozen=True, slots=True)
class PlainBand:
    array: np.ndarray  # uint16 [rows, cols]
    crs: str | None  # "EPSG:<code>", as rasterio's CRS.to_string() gives for an EPSG-coded CRS
    transform: Affine | None


def decode_plain_geotiff(data: bytes, max_pixels: int) -> PlainBand | None:
    """The band in ``data`` when it is a plain (Geo)TIFF this path reads exactly as GDAL would, else ``None``."""
    if data[:4] not in _TIFF_MAGIC:
        return None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            return _decode(tiff, len(data), max_pixels)
    except Exception as error:  # noqa: BLE001 - any parse failure: GDAL decides and words the refusal
        log.debug("band file left to GDAL", extra={"reason": f"{type(error).__name__}"})
        return None


def _decode(tiff: tifffile.TiffFile, size: int, max_pixels: int) -> PlainBand | None:
    if tiff.is_bigtiff or len(tiff.pages) != 1:
        return None
    page = tiff.pages[0]
    if not isinstance(page, tifffile.TiffPage) or page.subifds:
        return None
    if (page.samplesperpixel != 1 or page.bitspersample != 16 or page.sampleformat != 1
            or int(page.compression) not in _COMPRESSIONS or int(page.predictor) not in _PREDICTORS
            or page.imagedepth != 1 or page.planarconfig != 1 or len(page.shape) != 2):
        return None
    rows, cols = page.imagelength, page.imagewidth
    if rows <= 0 or cols <= 0 or rows * cols > max_pixels:
        return None
    if any(offset + count > size for offset, count in zip(page.dataoffsets, page.databytecounts)):
        return None
    georeferencing = _georeferencing(page)
    if georeferencing is None:
        return None
    array = page.asarray()
    if array.dtype != np.uint16 or array.shape != (rows, cols):
        return None
    crs, transform = georeferencing
    return PlainBand(np.ascontiguousarray(array, dtype=np.dtype("uint16")), crs, transform)


def _georeferencing(page: tifffile.TiffPage) -> tuple[str | None, Affine | None] | None:
    """(crs, transform) of the plain forms; (None, None) for no geo tags at all; None for anything else."""
    present = {code for code in _GEO_TAGS if code in page.tags}
    if not present:
        return None, None
    # GeoDoubleParams / GeoAsciiParams may be present: only citation keys may point into them (_geo_keys).
    if _MODEL_TRANSFORMATION in present or not {_MODEL_PIXEL_SCALE, _MODEL_TIEPOINT, _GEO_KEY_DIRECTORY} <= present:
        return None
    keys = _geo_keys(page.tags[_GEO_KEY_DIRECTORY].value)
    if keys is None:
        return None
    for key, unit in _RESTATED_UNITS.items():
        if keys.pop(key, unit) != unit:
            return None
    if not set(keys) <= _PLAIN_KEYS:
        return None
    if keys.get(_GT_RASTER_TYPE, _PIXEL_IS_AREA) != _PIXEL_IS_AREA:
        return None
    code = keys.get(_PROJECTED_CS_TYPE)
    # Geographic CRSs, and projected ones of other units or datums, are left to GDAL: Sentinel-2 bands are UTM.
    if keys.get(_GT_MODEL_TYPE) != _MODEL_PROJECTED or code is None or not _metric_projected_code(code):
        return None
    scale = tuple(float(v) for v in page.tags[_MODEL_PIXEL_SCALE].value)
    tiepoint = tuple(float(v) for v in page.tags[_MODEL_TIEPOINT].value)
    if len(scale) != 3 or len(tiepoint) != 6 or scale[0] <= 0 or scale[1] <= 0:
        return None
    if not all(np.isfinite(scale)) or not all(np.isfinite(tiepoint)):
        return None
    i, j, _k, x, y, _z = tiepoint
    transform = Affine(scale[0], 0.0, x - i * scale[0], 0.0, -scale[1], y + j * scale[1])
    return f"EPSG:{code}", transform


def _geo_keys(directory: object) -> dict[int, int] | None:
    """Key -> SHORT value of a GeoKeyDirectory whose keys all hold their value inline (location 0), else None."""
    values = [int(v) for v in directory]  # type: ignore[union-attr]
    if len(values) < 4 or values[0] != 1:
        return None
    count = values[3]
    if len(values) != 4 + 4 * count:
        return None
    keys: dict[int, int] = {}
    for entry in range(count):
        key, location, number, value = values[4 + 4 * entry: 8 + 4 * entry]
        if key in (_GT_CITATION, _GEOG_CITATION, _PCS_CITATION):
            keys[key] = -1  # ASCII citations (location 34737) only name the CRS
            continue
        if location != 0 or number != 1 or key in keys:
            return None
        keys[key] = value
    return keys


__all__ = ["PlainBand", "decode_plain_geotiff"]
