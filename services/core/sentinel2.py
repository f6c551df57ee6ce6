"""Sentinel-2 preprocessing shared by model export (training side) and the Wrapper (serving side).

numpy and tifffile only: services never import torch. Every function is a plain, vectorised function
so that one core preprocesses hundreds of 120x120 patches per second.

Conventions (D3.4 2.2.2 and the SimCLR training code, contracts doc section 6):
- 60 m bands (B01, B09, B10) are dropped, 20 m bands are upsampled x2 to the 10 m grid;
- channel order and per-band normalisation come from the model card, never from the data
  (the deployed reference divided each tile by its own maximum: NaN on empty tiles, train/serve skew).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import tifffile

from .model_card import ModelCard

# Native ground sampling distance of each Sentinel-2 L2A band, in metres.
SENTINEL2_RESOLUTION_M: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20,
}

# The order the SimCLR models were trained with (10 m and 20 m bands in wavelength order).
SIMCLR_BAND_ORDER: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

# BigEarthNet per-band statistics of L2A digital numbers used by the SimCLR training code
# (contracts doc section 6).
BIGEARTHNET_BAND_MEAN: dict[str, float] = {
    "B02": 429.943, "B03": 614.217, "B04": 590.236, "B05": 950.684, "B06": 1792.463,
    "B07": 2075.468, "B08": 2218.946, "B8A": 2266.460, "B11": 1594.427, "B12": 1009.327,
}
BIGEARTHNET_BAND_STD: dict[str, float] = {
    "B02": 572.416, "B03": 582.879, "B04": 675.887, "B05": 729.898, "B06": 1096.015,
    "B07": 1273.454, "B08": 1365.456, "B8A": 1356.138, "B11": 1079.191, "B12": 818.867,
}

PATCH_SIZE = 120  # BigEarthNet patches and the serving tiles are 120 x 120 pixels on the 10 m grid

Resampling = Literal["bilinear", "cubic", "nearest"]

_BAND_FILE = re.compile(r"_(B0[1-9]|B1[0-2]|B8A)\.tiff?$", re.IGNORECASE)
_CUBIC_A = -0.75  # OpenCV's INTER_CUBIC kernel parameter (Keys kernel with a = -0.75)


def read_bigearthnet_patch(folder: str | Path, bands: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Read a BigEarthNet patch folder (``<patch>/<patch>_<BAND>.tif``) into ``{band: 2-D array}``.

    ``bands`` limits what is read (faster when a model needs 10 of 12 files); a requested band that
    is not there raises ``ValueError`` naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"patch folder {folder} does not exist")
    files: dict[str, Path] = {}
    for path in folder.iterdir():
        match = _BAND_FILE.search(path.name)
        if match:
            files[match.group(1).upper()] = path
    if not files:
        raise ValueError(f"no band files '*_<BAND>.tif' in {folder}")
    wanted = list(bands) if bands is not None else sorted(files)
    missing = [band for band in wanted if band not in files]
    if missing:
        raise ValueError(f"patch {folder.name} has no band {', '.join(missing)} (found {', '.join(sorted(files))})")
    out: dict[str, np.ndarray] = {}
    for band in wanted:
        array = tifffile.imread(files[band])
        if array.ndim != 2:
            raise ValueError(f"band {band} of {folder.name} has shape {array.shape}; expected a 2-D raster")
        out[band] = array
    return out


def _linear_taps(size_in: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of OpenCV INTER_LINEAR along one axis.

    Half-pixel centres: output pixel d samples source coordinate (d + 0.5) / factor - 0.5; coordinates
    outside [0, size_in - 1] are clamped to the edge pixel (OpenCV sets the fraction to 0 there).
    """
    coord = (np.arange(size_in * factor, dtype=np.float64) + 0.5) / factor - 0.5
    coord = np.clip(coord, 0.0, size_in - 1)
    left = np.floor(coord).astype(np.intp)
    right = np.minimum(left + 1, size_in - 1)
    weight_right = (coord - left).astype(np.float32)
    return left, right, weight_right


