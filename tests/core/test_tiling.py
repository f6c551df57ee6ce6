"""Tiling with overlap and padding, and blending back: the geometry and arithmetic of ukis-csmask's utils."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal.windows
import scipy.special
from ukis_csmask import utils as csmask_utils

from services.core import tiling


@pytest.mark.parametrize(("size", "alpha"), [(256, 0.4), (64, 0.2), (33, 0.5), (10, 0.0), (8, 0.9)])
def test_tukey_window_is_scipys(size: int, alpha: float) -> None:
    assert np.array_equal(tiling.tukey_window(size, alpha), scipy.signal.windows.tukey(size, alpha))


def test_softmax_is_scipys_bit_for_bit() -> None:
    logits = np.random.default_rng(0).normal(scale=5, size=(3, 4, 16, 16)).astype(np.float32)
    ours, reference = tiling.softmax(logits, axis=1), scipy.special.softmax(logits, axis=1)
    assert ours.dtype == reference.dtype == np.float32 and np.array_equal(ours, reference)


@pytest.mark.parametrize(("rows", "cols", "tile", "overlap"), [(40, 40, 32, 0.2), (100, 73, 32, 0.2), (64, 64, 16, 0.0), (5, 90, 16, 0.25)])
def test_tiles_are_the_reference_tiles_that_touch_the_image(rows: int, cols: int, tile: int, overlap: float) -> None:
    image = np.random.default_rng(1).random((3, rows, cols)).astype(np.float32)
    grid = tiling.tile_grid(rows, cols, tile, overlap)
    ours = tiling.cut_tiles(image, grid, "symmetric")
    reference = csmask_utils.tile_array(np.moveaxis(image, 0, -1), xsize=tile, ysize=tile, overlap=overlap)
    reference = np.moveaxis(reference, -1, 1)
    # The reference also cuts tiles lying in its padding only; ours are the ones touching the image, in its order.
    step, margin = grid.step, grid.margin
    per_row = len({c for _, c in grid.origins})
    padded_rows, padded_cols = grid.padded_shape
    count_rows, count_cols = -(-(padded_rows - tile + 1) // step), -(-(padded_cols - tile + 1) // step)
    assert reference.shape[0] == count_rows * count_cols  # the reference's row-major tile order
    picked = [reference[(row // step) * count_cols + col // step] for row, col in grid.origins]
    assert np.array_equal(ours, np.stack(picked))
    assert all(row < margin + rows and row + tile > margin for row, _ in grid.origins)
    assert len(grid) == per_row * len({r for r, _ in grid.origins})


def test_every_pixel_is_covered_and_average_blending_of_the_image_is_the_image() -> None:
    image = np.random.default_rng(2).random((2, 70, 45)).astype(np.float32)
    grid = tiling.tile_grid(70, 45, 32, 0.25)
    tiles = tiling.cut_tiles(image, grid, "reflect")
    blended = tiling.blend_tiles(tiles, grid, 0.25, "average")
    assert (blended.weights >= 1).all()
    np.testing.assert_allclose(blended.mean(), image, rtol=1e-6)
    overwritten = tiling.blend_tiles(tiles, grid, 0.25, "overwrite")
    np.testing.assert_array_equal(overwritten.sums, image)


def test_tukey_blending_equals_the_reference_untiling() -> None:
    rng = np.random.default_rng(3)
    rows, cols, tile, overlap = 90, 120, 32, 0.2
    grid = tiling.tile_grid(rows, cols, tile, overlap)
    reference_tiles = csmask_utils.tile_array(rng.random((rows, cols, 3)).astype(np.float32), tile, tile, overlap)
    probabilities = scipy.special.softmax(rng.normal(size=(len(reference_tiles), 3, tile, tile)).astype(np.float32), axis=1)
    reference = csmask_utils.untile_array(np.moveaxis(probabilities, 1, -1), (rows, cols, 3), overlap=overlap,
                                          smooth_blending=True)
    padded_cols = grid.padded_shape[1]
    count_cols = -(-(padded_cols - tile + 1) // grid.step)
    ours = tiling.blend_tiles(
        np.stack([probabilities[(r // grid.step) * count_cols + c // grid.step] for r, c in grid.origins]),
        grid, overlap, "tukey",
    )
    assert ours.sums.dtype == np.float32
    assert np.array_equal(np.moveaxis(ours.sums, 0, -1), reference)
    assert np.array_equal(np.argmax(ours.sums, axis=0), np.argmax(reference, axis=-1))


def test_bad_geometry_is_refused() -> None:
    with pytest.raises(ValueError, match="overlap must be in"):
        tiling.tile_grid(10, 10, 8, 0.5)
    with pytest.raises(ValueError, match="nothing to tile"):
        tiling.tile_grid(0, 10, 8, 0.1)
    grid = tiling.tile_grid(10, 10, 8, 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        tiling.blend_tiles(np.zeros((len(grid) + 1, 1, 8, 8)), grid, 0.1)
