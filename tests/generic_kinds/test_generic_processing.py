"""Card-driven processing as plain functions: working grid, scaling, nodata, tiles, output kinds, writers."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
from affine import Affine

from services.core.model_card import CLASS_NODATA_CODE, ModelCard, class_colour_table
from services.wrapper import generic_kinds as gk
from services.wrapper.outputs import quicklook
from services.wrapper.outputs.class_raster import write_class_geotiff
from services.wrapper.outputs.rasters import read_geotiff

UTM32N = "EPSG:32632"
ORIGIN = Affine(10.0, 0.0, 472480.0, 0.0, -10.0, 5257490.0)


def card(**overrides: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "task": "generic", "input_kind": "sentinel2-l2a", "bands": ["B04", "B08", "B11"],
        "band_mean": [0.0] * 3, "band_std": [1.0] * 3, "normalisation": "standardise",
        "reflectance_scale": 1e-4, "reflectance_offset": "product", "working_resolution_m": 30.0,
        "resampling": "average", "tile_size": 16, "tile_overlap": 0.25, "output_activation": "softmax",
        "nodata_value": 0.0, "output_kind": "pixel-classes", "class_names": ["water", "land"],
        "class_colours": ["#0000ff", "#00ff00"], "weights": "seeded-init:seed=0",
    }
    fields.update(overrides)
    return ModelCard(**fields)


def scene(rows: int = 60, cols: int = 90, seed: int = 0, offset: float = 0.0) -> gk.SceneBands:
    """A 10 m footprint: B04, B08 at 10 m, B11 at 20 m; the left third is water (NIR low), the rest land."""
    rng = np.random.default_rng(seed)
    red = rng.integers(300, 700, (rows, cols)).astype(np.uint16)
    nir = np.where(np.arange(cols)[None, :] < cols // 3, 200, 3000).astype(np.uint16) + rng.integers(0, 50, (rows, cols)).astype(np.uint16)
    swir = rng.integers(500, 1500, (rows // 2, cols // 2)).astype(np.uint16)
    return gk.SceneBands({"B04": red, "B08": nir, "B11": swir}, ORIGIN, UTM32N, boa_add_offset=offset)


def water_or_land(batch: np.ndarray) -> np.ndarray:
    """A per-pixel 'model': logits (water, land) from the normalised NIR - red difference (channel 1 - channel 0)."""
    difference = batch[:, 1] - batch[:, 0]
    return np.stack([-difference, difference], axis=1).astype(np.float32) * 50


def test_working_stack_resamples_to_the_working_grid_and_keeps_the_georeferencing() -> None:
    stack = gk.working_stack(scene(), card())
    assert stack.values.shape == (3, 20, 30) and stack.values.dtype == np.float32
    assert stack.transform == ORIGIN @ Affine.scale(3.0) and stack.crs == UTM32N and stack.resolution_m == 30.0
    source = scene()
    # average of each 3 x 3 block of the 10 m band
    expected = source.bands["B04"].astype(np.float64).reshape(20, 3, 30, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(stack.values[0], expected, rtol=1e-5)
    assert not stack.nodata.any()


def test_partial_edge_pixels_are_kept_and_the_10m_grid_path_stacks_native_bands() -> None:
    stack = gk.working_stack(scene(rows=62, cols=92), card())
    assert stack.values.shape == (3, 21, 31)
    native = gk.working_stack(scene(rows=60, cols=60), card(working_resolution_m=0.0, resampling="", tile_size=16))
    assert native.values.shape == (3, 60, 60) and native.transform == ORIGIN


def test_nodata_pixels_are_masked_in_the_stack_and_the_classes() -> None:
    source = scene()
    for band in source.bands.values():
        band[: band.shape[0] // 2, : band.shape[1] // 3] = 0  # top-left block without data
    result = gk.process_scene(source, card(), water_or_land, batch_size=3)
    assert isinstance(result, gk.PixelClassResult)
    assert (result.codes[:10, :10] == CLASS_NODATA_CODE).all()
    assert not (result.codes[10:] == CLASS_NODATA_CODE).any()
    assert result.nodata_fraction == pytest.approx(100 / 600)
    assert sum(result.fractions.values()) == pytest.approx(1.0)
    assert result.fractions["water"] == pytest.approx(100 / 500)  # bottom-left block of the water third
    with pytest.raises(gk.InputRejected, match="nodata_policy is 'reject'"):
        gk.process_scene(source, card(nodata_policy="reject"), water_or_land)


def test_classes_follow_the_data_and_the_card_codes() -> None:
    result = gk.process_scene(scene(), card(class_codes=[7, 3]), water_or_land, batch_size=4)
    assert set(np.unique(result.codes[:, :10]).tolist()) == {7} and set(np.unique(result.codes[:, 10:]).tolist()) == {3}
    assert result.fractions == {"water": pytest.approx(1 / 3), "land": pytest.approx(2 / 3)}
    assert result.colour_table[7] == (0, 0, 255, 255) and result.transform == ORIGIN @ Affine.scale(3.0)
    assert gk.class_share(result, ["water", "land"]) == pytest.approx(1.0)
    assert gk.class_share(result, ["water"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"classes \['cloud'\] are not among"):
        gk.class_share(result, ["cloud"])
    assert gk.manifest_entry(result)["class_fractions"] == {"water": pytest.approx(1 / 3, abs=1e-6), "land": pytest.approx(2 / 3, abs=1e-6)}


def test_reflectance_applies_the_product_offset_only_when_the_card_says_so() -> None:
    dn = np.array([[[1000.0, 3000.0]]], dtype=np.float32)
    assert np.allclose(gk.reflectance(dn, card(), boa_add_offset=-1000), [[[0.0, 0.2]]])
    assert np.allclose(gk.reflectance(dn, card(reflectance_offset="none"), boa_add_offset=-1000), [[[0.1, 0.3]]])
    assert np.array_equal(gk.reflectance(dn, card(reflectance_scale=0.0, reflectance_offset="none")), dn)


def test_model_input_standardises_in_float64_like_the_reference() -> None:
    c = card(band_mean=[0.1, 0.2, 0.3], band_std=[0.3, 0.7, 0.11])
    values = np.random.default_rng(4).random((3, 5, 5)).astype(np.float32)
    image = np.moveaxis(values, 0, -1).copy()
    image -= [0.1, 0.2, 0.3]  # ukis-csmask's CSmask.normalize, in place on float32 with float64 statistics
    image /= [0.3, 0.7, 0.11]
    assert np.array_equal(gk.normalise(values, c), np.moveaxis(image, -1, 0))


def test_pixel_values_are_blended_means_with_nan_for_nodata() -> None:
    def ndvi_like(batch: np.ndarray) -> np.ndarray:
        return (batch[:, 1] - batch[:, 0])  # [N, T, T]: one value per pixel

    c = card(output_kind="pixel-values", class_names=[], class_colours=[], output_activation="none", blending="tukey")
    source = scene()
    source.bands["B04"][:3, :3] = 0
    source.bands["B08"][:3, :3] = 0
    source.bands["B11"][:2, :2] = 0
    result = gk.process_scene(source, c, ndvi_like)
    assert isinstance(result, gk.PixelValueResult) and result.values.shape == (1, 20, 30)
    assert np.isnan(result.values[0, 0, 0]) and np.isfinite(result.values[0, 1:, 1:]).all()
    stack = gk.working_stack(source, c)
    expected = gk.normalise(gk.reflectance(stack.values, c), c)
    np.testing.assert_allclose(result.values[0, 1:, 1:], (expected[1] - expected[0])[1:, 1:], rtol=1e-4, atol=1e-5)


def test_per_tile_kinds_give_records_with_labels() -> None:
    features = dict(input_kind="features", bands=[], band_mean=[], band_std=[], normalisation="none",
                    reflectance_scale=0.0, reflectance_offset="none", working_resolution_m=0.0, resampling="",
                    tile_size=0, nodata_value=None, class_colours=[])
    probabilities = card(**features, output_kind="tile-class-probabilities", class_names=["a", "b", "c"])
    records = gk.tile_class_probabilities(np.array([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]], dtype=np.float32), probabilities, top=2)
    assert [label for label, _ in records[0].labels] == ["b", "c"] and records[1].labels[0][0] == "a"
    assert sum(records[0].values) == pytest.approx(1.0)
    labelled = card(**features, output_kind="tile-class-probabilities", class_names=[], output_activation="none")
    assert gk.tile_class_probabilities(np.array([[0.2, 0.9]]), labelled, labels=["x", "y"])[0].labels[0] == ("y", 0.9)
    vector = card(**features, output_kind="tile-vector", class_names=[], output_activation="sigmoid")
    (record,) = gk.tile_vectors(np.array([[0.0, 100.0]], dtype=np.float32), vector)
    assert record.values == [0.5, 1.0]
    with pytest.raises(ValueError, match="do not fit 3 labels"):
        gk.tile_class_probabilities(np.zeros((1, 2)), probabilities)


def test_bad_inputs_are_rejected_with_the_reason() -> None:
    source = scene()
    with pytest.raises(gk.InputRejected, match="missing band B11"):
        gk.working_stack(gk.SceneBands({k: v for k, v in source.bands.items() if k != "B11"}), card())
    odd = dict(source.bands, B11=np.zeros((31, 45), dtype=np.uint16))
    with pytest.raises(gk.InputRejected, match="does not cover the footprint"):
        gk.working_stack(gk.SceneBands(odd, ORIGIN, UTM32N), card())
    with pytest.raises(ValueError, match="returned 1 outputs for 2 inputs"):
        gk.infer_in_batches(np.zeros((2, 3, 4, 4), np.float32), lambda b: b[:1], batch_size=2)


def test_class_geotiff_carries_codes_colours_nodata_and_georeferencing() -> None:
    c = card()
    codes = np.array([[0, 1], [CLASS_NODATA_CODE, 1]], dtype=np.uint8)
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    data = write_class_geotiff(codes, UTM32N, ORIGIN, c.class_names, c.codes, class_colour_table(c), "m", "1", created)
    assert data == write_class_geotiff(codes, UTM32N, ORIGIN, c.class_names, c.codes, class_colour_table(c), "m", "1", created)
    raster = read_geotiff(data)
    assert np.array_equal(raster.array[0], codes) and raster.nodata == CLASS_NODATA_CODE
    assert raster.transform == ORIGIN and "32632" in (raster.crs_wkt or "") and raster.band_descriptions == ("classes",)
    assert raster.tags["class_names"] == '["water", "land"]' and raster.tags["created"] == "2026-01-02T03:04:05+00:00"
    from rasterio.io import MemoryFile

    with MemoryFile(data) as memory_file, memory_file.open() as dataset:
        assert dataset.colormap(1)[1] == (0, 255, 0, 255)
    from services.wrapper.outputs.types import OutputFormatError

    with pytest.raises(OutputFormatError, match=r"codes \[9\]"):
        write_class_geotiff(np.full((2, 2), 9, np.uint8), None, None, c.class_names, c.codes, {}, "m", "1", created)


def test_png_round_trip_and_percentile_stretch() -> None:
    image = np.random.default_rng(5).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    assert np.array_equal(quicklook.decode_png(quicklook.encode_png(image)), image)
    grey = image[:, :, 0]
    assert np.array_equal(quicklook.decode_png(quicklook.encode_png(grey))[:, :, 0], grey)
    values = np.arange(100, dtype=np.float64).reshape(1, 10, 10)
    stretched = quicklook.stretch(values)
    assert stretched[0, 0, 0] == 0 and stretched[0, -1, -1] == 255  # below 2 % -> 0, above 98 % -> 255
    assert stretched[0, 5, 0] == round((50 - 1.98) * 255 / (97.02 - 1.98))
    with pytest.raises(quicklook.QuicklookError, match="uint8"):
        quicklook.encode_png(values[0])


def test_true_colour_and_mask_overlay_quicklooks() -> None:
    rgb = {"B04": np.full((20, 30), 100.0), "B03": np.full((20, 30), 50.0), "B02": np.tile(np.arange(30.0), (20, 1))}
    nodata = np.zeros((20, 30), bool)
    nodata[0, 0] = True
    picture = quicklook.true_colour(rgb, nodata)
    assert picture.shape == (20, 30, 3) and tuple(picture[0, 0]) == (0, 0, 0)
    assert picture[5, 29, 2] == 255 and picture[5, 0, 2] == 0  # blue stretched over its own range
    codes = np.zeros((20, 30), np.uint8)
    codes[:, 15:] = 1
    table = {0: (0, 0, 255, 255), 1: (255, 0, 0, 255)}
    overlay = quicklook.class_overlay(picture, codes, table, transparent_codes=[0], alpha=0.5)
    assert np.array_equal(overlay[:, :15], picture[:, :15])
    assert overlay[5, 20, 0] == round(0.5 * picture[5, 20, 0] + 0.5 * 255)
    png = quicklook.mask_overlay_png(rgb, codes, table, [0], nodata, max_side=10)
    assert quicklook.decode_png(png).shape == (6, 10, 3)  # block means by 3 (20 x 30 -> 6 x 10)


def test_per_tile_cards_over_a_scene_give_one_record_per_full_tile_with_its_grid() -> None:
    source = scene(rows=60, cols=90)
    for band in source.bands.values():
        band[-band.shape[0] // 6:, :] = 0  # the bottom tile row has no data
    c = card(working_resolution_m=20.0, tile_size=10, tile_overlap=0.0, output_kind="tile-class-probabilities")

    def mean_water_or_land(batch: np.ndarray) -> np.ndarray:
        return water_or_land(batch).mean(axis=(2, 3))  # [N, 2]

    records = gk.process_tiles(source, c, mean_water_or_land, batch_size=2)
    # 20 m grid: 30 x 45 -> full 10 x 10 tiles at rows 0, 10 (row 20 has no data) and cols 0, 10, 20, 30
    assert [(r.row, r.col) for r in records] == [(row, col) for row in (0, 10) for col in (0, 10, 20, 30)]
    assert records[1].transform == ORIGIN @ Affine.scale(2.0) @ Affine.translation(10, 0)
    by_origin = {(r.row, r.col): r.labels[0][0] for r in records}
    assert by_origin[(0, 0)] == "water" and by_origin[(0, 20)] == "land" and by_origin[(10, 30)] == "land"
    with pytest.raises(ValueError, match="per-tile output kinds"):
        gk.process_tiles(source, card(), mean_water_or_land)


def test_the_products_boa_add_offset_is_read_from_its_metadata() -> None:
    baseline_4 = b"""<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
 <n1:General_Info><Product_Image_Characteristics>
  <QUANTIFICATION_VALUES_LIST><BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE></QUANTIFICATION_VALUES_LIST>
  <BOA_ADD_OFFSET_VALUES_LIST>
   <BOA_ADD_OFFSET band_id="0">-1000</BOA_ADD_OFFSET><BOA_ADD_OFFSET band_id="1">-1000</BOA_ADD_OFFSET>
  </BOA_ADD_OFFSET_VALUES_LIST>
 </Product_Image_Characteristics></n1:General_Info>
