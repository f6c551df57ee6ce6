"""Small PNG quicklooks of Sentinel-2 inputs and results: numpy and zlib only (no imaging library).

- ``true_colour``: red, green, blue bands (B04, B03, B02) stretched per channel between the 2nd and 98th
  percentile of the pixels with data, to uint8; pixels without data are black.
- ``class_overlay``: a true-colour picture with each class pixel blended with its colour table entry
  (``alpha``); classes in ``transparent_codes`` (e.g. ``clear``) and no-data pixels are left as they are.
- ``encode_png``: an 8-bit greyscale, RGB or RGBA PNG (filter type 0 per row, zlib level 6).
- ``downscale``: block means, so a quicklook of a full scene stays small (``max_side``).
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterable, Mapping

import numpy as np

PNG_CONTENT_TYPE = "image/png"
PNG_SUFFIX = ".png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRUE_COLOUR_BANDS = ("B04", "B03", "B02")
_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


class QuicklookError(ValueError):
    """The arrays cannot make a picture (wrong shape or dtype); the message says why."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image [H, W] (grey) or [H, W, 3|4] (RGB / RGBA)."""
    if image.dtype != np.uint8:
        raise QuicklookError(f"a PNG needs uint8 pixels, got {image.dtype}")
    pixels = image[:, :, None] if image.ndim == 2 else image
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOUR_TYPES or 0 in pixels.shape[:2]:
        raise QuicklookError(f"a PNG needs [H, W] or [H, W, 3|4] pixels, got shape {image.shape}")
    height, width, channels = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), pixels.reshape(height, width * channels)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def decode_png(data: bytes) -> np.ndarray:
    """Read back what ``encode_png`` writes (8-bit, filter 0, not interlaced): [H, W, channels] uint8."""
    if not data.startswith(PNG_SIGNATURE):
        raise QuicklookError("not a PNG")
    offset, idat, header = len(PNG_SIGNATURE), b"", None
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        if zlib.crc32(kind + body) & 0xFFFFFFFF != struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])[0]:
            raise QuicklookError(f"PNG chunk {kind!r} has a bad CRC")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    if header is None:
        raise QuicklookError("PNG without IHDR")
    width, height, depth, colour_type = header[:4]
    channels = {v: k for k, v in _COLOUR_TYPES.items()}.get(colour_type)
    if depth != 8 or channels is None:
        raise QuicklookError(f"unsupported PNG (bit depth {depth}, colour type {colour_type})")
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * channels)
    if np.any(rows[:, 0] != 0):
        raise QuicklookError("PNG rows use filters this reader does not implement")
    return rows[:, 1:].reshape(height, width, channels).copy()


def downscale(array: np.ndarray, max_side: int) -> np.ndarray:
    """Block-mean [C, H, W] (float) by the smallest integer factor that brings both sides to <= ``max_side``."""
    factor = max(1, -(-max(array.shape[-2:]) // max_side))
    if factor == 1:
        return array
    rows, cols = (array.shape[-2] // factor) * factor, (array.shape[-1] // factor) * factor
    trimmed = array[..., :rows, :cols]
    shape = (*array.shape[:-2], rows // factor, factor, cols // factor, factor)
    with np.errstate(invalid="ignore"):
        return np.nanmean(trimmed.reshape(shape), axis=(-3, -1)) if np.isnan(trimmed).any() else trimmed.reshape(shape).mean(axis=(-3, -1))


def stretch(values: np.ndarray, valid: np.ndarray | None = None, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """uint8 [C, H, W] of [C, H, W] values stretched per channel between the ``low``/``high`` percentiles
    of the ``valid`` pixels (black where not valid)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 3:
        raise QuicklookError(f"expected [C, H, W] values, got shape {values.shape}")
    mask = np.isfinite(values).all(axis=0) if valid is None else (valid & np.isfinite(values).all(axis=0))
    out = np.zeros(values.shape, dtype=np.uint8)
    if not mask.any():
        return out
    for channel in range(values.shape[0]):
        lo, hi = np.percentile(values[channel][mask], [low, high])
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        scaled = np.clip((values[channel] - lo) * scale, 0, 255)
        out[channel] = np.where(mask, np.round(scaled), 0).astype(np.uint8)
    return out


def true_colour(bands: Mapping[str, np.ndarray], nodata: np.ndarray | None = None, max_side: int = 512) -> np.ndarray:
    """uint8 [H, W, 3] true-colour picture from ``B04``, ``B03``, ``B02`` on one grid (2-98 % stretch)."""
    missing = [band for band in TRUE_COLOUR_BANDS if band not in bands]
    if missing:
        raise QuicklookError(f"a true-colour quicklook needs bands {', '.join(missing)}")
    shapes = {np.shape(bands[band]) for band in TRUE_COLOUR_BANDS}
    if len(shapes) != 1:
        raise QuicklookError(f"true-colour bands have different shapes {sorted(shapes)}; resample them first")
    rgb = np.stack([np.asarray(bands[band], dtype=np.float64) for band in TRUE_COLOUR_BANDS])
    if nodata is not None:
        rgb[:, nodata] = np.nan
    rgb = downscale(rgb, max_side)
    return np.moveaxis(stretch(rgb), 0, -1)


def class_overlay(
    picture: np.ndarray,
    codes: np.ndarray,
    colour_table: Mapping[int, tuple[int, int, int, int]],
    transparent_codes: Iterable[int] = (),
    alpha: float = 0.5,
) -> np.ndarray:
    """uint8 [H, W, 3]: ``picture`` with class pixels blended with their colours (codes resized to the picture)."""
    if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise QuicklookError(f"overlay needs a uint8 [H, W, 3] picture, got {picture.dtype} {picture.shape}")
    codes = _resize_nearest(np.asarray(codes), picture.shape[:2])
    out = picture.astype(np.float64)
    skip = set(transparent_codes)
    for code, (red, green, blue, opacity) in colour_table.items():
        if code in skip or opacity == 0:
            continue
        where = codes == code
        out[where] = (1 - alpha) * out[where] + alpha * np.array([red, green, blue], dtype=np.float64)
    return np.round(out).astype(np.uint8)


def colour_classes(codes: np.ndarray, colour_table: Mapping[int, tuple[int, int, int, int]]) -> np.ndarray:
    """uint8 [H, W, 4] RGBA picture of a class raster (codes without a colour are transparent)."""
    out = np.zeros((*codes.shape, 4), dtype=np.uint8)
    for code, rgba in colour_table.items():
        out[codes == code] = rgba
    return out


def _resize_nearest(codes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if codes.shape == shape:
        return codes
    rows = (np.arange(shape[0]) * codes.shape[0] // shape[0]).clip(0, codes.shape[0] - 1)
    cols = (np.arange(shape[1]) * codes.shape[1] // shape[1]).clip(0, codes.shape[1] - 1)
    return codes[rows][:, cols]


def true_colour_png(bands: Mapping[str, np.ndarray], nodata: np.ndarray | None = None, max_side: int = 512) -> bytes:
    return encode_png(true_colour(bands, nodata, max_side))


def mask_overlay_png(
    bands: Mapping[str, np.ndarray],
    codes: np.ndarray,
    colour_table: Mapping[int, tuple[int, int, int, int]],
    transparent_codes: Iterable[int] = (),
    nodata: np.ndarray | None = None,
    max_side: int = 512,
    alpha: float = 0.5,
) -> bytes:
    """PNG of the true-colour picture with the class raster (same grid as ``bands``) overlaid."""
    picture = true_colour(bands, nodata, max_side)
    return encode_png(class_overlay(picture, codes, colour_table, transparent_codes, alpha))
