"""Result keys: deterministic, derived from the input object's name, safe and collision-free."""

from __future__ import annotations

import typing

import pytest

from services.core.model_card import Task
from services.wrapper.outputs import OutputFormatError
from services.wrapper.outputs.keys import MAX_NAME_LENGTH, PRODUCTION_RESULT_PREFIXES, input_name, result_key, sanitise_name


@pytest.mark.parametrize(
    ("input_key", "expected"),
    [
        ("uploads/run-1/patches.tar.gz", "patches"),
        ("uploads/patches.tgz", "patches"),
        ("a/b/S2B_MSIL2A_20180502T093039_N0207_R136_T35VNL_20180502T114247.SAFE/",
         "S2B_MSIL2A_20180502T093039_N0207_R136_T35VNL_20180502T114247"),
        ("in/S2A_MSIL2A_20170613T101031_39_24", "S2A_MSIL2A_20170613T101031_39_24"),
        ("in/S2A_MSIL2A_20170613T101031_39_24/", "S2A_MSIL2A_20170613T101031_39_24"),
        ("result-image2feature/scene.features.json", "scene.features"),
        ("codes/model.v1.2", "model.v1.2"),  # a version-like tail is not an extension
        ("top.tar.GZ", "top"),
    ],
)
def test_input_name_drops_folder_and_extension(input_key: str, expected: str) -> None:
    assert input_name(input_key) == expected


def test_unsafe_names_are_cleaned_and_kept_apart() -> None:
    spaced = input_name("uploads/my patches.tar.gz")
    underscored = input_name("uploads/my_patches.tar.gz")
    assert underscored == "my_patches"
    assert spaced.startswith("my_patches-") and spaced != underscored
    assert all(ch.isalnum() or ch in "._-" for ch in spaced)
    assert sanitise_name("../../etc/passwd") not in ("", "..")
    assert not sanitise_name(".hidden").startswith(".")
    assert sanitise_name("Ünïcode name") != sanitise_name("_n_code name")


def test_sanitise_is_idempotent_and_bounded() -> None:
    for raw in ("plain-name_1.2", "with space", "x" * 500, "a/b\\c:d"):
        once = sanitise_name(raw)
        assert sanitise_name(once) == once
        assert len(once) <= MAX_NAME_LENGTH
    assert sanitise_name("x" * 500) != sanitise_name("x" * 499)


def test_result_key_is_deterministic_per_input() -> None:
    first = result_key("result-image2feature", "folder/patches.tar.gz", ".features.json")
    again = result_key("result-image2feature/", "folder/patches.tar.gz", ".features.json")
    assert first == again == "result-image2feature/patches.features.json"
    other = result_key("result-image2feature", "folder/other.tar.gz", ".features.json")
    assert other != first


def test_result_key_allows_nested_prefix_and_per_patch_suffix() -> None:
    key = result_key("result-uc5-cfactor/uc5-test", "in/scene.SAFE/", "/S2A_0_1.tif")
    assert key == "result-uc5-cfactor/uc5-test/scene/S2A_0_1.tif"


@pytest.mark.parametrize("prefix", ["", "/", "a//b", "../x", "a/../b", "has space", ".hidden"])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(OutputFormatError, match="result prefix"):
        result_key(prefix, "in/x.tar.gz", ".json")


@pytest.mark.parametrize("suffix", ["/../x", "a b", "//x", "/x/", "/./x"])
def test_bad_suffix_is_refused(suffix: str) -> None:
    with pytest.raises(OutputFormatError, match="suffix"):
        result_key("result-image2code", "in/x.tar.gz", suffix)


@pytest.mark.parametrize("input_key", ["", "/", "folder/.tar.gz", "folder/..."])
def test_nameless_input_is_refused(input_key: str) -> None:
    with pytest.raises(OutputFormatError):
        input_name(input_key)


def test_every_task_has_its_production_prefix() -> None:
    assert set(PRODUCTION_RESULT_PREFIXES) == set(typing.get_args(Task))
    assert PRODUCTION_RESULT_PREFIXES["uc6-locust"] == "result-uc6-classifier"
    assert PRODUCTION_RESULT_PREFIXES["compress"] == "result-image2code"
    for prefix in PRODUCTION_RESULT_PREFIXES.values():
        assert result_key(prefix, "in/x.tar.gz", ".out").startswith(prefix + "/")
