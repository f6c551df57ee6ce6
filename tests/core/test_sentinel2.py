"""Sentinel-2 preprocessing: OpenCV-convention resampling, band stacking, card normalisation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from services.core import sentinel2
from services.core.model_card import ModelCard

SAMPLE_PATCHES = Path(__file__).resolve().parents[2] / "data" / "bigearthnet-sample" / "patches"
ORDER = sentinel2.SIMCLR_BAND_ORDER


def s2_card(**overrides: object) -> ModelCard:
    fields: dict[str, object] = {
        "task": "ssl-features",
        "input_kind": "sentinel2-l2a",
        "bands": list(ORDER),
        "band_mean": [sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in ORDER],
        "band_std": [sentinel2.BIGEARTHNET_BAND_STD[b] for b in ORDER],
        "normalisation": "standardise",
        "resampling_20m": "bilinear",
        "weights": "seeded-init:seed=0",
    }
    fields.update(overrides)
    return ModelCard(**fields)


def reference_bilinear(array: np.ndarray, factor: int) -> np.ndarray:
    """Direct per-pixel formula of OpenCV INTER_LINEAR (half-pixel centres, clamped coordinates)."""
    height, width = array.shape
    out = np.zeros((height * factor, width * factor))
    for i in range(height * factor):
        for j in range(width * factor):
            sy = min(max((i + 0.5) / factor - 0.5, 0.0), height - 1)
            sx = min(max((j + 0.5) / factor - 0.5, 0.0), width - 1)
            y0, x0 = math.floor(sy), math.floor(sx)
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            wy, wx = sy - y0, sx - x0
            out[i, j] = (
                (1 - wy) * (1 - wx) * array[y0, x0]
                + (1 - wy) * wx * array[y0, x1]
                + wy * (1 - wx) * array[y1, x0]
                + wy * wx * array[y1, x1]
            )
    return out


def keys_kernel(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def reference_cubic(array: np.ndarray, factor: int) -> np.ndarray:
    """Direct formula of OpenCV INTER_CUBIC: Keys kernel a = -0.75 on 4 x 4 taps, border replicated."""
    height, width = array.shape
    out = np.zeros((height * factor, width * factor))
    for i in range(height * factor):
        for j in range(width * factor):
            sy, sx = (i + 0.5) / factor - 0.5, (j + 0.5) / factor - 0.5
            y0, x0 = math.floor(sy), math.floor(sx)
            total = 0.0
            for m in range(-1, 3):
                for n in range(-1, 3):
                    weight = keys_kernel(sy - (y0 + m)) * keys_kernel(sx - (x0 + n))
                    total += weight * array[min(max(y0 + m, 0), height - 1), min(max(x0 + n, 0), width - 1)]
            out[i, j] = total
    return out


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("shape", [(5, 7), (1, 4), (6, 1)])
def test_bilinear_matches_direct_formula(factor: int, shape: tuple[int, int]) -> None:
    array = np.random.default_rng(1).uniform(0, 10000, size=shape).astype(np.float32)
    got = sentinel2.upsample_bilinear(array, factor)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_bilinear(array, factor), rtol=1e-6, atol=1e-3)


def test_bilinear_uses_half_pixel_centres_and_edge_clamp() -> None:
    # OpenCV: resize([[0, 4]], (4, 1), INTER_LINEAR) == [[0, 1, 3, 4]]; a corner-aligned resize
    # would give [0, 4/3, 8/3, 4] instead.
    got = sentinel2.upsample_bilinear(np.array([[0.0, 4.0]], dtype=np.float32), 2)
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got[0], [0.0, 1.0, 3.0, 4.0])
    np.testing.assert_allclose(got[1], [0.0, 1.0, 3.0, 4.0])


@pytest.mark.parametrize("factor", [2, 3])
def test_cubic_matches_direct_formula(factor: int) -> None:
    array = np.random.default_rng(2).uniform(0, 10000, size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(sentinel2.upsample_cubic(array, factor), reference_cubic(array, factor), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("upsample", [sentinel2.upsample_bilinear, sentinel2.upsample_cubic, sentinel2.upsample_nearest])
def test_upsampling_a_stack_equals_upsampling_each_band(upsample) -> None:
    stack = np.random.default_rng(3).uniform(0, 5000, size=(3, 8, 9)).astype(np.float32)
    together = upsample(stack, 2)
    assert together.shape == (3, 16, 18)
    for band in range(3):
        np.testing.assert_allclose(together[band], upsample(stack[band], 2), rtol=1e-6)


@pytest.mark.parametrize("upsample", [sentinel2.upsample_bilinear, sentinel2.upsample_cubic])
def test_upsampling_keeps_constant_images_constant(upsample) -> None:
    np.testing.assert_allclose(upsample(np.full((4, 4), 1234.0, dtype=np.float32), 2), 1234.0, rtol=1e-6)


@pytest.mark.parametrize("factor", [0, -2, 1.5])
def test_upsampling_rejects_bad_factors(factor) -> None:
    with pytest.raises(ValueError, match="factor"):
        sentinel2.upsample_bilinear(np.zeros((2, 2)), factor)


def synthetic_bands(rng: np.random.Generator) -> dict[str, np.ndarray]:
    bands = {}
    for band, resolution in sentinel2.SENTINEL2_RESOLUTION_M.items():
        size = 120 * 10 // resolution
        bands[band] = rng.integers(0, 10000, size=(size, size), dtype=np.uint16)
    return bands


def test_stack_bands_orders_upsamples_and_drops_other_bands() -> None:
    bands = synthetic_bands(np.random.default_rng(4))
    stack = sentinel2.stack_bands(bands, ORDER, "bilinear")
    assert stack.shape == (10, 120, 120) and stack.dtype == np.float32
    for channel, band in enumerate(ORDER):
        if sentinel2.SENTINEL2_RESOLUTION_M[band] == 10:
            np.testing.assert_array_equal(stack[channel], bands[band])
        else:
            np.testing.assert_allclose(stack[channel], sentinel2.upsample_bilinear(bands[band], 2), rtol=1e-6)


def test_stack_bands_follows_any_order_and_resampling() -> None:
    bands = synthetic_bands(np.random.default_rng(5))
    order = ("B12", "B04", "B05")
    stack = sentinel2.stack_bands(bands, order, "nearest")
    np.testing.assert_array_equal(stack[1], bands["B04"])
    np.testing.assert_array_equal(stack[0], np.repeat(np.repeat(bands["B12"], 2, 0), 2, 1))
    np.testing.assert_allclose(sentinel2.stack_bands(bands, order, "cubic")[2], sentinel2.upsample_cubic(bands["B05"], 2))


def test_stack_bands_accepts_20m_bands_already_on_the_10m_grid() -> None:
    bands = synthetic_bands(np.random.default_rng(6))
    bands["B05"] = sentinel2.upsample_bilinear(bands["B05"], 2)
    stack = sentinel2.stack_bands(bands, ORDER)
    np.testing.assert_array_equal(stack[ORDER.index("B05")], bands["B05"])


def test_stack_bands_names_the_missing_band() -> None:
    bands = synthetic_bands(np.random.default_rng(7))
    del bands["B8A"]
    with pytest.raises(ValueError, match="missing band B8A"):
        sentinel2.stack_bands(bands, ORDER)


@pytest.mark.parametrize(("band", "shape"), [("B05", (59, 60)), ("B02", (60, 60)), ("B11", (20, 20))])
def test_stack_bands_names_the_band_of_wrong_size(band: str, shape: tuple[int, int]) -> None:
    bands = synthetic_bands(np.random.default_rng(8))
    bands[band] = np.zeros(shape, dtype=np.uint16)
    with pytest.raises(ValueError, match=rf"band {band} has shape \({shape[0]}, {shape[1]}\)"):
        sentinel2.stack_bands(bands, ORDER)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_stack_bands_names_the_band_with_non_finite_values(bad_value: float) -> None:
    bands = {band: array.astype(np.float32) for band, array in synthetic_bands(np.random.default_rng(9)).items()}
    bands["B06"][10, 10] = bad_value
    with pytest.raises(ValueError, match="band B06 has non-finite values"):
        sentinel2.stack_bands(bands, ORDER)


def test_stack_bands_rejects_unknown_resampling_and_empty_order() -> None:
    bands = synthetic_bands(np.random.default_rng(10))
    with pytest.raises(ValueError, match="unknown resampling"):
        sentinel2.stack_bands(bands, ORDER, "lanczos")
    with pytest.raises(ValueError, match="empty"):
        sentinel2.stack_bands(bands, ())


def test_normalise_standardises_per_band_as_the_card_says() -> None:
    card = s2_card()
    stack = np.random.default_rng(11).uniform(0, 10000, size=(10, 4, 4)).astype(np.float32)
    got = sentinel2.normalise(stack, card)
    for channel, band in enumerate(ORDER):
        expected = (stack[channel] - sentinel2.BIGEARTHNET_BAND_MEAN[band]) / sentinel2.BIGEARTHNET_BAND_STD[band]
        np.testing.assert_allclose(got[channel], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sentinel2.denormalise(got, card), stack, rtol=1e-5, atol=1e-2)
    batch = np.stack([stack, stack * 0.5])
    np.testing.assert_allclose(sentinel2.normalise(batch, card)[0], got)


def test_normalise_leaves_input_untouched_and_handles_all_zero_tiles() -> None:
    card = s2_card()
    zeros = np.zeros((10, 120, 120), dtype=np.float32)
    got = sentinel2.normalise(zeros, card)
    assert np.isfinite(got).all()  # the reference divided by the tile maximum: NaN here
    assert not zeros.any()


def test_normalise_none_is_a_float32_copy() -> None:
    card = ModelCard(task="classify", input_kind="features", weights="seeded-init:seed=0")
    stack = np.arange(8, dtype=np.uint16).reshape(2, 2, 2)
    got = sentinel2.normalise(stack, card)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, stack)


def test_normalise_rejects_a_stack_that_does_not_match_the_card() -> None:
    with pytest.raises(ValueError, match="9 channels but the card declares 10 bands"):
        sentinel2.normalise(np.zeros((9, 4, 4), dtype=np.float32), s2_card())
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        sentinel2.normalise(np.zeros((4, 4), dtype=np.float32), s2_card())


def test_read_real_patch_then_preprocess() -> None:
    folder = sorted(SAMPLE_PATCHES.iterdir())[0]
    bands = sentinel2.read_bigearthnet_patch(folder)
    assert set(bands) == set(sentinel2.SENTINEL2_RESOLUTION_M) - {"B10"}  # BigEarthNet drops B10
    assert bands["B02"].shape == (120, 120) and bands["B05"].shape == (60, 60) and bands["B01"].shape == (20, 20)
    assert bands["B02"].dtype == np.uint16
    tensor = sentinel2.normalise(sentinel2.stack_bands(bands, ORDER), s2_card())
    assert tensor.shape == (10, 120, 120) and tensor.dtype == np.float32 and np.isfinite(tensor).all()
    subset = sentinel2.read_bigearthnet_patch(folder, ["B04", "B8A"])
    assert list(subset) == ["B04", "B8A"]
    np.testing.assert_array_equal(subset["B04"], bands["B04"])


def test_read_patch_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sentinel2.read_bigearthnet_patch(tmp_path / "nope")
    with pytest.raises(ValueError, match="no band files"):
        sentinel2.read_bigearthnet_patch(tmp_path)
    tifffile.imwrite(tmp_path / f"{tmp_path.name}_B02.tif", np.zeros((120, 120), dtype=np.uint16))
    with pytest.raises(ValueError, match="no band B03"):
        sentinel2.read_bigearthnet_patch(tmp_path, ["B02", "B03"])
    tifffile.imwrite(tmp_path / f"{tmp_path.name}_B04.tif", np.zeros((2, 120, 120), dtype=np.uint16))
    with pytest.raises(ValueError, match="band B04 .* 2-D"):
        sentinel2.read_bigearthnet_patch(tmp_path, ["B04"])
