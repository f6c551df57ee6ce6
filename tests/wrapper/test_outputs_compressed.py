"""compress results: entropy-coded codes decode bit-exactly (format 1) or as requantised (format 2), sizes are
reported right, rate control meets what a workflow asks for, damage is detected."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from outputs_test_data import (
    GEOREFERENCED_PATCH,
    PLAIN_PATCH,
    SYNTHETIC_TRAIN_RMS,
    band_scale,
    patch_metadata,
    read_sample_patch,
    requantised_codes,
    synthetic_prior,
    synthetic_transform_codes,
)
from services.core.rvq_prior import fit_rvq_prior
from services.core.transform_codes import QUANTISER_SCALES
from services.wrapper.outputs import (
    OperatingPoint,
    OutputFormatError,
    PatchMetadata,
    keep_levels,
    read_compressed,
    read_compressed_header,
    write_compressed,
    write_transform_codes,
)
from services.wrapper.outputs.compressed import (
    CODE_MAGIC,
    FORMAT_VERSION_RESIDUAL,
    FORMAT_VERSION_RESIDUAL_PRIOR,
    FORMAT_VERSION_TRANSFORM,
)
from services.wrapper.outputs.residual_prior_codes import smaller_residual_file, write_residual_prior_codes

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
    assert data.startswith(CODE_MAGIC) and struct.unpack_from("<H", data, 8)[0] == FORMAT_VERSION_RESIDUAL
    assert header["format_version"] == FORMAT_VERSION_RESIDUAL
    assert header["codec"] == "residual-vq/1"


def test_format_1_files_without_a_codec_still_read_and_another_codec_is_refused() -> None:
    codes = _skewed_codes(1, seed=3)
    data = _write(codes).file.data
    # As written before the header named the codec: the same codes come back.
    older = _rewrite_header(data, lambda h: h.pop("codec"))
    assert "codec" not in read_compressed_header(older)
    assert np.array_equal(read_compressed(older).codes, codes)
    with pytest.raises(OutputFormatError, match="header codec is 'transform-codes/1'; this reader handles 'residual-vq/1'"):
        read_compressed(_rewrite_header(data, lambda h: h.update(codec="transform-codes/1")))


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


# ---------------------------------------------------------------------------------------------------------------
# Format 2: transform codes with a learned prior, at a workflow's operating point


def _write_v2(codes: np.ndarray, point: OperatingPoint, prior=None, patches=None):  # type: ignore[no-untyped-def]
    return write_transform_codes(codes, point, prior or synthetic_prior(), patches or _patches(codes.shape[0]),
                                 band_scale(), MODEL, "2")


def _added_rms_percent(codes: np.ndarray, decoded: np.ndarray, levels: int) -> float:
    """The RMS error requantising adds (% of 10,000 DN), measured on the codes: the transform is orthonormal, so
    the squared error over a patch's 144,000 values is the squared error of its coefficients (x 100 DN)."""
    kept = codes[..., :levels].astype(np.float64)
    difference = (kept - decoded[..., :levels]) * 100.0
    return 100.0 * math.sqrt((difference**2).sum() / (codes.shape[0] * 14400 * 10)) / 10000.0


@pytest.mark.parametrize("levels", range(1, 9))
def test_v2_at_scale_1_decodes_the_served_codes_exactly_at_every_level_count(levels: int) -> None:
    codes = synthetic_transform_codes(2, seed=levels)
    result = _write_v2(codes, OperatingPoint(levels, quantiser_scale=1))
    data = result.file.data
    assert struct.unpack_from("<H", data, 8)[0] == FORMAT_VERSION_TRANSFORM
    decoded = read_compressed(data, synthetic_prior())
    assert decoded.codes.dtype == np.int64 and decoded.codes.shape == (2, 60, 60, 8)
    assert np.array_equal(decoded.codes, keep_levels(codes, levels))
    assert (decoded.levels, decoded.quantiser_scale, decoded.format_version) == (levels, 1, FORMAT_VERSION_TRANSFORM)
    assert (decoded.model_name, decoded.model_version) == (MODEL, "2")
    stats = result.stats
    assert stats.bits_per_pixel == len(data) * 8 / (2 * 14400)
    assert stats.quantiser_scale == 1 and stats.target_met is None
    # No requantisation: the estimate is the transform's own error at this level count.
    assert stats.estimated_rms_percent == pytest.approx(SYNTHETIC_TRAIN_RMS[0, levels - 1])