</n1:Level-2A_User_Product>"""
    assert gk.product_boa_add_offset(baseline_4) == -1000.0
    older = baseline_4.replace(b"BOA_ADD_OFFSET_VALUES_LIST", b"OTHER_LIST").replace(b"BOA_ADD_OFFSET ", b"OTHER ").replace(b"</BOA_ADD_OFFSET>", b"</OTHER>")
    assert gk.product_boa_add_offset(older) == 0.0
    with pytest.raises(gk.InputRejected, match="differs between bands"):
        gk.product_boa_add_offset(baseline_4.replace(b'"1">-1000', b'"1">-900'))
    with pytest.raises(gk.InputRejected, match="not readable XML"):
        gk.product_boa_add_offset(b"<unclosed")
    # and the offset reaches the model input: reflectance = (DN - 1000) / 10000
    source = scene(offset=-1000.0)
    stack = gk.working_stack(source, card())
    c = card(normalisation="none", band_mean=[], band_std=[])
    np.testing.assert_allclose(gk.model_input(stack, c, source.boa_add_offset), (stack.values - 1000.0) * 1e-4, rtol=1e-5)


def test_services_never_import_the_reference_package() -> None:
    """ukis-csmask is the reference the tests compare with (dev/bench extras); a service image has no such package."""
    import re
    from pathlib import Path

    services = Path(__file__).resolve().parents[2] / "services"
    pattern = re.compile(r"^\s*(import|from)\s+(ukis_csmask|eodal|scipy)\b", re.M)
    offenders = [str(path) for path in services.rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []
