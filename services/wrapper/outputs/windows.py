"""Cutting model inputs into windows and putting the per-window outputs back on a grid (UC5, UC6).

UC5 (``uc5-cfactor``): the model reads ``input_sentinel2_10_bands_24`` [10, 24, 24] and returns one C-factor, so a
120 x 120 tile at 10 m is cut into 5 x 5 non-overlapping crops and gives a 5 x 5 raster at 240 m (the tile's
transform scaled by 24).

UC6 (``uc6-locust``): the model reads ``input`` [4, 2, 12, 12] (4 time steps x precipitation/temperature x 12 x 12
cells) and returns one probability, so a [4, 2, H, W] stack is cut with stride 12 into floor(H/12) x floor(W/12)
windows (rows and columns beyond the last full window are not covered) and gives a raster at 12 x the input cell
size. A window with any non-finite input value (sea, missing data) is not sent to the model and is nodata (-1).

Crops come out in row-major window order; ``rows``/``cols`` say where each one belongs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from affine import Affine

from services.wrapper.outputs.rasters import INDEX_NODATA
from services.wrapper.outputs.types import OutputFormatError, compose

CFACTOR_CROP = 24
CFACTOR_BANDS = 10
LOCUST_WINDOW = 12
LOCUST_TIME_STEPS = 4
LOCUST_VARIABLES = 2


@dataclass(frozen=True, slots=True)
class Windows:
    """Model inputs cut from one grid: ``crops[k]`` belongs at window (``rows[k]``, ``cols[k]``) of ``grid_shape``."""

    crops: np.ndarray  # float32 [M, ..., window, window]
    rows: np.ndarray  # int64 [M]
    cols: np.ndarray  # int64 [M]
    grid_shape: tuple[int, int]
    window: int

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __repr__(self) -> str:
        return f"Windows({len(self)} of {self.grid_shape[0]}x{self.grid_shape[1]}, crops {list(self.crops.shape)})"


def _window_view(array: np.ndarray, window: int) -> tuple[np.ndarray, tuple[int, int]]:
    """[..., H, W] -> [R, C, ..., window, window] over the full windows (a copy, C-contiguous)."""
    rows, cols = array.shape[-2] // window, array.shape[-1] // window
    lead = array.shape[:-2]
    trimmed = array[..., : rows * window, : cols * window]
    blocks = trimmed.reshape(*lead, rows, window, cols, window)
    # [..., R, w, C, w] -> [R, C, ..., w, w]
    n = len(lead)
    order = (n, n + 2, *range(n), n + 1, n + 3)
    return np.ascontiguousarray(blocks.transpose(order)), (rows, cols)


def window_transform(transform: Affine | Sequence[float], window: int) -> Affine:
    """The transform of the window grid: same origin, pixels ``window`` times larger."""
    affine = transform if isinstance(transform, Affine) else Affine(*tuple(transform)[:6])
    return compose(affine, Affine.scale(window))


def cut_cfactor_crops(stack: np.ndarray) -> Windows:
    """A normalised 10-band tile [10, H, W] (H, W multiples of 24; 120 x 120 in practice) -> crops [M, 10, 24, 24]."""
    if not isinstance(stack, np.ndarray) or stack.dtype != np.float32:
        got = stack.dtype if isinstance(stack, np.ndarray) else type(stack).__name__
        raise OutputFormatError(f"UC5 stack must be float32, got {got}")
    if stack.ndim != 3 or stack.shape[0] != CFACTOR_BANDS or 0 in stack.shape:
        raise OutputFormatError(f"UC5 stack must have shape [{CFACTOR_BANDS}, H, W], got {list(stack.shape)}")
    if stack.shape[1] % CFACTOR_CROP or stack.shape[2] % CFACTOR_CROP:
        raise OutputFormatError(
            f"UC5 tile of {stack.shape[1]}x{stack.shape[2]} pixels does not divide into {CFACTOR_CROP}x{CFACTOR_CROP} crops"
        )
    if not np.isfinite(stack).all():
        raise OutputFormatError("UC5 stack holds non-finite values")
    blocks, grid = _window_view(stack, CFACTOR_CROP)
    rows, cols = np.divmod(np.arange(grid[0] * grid[1], dtype=np.int64), grid[1])
    return Windows(blocks.reshape(-1, CFACTOR_BANDS, CFACTOR_CROP, CFACTOR_CROP), rows, cols, grid, CFACTOR_CROP)


def cut_locust_windows(stack: np.ndarray) -> Windows:
    """A [4, 2, H, W] time stack -> the windows [M, 4, 2, 12, 12] whose values are all finite."""
    if not isinstance(stack, np.ndarray) or stack.dtype != np.float32:
        got = stack.dtype if isinstance(stack, np.ndarray) else type(stack).__name__
        raise OutputFormatError(f"UC6 stack must be float32, got {got}")
    lead = (LOCUST_TIME_STEPS, LOCUST_VARIABLES)
    if stack.ndim != 4 or stack.shape[:2] != lead:
        raise OutputFormatError(f"UC6 stack must have shape [{lead[0]}, {lead[1]}, H, W], got {list(stack.shape)}")
    if stack.shape[2] < LOCUST_WINDOW or stack.shape[3] < LOCUST_WINDOW:
        raise OutputFormatError(
            f"UC6 grid of {stack.shape[2]}x{stack.shape[3]} cells is smaller than one "
            f"{LOCUST_WINDOW}x{LOCUST_WINDOW} window"
        )
    blocks, grid = _window_view(stack, LOCUST_WINDOW)
    flat = blocks.reshape(grid[0] * grid[1], *lead, LOCUST_WINDOW, LOCUST_WINDOW)
    finite = np.isfinite(flat).reshape(flat.shape[0], -1).all(axis=1)
    keep = np.flatnonzero(finite)
    rows, cols = np.divmod(keep.astype(np.int64), grid[1])
    return Windows(flat[keep], rows, cols, grid, LOCUST_WINDOW)


def assemble_window_raster(windows: Windows, values: np.ndarray) -> np.ndarray:
    """One model output per window ([M] or [M, 1]) -> float32 raster of ``grid_shape``, nodata -1 elsewhere."""
    if not isinstance(windows, Windows):
        raise OutputFormatError(f"windows must be the Windows the values were computed from, got {type(windows).__name__}")
    if not isinstance(values, np.ndarray) or values.dtype != np.float32:
        got = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
        raise OutputFormatError(f"window values must be float32, got {got}")
    if values.shape not in ((len(windows),), (len(windows), 1)):
        raise OutputFormatError(f"expected {len(windows)} window values ([M] or [M, 1]), got shape {list(values.shape)}")
    flat = values.reshape(-1)
    if not (np.isfinite(flat) & (flat >= 0.0) & (flat <= 1.0)).all():
        raise OutputFormatError("window values must be finite and in [0, 1]")
    raster = np.full(windows.grid_shape, INDEX_NODATA, dtype=np.float32)
    raster[windows.rows, windows.cols] = flat
    return raster


@dataclass(frozen=True, slots=True)
class TileRaster:
    """One tile's result raster and where the tile sits in its product (``i``/``j`` in tiles)."""

    i: int
    j: int
    raster: np.ndarray  # float32 [h, w]
    transform: Affine  # of ``raster``


