"""Cloud-Optimized GeoTIFFs in memory, and the ``uc5-cfactor`` / ``uc6-locust`` result rasters.

Every raster result is written by GDAL's COG driver (``cog_bytes``): tiled in ``COG_BLOCK_SIZE`` blocks, the
overviews GDAL's ``OVERVIEWS=AUTO`` makes (halving until the image fits one block: none for a 120 x 120 patch),
and the compression named by the caller (``NONE`` when none is asked for), so a reader can fetch a window or a
reduced view with HTTP range requests instead of downloading the whole file.

UC5 and UC6 results are float32 GeoTIFFs with values in [0, 1], nodata -1 and ZSTD compression, as production
writes them (contracts doc section 7). The band description names the quantity (``C-Factor``,
``Locust Suitability Index``); dataset tags record ``product`` (the same name), ``model``, ``model_version`` and
``created`` (ISO 8601, UTC), and ``TIFFTAG_DATETIME`` holds the same instant. ``created`` is a parameter, never the
clock: writing the same result twice gives byte-identical files, so a redelivered message overwrites in place.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, Mapping, Sequence

import numpy as np
from affine import Affine
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile

from services.wrapper.gdal_policy import GTIFF, CrsRefused, NotTheClaimedFormat, open_raster_bytes, parse_crs
from services.wrapper.outputs.types import OutputFile, OutputFormatError

GEOTIFF_CONTENT_TYPE = "image/tiff; application=geotiff"
GEOTIFF_SUFFIX = ".tif"
# COG tile side: 256 keeps a 120 x 120 patch to one tile and a granule-sized raster to ~1700 tiles per band.
COG_BLOCK_SIZE = 256
INDEX_NODATA = -1.0

IndexTask = Literal["uc5-cfactor", "uc6-locust"]
# The name production gives each index raster (band description and ``product`` tag).
INDEX_PRODUCT_NAMES: Mapping[IndexTask, str] = {
    "uc5-cfactor": "C-Factor",
    "uc6-locust": "Locust Suitability Index",
}


@dataclass(frozen=True, slots=True)
class GeoRaster:
    """A GeoTIFF read back: pixels [bands, rows, cols] and everything the tests and the next step look at."""

    array: np.ndarray
    crs_wkt: str | None
    transform: Affine | None
    nodata: float | None
    compression: str | None
    tags: dict[str, str] = field(default_factory=dict)
    band_descriptions: tuple[str | None, ...] = ()

    def __repr__(self) -> str:
        crs = "yes" if self.crs_wkt else "none"
        return f"GeoRaster({self.array.dtype} {list(self.array.shape)}, crs={crs}, nodata={self.nodata})"


def _to_affine(transform: Affine | Sequence[float] | None) -> Affine | None:
    if transform is None:
        return None
    if isinstance(transform, Affine):
        return transform
    values = tuple(float(v) for v in transform)
    if len(values) not in (6, 9):
        raise OutputFormatError(f"transform must have 6 coefficients (a, b, c, d, e, f), got {len(values)}")
    return Affine(*values[:6])


def geotiff_bytes(
    array: np.ndarray,
    crs_wkt: str | None,
    transform: Affine | Sequence[float] | None,
    nodata: float | None = None,
    compress: str | None = None,
    band_descriptions: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
) -> bytes:
    """A COG of ``array`` ([rows, cols] or [bands, rows, cols]) written by GDAL into memory (``cog_bytes``).

    No CRS/transform (a patch without georeferencing) writes a plain TIFF grid. GDAL writes no clock time of its
    own, so the bytes depend on the arguments only.
    """
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3) or 0 in array.shape:
        raise OutputFormatError(f"raster must be a non-empty [rows, cols] or [bands, rows, cols] array")
    stack = array[None] if array.ndim == 2 else array
    affine = _to_affine(transform)
    profile: dict[str, object] = {"width": stack.shape[2], "height": stack.shape[1], "count": stack.shape[0],
                                  "dtype": stack.dtype.name}
    if crs_wkt is not None:
        try:
            profile["crs"] = parse_crs(crs_wkt)
        except (CRSError, CrsRefused) as error:
            raise OutputFormatError(f"CRS {str(crs_wkt)[:80]!r} is not a CRS GDAL understands: {error}") from None
    if affine is not None:
        profile["transform"] = affine
    if nodata is not None:
        profile["nodata"] = nodata
    return cog_bytes(stack, profile, compress or "NONE", band_descriptions, tags or {}, what="GeoTIFF")


def cog_bytes(
    stack: np.ndarray,
    profile: Mapping[str, object],
    compress: str,
    band_descriptions: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
    colour_table: Mapping[int, tuple[int, int, int, int]] | None = None,
    what: str = "GeoTIFF",
) -> bytes:
    """``stack`` [bands, rows, cols] as a Cloud-Optimized GeoTIFF, written by GDAL's COG driver into memory.

    The COG driver only copies a finished dataset (GDAL CreateCopy): rasterio fills a MEM dataset first and GDAL
    writes the tiles, the overviews and then the header in COG order when it is closed. The bytes depend on the
    arguments only (GDAL writes no clock time), so a redelivered result is byte-identical.
    """
    options = {**profile, "driver": "COG", "compress": compress, "blocksize": COG_BLOCK_SIZE,
               "overviews": "AUTO", "bigtiff": "IF_SAFER"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with MemoryFile() as memory_file:
                with memory_file.open(**options) as dataset:
                    dataset.write(stack)
                    for index, description in enumerate(band_descriptions, start=1):
                        dataset.set_band_description(index, description)
                    if colour_table is not None:
                        dataset.write_colormap(1, dict(colour_table))
                    if tags:
                        dataset.update_tags(**tags)
                return bytes(memory_file.read())
    except RasterioError as error:
        raise OutputFormatError(f"GDAL could not write the {what}: {error}") from None


def read_geotiff(data: bytes) -> GeoRaster:
    """Read a GeoTIFF held in memory (all bands); GDAL's GTiff driver only (``gdal_policy``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with open_raster_bytes(bytes(data), GTIFF) as dataset:
                georeferenced = dataset.crs is not None
                return GeoRaster(
                    array=dataset.read(),
                    crs_wkt=dataset.crs.to_wkt() if georeferenced else None,
                    transform=dataset.transform if georeferenced or not dataset.transform.is_identity else None,
                    nodata=dataset.nodata,
                    compression=dataset.compression.value if dataset.compression else None,
                    tags=dict(dataset.tags()),
                    band_descriptions=tuple(dataset.descriptions),
                )
    except (NotTheClaimedFormat, RasterioError) as error:
        raise OutputFormatError(f"not a readable GeoTIFF: {error}") from None