@pytest.mark.parametrize("scale", [2, 3, 8, 64])
@pytest.mark.parametrize("levels", [1, 5, 8])
def test_v2_at_a_coarser_scale_decodes_the_requantised_codes(scale: int, levels: int) -> None:
    codes = synthetic_transform_codes(2, seed=scale)
    result = _write_v2(codes, OperatingPoint(levels, quantiser_scale=scale))
    decoded = read_compressed(result.file.data, synthetic_prior())
    assert np.array_equal(decoded.codes, requantised_codes(codes, scale, levels))
    assert decoded.quantiser_scale == scale
    base = SYNTHETIC_TRAIN_RMS[0, levels - 1]
    added = _added_rms_percent(codes, decoded.codes, levels)
    assert added > 0
    assert result.stats.estimated_rms_percent == pytest.approx(math.sqrt(base**2 + added**2), rel=1e-9)


def test_v2_header_records_the_operating_point_and_the_prior() -> None:
    georeferenced = patch_metadata(read_sample_patch(GEOREFERENCED_PATCH))
    plain = patch_metadata(read_sample_patch(PLAIN_PATCH))
    prior = synthetic_prior()
    data = _write_v2(synthetic_transform_codes(2), OperatingPoint(4, target_bpp=2.0), prior, [georeferenced, plain]).file.data
    header = read_compressed_header(data)
    assert header["format_version"] == FORMAT_VERSION_TRANSFORM
    assert header["codec"] == "transform-codes/1"
    assert header["levels"] == 4 and header["quantiser_scale"] in QUANTISER_SCALES
    assert header["prior_sha256"] == prior.sha256
    assert header["requested"] == {"levels": 4, "target_bpp": 2.0}
    assert header["target_met"] is True and header["estimated_rms_percent"] > 0
    assert header["model_name"] == MODEL and header["model_version"] == "2"
    decoded = read_compressed(data, prior)
    assert decoded.patches == (georeferenced, plain) and decoded.band_scale == band_scale()
    # A fixed scale is no target: nothing to meet.
    fixed = read_compressed_header(_write_v2(synthetic_transform_codes(1), OperatingPoint(8, quantiser_scale=8)).file.data)
    assert fixed["requested"] == {"levels": 8, "quantiser_scale": 8} and "target_met" not in fixed


def test_v2_coarser_scales_cost_fewer_bits_and_beat_format_1() -> None:
    codes = synthetic_transform_codes(2, seed=4)
    sizes = [_write_v2(codes, OperatingPoint(8, quantiser_scale=s)).stats.bits_per_pixel for s in QUANTISER_SCALES]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2 * sizes[-1]
    # The learned prior earns its bits: the same codes in format 1 (per-file histograms) cost more.
    assert sizes[0] < write_compressed(codes, 8, _patches(2), band_scale(), MODEL, "2").stats.bits_per_pixel


@pytest.mark.parametrize("patches", [1, 3])
def test_v2_target_bpp_takes_the_finest_scale_that_fits(patches: int) -> None:
    codes = synthetic_transform_codes(patches, seed=7)
    by_scale = {s: _write_v2(codes, OperatingPoint(6, quantiser_scale=s)).stats.bits_per_pixel for s in QUANTISER_SCALES}
    chosen = []
    # Targets half-way between the file sizes of neighbouring scales (from coarse to fine, and one above all).
    pairs = list(zip(QUANTISER_SCALES[:-1], QUANTISER_SCALES[1:]))[::-1]
    for finer, coarser in [*pairs, (None, 1)]:
        target = (by_scale[finer] + by_scale[coarser]) / 2 if finer else by_scale[1] * 1.5
        result = _write_v2(codes, OperatingPoint(6, target_bpp=target))
        stats = result.stats
        assert stats.target_met is True and stats.bits_per_pixel <= target, (target, stats)
        assert stats.quantiser_scale == coarser  # the finest scale within the target
        assert stats.bits_per_pixel == len(result.file.data) * 8 / (patches * 14400)
        decoded = read_compressed(result.file.data, synthetic_prior())
        assert np.array_equal(decoded.codes, requantised_codes(codes, coarser, 6))
        chosen.append((stats.quantiser_scale, stats.bits_per_pixel))
    # Monotone: a looser target never takes a coarser scale nor a smaller file.
    assert [c[0] for c in chosen] == sorted((c[0] for c in chosen), reverse=True)
    assert [c[1] for c in chosen] == sorted(c[1] for c in chosen)


def test_v2_unreachable_target_bpp_takes_the_coarsest_scale_and_says_so() -> None:
    codes = synthetic_transform_codes(1, seed=8)
    result = _write_v2(codes, OperatingPoint(8, target_bpp=0.01))
    assert result.stats.quantiser_scale == QUANTISER_SCALES[-1] and result.stats.target_met is False
    assert result.stats.bits_per_pixel > 0.01
    assert read_compressed_header(result.file.data)["target_met"] is False


