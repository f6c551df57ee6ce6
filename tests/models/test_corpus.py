"""The corpus builder's cutting rules (models/corpus.py), on arrays made here: the real archives are `make data`'s."""

import numpy as np

from models import corpus


def test_tile_scene_drops_partial_and_nodata_windows():
    stack = np.full((10, 250, 370), 500, np.uint16)  # 2 x 3 whole windows, partial edges beyond
    stack[:, 130, 5] = 0  # one no-data pixel (0 in every band) in window (1, 0)
    stack[3, 10, 250] = 0  # a 0 in one band only is a dark pixel, not no-data: window (0, 2) stays
    patches = corpus.tile_scene(stack, "scene")
    assert patches.patch_ids == ["scene_0_0", "scene_0_1", "scene_0_2", "scene_1_1", "scene_1_2"]
    assert patches.patches.shape == (5, 10, 120, 120) and patches.patches.dtype == np.uint16
    assert (patches.cloud_fraction == -1).all()


def test_tile_scene_cloud_fraction_per_window():
    stack = np.full((10, 120, 240), 900, np.uint16)
    cloud = np.zeros((120, 240), np.float32)
    cloud[:60, 120:] = 1
    assert corpus.tile_scene(stack, "s", cloud).cloud_fraction.tolist() == [0.0, 0.5]


def test_bigearthnet_scene_is_the_product_prefix():
    assert corpus._scene_of_patch("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57") == "S2A_MSIL2A_20170613T101031"
    assert corpus._scene_of_patch("S2B_MSIL2A_20170924T93020_69_24") == "S2B_MSIL2A_20170924T93020"


def test_validation_scenes_never_include_the_bundled_sample():
    # The sample trained the codebooks already: no validation scene may be one of its scenes.
    sample = corpus.load_bundled_sample()
    assert not set(sample.scenes) & corpus.VALIDATION_SCENES
    assert len(sample) == 42
