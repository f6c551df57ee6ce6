"""Tiles with overlap and padding, and blending of per-pixel tile outputs back into one raster (numpy only).

The geometry is ukis-csmask's (``ukis_csmask.utils.tile_array`` / ``untile_array``), so a model trained and
evaluated with that tiling is served the same way: for tile side ``T`` and overlap fraction ``o``, the image
is padded by ``margin = int(T * o)`` before and ``T + 1 + margin`` after (numpy ``pad`` mode from the card),
tiles start every ``step = int(T - T * o)`` pixels of the padded image, and the blended result is cropped
back at ``margin``. Tiles that do not touch the image (only padding) are left out: they add nothing to the
cropped result, so leaving them out changes no value and saves their inference.

Blending (card ``blending``): ``tukey`` weights each tile with the outer product of a tapered cosine window
(``alpha = 2 * o``, scipy's ``signal.windows.tukey``), ``average`` with ones, ``overwrite`` lets the later
tile win. Sums are accumulated in float64 in row-major tile order and cast to float32, as the reference does,
so an argmax over blended class scores is the reference's argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Padding = Literal["symmetric", "reflect", "edge", "constant"]
Blending = Literal["tukey", "average", "overwrite"]


@dataclass(frozen=True, slots=True)
class TileGrid:
    """Where the tiles of one image lie: origins in padded pixel coordinates, row-major order."""

    rows: int
    cols: int
    tile: int
    step: int
    margin: int
    origins: tuple[tuple[int, int], ...]

    @property
    def padded_shape(self) -> tuple[int, int]:
        extra = 2 * self.margin + self.tile + 1
        return self.rows + extra, self.cols + extra

    def __len__(self) -> int:
        return len(self.origins)


def _axis_origins(length: int, tile: int, step: int, margin: int) -> list[int]:
    padded = length + 2 * margin + tile + 1
    count = math.ceil((padded - tile + 1) / step)  # positions a rolling window of ``step`` takes
    # Keep the tiles that cover at least one pixel of the image [margin, margin + length).
    return [k * step for k in range(count) if k * step < margin + length and k * step + tile > margin]


def tile_grid(rows: int, cols: int, tile: int, overlap: float) -> TileGrid:
    """The tiles covering a ``rows`` x ``cols`` image (ukis-csmask's geometry, see the module docstring)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"image of {rows} x {cols} pixels has nothing to tile")
    if tile < 1:
        raise ValueError(f"tile size must be positive, got {tile}")
    if not 0.0 <= overlap < 0.5:
        raise ValueError(f"tile overlap must be in [0, 0.5), got {overlap}")
    step = int(tile - tile * overlap)
    margin = int(tile * overlap)
    row_origins = _axis_origins(rows, tile, step, margin)
    col_origins = _axis_origins(cols, tile, step, margin)
    origins = tuple((r, c) for r in row_origins for c in col_origins)
    return TileGrid(rows=rows, cols=cols, tile=tile, step=step, margin=margin, origins=origins)


def pad_image(image: np.ndarray, grid: TileGrid, mode: Padding = "symmetric") -> np.ndarray:
    """Pad [C, H, W] to the grid's padded shape (``constant`` pads with 0)."""
    if image.ndim != 3 or image.shape[1:] != (grid.rows, grid.cols):
        raise ValueError(f"image shape {image.shape} does not fit the grid [C, {grid.rows}, {grid.cols}]")
    after = grid.tile + 1 + grid.margin
    return np.pad(image, ((0, 0), (grid.margin, after), (grid.margin, after)), mode=mode)


def cut_tiles(image: np.ndarray, grid: TileGrid, mode: Padding = "symmetric") -> np.ndarray:
    """[N, C, T, T] tiles of a [C, H, W] image (a copy, contiguous: ready to send)."""
    padded = pad_image(image, grid, mode)
    tiles = np.empty((len(grid), image.shape[0], grid.tile, grid.tile), dtype=image.dtype)
    for index, (row, col) in enumerate(grid.origins):
        tiles[index] = padded[:, row:row + grid.tile, col:col + grid.tile]
    return tiles


def tukey_window(size: int, alpha: float) -> np.ndarray:
    """scipy.signal.windows.tukey(size, alpha, sym=True), float64, by its published formula."""
    if size <= 1:
        return np.ones(max(size, 0))
    if alpha <= 0:
        return np.ones(size)
    if alpha >= 1.0:
        n = np.arange(size)
        return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (size - 1))
    n = np.arange(0, size)
    width = int(np.floor(alpha * (size - 1) / 2.0))
    n1 = n[0:width + 1]
    n2 = n[width + 1:size - width - 1]
    n3 = n[size - width - 1:]
    w1 = 0.5 * (1 + np.cos(np.pi * (-1 + 2.0 * n1 / alpha / (size - 1))))
    w2 = np.ones(n2.shape)
    w3 = 0.5 * (1 + np.cos(np.pi * (-2.0 / alpha + 1 + 2.0 * n3 / alpha / (size - 1))))
    return np.concatenate((w1, w2, w3))


def blend_window(tile: int, overlap: float, blending: Blending) -> np.ndarray:
    """[T, T] float64 weights of one tile's output."""
    if blending == "tukey":
        window = tukey_window(tile, overlap * 2)
        return window[:, None] * window[None, :]
    return np.ones((tile, tile))


@dataclass(frozen=True, slots=True)
class Blended:
    """Blended per-pixel outputs: ``sums`` [K, H, W] float32 (weighted sums, the reference's values) and
    ``weights`` [H, W] float64 (sum of the window weights; 0 where no tile weighs the pixel)."""

    sums: np.ndarray
    weights: np.ndarray

    def mean(self) -> np.ndarray:
        """Weighted mean [K, H, W] float32; NaN where no tile weighs the pixel."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.sums.astype(np.float64) / self.weights[None]
        out[:, self.weights <= 0] = np.nan
        return out.astype(np.float32)


def blend_tiles(outputs: np.ndarray, grid: TileGrid, overlap: float, blending: Blending = "tukey") -> Blended:
    """Blend [N, K, T, T] tile outputs (tile order of ``grid``) into [K, rows, cols]."""
    if outputs.ndim != 4 or outputs.shape[0] != len(grid) or outputs.shape[2:] != (grid.tile, grid.tile):
        raise ValueError(f"tile outputs {outputs.shape} do not fit {len(grid)} tiles of {grid.tile} x {grid.tile}")
    padded_rows, padded_cols = grid.padded_shape
    channels = outputs.shape[1]
    target = np.zeros((channels, padded_rows, padded_cols))
    weights = np.zeros((padded_rows, padded_cols))
    window = blend_window(grid.tile, overlap, blending)
    for tile_output, (row, col) in zip(outputs, grid.origins):
        rows, cols = slice(row, row + grid.tile), slice(col, col + grid.tile)
        if blending == "overwrite":
            target[:, rows, cols] = tile_output
            weights[rows, cols] = 1.0
        else:
            target[:, rows, cols] += tile_output * window
            weights[rows, cols] += window
    crop_rows = slice(grid.margin, grid.margin + grid.rows)
    crop_cols = slice(grid.margin, grid.margin + grid.cols)
    return Blended(sums=target[:, crop_rows, crop_cols].astype(np.float32), weights=weights[crop_rows, crop_cols].copy())


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """scipy.special.softmax's arithmetic (shift by the max, exp, divide by the sum), in the input's dtype."""
    shifted = np.exp(logits - np.amax(logits, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-values.astype(np.float64)))).astype(values.dtype)