def test_v2_target_rms_takes_coarser_scales_for_looser_targets() -> None:
    codes = synthetic_transform_codes(2, seed=9)
    levels = 4
    base = SYNTHETIC_TRAIN_RMS[0, levels - 1]
    chosen = []
    for target in (base * 1.01, base * 1.3, base * 2, base * 4, base * 10):
        result = _write_v2(codes, OperatingPoint(levels, target_rms_percent=target))
        stats = result.stats
        assert stats.target_met is True and stats.estimated_rms_percent <= target
        decoded = read_compressed(result.file.data, synthetic_prior())
        # The estimate is what this file's requantisation really adds to the transform's error.
        added = _added_rms_percent(codes, decoded.codes, levels)
        assert stats.estimated_rms_percent == pytest.approx(math.sqrt(base**2 + added**2), rel=1e-9)
        # The coarsest: the next coarser scale would be over the target.
        coarser = [s for s in QUANTISER_SCALES if s > stats.quantiser_scale]
        if coarser:
            over = _write_v2(codes, OperatingPoint(levels, quantiser_scale=coarser[0])).stats.estimated_rms_percent
            assert over > target
        chosen.append((stats.quantiser_scale, stats.bits_per_pixel))
    assert [c[0] for c in chosen] == sorted(c[0] for c in chosen) and chosen[0][0] < chosen[-1][0]
    assert [c[1] for c in chosen] == sorted((c[1] for c in chosen), reverse=True)
    # Below the transform's own error no scale can do: the finest, flagged.
    tight = _write_v2(codes, OperatingPoint(levels, target_rms_percent=base * 0.9)).stats
    assert tight.quantiser_scale == 1 and tight.target_met is False


def test_v2_needs_the_prior_it_was_coded_with() -> None:
    data = _write_v2(synthetic_transform_codes(1), OperatingPoint(8, quantiser_scale=4)).file.data
    with pytest.raises(OutputFormatError, match="no prior was given"):
        read_compressed(data)
    with pytest.raises(OutputFormatError, match="not with the prior given"):
        read_compressed(data, synthetic_prior(seed=1))
    assert read_compressed(data, synthetic_prior()).quantiser_scale == 4


def test_v2_damaged_files_are_refused() -> None:
    prior = synthetic_prior()
    data = _write_v2(synthetic_transform_codes(2), OperatingPoint(6, quantiser_scale=2)).file.data
    one_patch = _write_v2(synthetic_transform_codes(1), OperatingPoint(6, quantiser_scale=2)).file.data
    cases = {
        "payload is damaged": data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:],
        "bytes; its header describes": data[:-4],
        "truncated inside its header": data[:40],
        "header is damaged": data[:20] + bytes([data[20] ^ 0x01]) + data[21:],
        "quantiser_scale": _rewrite_header(data, lambda h: h.update(quantiser_scale=5)),
        "codec": _rewrite_header(data, lambda h: h.update(codec="transform-codes/9")),
        "levels": _rewrite_header(data, lambda h: h.update(levels=0)),
        "prior_sha256": _rewrite_header(data, lambda h: h.update(prior_sha256=None)),
        "word_count": _rewrite_header(data, lambda h: h.update(word_count=-1)),
        # A header that lies about what was coded (CRC recomputed): the words do not decode into that many codes.
        "invalid|left over": _rewrite_header(data, lambda h: h.update(patches=h["patches"][:1])),
        "invalid|left over ": _rewrite_header(data, lambda h: h.update(patches=h["patches"] * 2)),
        "invalid|left over  ": _rewrite_header(data, lambda h: h.update(levels=5)),
        "more than the limit": _rewrite_header(one_patch, lambda h: h.update(patches=h["patches"] * 9000)),
    }
    for match, damaged in cases.items():
        with pytest.raises(OutputFormatError, match=match.strip()):
            read_compressed(damaged, prior)


@pytest.mark.parametrize(
    ("point", "match"),
    [
        (lambda: OperatingPoint(0, quantiser_scale=1), "levels"),
        (lambda: OperatingPoint(9, quantiser_scale=1), "levels"),
        (lambda: OperatingPoint(8), "exactly one"),
        (lambda: OperatingPoint(8, quantiser_scale=2, target_bpp=1.0), "exactly one"),
        (lambda: OperatingPoint(8, quantiser_scale=5), "quantiser scale"),
        (lambda: OperatingPoint(8, target_bpp=0.0), "target_bpp"),
        (lambda: OperatingPoint(8, target_rms_percent=float("nan")), "target_rms_percent"),
    ],
)
def test_bad_operating_points_are_refused(point, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OutputFormatError, match=match):
        point()


