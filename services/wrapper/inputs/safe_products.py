"""Sentinel-2 L2A SAFE products, cut into non-overlapping 120 x 120 tiles at 10 m (60 x 60 at 20 m).

The ten needed bands of a granule are downloaded to a scratch folder (the JPEG 2000 decoder needs random access,
and every pixel is read anyway, so ranged reads would save nothing) and read in strips of tile rows, which bounds
memory whatever the scene size. Incomplete edge tiles and tiles with no-data (0 in any band, the L2A convention)
are dropped. A product that cannot be tiled (a band missing, grids that do not line up, a file that does not open)
is rejected as a whole with one rejection; a read failure after tiles have been yielded raises ``InputError``,
since a partial product cannot be taken back.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from contextlib import ExitStack
from typing import Iterator, Mapping

import numpy as np
from affine import Affine
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from services.core.metrics import Stage, timed_stage
from services.wrapper.gdal_policy import JPEG2000, NotTheClaimedFormat, open_raster_file
from services.wrapper.inputs.s3_listing import SAFE_BANDS_10M, SAFE_BANDS_20M, S3Client, SafeGranuleSource, s3_failure
from services.wrapper.inputs.decode_limits import MAX_SAFE_BAND_PIXELS
from services.wrapper.inputs.settings import InputLimits
from services.wrapper.inputs.types import (
    BAND_RESOLUTION_M,
    PATCH_SIZE_10M,
    InputError,
    InputItem,
    InputPatch,
    PatchRejection,
)

log = logging.getLogger(__name__)

NODATA_VALUE = 0
MAX_PRODUCT_METADATA_BYTES = 16 * 1024 * 1024  # MTD_MSIL2A.xml is ~60 KB
_GRID_TOLERANCE = 1e-6  # metres; transforms are read back from JP2 boxes as doubles


def read_safe_granule(
    client: S3Client, bucket: str, source: SafeGranuleSource, limits: InputLimits
) -> Iterator[InputItem]:
    """Tiles of one SAFE granule in S3 (or one rejection for the whole product)."""
    if source.missing_bands:
        yield PatchRejection(
            source.tile_id_prefix, source.product_dir, f"product lacks band files {', '.join(source.missing_bands)}"
        )
        return
    total_bytes = sum(obj.size for obj in source.band_objects.values())
    if total_bytes > limits.max_safe_granule_bytes:
        raise InputError(
            f"product bands total {total_bytes} bytes, over the limit of {limits.max_safe_granule_bytes} bytes "
            "(limit max_safe_granule_bytes)",
            source.product_dir,
        )
    boa_add_offset = product_boa_add_offset(client, bucket, source)
    if isinstance(boa_add_offset, str):
        yield PatchRejection(source.tile_id_prefix, source.product_dir, boa_add_offset)
        return
    transfer = TransferConfig(max_concurrency=limits.fetch_concurrency)
    with tempfile.TemporaryDirectory(prefix="eoml-safe-", dir=limits.scratch_dir) as scratch:
        band_paths: dict[str, str] = {}
        for band, obj in sorted(source.band_objects.items()):
            path = os.path.join(scratch, f"{band}.jp2")
            try:
                client.download_file(bucket, obj.key, path, Config=transfer)
            except (BotoCoreError, ClientError, Boto3Error) as error:
                raise s3_failure(error, f"downloading {obj.key}", client, obj.key) from None
            band_paths[band] = path
        yield from tile_safe_bands(band_paths, source.tile_id_prefix, source.product_dir, limits, boa_add_offset)


def product_boa_add_offset(client: S3Client, bucket: str, source: SafeGranuleSource) -> float | str:
    """The product's ``BOA_ADD_OFFSET`` from ``<product>.SAFE/MTD_MSIL2A.xml`` (0 when the product has no such
    file or element: baselines before 04.00), or the reason the product is refused (unreadable metadata)."""
    from services.wrapper.generic_kinds import InputRejected, product_boa_add_offset as offset_of

    key = f"{source.product_dir.rstrip('/')}/MTD_MSIL2A.xml"
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        with response["Body"] as body:
            metadata = body.read(MAX_PRODUCT_METADATA_BYTES + 1)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return 0.0
        raise s3_failure(error, f"reading {key}", client, key) from None
    except BotoCoreError as error:
        raise s3_failure(error, f"reading {key}", client, key) from None
    if len(metadata) > MAX_PRODUCT_METADATA_BYTES:
        return f"product metadata {key} is over {MAX_PRODUCT_METADATA_BYTES} bytes"
    try:
        return offset_of(metadata)
    except InputRejected as error:
        return f"product metadata {key}: {error}"


def tile_safe_bands(
    band_paths: Mapping[str, str], tile_id_prefix: str, source: str, limits: InputLimits, boa_add_offset: float = 0.0
) -> Iterator[InputItem]:
    """Tiles ``<tile_id_prefix>_<i>_<j>`` from local band files (B02, B03, B04, B08 at 10 m; B05..B12 at 20 m)."""
    tile = PATCH_SIZE_10M
    missing = [band for band in SAFE_BANDS_10M + SAFE_BANDS_20M if band not in band_paths]
    if missing:
        yield PatchRejection(tile_id_prefix, source, f"product lacks band files {', '.join(missing)}")
        return
    with ExitStack() as stack:
        datasets: dict[str, DatasetReader] = {}
        for band, path in sorted(band_paths.items()):
            try:
                # JP2OpenJPEG only (gdal_policy): a ``.jp2`` holding VRT XML or a PDS label is refused, not followed.
                datasets[band] = stack.enter_context(open_raster_file(path, JPEG2000))
            except NotTheClaimedFormat as error:
                yield PatchRejection(tile_id_prefix, source, f"band {band} {error}")
                return
            except RasterioError as error:
                reason = f"band {band} does not open as a JPEG 2000 raster ({error})"
                yield PatchRejection(tile_id_prefix, source, reason)
                return
        fault = _grid_fault(datasets)
        if fault is not None:
            yield PatchRejection(tile_id_prefix, source, fault)
            return
        grid = datasets[SAFE_BANDS_10M[0]]
        tile_rows, tile_cols = grid.height // tile, grid.width // tile
        if tile_rows == 0 or tile_cols == 0:
            yield PatchRejection(
                tile_id_prefix, source, f"scene is {grid.height}x{grid.width} at 10 m, smaller than one {tile}x{tile} tile"
            )
            return
        crs = grid.crs.to_string() if grid.crs else None
        kept = dropped_nodata = 0
        for first_row in range(0, tile_rows, limits.safe_tile_rows_per_read):
            strip_rows = min(limits.safe_tile_rows_per_read, tile_rows - first_row)
            try:
                strips = {band: _read_strip(ds, band, first_row, strip_rows, tile_cols) for band, ds in datasets.items()}
            except RasterioError as error:
                raise InputError(f"product band data is unreadable at tile row {first_row} ({error})", source) from None
            nodata = np.zeros((strip_rows, tile_cols), dtype=bool)
            for band, strip in strips.items():
                side = _tile_side(band)
                nodata |= (strip.reshape(strip_rows, side, tile_cols, side) == NODATA_VALUE).any(axis=(1, 3))
            for row_in_strip in range(strip_rows):
                i = first_row + row_in_strip
                for j in range(tile_cols):
                    if nodata[row_in_strip, j]:
                        dropped_nodata += 1
                        continue
                    kept += 1
                    yield InputPatch(
                        patch_id=f"{tile_id_prefix}_{i}_{j}",
                        source=source,
                        bands={band: _cut(strip, band, row_in_strip, j) for band, strip in strips.items()},
                        crs=crs,
                        transform=grid.transform @ Affine.translation(j * tile, i * tile),
                        i=i,
                        j=j,
                        boa_add_offset=boa_add_offset,
                    )
        log.info(
            "product tiled",
            extra={
                "source": source,
                "tile_id_prefix": tile_id_prefix,
                "tiles": kept,
                "dropped_nodata": dropped_nodata,
                "grid_tiles": tile_rows * tile_cols,
                "edge_pixels_dropped": (grid.height - tile_rows * tile, grid.width - tile_cols * tile),
            },
        )


def _tile_side(band: str) -> int:
    return PATCH_SIZE_10M * 10 // BAND_RESOLUTION_M[band]


@timed_stage(Stage.DECODE)
def _read_strip(dataset: DatasetReader, band: str, first_row: int, strip_rows: int, tile_cols: int) -> np.ndarray:
    side = _tile_side(band)
    window = Window(col_off=0, row_off=first_row * side, width=tile_cols * side, height=strip_rows * side)
    return dataset.read(1, window=window)


def _cut(strip: np.ndarray, band: str, row_in_strip: int, j: int) -> np.ndarray:
    side = _tile_side(band)
    # A copy, not a view: a view would keep the whole strip alive as long as the consumer holds the tile.
    return np.ascontiguousarray(strip[row_in_strip * side:(row_in_strip + 1) * side, j * side:(j + 1) * side])


def _grid_fault(datasets: Mapping[str, DatasetReader]) -> str | None:
    """Why the bands cannot be tiled together, or None: every band must lie on the 10 m grid's footprint."""
    for band, dataset in datasets.items():
        if dataset.count != 1 or dataset.dtypes[0] != "uint16":
            return f"band {band} has {dataset.count} band(s) of {dataset.dtypes[0]}, expected 1 of uint16"
        if dataset.width * dataset.height > MAX_SAFE_BAND_PIXELS:
            return f"band {band} is {dataset.height}x{dataset.width}, more than {MAX_SAFE_BAND_PIXELS} pixels"
    grid = datasets[SAFE_BANDS_10M[0]]
    for band in SAFE_BANDS_10M + SAFE_BANDS_20M:
        dataset = datasets[band]
        scale = BAND_RESOLUTION_M[band] // 10
        if dataset.crs != grid.crs:
            return f"band {band} has CRS {dataset.crs}, band {SAFE_BANDS_10M[0]} has {grid.crs}"
        expected = grid.transform @ Affine.scale(scale)
        if not all(math.isclose(a, b, abs_tol=_GRID_TOLERANCE) for a, b in zip(dataset.transform, expected)):
            return f"band {band} grid {tuple(dataset.transform)[:6]} does not line up with {tuple(expected)[:6]}"
        if dataset.height < grid.height // scale or dataset.width < grid.width // scale:
            return f"band {band} is {dataset.height}x{dataset.width}, too small for the {grid.height}x{grid.width} 10 m grid"
    return None