def _check_created(created: datetime) -> datetime:
    if not isinstance(created, datetime) or created.tzinfo is None:
        raise OutputFormatError(f"created must be a timezone-aware datetime, got {created!r}")
    return created.astimezone(timezone.utc)


def check_index_values(values: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] holding values in [0, 1] or the nodata value -1."""
    if not isinstance(values, np.ndarray) or values.dtype != np.float32:
        got = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
        raise OutputFormatError(f"index raster must be float32, got {got}")
    if values.ndim != 2 or 0 in values.shape:
        raise OutputFormatError(f"index raster must have shape [rows >= 1, cols >= 1], got {list(values.shape)}")
    valid = ((values >= 0.0) & (values <= 1.0)) | (values == INDEX_NODATA)
    if not valid.all():
        bad = values[~valid]
        raise OutputFormatError(
            f"index raster has {bad.size} values outside [0, 1] that are not the nodata value -1 "
            f"(first: {float(bad[0])!r}); write -1 where there is no value"
        )
    return values


def write_index_geotiff(
    values: np.ndarray,
    task: IndexTask,
    crs_wkt: str | None,
    transform: Affine | Sequence[float] | None,
    model_name: str,
    model_version: str,
    created: datetime,
) -> OutputFile:
    """The UC5 C-factor or UC6 locust suitability raster: float32, 0..1, nodata -1, ZSTD, tagged."""
    if task not in INDEX_PRODUCT_NAMES:
        raise OutputFormatError(f"task must be one of {sorted(INDEX_PRODUCT_NAMES)}, got {task!r}")
    check_index_values(values)
    created_utc = _check_created(created)
    product = INDEX_PRODUCT_NAMES[task]
    data = geotiff_bytes(
        values,
        crs_wkt,
        transform,
        nodata=INDEX_NODATA,
        compress="ZSTD",
        band_descriptions=(product,),
        tags={
            "product": product,
            "model": model_name,
            "model_version": model_version,
            "created": created_utc.isoformat(),
            "TIFFTAG_DATETIME": created_utc.strftime("%Y:%m:%d %H:%M:%S"),
        },
    )
    return OutputFile(data=data, content_type=GEOTIFF_CONTENT_TYPE, suffix=GEOTIFF_SUFFIX)


__all__ = [
    "GEOTIFF_CONTENT_TYPE",
    "COG_BLOCK_SIZE",
    "GEOTIFF_SUFFIX",
    "GeoRaster",
    "INDEX_NODATA",
    "INDEX_PRODUCT_NAMES",
    "IndexTask",
    "check_index_values",
    "cog_bytes",
    "geotiff_bytes",
    "read_geotiff",
    "write_index_geotiff",
]