def test_v2_refuses_codes_that_are_not_transform_codes() -> None:
    codes = synthetic_transform_codes(1)
    holes = codes.copy()
    holes[0, :30, :, 2] = -1  # level 3 used in half the patch: not what a transform compressor gives
    with pytest.raises(OutputFormatError, match="prefix of the levels"):
        _write_v2(holes, OperatingPoint(8, quantiser_scale=1))
    with pytest.raises(OutputFormatError, match="codes use 3 levels; 5 were asked for"):
        _write_v2(keep_levels(codes, 3), OperatingPoint(5, quantiser_scale=1))
    # Fewer levels than the codes carry is what a workflow asks for: fine.
    decoded = read_compressed(_write_v2(keep_levels(codes, 3), OperatingPoint(2, quantiser_scale=1)).file.data,
                              synthetic_prior())
    assert np.array_equal(decoded.codes, keep_levels(codes, 2))


def test_v2_writer_is_deterministic() -> None:
    codes = synthetic_transform_codes(2, seed=5)
    point = OperatingPoint(5, target_bpp=2.0)
    assert _write_v2(codes, point).file.data == _write_v2(codes.copy(), point).file.data


def test_v2_estimates_of_a_file_larger_than_one_estimate_chunk() -> None:
    # Rate control sums its estimates over chunks of 256 patches: a 260-patch file gets the whole-file figures.
    from services.core import transform_codes

    codes = synthetic_transform_codes(260, seed=12)
    result = _write_v2(codes, OperatingPoint(5, target_rms_percent=float(SYNTHETIC_TRAIN_RMS[0, 4]) * 1.5))
    stats = result.stats
    decoded = read_compressed(result.file.data, synthetic_prior())
    added = _added_rms_percent(codes, decoded.codes, 5)
    assert stats.estimated_rms_percent == pytest.approx(math.sqrt(SYNTHETIC_TRAIN_RMS[0, 4] ** 2 + added**2), rel=1e-9)
    q, _ = transform_codes.codes_to_coefficients(codes)
    whole = transform_codes.ideal_bits(transform_codes.requantise(q, stats.quantiser_scale), 5, stats.quantiser_scale,
                                       synthetic_prior())
    assert stats.entropy_bits == pytest.approx(whole, rel=1e-9)
    assert stats.entropy_bits <= stats.payload_bits <= stats.entropy_bits * 1.01 + 64


# ---------------------------------------------------------------------------------------------------------------
# Format 3: residual-VQ codes under the card's static RVQ prior, written only when smaller than format 1


def _rvq_prior(seed: int = 11):  # type: ignore[no-untyped-def]
    return fit_rvq_prior(_skewed_codes(6, seed=seed), source="skewed training codes")


@pytest.mark.parametrize("levels", [1, 4, 8])
def test_format_3_decodes_the_codes_bit_exactly_with_its_prior(levels: int) -> None:
    codes = _skewed_codes(2, seed=levels)
    codes[1, :10, :10, 5:] = -1
    prior = _rvq_prior()
    result = write_residual_prior_codes(codes, levels, prior, _patches(2), band_scale(), MODEL, "1")
    data = result.file.data
    header = read_compressed_header(data)
    assert (header["format_version"], header["codec"], header["prior_sha256"]) == (3, "residual-vq/1", prior.sha256)
    assert struct.unpack_from("<H", data, 8)[0] == FORMAT_VERSION_RESIDUAL_PRIOR
    decoded = read_compressed(data, prior)
    np.testing.assert_array_equal(decoded.codes, keep_levels(codes, levels))
    assert decoded.format_version == 3 and decoded.levels == levels
    assert result.stats.format_version == 3 and result.stats.payload_bits >= result.stats.entropy_bits - 64


def test_format_3_needs_the_prior_its_header_names() -> None:
    data = write_residual_prior_codes(_skewed_codes(1), 8, _rvq_prior(), _patches(1), band_scale(), MODEL, "1").file.data
    with pytest.raises(OutputFormatError, match="no RVQ prior given"):
        read_compressed(data)
    with pytest.raises(OutputFormatError, match="not with"):
        read_compressed(data, _rvq_prior(seed=12))
    with pytest.raises(OutputFormatError, match="no RVQ prior given"):
        read_compressed(data, synthetic_prior())


def test_the_smaller_file_is_kept_and_a_prior_never_costs_bits() -> None:
    prior = _rvq_prior()
    # One patch drawn like the training codes: format 1's per-file tables cost more than the prior's mismatch.
    small = _skewed_codes(1, seed=3)
    chosen = smaller_residual_file(small, 8, prior, _patches(1), band_scale(), MODEL, "1")
    own = _write(small)
    assert chosen.stats.format_version == 3 and len(chosen.file.data) < len(own.file.data)
    # Codes unlike the training codes (uniform): the prior would cost more, format 1 is written.
    unlike = _uniform_codes(1, seed=4)
    kept = smaller_residual_file(unlike, 8, prior, _patches(1), band_scale(), MODEL, "1")
    assert kept.stats.format_version == 1 and kept.file.data == _write(unlike).file.data
    # Without a prior: format 1.
    assert smaller_residual_file(small, 8, None, _patches(1), band_scale(), MODEL, "1").file.data == own.file.data
