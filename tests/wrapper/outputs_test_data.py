"""Inputs for the output-writer tests: real sample patches read by the real input layer, and the real model card."""

from __future__ import annotations

import functools
from datetime import datetime, timezone

import numpy as np

from services.core import sentinel2, transform_codes
from services.core.model_card import ModelCard
from services.wrapper.inputs.band_files import assemble_patch
from services.wrapper.inputs.types import InputPatch
from services.wrapper.outputs import BandScale, PatchMetadata
from wrapper_input_data import SAMPLE_PATCHES, sample_band_path

# Sample patches whose band files carry a CRS and transform (most BigEarthNet v1 sample files do not).
GEOREFERENCED_PATCH = "S2A_MSIL2A_20170617T113321_36_85"
SECOND_GEOREFERENCED_PATCH = "S2A_MSIL2A_20170617T113321_4_55"
PLAIN_PATCH = "S2A_MSIL2A_20170613T101031_39_24"
CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def compressor_card() -> ModelCard:
    """The card the compression models declare (band order and BigEarthNet statistics of the SimCLR training)."""
    return ModelCard(
        task="compress",
        input_kind="sentinel2-l2a",
        bands=list(sentinel2.SIMCLR_BAND_ORDER),
        band_mean=[sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in sentinel2.SIMCLR_BAND_ORDER],
        band_std=[sentinel2.BIGEARTHNET_BAND_STD[b] for b in sentinel2.SIMCLR_BAND_ORDER],
        normalisation="standardise",
        resampling_20m="bilinear",
        patch_size=120,
        weights="seeded-init:seed=4",
    )


def band_scale() -> BandScale:
    return BandScale.from_card(compressor_card())


def read_sample_patch(patch: str) -> InputPatch:
    """A sample patch as the Wrapper's input layer reads it (10 and 20 m bands at native resolution)."""
    files = {band: sample_band_path(patch, band).read_bytes() for band in sentinel2.SIMCLR_BAND_ORDER}
    item = assemble_patch(patch, f"test/{patch}", files)
    assert isinstance(item, InputPatch), item
    return item


def normalised_stack(patch: InputPatch, resampling: str = "nearest") -> np.ndarray:
    """[10, 120, 120] float32 as a model would receive it."""
    stack = sentinel2.stack_bands(patch.bands, sentinel2.SIMCLR_BAND_ORDER, resampling)
    return sentinel2.normalise(stack, compressor_card())


def patch_metadata(patch: InputPatch) -> PatchMetadata:
    return PatchMetadata.from_input_patch(patch)


def sample_patch_names() -> list[str]:
    return sorted(path.name for path in SAMPLE_PATCHES.iterdir() if path.is_dir())


# ---------------------------------------------------------------------------------------------------------------
# Transform codes (format 2): a prior fitted on synthetic coefficients shaped like the transform's (Laplacian, the
# scale falling with the coefficient's rank), and codes drawn the same way.

_COEFFICIENT_SCALE = 40.0 * np.exp(-np.arange(128) / 18.0) + 0.3  # in base steps (100 DN)
# The transform's own error at the base step on the "training corpus" (% of 10,000 DN) per level count; only the
# s = 1 row enters the writer's estimate. Rows for s > 1 grow with the scale like a real calibration.
SYNTHETIC_TRAIN_RMS = np.array([[3.0, 2.2, 1.6, 1.2, 0.9, 0.7, 0.6, 0.5]]) * np.sqrt(
    1.0 + (np.array(transform_codes.QUANTISER_SCALES)[:, None] / 8.0) ** 2)


def synthetic_coefficients(blocks: int, seed: int) -> np.ndarray:
    """Base quantised coefficients [blocks, 128] (int32)."""
    rng = np.random.default_rng(seed)
    q = np.round(rng.laplace(0.0, _COEFFICIENT_SCALE, size=(blocks, 128)))
    return np.clip(q, -5000, 4999).astype(np.int32)


@functools.lru_cache(maxsize=4)
def synthetic_prior(seed: int = 0) -> transform_codes.LaplaceContextPrior:
    q = synthetic_coefficients(3000, seed)
    symbols = {s: transform_codes.requantise(q, s) for s in transform_codes.QUANTISER_SCALES}
    bpp = np.ones((len(transform_codes.QUANTISER_SCALES), 8))
    return transform_codes.fit_prior(symbols, SYNTHETIC_TRAIN_RMS, bpp, f"synthetic Laplacian, seed {seed}")


def synthetic_transform_codes(patches: int, seed: int = 0) -> np.ndarray:
    """Codes [patches, 60, 60, 8] of a compressor with all 8 levels, as the served transform compressor gives."""
    q = synthetic_coefficients(patches * 225, seed + 1000).reshape(patches, 15, 15, 128)
    return transform_codes.coefficients_to_codes(q, 8)


def requantised_codes(codes: np.ndarray, scale: int, levels: int) -> np.ndarray:
    """What a file at (scale, levels) must decode to, computed per code without the transform's layout: the base
    coefficient code - 5000 rounded half away from zero to a multiple of the scale, clamped to the codebook."""
    q = codes.astype(np.int64) - 5000
    restored = np.sign(q) * ((np.abs(q) + scale // 2) // scale) * scale
    out = np.clip(restored + 5000, 0, 9999)
    out[..., levels:] = -1
    return out
