"""Sentinel-2 L2A SAFE products: real JPEG 2000 files written with rasterio, uploaded to a real S3-protocol server.

The synthetic scene is 250 x 370 pixels at 10 m: 2 x 3 whole 120 x 120 tiles and incomplete edges that must be
dropped. No-data (0) sits in the top-left tile of B02 and in one 20 m pixel of B11 that falls in tile (1, 2), so
those two tiles are dropped, and in the bottom edge rows of B04, which are outside every whole tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from services.wrapper.inputs import (
    InputError,
    InputLimits,
    InputPatch,
    PatchRejection,
    S3Access,
    read_input,
    tile_safe_bands,
)
from services.wrapper.inputs.s3_listing import S3Client

PRODUCT = "S2B_MSIL2A_20240101T100309_N0510_R122_T33UUP_20240101T120000"
GRANULE = "L2A_T33UUP_A035000_20240101T100305"
FILE_STEM = "T33UUP_20240101T100309"
ROWS_10M, COLS_10M = 250, 370
ORIGIN_X, ORIGIN_Y = 399960.0, 5300040.0
CRS = "EPSG:32633"
BANDS_10M = ("B02", "B03", "B04", "B08")
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
KEPT_TILES = [(0, 1), (0, 2), (1, 0), (1, 1)]


def _scene(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scene = {band: rng.integers(1, 10_000, (ROWS_10M, COLS_10M), dtype=np.uint16) for band in BANDS_10M}
    scene |= {band: rng.integers(1, 10_000, (ROWS_10M // 2, COLS_10M // 2), dtype=np.uint16) for band in BANDS_20M}
    scene["B02"][0:5, 0:5] = 0  # tile (0, 0)
    scene["B11"][70, 150] = 0  # 10 m rows 140-141, cols 300-301: tile (1, 2)
    scene["B04"][245:250, :] = 0  # edge rows below the last whole tile row
    return scene


def _write_jp2(path: Path, array: np.ndarray, pixel_size: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="JP2OpenJPEG",
        width=array.shape[1],
        height=array.shape[0],
        count=1,
        dtype="uint16",
        crs=CRS,
        transform=from_origin(ORIGIN_X, ORIGIN_Y, pixel_size, pixel_size),
        QUALITY=100,
        REVERSIBLE="YES",  # lossless, so tiles can be compared with the arrays written
        YCBCR420="NO",
    ) as dataset:
        dataset.write(array, 1)


def _write_safe(root: Path, scene: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """A SAFE tree as L2A products lay it out, with the files the reader must ignore beside the ones it needs."""
    img_data = root / f"{PRODUCT}.SAFE" / "GRANULE" / GRANULE / "IMG_DATA"
    files: dict[str, Path] = {}
    for band, array in scene.items():
        if band in skip:
            continue
        resolution = 10 if band in BANDS_10M else 20
        path = img_data / f"R{resolution}m" / f"{FILE_STEM}_{band}_{resolution}m.jp2"
        _write_jp2(path, array, float(resolution))
        files[band] = path
    # Present in real products, not needed: B02 again at 20 m, the true-colour image, the 60 m aerosol band.
    _write_jp2(img_data / "R20m" / f"{FILE_STEM}_B02_20m.jp2", np.ones((125, 185), np.uint16), 20.0)
    _write_jp2(img_data / "R10m" / f"{FILE_STEM}_TCI_10m.jp2", np.ones((ROWS_10M, COLS_10M), np.uint16), 10.0)
    _write_jp2(img_data / "R60m" / f"{FILE_STEM}_B01_60m.jp2", np.ones((42, 62), np.uint16), 60.0)
    (root / f"{PRODUCT}.SAFE" / "MTD_MSIL2A.xml").write_text("<metadata/>")
    return files


def _upload_tree(client: S3Client, bucket: str, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=prefix + path.relative_to(root).as_posix(), Body=path.read_bytes())


def _expected_tile(scene: dict[str, np.ndarray], band: str, i: int, j: int) -> np.ndarray:
    side = 120 if band in BANDS_10M else 60
    return scene[band][i * side:(i + 1) * side, j * side:(j + 1) * side]


def _check_tiles(items: list, scene: dict[str, np.ndarray], source: str) -> None:  # type: ignore[type-arg]
    assert all(isinstance(item, InputPatch) for item in items)
    assert [(item.i, item.j) for item in items] == KEPT_TILES
    for item in items:
        assert item.patch_id == f"{PRODUCT}_{item.i}_{item.j}"
        assert item.source == source
        assert item.crs == CRS
        assert item.transform == from_origin(ORIGIN_X + item.j * 1200, ORIGIN_Y - item.i * 1200, 10, 10)
        assert sorted(item.bands) == sorted(BANDS_10M + BANDS_20M)
        for band in BANDS_10M + BANDS_20M:
            assert item.bands[band].dtype == np.uint16
            np.testing.assert_array_equal(item.bands[band], _expected_tile(scene, band, item.i, item.j))


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    return _scene()


@pytest.fixture(scope="module")
def safe_tree(tmp_path_factory: pytest.TempPathFactory, scene: dict[str, np.ndarray]) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("safe")
    return root, _write_safe(root, scene)


def test_safe_product_in_s3_is_tiled_with_georeferencing(
    s3_access: S3Access, s3_client: S3Client, scene: dict[str, np.ndarray], safe_tree: tuple[Path, dict[str, Path]]
) -> None:
    root, _ = safe_tree
    _upload_tree(s3_client, s3_access.bucket_name, root, "scenes/2024/")

    items = list(read_input(s3_access, "scenes", limits=InputLimits(safe_tile_rows_per_read=1)))

    _check_tiles(items, scene, f"scenes/2024/{PRODUCT}.SAFE")


@pytest.mark.parametrize("tile_rows_per_read", [1, 2, 50])
def test_strip_height_does_not_change_the_tiles(
    tile_rows_per_read: int, scene: dict[str, np.ndarray], safe_tree: tuple[Path, dict[str, Path]]
) -> None:
    _, files = safe_tree

    items = list(
        tile_safe_bands(
            {band: str(path) for band, path in files.items()},
            PRODUCT,
            "local",
            InputLimits(safe_tile_rows_per_read=tile_rows_per_read),
        )
    )

    _check_tiles(items, scene, "local")


def test_product_missing_a_band_is_rejected_and_the_next_product_is_read(
    s3_access: S3Access, s3_client: S3Client, scene: dict[str, np.ndarray],
    safe_tree: tuple[Path, dict[str, Path]], tmp_path: Path,
) -> None:
    _write_safe(tmp_path, scene, skip=("B8A",))
    _upload_tree(s3_client, s3_access.bucket_name, tmp_path, "in/a/")
    _upload_tree(s3_client, s3_access.bucket_name, safe_tree[0], "in/b/")

    items = list(read_input(s3_access, "in"))

    rejection, tiles = items[0], items[1:]
    assert isinstance(rejection, PatchRejection)
    assert (rejection.patch_id, rejection.source) == (PRODUCT, f"in/a/{PRODUCT}.SAFE")
    assert "B8A" in rejection.reason
    _check_tiles(tiles, scene, f"in/b/{PRODUCT}.SAFE")


def test_bands_on_different_grids_reject_the_product(
    scene: dict[str, np.ndarray], safe_tree: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    _, files = safe_tree
    shifted = tmp_path / "B05_shifted.jp2"
    with rasterio.open(
        shifted, "w", driver="JP2OpenJPEG", width=185, height=125, count=1, dtype="uint16", crs=CRS,
        transform=from_origin(ORIGIN_X + 20, ORIGIN_Y, 20, 20), QUALITY=100, REVERSIBLE="YES",
    ) as dataset:
        dataset.write(scene["B05"], 1)
    band_paths = {band: str(path) for band, path in files.items()} | {"B05": str(shifted)}

    items = list(tile_safe_bands(band_paths, PRODUCT, "local", InputLimits()))

    assert len(items) == 1 and isinstance(items[0], PatchRejection)
    assert "B05" in items[0].reason and "line up" in items[0].reason


def test_unreadable_band_file_rejects_the_product(safe_tree: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    _, files = safe_tree
    junk = tmp_path / "B12.jp2"
    junk.write_bytes(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"garbage" * 100)
    band_paths = {band: str(path) for band, path in files.items()} | {"B12": str(junk)}

    items = list(tile_safe_bands(band_paths, PRODUCT, "local", InputLimits()))

    assert len(items) == 1 and isinstance(items[0], PatchRejection)
    assert "does not open" in items[0].reason


def test_granule_over_the_size_limit_is_an_input_error(
    s3_access: S3Access, s3_client: S3Client, safe_tree: tuple[Path, dict[str, Path]]
) -> None:
    _upload_tree(s3_client, s3_access.bucket_name, safe_tree[0], "in/")

    with pytest.raises(InputError, match="max_safe_granule_bytes"):
        list(read_input(s3_access, "in", limits=InputLimits(max_safe_granule_bytes=10_000)))
