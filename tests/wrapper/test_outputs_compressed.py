"""compress results: entropy-coded codes decode bit-exactly, sizes are reported right, damage is detected."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from outputs_test_data import GEOREFERENCED_PATCH, PLAIN_PATCH, band_scale, patch_metadata, read_sample_patch
from services.wrapper.outputs import (
    OutputFormatError,
    PatchMetadata,
    keep_levels,
    read_compressed,
    read_compressed_header,
    write_compressed,
)
from services.wrapper.outputs.compressed import CODE_MAGIC, FORMAT_VERSION

MODEL = "Bigearth-net-compression-compress-pytorch"


def _patches(count: int) -> list[PatchMetadata]:
    return [PatchMetadata(patch_id=f"patch_{k}") for k in range(count)]


def _uniform_codes(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10000, size=(count, 60, 60, 8), dtype=np.int64)


def _skewed_codes(count: int, seed: int = 0) -> np.ndarray:
    # Like real residual-VQ codes: a few codes much more frequent than the rest, more so at deeper levels.
    rng = np.random.default_rng(seed)
    scale = np.array([400, 200, 100, 50, 25, 12, 6, 3], dtype=np.float64)
    return np.minimum(rng.exponential(scale, size=(count, 60, 60, 8)).astype(np.int64), 9999)


def _write(codes: np.ndarray, levels: int = 8, patches: list[PatchMetadata] | None = None):  # type: ignore[no-untyped-def]
    return write_compressed(codes, levels, patches or _patches(codes.shape[0]), band_scale(), MODEL, "1")


@pytest.mark.parametrize("make_codes", [_uniform_codes, _skewed_codes])
def test_all_levels_decode_bit_exactly(make_codes) -> None:  # type: ignore[no-untyped-def]
    codes = make_codes(3)
    result = _write(codes)
    decoded = read_compressed(result.file.data)
    assert decoded.codes.dtype == np.int64
    assert np.array_equal(decoded.codes, codes)
    assert decoded.levels == 8 and decoded.model_name == MODEL and decoded.model_version == "1"


@pytest.mark.parametrize("levels", [1, 3, 7])
def test_fewer_levels_store_only_those_planes(levels: int) -> None:
    codes = _skewed_codes(2, seed=levels)
    full = _write(codes)
    partial = _write(codes, levels)
    decoded = read_compressed(partial.file.data)
    assert decoded.levels == levels
    assert np.array_equal(decoded.codes[..., :levels], codes[..., :levels])
    assert (decoded.codes[..., levels:] == -1).all()
    assert np.array_equal(decoded.codes, keep_levels(codes, levels))
    assert partial.stats.symbols == 2 * 3600 * levels
    assert len(partial.file.data) < len(full.file.data)


def test_unused_level_markers_inside_kept_planes_survive() -> None:
    # The decompressor's convention: each position may use fewer levels, -1 marking the rest.
    rng = np.random.default_rng(7)
    codes = _skewed_codes(2, seed=7)
    kept = rng.integers(1, 9, size=(2, 60, 60, 1))
    codes[np.arange(8)[None, None, None, :] >= kept] = -1
    decoded = read_compressed(_write(codes).file.data)
    assert np.array_equal(decoded.codes, codes)


def test_constant_levels_cost_no_coded_bits() -> None:
    codes = np.full((1, 60, 60, 8), -1, dtype=np.int64)
    codes[..., 0] = 42
    result = _write(codes)
    assert result.stats.level_models == ("constant",) * 8
    assert result.stats.payload_bits == 0 and result.stats.entropy_bits == 0.0
    assert np.array_equal(read_compressed(result.file.data).codes, codes)


def test_bits_per_pixel_on_a_known_histogram() -> None:
    # Level 0: two codes, half each (1 bit per symbol); level 1: four codes, a quarter each (2 bits);
    # levels 2..7: one code (0 bits). One patch: 3600 positions, 14400 pixels.
    rng = np.random.default_rng(11)
    codes = np.full((1, 60, 60, 8), 5, dtype=np.int64)
    codes[..., 0] = rng.permutation(np.repeat([17, 9000], 1800)).reshape(1, 60, 60)
    codes[..., 1] = rng.permutation(np.repeat([0, 1, 2, 9999], 900)).reshape(1, 60, 60)
    result = _write(codes)
    stats = result.stats

    assert stats.entropy_bits == pytest.approx(3600 * (1 + 2))
    assert stats.entropy_bits_per_pixel == pytest.approx(0.75)
    assert stats.bits_per_pixel == len(result.file.data) * 8 / 14400
    assert stats.file_bytes == len(result.file.data)
    assert stats.payload_bits_per_pixel == stats.payload_bits / 14400
    assert stats.fixed_length_bits_per_pixel == pytest.approx(8 * 3600 * math.log2(10000) / 14400)
    # A range coder gets within a few words of the entropy when its model is the exact histogram.
    assert stats.entropy_bits <= stats.payload_bits <= stats.entropy_bits + 64
    assert stats.level_models[:2] == ("categorical", "categorical")
    assert np.array_equal(read_compressed(result.file.data).codes, codes)


def test_entropy_coding_beats_plain_indices_on_skewed_codes() -> None:
    stats = _write(_skewed_codes(4, seed=3)).stats
    assert stats.entropy_bits_per_pixel <= stats.payload_bits_per_pixel <= stats.bits_per_pixel
    assert stats.bits_per_pixel < stats.fixed_length_bits_per_pixel
    assert set(stats.level_models) == {"categorical"}


def test_near_uniform_levels_fall_back_to_the_uniform_model() -> None:
    # One patch of nearly distinct codes: a histogram table would cost more than it saves.
    stats = _write(_uniform_codes(1)).stats
    assert set(stats.level_models) == {"uniform"}
    assert stats.payload_bits_per_pixel == pytest.approx(8 * math.log2(10001) / 4, rel=1e-3)


def test_header_carries_scale_and_source_metadata() -> None:
    georeferenced = patch_metadata(read_sample_patch(GEOREFERENCED_PATCH))
    plain = patch_metadata(read_sample_patch(PLAIN_PATCH))
    codes = _skewed_codes(2)
    data = _write(codes, 4, [georeferenced, plain]).file.data
    decoded = read_compressed(data)
    assert decoded.patches == (georeferenced, plain)
    assert decoded.patches[0].crs_wkt is not None and decoded.patches[0].transform == georeferenced.transform
    assert decoded.band_scale == band_scale()
    assert decoded.band_scale.bands[0] == "B02" and decoded.band_scale.std[0] == pytest.approx(572.416)

    header = read_compressed_header(data)
    assert header["levels"] == 4 and header["model_name"] == MODEL
    assert data.startswith(CODE_MAGIC) and struct.unpack_from("<H", data, 8)[0] == FORMAT_VERSION


def test_writer_is_deterministic() -> None:
    codes = _skewed_codes(2, seed=5)
    assert _write(codes, 5).file.data == _write(codes.copy(), 5).file.data


def _rewrite_header(data: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    """A copy of ``data`` with its JSON header edited and the header CRC recomputed (a well-formed lie)."""
    import zlib

    length = struct.unpack_from("<I", data, 10)[0]
    header = json.loads(data[18 : 18 + length])
    change(header)
    new_header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return data[:10] + struct.pack("<II", len(new_header), zlib.crc32(new_header)) + new_header + data[18 + length :]


def test_damaged_files_are_refused() -> None:
    data = _write(_skewed_codes(1)).file.data
    cases = {
        "magic": b"NOTCODES" + data[8:],
        "version": data[:8] + struct.pack("<H", 99) + data[10:],
        "truncated inside its header": data[:30],
        "header is damaged": data[:20] + bytes([data[20] ^ 0x01]) + data[21:],
        "payload is damaged": data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:],
        "bytes; its header describes": data[:-4],
        "shorter than": data[:10],
        "levels": _rewrite_header(data, lambda h: h.update(levels=9)),
        "codebook_size": _rewrite_header(data, lambda h: h.update(codebook_size=4096)),
        "unknown model kind": _rewrite_header(data, lambda h: h["level_models"][0].update(kind="laplace")),
        "patches": _rewrite_header(data, lambda h: h.update(patches=[])),
    }
    for match, damaged in cases.items():
        with pytest.raises(OutputFormatError, match=match):
            read_compressed(damaged)


@pytest.mark.parametrize(
    ("codes", "levels", "match"),
    [
        (np.zeros((1, 60, 60, 8), dtype=np.float32), 8, "integer"),
        (np.zeros((1, 60, 60), dtype=np.int64), 8, "shape"),
        (np.zeros((1, 30, 30, 8), dtype=np.int64), 8, "shape"),
        (np.zeros((0, 60, 60, 8), dtype=np.int64), 8, "shape"),
        (np.full((1, 60, 60, 8), 10000, dtype=np.int64), 8, r"\[-1, 9999\]"),
        (np.full((1, 60, 60, 8), -2, dtype=np.int64), 8, r"\[-1, 9999\]"),
        (np.zeros((1, 60, 60, 8), dtype=np.int64), 0, "levels"),
        (np.zeros((1, 60, 60, 8), dtype=np.int64), 9, "levels"),
    ],
)
def test_bad_codes_are_refused(codes: np.ndarray, levels: int, match: str) -> None:
    with pytest.raises(OutputFormatError, match=match):
        write_compressed(codes, levels, _patches(max(codes.shape[0], 1)), band_scale(), MODEL, "1")


def test_patch_count_is_bounded_on_both_sides() -> None:
    codes = _skewed_codes(3)
    with pytest.raises(OutputFormatError, match="several files"):
        write_compressed(codes, 8, _patches(3), band_scale(), MODEL, "1", max_patches=2)
    data = _write(codes).file.data
    with pytest.raises(OutputFormatError, match="more than the limit of 2"):
        read_compressed(data, max_patches=2)
    assert read_compressed(data, max_patches=3).codes.shape[0] == 3


def test_patch_metadata_must_match() -> None:
    with pytest.raises(OutputFormatError, match="patch metadata"):
        write_compressed(_uniform_codes(2), 8, _patches(1), band_scale(), MODEL, "1")
