"""Inputs for the output-writer tests: real sample patches read by the real input layer, and the real model card."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from services.core import sentinel2
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