def _cubic_taps(size_in: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [n_out, 4] and weights [n_out, 4] of OpenCV INTER_CUBIC along one axis.

    Unlike the linear case OpenCV does not clamp the coordinate; it replicates the border pixel for
    taps that fall outside the image.
    """
    coord = (np.arange(size_in * factor, dtype=np.float64) + 0.5) / factor - 0.5
    base = np.floor(coord)
    t = coord - base
    a = _CUBIC_A
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    w3 = 1.0 - w0 - w1 - w2
    index = base.astype(np.intp)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(index, 0, size_in - 1), np.stack([w0, w1, w2, w3], axis=1).astype(np.float32)


def _check_factor(array: np.ndarray, factor: int) -> None:
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"upsampling factor must be a positive integer, got {factor!r}")
    if array.ndim < 2:
        raise ValueError(f"expected an array [..., H, W], got shape {array.shape}")


def upsample_bilinear(array: np.ndarray, factor: int) -> np.ndarray:
    """Upsample the last two axes by an integer ``factor`` like ``cv2.resize(..., INTER_LINEAR)``.

    Works on one band [H, W] or a stack [..., H, W] at once. Returns float32 without rounding (OpenCV
    rounds to the input's integer type; the difference is below half a digital number).
    """
    _check_factor(array, factor)
    data = np.asarray(array, dtype=np.float32)
    if factor == 1:
        return data.copy()
    rows_left, rows_right, rows_w = _linear_taps(data.shape[-2], factor)
    cols_left, cols_right, cols_w = _linear_taps(data.shape[-1], factor)
    top = data[..., rows_left, :]
    rows = top + (data[..., rows_right, :] - top) * rows_w[:, None]
    left = rows[..., cols_left]
    return left + (rows[..., cols_right] - left) * cols_w


def upsample_cubic(array: np.ndarray, factor: int) -> np.ndarray:
    """Upsample the last two axes by an integer ``factor`` like ``cv2.resize(..., INTER_CUBIC)`` (float32)."""
    _check_factor(array, factor)
    data = np.asarray(array, dtype=np.float32)
    if factor == 1:
        return data.copy()
    rows_index, rows_w = _cubic_taps(data.shape[-2], factor)
    cols_index, cols_w = _cubic_taps(data.shape[-1], factor)
    rows = sum(data[..., rows_index[:, k], :] * rows_w[:, k, None] for k in range(4))
    return sum(rows[..., cols_index[:, k]] * cols_w[:, k] for k in range(4))


def upsample_nearest(array: np.ndarray, factor: int) -> np.ndarray:
    """Pixel replication (``INTER_NEAREST`` for integer factors), float32."""
    _check_factor(array, factor)
    data = np.asarray(array, dtype=np.float32)
    return np.repeat(np.repeat(data, factor, axis=-2), factor, axis=-1)


_UPSAMPLERS = {"bilinear": upsample_bilinear, "cubic": upsample_cubic, "nearest": upsample_nearest}


def stack_bands(
    bands: Mapping[str, np.ndarray],
    order: Sequence[str],
    resampling: Resampling | str = "bilinear",
    size: int = PATCH_SIZE,
) -> np.ndarray:
    """Stack ``bands`` in ``order`` into float32 [len(order), size, size] on the 10 m grid.

    Bands not named in ``order`` (60 m bands, anything else) are ignored. A band already at
    ``size`` is taken as is; a Sentinel-2 band at its native resolution (e.g. a 20 m band at
    size / 2) is upsampled with ``resampling``. Raises ``ValueError`` naming the missing band, the
    band of the wrong size, or the band with non-finite values.
    """
    if resampling not in _UPSAMPLERS:
        raise ValueError(f"unknown resampling {resampling!r}; expected one of {', '.join(_UPSAMPLERS)}")
    if not order:
        raise ValueError("band order is empty")
    missing = [band for band in order if band not in bands]
    if missing:
        raise ValueError(f"missing band {', '.join(missing)} (have {', '.join(sorted(bands))})")
    upsample = _UPSAMPLERS[resampling]
    out = np.empty((len(order), size, size), dtype=np.float32)
    # Bands that need the same upsampling are resampled together: one vectorised call per factor.
    pending: dict[int, list[tuple[int, np.ndarray]]] = {}
    for channel, band in enumerate(order):
        array = np.asarray(bands[band])
        # Integer rasters (the L2A uint16 files) cannot hold NaN/inf; float inputs are checked before
        # resampling so the error names the band rather than a smeared neighbourhood.
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise ValueError(f"band {band} has non-finite values (NaN or inf)")
        if array.shape == (size, size):
            out[channel] = array
            continue
        factor = SENTINEL2_RESOLUTION_M.get(band, 10) // 10
        native = size // factor
        if factor > 1 and size % factor == 0 and array.shape == (native, native):
            pending.setdefault(factor, []).append((channel, array))
            continue
        expected = f"({size}, {size})" + (f" or ({native}, {native})" if factor > 1 else "")
        raise ValueError(f"band {band} has shape {array.shape}; expected {expected}")
    for factor, items in pending.items():
        channels = [channel for channel, _ in items]
        out[channels] = upsample(np.stack([array for _, array in items]), factor)
    return out


def _card_statistics(card: ModelCard, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    if card.normalisation == "none":
        return None
    if channels != len(card.bands):
        raise ValueError(f"stack has {channels} channels but the card declares {len(card.bands)} bands")
    mean = np.asarray(card.band_mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(card.band_std, dtype=np.float32).reshape(-1, 1, 1)
    return mean, std


def normalise(stack: np.ndarray, card: ModelCard) -> np.ndarray:
    """Apply the card's normalisation to a stack [C, H, W] or a batch [N, C, H, W]; returns float32."""
    if stack.ndim not in (3, 4):
        raise ValueError(f"expected [C, H, W] or [N, C, H, W], got shape {stack.shape}")
    out = np.array(stack, dtype=np.float32, copy=True)
    stats = _card_statistics(card, out.shape[-3])
    if stats is not None:
        mean, std = stats
        out -= mean
        out /= std
    return out


def denormalise(stack: np.ndarray, card: ModelCard) -> np.ndarray:
    """Invert ``normalise`` (e.g. for the decompressor's output, which lives in normalised space)."""
    if stack.ndim not in (3, 4):
        raise ValueError(f"expected [C, H, W] or [N, C, H, W], got shape {stack.shape}")
    out = np.array(stack, dtype=np.float32, copy=True)
    stats = _card_statistics(card, out.shape[-3])
    if stats is not None:
        mean, std = stats
        out *= std
        out += mean
    return out
