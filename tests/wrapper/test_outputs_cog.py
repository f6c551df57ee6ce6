"""Every raster result is a Cloud-Optimized GeoTIFF: rio-cogeo's validator (GDAL's COG rules: tiled, IFDs before
the data, overviews in order) accepts it, it is tiled, compressed as stated, and has overviews where its size calls
for them. Written with the Wrapper's GDAL policy in force (GDAL_SKIP must not block the COG driver)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rio_cogeo.cogeo import cog_validate

from outputs_test_data import CREATED, GEOREFERENCED_PATCH, patch_metadata, read_sample_patch
from services.wrapper.gdal_policy import ensure_gdal_policy
from services.wrapper.generic_task import write_value_geotiff
from services.wrapper.outputs.class_raster import write_class_geotiff
from services.wrapper.outputs.rasters import COG_BLOCK_SIZE, geotiff_bytes, write_index_geotiff

UTM_33N = "EPSG:32633"
GRID = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5300000.0)


@pytest.fixture(autouse=True)
def _gdal_policy() -> None:
    ensure_gdal_policy()  # as in the Wrapper: the skipped drivers are not registered


def _check_cog(data: bytes, tmp_path: Path, name: str) -> rasterio.DatasetReader:
    path = tmp_path / name
    path.write_bytes(data)
    valid, errors, _warnings = cog_validate(str(path), strict=True)
    assert valid, errors
    dataset = rasterio.open(path)
    assert dataset.profile["tiled"] and dataset.block_shapes[0] == (COG_BLOCK_SIZE, COG_BLOCK_SIZE)
    return dataset


def test_a_large_index_raster_is_a_tiled_cog_with_overviews(tmp_path: Path) -> None:
    values = np.random.default_rng(3).random((1100, 1300), dtype=np.float32)
    output = write_index_geotiff(values, "uc6-locust", UTM_33N, GRID, "uc6-locust", "1", CREATED)
    with _check_cog(output.data, tmp_path, "index.tif") as dataset:
        assert dataset.overviews(1) == [2, 4, 8]  # halved until it fits one 256 block: 1300 -> 163
        assert dataset.compression.value == "ZSTD"
        assert dataset.crs.to_epsg() == 32633 and dataset.transform == GRID
        assert np.array_equal(dataset.read(1), values)
        assert dataset.tags()["product"] == "Locust Suitability Index"
        assert dataset.nodata == -1.0


def test_a_patch_sized_raster_is_one_tile_without_overviews(tmp_path: Path) -> None:
    metadata = patch_metadata(read_sample_patch(GEOREFERENCED_PATCH))
    codes = np.arange(120 * 120, dtype=np.uint16).reshape(120, 120) % 3
    data = write_class_geotiff(codes.astype(np.uint8), metadata.crs_wkt, metadata.affine, ["a", "b", "c"], [0, 1, 2],
                               {0: (255, 0, 0, 255), 1: (0, 255, 0, 255), 2: (0, 0, 255, 255)}, "m", "1", CREATED)
    with _check_cog(data, tmp_path, "classes.tif") as dataset:
        assert dataset.overviews(1) == []
        assert dataset.compression.value == "DEFLATE"
        assert dataset.colormap(1)[1] == (0, 255, 0, 255)
        assert dataset.descriptions == ("classes",) and dataset.nodata == 255
        assert np.array_equal(dataset.read(1), codes)


def test_value_rasters_and_uncompressed_rasters_are_cogs_and_byte_identical_when_rewritten(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    value_tif = write_value_geotiff(values, UTM_33N, GRID, "m", "1", CREATED.isoformat())
    with _check_cog(value_tif, tmp_path, "values.tif") as dataset:
        assert dataset.compression.value == "DEFLATE" and dataset.overviews(1) == [2]
    plain = geotiff_bytes(np.ones((2, 40, 40), dtype=np.uint16), None, None)
    with _check_cog(plain, tmp_path, "plain.tif") as dataset:
        assert dataset.compression is None  # COMPRESS=NONE, stated
        assert dataset.crs is None
    assert geotiff_bytes(values, UTM_33N, GRID, compress="ZSTD") == geotiff_bytes(values, UTM_33N, GRID, compress="ZSTD")


def test_the_checker_refuses_a_striped_geotiff(tmp_path: Path) -> None:
    """rio-cogeo's validator does reject a plain striped GeoTIFF (so the checks above can fail)."""
    path = tmp_path / "striped.tif"
    with rasterio.open(path, "w", driver="GTiff", width=600, height=600, count=1, dtype="uint8") as dataset:
        dataset.write(np.zeros((1, 600, 600), dtype=np.uint8))
    assert not cog_validate(str(path))[0]