def mosaic_tile_rasters(tiles: Sequence[TileRaster], pixel_tolerance: float = 1e-3) -> tuple[np.ndarray, Affine]:
    """Per-tile rasters of one product (e.g. 5 x 5 C-factors of each 120 x 120 tile) -> one raster of the product.

    Tiles that were dropped (no-data tiles) are nodata (-1). Every tile must lie on the grid implied by the first
    tile's transform and its (i, j); a tile that does not is an ``OutputFormatError`` (rather than a shifted map).
    """
    if not tiles:
        raise OutputFormatError("no tile rasters to mosaic")
    shape = tiles[0].raster.shape
    if len(shape) != 2 or 0 in shape:
        raise OutputFormatError(f"tile rasters must be [rows, cols], got {list(shape)}")
    positions = {(t.i, t.j) for t in tiles}
    if len(positions) != len(tiles):
        raise OutputFormatError("two tile rasters have the same (i, j)")
    height, width = shape
    min_i, min_j = min(t.i for t in tiles), min(t.j for t in tiles)
    max_i, max_j = max(t.i for t in tiles), max(t.j for t in tiles)
    first = tiles[0]
    origin = compose(first.transform, Affine.translation(-(first.j - min_j) * width, -(first.i - min_i) * height))
    mosaic = np.full(((max_i - min_i + 1) * height, (max_j - min_j + 1) * width), INDEX_NODATA, dtype=np.float32)
    for tile in tiles:
        if tile.raster.shape != shape or tile.raster.dtype != np.float32:
            raise OutputFormatError(
                f"tile ({tile.i}, {tile.j}) raster is {tile.raster.dtype} {list(tile.raster.shape)}; "
                f"expected float32 {list(shape)}"
            )
        row, col = (tile.i - min_i) * height, (tile.j - min_j) * width
        expected = compose(origin, Affine.translation(col, row))
        # Offsets may differ by float noise, never by a visible fraction of a pixel.
        pixel = max(abs(expected.a), abs(expected.e), abs(expected.b), abs(expected.d))
        if not np.allclose(tuple(tile.transform)[:6], tuple(expected)[:6], rtol=1e-9, atol=pixel_tolerance * pixel):
            raise OutputFormatError(f"tile ({tile.i}, {tile.j}) transform does not sit on the product's grid")
        mosaic[row : row + height, col : col + width] = tile.raster
    return mosaic, origin


__all__ = [
    "CFACTOR_CROP",
    "LOCUST_WINDOW",
    "TileRaster",
    "Windows",
    "assemble_window_raster",
    "cut_cfactor_crops",
    "cut_locust_windows",
    "mosaic_tile_rasters",
    "window_transform",
]
