"""decompress results: decoded patches back to digital numbers as a tar.gz of BigEarthNet patch folders."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from datetime import datetime

import numpy as np
import pytest
from affine import Affine

from outputs_test_data import (
    CREATED,
    GEOREFERENCED_PATCH,
    PLAIN_PATCH,
    SECOND_GEOREFERENCED_PATCH,
    band_scale,
    normalised_stack,
    patch_metadata,
    read_sample_patch,
)
from services.core import sentinel2
from services.wrapper.inputs import InputLimits, InputPatch
from services.wrapper.inputs.tar_stream import read_tar_stream
from services.wrapper.outputs import (
    BandScale,
    OutputFormatError,
    PatchMetadata,
    read_decompressed_archive,
    write_decompressed_archive,
)
from services.wrapper.outputs.decompressed import quantise_uint16

PATCHES = (GEOREFERENCED_PATCH, PLAIN_PATCH)


def _decoded_and_metadata(names: tuple[str, ...] = PATCHES) -> tuple[np.ndarray, list[PatchMetadata], list[InputPatch]]:
    """Sample patches as a lossless codec would return them: stacked (20 m bands replicated) and normalised."""
    inputs = [read_sample_patch(name) for name in names]
    decoded = np.stack([normalised_stack(patch, resampling="nearest") for patch in inputs])
    return decoded, [patch_metadata(patch) for patch in inputs], inputs


def test_archive_is_read_back_by_the_wrappers_own_input_layer() -> None:
    decoded, metadata, inputs = _decoded_and_metadata()
    output = write_decompressed_archive(decoded, band_scale(), metadata, CREATED)
    assert output.suffix == ".tar.gz" and output.content_type == "application/gzip"

    items = list(read_tar_stream(io.BytesIO(output.data), "result.tar.gz", InputLimits()))
    assert all(isinstance(item, InputPatch) for item in items), items
    read_back = {item.patch_id: item for item in items}
    assert set(read_back) == set(PATCHES)
    for original in inputs:
        again = read_back[original.patch_id]
        assert set(again.bands) == set(sentinel2.SIMCLR_BAND_ORDER)
        for band, array in original.bands.items():
            # 10 m bands at 120 x 120 and 20 m bands at 60 x 60, the same digital numbers as the source files.
            assert again.bands[band].dtype == np.uint16
            assert np.array_equal(again.bands[band], array), band
        assert again.crs == original.crs and again.transform == original.transform
    assert read_back[GEOREFERENCED_PATCH].crs == "EPSG:32629"


def test_native_grid_doubles_the_pixel_size_of_20m_bands() -> None:
    decoded, metadata, _ = _decoded_and_metadata((GEOREFERENCED_PATCH,))
    rasters = read_decompressed_archive(write_decompressed_archive(decoded, band_scale(), metadata, CREATED).data)
    bands = rasters[GEOREFERENCED_PATCH]
    tile_transform = Affine(10.0, 0.0, 643200.0, 0.0, -10.0, 5798040.0)
    assert bands["B02"].transform == tile_transform and bands["B02"].array.shape == (1, 120, 120)
    assert bands["B05"].transform == tile_transform @ Affine.scale(2) and bands["B05"].array.shape == (1, 60, 60)
    assert bands["B05"].crs_wkt == bands["B02"].crs_wkt and "32629" in bands["B05"].crs_wkt


def test_10m_grid_writes_every_band_at_120() -> None:
    decoded, metadata, inputs = _decoded_and_metadata((SECOND_GEOREFERENCED_PATCH,))
    output = write_decompressed_archive(decoded, band_scale(), metadata, CREATED, band_grid="10m")
    bands = read_decompressed_archive(output.data)[SECOND_GEOREFERENCED_PATCH]
    assert {raster.array.shape for raster in bands.values()} == {(1, 120, 120)}
    assert {raster.transform for raster in bands.values()} == {inputs[0].transform}
    b05 = inputs[0].bands["B05"]
    assert np.array_equal(bands["B05"].array[0], np.repeat(np.repeat(b05, 2, axis=0), 2, axis=1))


def test_archive_layout_and_fixed_timestamps() -> None:
    decoded, metadata, _ = _decoded_and_metadata()
    data = write_decompressed_archive(decoded, band_scale(), metadata, CREATED).data
    assert struct.unpack_from("<I", data, 4)[0] == int(CREATED.timestamp())  # gzip header MTIME
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        members = archive.getmembers()
    expected: list[str] = []
    for patch in PATCHES:
        expected += [patch] + [f"{patch}/{patch}_{band}.tif" for band in sentinel2.SIMCLR_BAND_ORDER]
    assert [m.name for m in members] == expected
    assert {m.mtime for m in members} == {int(CREATED.timestamp())}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}


def test_writer_is_deterministic() -> None:
    decoded, metadata, _ = _decoded_and_metadata()
    first = write_decompressed_archive(decoded, band_scale(), metadata, CREATED).data
    assert write_decompressed_archive(decoded.copy(), band_scale(), list(metadata), CREATED).data == first
    later = CREATED.replace(year=2027)
    other = write_decompressed_archive(decoded, band_scale(), metadata, later).data
    assert other != first
    assert gzip.decompress(other) != gzip.decompress(first)  # tar headers carry the time too


def test_digital_numbers_are_rounded_and_clipped() -> None:
    assert quantise_uint16(np.array([-5.0, 0.4, 0.5, 1.5, 2.5, 65535.4, 70000.0])).tolist() == [0, 0, 0, 2, 2, 65535, 65535]
    scale = BandScale(("B02",), (100.0,), (10.0,))
    decoded = np.zeros((1, 1, 120, 120), dtype=np.float32)
    decoded[0, 0, 0, :4] = [-20.0, 0.25, 1.0, 7000.0]  # -> DN -100 (0), 102.5 (102), 110, 70100 (65535)
    bands = read_decompressed_archive(
        write_decompressed_archive(decoded, scale, [PatchMetadata("p")], CREATED).data
    )["p"]
    assert bands["B02"].array[0, 0, :5].tolist() == [0, 102, 110, 65535, 100]


@pytest.mark.parametrize(
    ("decoded", "match"),
    [
        (np.zeros((1, 10, 120, 120), dtype=np.float64), "float32"),
        (np.zeros((1, 9, 120, 120), dtype=np.float32), "shape"),
        (np.zeros((1, 10, 60, 60), dtype=np.float32), "shape"),
        (np.full((1, 10, 120, 120), np.inf, dtype=np.float32), "non-finite"),
    ],
)
def test_bad_decoded_input_is_refused(decoded: np.ndarray, match: str) -> None:
    with pytest.raises(OutputFormatError, match=match):
        write_decompressed_archive(decoded, band_scale(), [PatchMetadata("p")], CREATED)


def test_bad_arguments_are_refused() -> None:
    decoded = np.zeros((2, 10, 120, 120), dtype=np.float32)
    with pytest.raises(OutputFormatError, match="timezone-aware"):
        write_decompressed_archive(decoded, band_scale(), [PatchMetadata("a"), PatchMetadata("b")], datetime(2026, 1, 1))
    with pytest.raises(OutputFormatError, match="share the folder"):
        write_decompressed_archive(decoded, band_scale(), [PatchMetadata("x/p"), PatchMetadata("y/p")], CREATED)
    with pytest.raises(OutputFormatError, match="band_grid"):
        write_decompressed_archive(
            decoded, band_scale(), [PatchMetadata("a"), PatchMetadata("b")], CREATED, "20m"  # type: ignore[arg-type]
        )
    with pytest.raises(OutputFormatError, match="not a readable tar.gz"):
        read_decompressed_archive(b"not gzip at all")
