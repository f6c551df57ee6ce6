"""The tifffile fast path for band files reads exactly what GDAL reads, and leaves every other file to GDAL.

Each case writes a band file with GDAL itself (rasterio), then decodes it twice: through the Wrapper's entry point
(``decode_band_file``, fast path first) and through GDAL alone (``decode_band_file_with_gdal``). Plain files must
take the fast path and agree pixel for pixel, CRS string and transform; the others must not take it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS
from rasterio.io import MemoryFile

from services.wrapper.inputs.band_files import BandDecodeError, decode_band_file, decode_band_file_with_gdal
from services.wrapper.inputs.decode_limits import MAX_BAND_FILE_PIXELS
from services.wrapper.inputs.plain_geotiff import decode_plain_geotiff

SAMPLE_PATCHES = Path(__file__).resolve().parents[2] / "data" / "bigearthnet-sample" / "patches"
UTM_TRANSFORM = Affine(10.0, 0.0, 399960.0, 0.0, -10.0, 5800020.0)


def geotiff(rows: int = 120, cols: int = 120, dtype: str = "uint16", count: int = 1, crs: Any = "EPSG:32633",
            transform: Affine | None = UTM_TRANSFORM, seed: int = 0, area_or_point: str = "",
            **creation: Any) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 12000, size=(count, rows, cols)).astype(dtype)
    profile: dict[str, Any] = {"driver": "GTiff", "width": cols, "height": rows, "count": count, "dtype": dtype,
                               **creation}
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    with MemoryFile() as memory:
        with memory.open(**profile) as dataset:
            if area_or_point:
                dataset.update_tags(AREA_OR_POINT=area_or_point)
            dataset.write(pixels)
        return memory.read()


def assert_same_decoding(data: bytes) -> None:
    fast, reference = decode_band_file(data), decode_band_file_with_gdal(data)
    assert fast.array.dtype == reference.array.dtype == np.uint16
    np.testing.assert_array_equal(fast.array, reference.array)
    assert fast.crs == reference.crs
    assert fast.transform == reference.transform


PLAIN = {
    "utm-uncompressed": {},
    "utm-deflate": {"compress": "deflate"},
    "utm-deflate-predictor": {"compress": "deflate", "predictor": 2},
    "utm-lzw-predictor": {"compress": "lzw", "predictor": 2},
    "utm-tiled-lzw": {"compress": "lzw", "tiled": True, "blockxsize": 64, "blockysize": 64},
    "utm-big-endian": {"ENDIANNESS": "BIG"},
    "utm-south-60m": {"crs": "EPSG:32734", "rows": 20, "cols": 20,
                      "transform": Affine(60.0, 0.0, 500000.0, 0.0, -60.0, 7100040.0)},
    "laea-europe": {"crs": "EPSG:3035", "transform": Affine(10.0, 0.0, 4321000.0, 0.0, -10.0, 3210000.0)},
    "no-georeferencing": {"crs": None, "transform": None},
}


@pytest.mark.parametrize("case", sorted(PLAIN))
def test_plain_band_files_take_the_fast_path_and_read_as_gdal_reads_them(case: str) -> None:
    options = dict(PLAIN[case])
    data = geotiff(**options)
    assert decode_plain_geotiff(data, MAX_BAND_FILE_PIXELS) is not None, "a plain band file left the fast path"
    assert_same_decoding(data)


def test_every_bundled_sample_band_file_reads_the_same_on_both_paths() -> None:
    files = sorted(SAMPLE_PATCHES.glob("*/*.tif"))
    assert len(files) >= 42 * 12
    for path in files:
        data = path.read_bytes()
        assert decode_plain_geotiff(data, MAX_BAND_FILE_PIXELS) is not None, path.name
        assert_same_decoding(data)


OTHERS = {
    "geographic-crs": {"crs": "EPSG:4326", "transform": Affine(0.0001, 0.0, 10.0, 0.0, -0.0001, 50.0)},
    "crs-without-epsg-code": {"crs": CRS.from_proj4("+proj=utm +zone=33 +ellps=intl +units=m +no_defs")},
    "pixel-is-point": {"area_or_point": "Point"},
    "rotated-transform": {"transform": Affine(10.0, 1.0, 399960.0, 1.0, -10.0, 5800020.0)},
    "bigtiff": {"BIGTIFF": "YES"},
    "zstd": {"compress": "zstd"},
}


@pytest.mark.parametrize("case", sorted(OTHERS))
def test_files_outside_the_plain_form_are_left_to_gdal(case: str) -> None:
    data = geotiff(**OTHERS[case])
    assert decode_plain_geotiff(data, MAX_BAND_FILE_PIXELS) is None
    assert_same_decoding(data)


@pytest.mark.parametrize("options, message", [
    ({"dtype": "float32"}, "expected uint16"),
    ({"count": 2}, "expected 1"),
])
def test_bands_gdal_refuses_are_refused_with_gdals_message(options: dict[str, Any], message: str) -> None:
    data = geotiff(**options)
    assert decode_plain_geotiff(data, MAX_BAND_FILE_PIXELS) is None
    with pytest.raises(BandDecodeError, match=message):
        decode_band_file(data)


def test_a_band_over_the_pixel_limit_is_left_to_gdals_limit_check() -> None:
    data = geotiff(rows=64, cols=64)
    assert decode_plain_geotiff(data, max_pixels=64 * 64 - 1) is None
    assert decode_plain_geotiff(data, max_pixels=64 * 64) is not None


def test_a_truncated_file_is_not_decoded_by_the_fast_path() -> None:
    data = geotiff(compress="deflate")
    assert decode_plain_geotiff(data[: len(data) // 2], MAX_BAND_FILE_PIXELS) is None
    with pytest.raises(BandDecodeError):
        decode_band_file(data[: len(data) // 2])
