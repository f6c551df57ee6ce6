"""uc5-cfactor and uc6-locust results: windows cut and reassembled, GeoTIFFs with production's tags read back."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from outputs_test_data import CREATED, GEOREFERENCED_PATCH, normalised_stack, patch_metadata, read_sample_patch
from services.wrapper.outputs import (
    OutputFormatError,
    TileRaster,
    assemble_window_raster,
    cut_cfactor_crops,
    cut_locust_windows,
    mosaic_tile_rasters,
    read_geotiff,
    window_transform,
    write_index_geotiff,
)

TILE_TRANSFORM = Affine(10.0, 0.0, 643200.0, 0.0, -10.0, 5798040.0)


def test_cfactor_crops_of_a_real_tile() -> None:
    stack = normalised_stack(read_sample_patch(GEOREFERENCED_PATCH), resampling="bilinear")
    windows = cut_cfactor_crops(stack)
    assert windows.crops.shape == (25, 10, 24, 24) and windows.crops.dtype == np.float32
    assert windows.grid_shape == (5, 5)
    for k in (0, 4, 7, 24):
        row, col = windows.rows[k], windows.cols[k]
        assert (row, col) == divmod(k, 5)
        assert np.array_equal(windows.crops[k], stack[:, row * 24 : (row + 1) * 24, col * 24 : (col + 1) * 24])


def test_cfactor_raster_puts_each_value_at_its_crop() -> None:
    windows = cut_cfactor_crops(np.zeros((10, 120, 120), dtype=np.float32))
    values = (np.arange(25, dtype=np.float32) / 25.0).reshape(25, 1)  # the model's [M, 1] output
    raster = assemble_window_raster(windows, values)
    assert raster.shape == (5, 5) and raster.dtype == np.float32
    assert raster[2, 3] == values[13, 0] and raster[4, 0] == values[20, 0]


def test_cfactor_geotiff_reads_back_with_crs_transform_and_tags() -> None:
    metadata = patch_metadata(read_sample_patch(GEOREFERENCED_PATCH))
    raster = np.linspace(0.0, 1.0, 25, dtype=np.float32).reshape(5, 5)
    raster[0, 0] = -1.0
    transform = window_transform(metadata.affine, 24)
    output = write_index_geotiff(raster, "uc5-cfactor", metadata.crs_wkt, transform, "uc5-cfactor", "1", CREATED)
    assert output.suffix == ".tif" and output.content_type.startswith("image/tiff")

    back = read_geotiff(output.data)
    assert back.array.dtype == np.float32 and back.array.shape == (1, 5, 5)
    assert np.array_equal(back.array[0], raster)
    assert back.nodata == -1.0
    assert back.compression is not None and back.compression.lower() == "zstd"
    assert CRS.from_wkt(back.crs_wkt) == CRS.from_epsg(32629)
    assert back.transform == Affine(240.0, 0.0, 643200.0, 0.0, -240.0, 5798040.0)
    assert back.band_descriptions == ("C-Factor",)
    assert back.tags["product"] == "C-Factor"
    assert back.tags["model"] == "uc5-cfactor" and back.tags["model_version"] == "1"
    assert back.tags["created"] == "2026-01-02T03:04:05+00:00"
    assert back.tags["TIFFTAG_DATETIME"] == "2026:01:02 03:04:05"


def test_locust_windows_skip_non_finite_input_and_leave_nodata() -> None:
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((4, 2, 30, 40), dtype=np.float32)  # 2 x 3 full windows; the rest is not covered
    stack[2, 1, 15, 20] = np.nan  # window (1, 1)
    stack[0, 0, 5, 38] = np.inf  # outside every full window: no effect
    windows = cut_locust_windows(stack)
    assert windows.grid_shape == (2, 3)
    assert list(zip(windows.rows.tolist(), windows.cols.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]
    assert windows.crops.shape == (5, 4, 2, 12, 12)
    assert np.array_equal(windows.crops[4], stack[:, :, 12:24, 24:36])

    probabilities = np.array([[0.1], [0.2], [0.3], [0.4], [0.5]], dtype=np.float32)
    raster = assemble_window_raster(windows, probabilities)
    assert np.array_equal(raster, np.array([[0.1, 0.2, 0.3], [0.4, -1.0, 0.5]], dtype=np.float32))

    output = write_index_geotiff(raster, "uc6-locust", CRS.from_epsg(4326).to_wkt(),
                                 window_transform(Affine(0.1, 0, 30.0, 0, -0.1, 20.0), 12), "uc6-locust", "1", CREATED)
    back = read_geotiff(output.data)
    assert back.band_descriptions == ("Locust Suitability Index",)
    assert back.tags["product"] == "Locust Suitability Index"
    assert np.array_equal(back.array[0], raster) and back.nodata == -1.0
    assert back.transform.a == pytest.approx(1.2) and back.transform.c == pytest.approx(30.0)


def test_geotiff_without_georeferencing() -> None:
    raster = np.full((5, 5), 0.5, dtype=np.float32)
    back = read_geotiff(write_index_geotiff(raster, "uc5-cfactor", None, None, "m", "1", CREATED).data)
    assert back.crs_wkt is None and back.transform is None
    assert np.array_equal(back.array[0], raster)


def test_index_geotiff_is_deterministic() -> None:
    raster = np.random.default_rng(1).random((5, 5), dtype=np.float32)
    args = ("uc5-cfactor", CRS.from_epsg(32629).to_wkt(), TILE_TRANSFORM, "uc5-cfactor", "1", CREATED)
    first = write_index_geotiff(raster, *args).data  # type: ignore[arg-type]
    assert write_index_geotiff(raster.copy(), *args).data == first  # type: ignore[arg-type]
    later = write_index_geotiff(raster, *args[:-1], CREATED.replace(day=3)).data  # type: ignore[arg-type]
    assert later != first


def test_mosaic_of_tiles_with_a_missing_one() -> None:
    # Three 5 x 5 tile rasters of a 2 x 2 tile product; tile (1, 0) was dropped (no data).
    def tile(i: int, j: int, value: float) -> TileRaster:
        tile_transform = TILE_TRANSFORM @ Affine.translation(j * 120, i * 120)
        return TileRaster(i, j, np.full((5, 5), value, dtype=np.float32), window_transform(tile_transform, 24))

    mosaic, transform = mosaic_tile_rasters([tile(0, 1, 0.2), tile(0, 0, 0.1), tile(1, 1, 0.4)])
    assert mosaic.shape == (10, 10)
    assert (mosaic[:5, :5] == np.float32(0.1)).all() and (mosaic[:5, 5:] == np.float32(0.2)).all()
    assert (mosaic[5:, :5] == -1.0).all() and (mosaic[5:, 5:] == np.float32(0.4)).all()
    assert transform == window_transform(TILE_TRANSFORM, 24)

    shifted = TileRaster(1, 0, np.zeros((5, 5), dtype=np.float32), window_transform(TILE_TRANSFORM, 24))
    with pytest.raises(OutputFormatError, match="grid"):
        mosaic_tile_rasters([tile(0, 0, 0.1), shifted])


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.full((5, 5), 1.5, dtype=np.float32), "outside"),
        (np.full((5, 5), np.nan, dtype=np.float32), "outside"),
        (np.full((5, 5), 0.5, dtype=np.float64), "float32"),
        (np.full((1, 5, 5), 0.5, dtype=np.float32), "shape"),
    ],
)
def test_bad_index_values_are_refused(values: np.ndarray, match: str) -> None:
    with pytest.raises(OutputFormatError, match=match):
        write_index_geotiff(values, "uc5-cfactor", None, None, "m", "1", CREATED)


def test_bad_index_arguments_are_refused() -> None:
    values = np.zeros((5, 5), dtype=np.float32)
    with pytest.raises(OutputFormatError, match="task"):
        write_index_geotiff(values, "classify", None, None, "m", "1", CREATED)  # type: ignore[arg-type]
    with pytest.raises(OutputFormatError, match="timezone-aware"):
        write_index_geotiff(values, "uc6-locust", None, None, "m", "1", datetime(2026, 1, 1))
    with pytest.raises(OutputFormatError, match="CRS|GeoTIFF"):
        write_index_geotiff(values, "uc6-locust", "not a crs", TILE_TRANSFORM, "m", "1", CREATED)
    with pytest.raises(OutputFormatError, match="not a readable GeoTIFF"):
        read_geotiff(b"II*\x00garbage")


@pytest.mark.parametrize(
    ("cut", "stack", "match"),
    [
        (cut_cfactor_crops, np.zeros((10, 100, 100), dtype=np.float32), "does not divide"),
        (cut_cfactor_crops, np.zeros((12, 120, 120), dtype=np.float32), "shape"),
        (cut_cfactor_crops, np.zeros((10, 120, 120), dtype=np.float64), "float32"),
        (cut_cfactor_crops, np.full((10, 120, 120), np.nan, dtype=np.float32), "non-finite"),
        (cut_locust_windows, np.zeros((3, 2, 24, 24), dtype=np.float32), "shape"),
        (cut_locust_windows, np.zeros((4, 2, 11, 24), dtype=np.float32), "smaller than one"),
        (cut_locust_windows, np.zeros((4, 2, 24, 24), dtype=np.float16), "float32"),
    ],
)
def test_bad_window_input_is_refused(cut: object, stack: np.ndarray, match: str) -> None:
    with pytest.raises(OutputFormatError, match=match):
        cut(stack)  # type: ignore[operator]


def test_assembly_needs_one_value_per_window() -> None:
    windows = cut_cfactor_crops(np.zeros((10, 120, 120), dtype=np.float32))
    with pytest.raises(OutputFormatError, match="25 window values"):
        assemble_window_raster(windows, np.zeros(24, dtype=np.float32))
    with pytest.raises(OutputFormatError, match=r"in \[0, 1\]"):
        assemble_window_raster(windows, np.full(25, 2.0, dtype=np.float32))
