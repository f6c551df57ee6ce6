"""ssl-features results: production JSON and npz written, read back bit-exactly, refused when malformed."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from outputs_test_data import GEOREFERENCED_PATCH, PLAIN_PATCH, patch_metadata, read_sample_patch
from services.wrapper.outputs import (
    OutputFormatError,
    PatchMetadata,
    read_features,
    write_features_json,
    write_features_npz,
)


def _features(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    features = np.abs(rng.standard_normal((count, 2048), dtype=np.float32))
    # Values whose decimal form is awkward: the smallest subnormal, the largest float32, exact zeros, a 0.1.
    features[0, :4] = [np.float32(1e-45), np.finfo(np.float32).max, 0.0, np.float32(0.1)]
    return features


def _patches(count: int) -> list[PatchMetadata]:
    return [PatchMetadata(patch_id=f"S2A_MSIL2A_20170613T101031_{k}_7") for k in range(count)]


def test_json_round_trip_is_bit_exact_with_production_keys() -> None:
    features = _features(3)
    output = write_features_json(features, _patches(3))
    assert output.suffix == ".features.json" and output.content_type == "application/json"

    records = json.loads(output.data)
    assert [set(r) for r in records] == [{"i", "j", "result", "patch_id"}] * 3
    # BigEarthNet patches have no grid position: i is the index in input order, j is 0.
    assert [(r["i"], r["j"]) for r in records] == [(0, 0), (1, 0), (2, 0)]

    back = read_features(output.data)
    assert back.patch_ids == tuple(p.patch_id for p in _patches(3))
    assert back.features.dtype == np.float32
    assert np.array_equal(back.features.view(np.uint32), features.view(np.uint32))
    assert back.i.tolist() == [0, 1, 2] and back.j.tolist() == [0, 0, 0]


def test_tiles_keep_their_grid_position() -> None:
    patches = [PatchMetadata("scene_3_4", i=3, j=4), PatchMetadata("scene_3_5", i=3, j=5)]
    for output in (write_features_json(_features(2), patches), write_features_npz(_features(2), patches)):
        back = read_features(output.data)
        assert back.i.tolist() == [3, 3] and back.j.tolist() == [4, 5]


def test_mixing_tiles_and_patches_is_refused() -> None:
    patches = [PatchMetadata("scene_3_4", i=3, j=4), PatchMetadata("patch")]
    with pytest.raises(OutputFormatError, match="grid position"):
        write_features_json(_features(2), patches)


def test_production_json_without_patch_ids_is_read() -> None:
    features = _features(2, seed=5)
    production = json.dumps(
        [{"i": 7, "j": 9, "result": features[0].tolist()}, {"i": 7, "j": 10, "result": features[1].tolist()}]
    ).encode()
    back = read_features(production)
    assert back.patch_ids == ("7_9", "7_10")
    assert np.array_equal(back.features, features)
    assert back.i.tolist() == [7, 7] and back.j.tolist() == [9, 10]


def test_npz_is_plain_numpy_and_round_trips() -> None:
    features = _features(4, seed=1)
    patches = _patches(4)
    output = write_features_npz(features, patches, model_name="Bigearth-net-ssl-label", model_version="1")
    assert output.suffix == ".features.npz"

    with np.load(io.BytesIO(output.data), allow_pickle=False) as npz:
        assert npz["patch_ids"].dtype.kind == "U"
        assert npz["patch_ids"].tolist() == [p.patch_id for p in patches]
        assert npz["features"].dtype == np.float32 and npz["features"].shape == (4, 2048)
        assert np.array_equal(npz["features"], features)
        assert npz["i"].tolist() == [0, 1, 2, 3]

    back = read_features(output.data)
    assert back.model_name == "Bigearth-net-ssl-label" and back.model_version == "1"
    assert np.array_equal(back.features.view(np.uint32), features.view(np.uint32))
    # The npz is much smaller than the JSON for the same features.
    assert len(output.data) < len(write_features_json(features, patches).data) / 2


def test_writers_are_deterministic() -> None:
    features, patches = _features(2), _patches(2)
    assert write_features_json(features, patches).data == write_features_json(features.copy(), list(patches)).data
    first = write_features_npz(features, patches, "m", "1").data
    assert write_features_npz(features.copy(), list(patches), "m", "1").data == first
    # Zip entries carry a fixed timestamp, not the clock.
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_metadata_from_the_input_layer() -> None:
    georeferenced = patch_metadata(read_sample_patch(GEOREFERENCED_PATCH))
    plain = patch_metadata(read_sample_patch(PLAIN_PATCH))
    assert georeferenced.crs_wkt is not None and "32629" in georeferenced.crs_wkt
    assert georeferenced.transform == (10.0, 0.0, 643200.0, 0.0, -10.0, 5798040.0)
    assert plain.crs_wkt is None and plain.transform is None
    back = read_features(write_features_json(_features(2), [georeferenced, plain]).data)
    assert back.patch_ids == (GEOREFERENCED_PATCH, PLAIN_PATCH)


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (np.zeros((2, 2048), dtype=np.float64), "float32"),
        (np.zeros((2, 100), dtype=np.float32), "shape"),
        (np.zeros((2048,), dtype=np.float32), "shape"),
        (np.zeros((0, 2048), dtype=np.float32), "shape"),
        (np.full((2, 2048), np.nan, dtype=np.float32), "not finite"),
        ([[0.0] * 2048] * 2, "numpy array"),
    ],
)
def test_bad_features_are_refused(features: object, match: str) -> None:
    for writer in (write_features_json, write_features_npz):
        with pytest.raises(OutputFormatError, match=match):
            writer(features, _patches(2))  # type: ignore[arg-type]


def test_patch_metadata_must_match_rows() -> None:
    with pytest.raises(OutputFormatError, match="3 patch metadata"):
        write_features_json(_features(2), _patches(3))
    with pytest.raises(OutputFormatError, match="more than once"):
        write_features_npz(_features(2), [PatchMetadata("same"), PatchMetadata("same")])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not json", "neither an npz nor valid JSON"),
        (b'{"i": 0}', "list"),
        (b'[{"i": 0, "j": 0}]', "keys i, j and result"),
        (b'[{"i": 0, "j": 0, "result": [1.0, 2.0]}]', "2048"),
        (b'[{"i": "0", "j": 0, "result": []}]', "integer"),
        (json.dumps([{"i": 0, "j": 0, "result": [1e39] * 2048}]).encode(), "not finite"),
        (b"PK\x03\x04truncated zip", "npz cannot be read"),
    ],
)
def test_bad_feature_files_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(OutputFormatError, match=match):
        read_features(data)


def test_npz_missing_arrays_is_refused() -> None:
    buffer = io.BytesIO()
    np.savez(buffer, features=_features(1))
    with pytest.raises(OutputFormatError, match="lacks the arrays"):
        read_features(buffer.getvalue())
