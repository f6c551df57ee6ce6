"""``compress`` results: the compressor's codes, entropy-coded, in one self-describing file per input.

Codes are INT64 [N, 60, 60, 8]: a code in [0, 9999] per code position and level, -1 where a level is not used (the
decompressor's convention). Compressing at L < 8 levels keeps only the first L levels; the reader gives back all 8
with -1 in the dropped ones, which the decompressor decodes as "level not used".

Two format versions share the prefix and the header rules (all integers little-endian)::

    offset 0   magic  b"EOMLRVQC"                      8 bytes
    offset 8   format version (uint16): 1, 2 or 3
    offset 10  header length H in bytes (uint32)
    offset 14  CRC-32 of the header bytes (uint32)
    offset 18  header: H bytes of UTF-8 JSON (sorted keys)
               version 1: model tables (``table_bytes`` bytes), then the coded words
               version 2: the coded words
               version 3: the coded words (``residual_prior_codes.py``: residual-VQ codes, the card's static prior)
               coded words: ``word_count`` uint32 words of one ``constriction`` range-coder stream

Every header records the model name and version, the number of levels kept, the per-band scale the decoder side
needs to go back to digital numbers (band order, mean, std from the model card), each patch's source metadata
(patch id, CRS as WKT, affine transform, i, j) and a CRC-32 of everything after the header, so a damaged file is
refused instead of decoded into wrong codes.

**Version 2** (``write_transform_codes``; compressors whose model card carries an entropy prior,
``card.entropy_prior``): the codes are quantised transform coefficients (``services/core/transform_codes.py``,
``codec: "transform-codes/1"``). The file stores ``symbol = round(q / s)`` for the base coefficients
``q = code - 5000`` of the first ``levels`` levels at a quantiser scale ``s`` (``quantiser_scale``), coded with the
learned prior the header names by its sha256 (``prior_sha256``): one range-coder stream, coefficient by coefficient
over every block of the file. The reader gives back ``code = symbol * s + 5000`` (clamped to 0..9,999), -1 in the
levels not kept: with ``s = 1`` the served codes exactly. The header also records the operating point the workflow
asked for (``requested``: ``levels`` and one of ``quantiser_scale``, ``target_bpp``, ``target_rms_percent``, the
Wrapper's defaults when it asked for none), whether a target was met (``target_met``, only with a target) and the
file's estimated RMS error (``estimated_rms_percent``, % of 10,000 DN: the transform's own error at the base step
on the training corpus, from the prior, combined with the error this file's requantisation adds).

**Version 1** (``write_compressed``; ``codec: "residual-vq/1"`` compressors, no prior; the header names the codec
since it became a card field, files without it still read): symbol = code + 1 (so
-1 is symbol 0), alphabet 10001. Symbols are coded level by level (all of level 0, then level 1, ...), each level
in C order of [patch, row, col], with one model per level chosen from this file's own histogram of that level,
whichever is smaller in total (model + coded bits):

- ``constant``: one distinct symbol; nothing is coded (``constriction`` has no delta distribution);
- ``categorical``: the level's empirical histogram, stored sparsely in the tables section as pairs of LEB128
  varints (gap to the previous present symbol, count - 1) over the present symbols in ascending order; the
  coder's alphabet is the present symbols only, so the decoder rebuilds the identical model from the counts;
- ``uniform``: all 10001 symbols equally likely (cheaper when the histogram would cost more than it saves, e.g.
  one patch whose 3600 codes per level are nearly all distinct).

Bits per pixel are measured per spatial pixel of the 120 x 120 patch (as D3.4 does): file bits / (N x 14400);
raw Sentinel-2 at 10 bands x 12 bits is 120 bpp.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import constriction
import numpy as np

from services.core import transform_codes as tc
from services.core.metrics import Stage, timed_stage
from services.core.rvq_prior import ResidualVqPrior
from services.core.transform_codes import QUANTISER_SCALES, LaplaceContextPrior, TransformCodesError
from services.wrapper.outputs.types import BandScale, OutputFile, OutputFormatError, PatchMetadata, check_patches

CODE_MAGIC = b"EOMLRVQC"
FORMAT_VERSION_RESIDUAL = 1  # residual-VQ codes, per-file histograms (``write_compressed``)
FORMAT_VERSION_TRANSFORM = 2  # transform codes, learned prior, rate control (``write_transform_codes``)
FORMAT_VERSION_RESIDUAL_PRIOR = 3  # residual-VQ codes under the card's static prior (``residual_prior_codes.py``)
FORMAT_VERSION = FORMAT_VERSION_RESIDUAL_PRIOR  # the newest
SUPPORTED_VERSIONS = (FORMAT_VERSION_RESIDUAL, FORMAT_VERSION_TRANSFORM, FORMAT_VERSION_RESIDUAL_PRIOR)
TRANSFORM_CODEC = "transform-codes/1"  # services.core.model_card.Codec: the header's ``codec`` of each version
RESIDUAL_CODEC = "residual-vq/1"
CODEBOOK_SIZE = 10000
CODEBOOK_LEVELS = 8
LATENT_SHAPE = (60, 60)
PATCH_SIZE = 120  # the compressor downscales by 2: a 60 x 60 latent grid covers 120 x 120 pixels
UNUSED_CODE = -1
RAW_BITS_PER_PIXEL = 10 * 12  # 10 bands of 12-bit L2A digital numbers
COMPRESSED_SUFFIX = ".codes"
COMPRESSED_CONTENT_TYPE = "application/octet-stream"
CODER = "constriction.stream.queue.RangeEncoder"

_PREFIX = struct.Struct("<8sHII")
_ALPHABET = CODEBOOK_SIZE + 1  # symbol = code + 1
PIXELS_PER_PATCH = PATCH_SIZE * PATCH_SIZE
# Decoded codes take 8 x 3600 x 8 bytes = 230 KB per patch: 8192 patches are 1.9 GB. Both sides refuse more by
# default, so a file cannot make the decompress step allocate without bound; a larger input is written as
# several files.
MAX_PATCHES_PER_FILE = 8192

ModelKind = Literal["constant", "categorical", "uniform"]
# Rate control: a scale is encoded and measured only when its ideal cost (the prior's code lengths plus the header)
# is within this factor of the target; the range coder's real cost is within a fraction of a percent of the ideal,
# so a scale pruned this way cannot meet the target.
_PRUNE_FACTOR = 1.02


@dataclass(frozen=True, slots=True)
class CompressionStats:
    """Sizes of one compressed file. ``*_bits_per_pixel`` divide by N x 120 x 120 spatial pixels."""

    patches: int
    levels: int
    symbols: int  # coded symbols: N x 60 x 60 x levels
    file_bytes: int
    payload_bits: int  # the range coder's words
    # Version 1: sum over levels of the level's empirical (zeroth-order) entropy x its symbol count; version 2: the
    # prior's ideal code length of the file's symbols.
    entropy_bits: float
    level_models: tuple[str, ...]  # version 1: one model per level; version 2: ("transform-codes/1",)
    format_version: int = FORMAT_VERSION_RESIDUAL
    # Version 2: the quantiser scale chosen, the file's estimated RMS error (% of 10,000 DN), the operating point the
    # workflow asked for and, when it asked for a target, whether the file meets it. None for version 1.
    quantiser_scale: int | None = None
    estimated_rms_percent: float | None = None
    requested: dict[str, Any] | None = None
    target_met: bool | None = None

    @property
    def pixels(self) -> int:
        return self.patches * PIXELS_PER_PATCH

    @property
    def bits_per_pixel(self) -> float:
        """What the file achieves, header and model tables included."""
        return self.file_bytes * 8 / self.pixels

    @property
    def payload_bits_per_pixel(self) -> float:
        return self.payload_bits / self.pixels

    @property
    def entropy_bits_per_pixel(self) -> float:
        """The bound for any coder of these codes with one static model per level (model cost not counted)."""
        return self.entropy_bits / self.pixels

    @property
    def fixed_length_bits_per_pixel(self) -> float:
        """The codes stored as plain indices: levels x log2(10000) bits per 2 x 2 pixel block."""
        return self.symbols * math.log2(CODEBOOK_SIZE) / self.pixels

    def as_dict(self) -> dict[str, Any]:
        return {
            "patches": self.patches,
            "levels": self.levels,
            "file_bytes": self.file_bytes,
            "bits_per_pixel": self.bits_per_pixel,
            "payload_bits_per_pixel": self.payload_bits_per_pixel,
            "entropy_bits_per_pixel": self.entropy_bits_per_pixel,
            "fixed_length_bits_per_pixel": self.fixed_length_bits_per_pixel,
            "level_models": list(self.level_models),
            "format_version": self.format_version,
            # The operating point (format 2 only; ``target_met`` only when the workflow asked for a target).
            **{name: value for name, value in (
                ("quantiser_scale", self.quantiser_scale),
                ("estimated_rms_percent", self.estimated_rms_percent),
                ("requested", self.requested),
                ("target_met", self.target_met),
            ) if value is not None},
        }


@dataclass(frozen=True, slots=True)
class CompressedFile:
    file: OutputFile
    stats: CompressionStats


@dataclass(frozen=True, slots=True)
class DecodedCodes:
    """A compressed file read back: codes [N, 60, 60, 8] int64 (-1 in levels >= ``levels``) and what travels with them."""

    codes: np.ndarray
    levels: int
    patches: tuple[PatchMetadata, ...]
    band_scale: BandScale
    model_name: str
    model_version: str
    format_version: int = FORMAT_VERSION_RESIDUAL
    quantiser_scale: int | None = None  # version 2: the scale the codes were requantised with (1 = exact)

    def __repr__(self) -> str:
        return f"DecodedCodes({len(self.patches)} patches, levels={self.levels}, model={self.model_name!r})"


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """The rate a workflow asks for (version 2): ``levels`` and exactly one of a quantiser scale, a target bits per
    pixel or a target RMS error (% of 10,000 DN)."""

    levels: int
    quantiser_scale: int | None = None
    target_bpp: float | None = None
    target_rms_percent: float | None = None

    def __post_init__(self) -> None:
        _check_levels(self.levels)
        given = [name for name in ("quantiser_scale", "target_bpp", "target_rms_percent")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise OutputFormatError(
                f"an operating point needs exactly one of quantiser_scale, target_bpp, target_rms_percent; got {given}")
        if self.quantiser_scale is not None:
            try:
                tc.check_scale(self.quantiser_scale)
            except TransformCodesError as error:
                raise OutputFormatError(str(error)) from None
        for name in ("target_bpp", "target_rms_percent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise OutputFormatError(f"{name} must be a finite number > 0, got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        """The fields given (what the header records as ``requested``)."""
        out: dict[str, Any] = {"levels": self.levels}
        for name in ("quantiser_scale", "target_bpp", "target_rms_percent"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


# ---------------------------------------------------------------------------------------------
# Sparse histogram tables (LEB128 varints)


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(data: bytes, offset: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= end or shift > 28:
            raise OutputFormatError("compressed file: a model table is truncated or malformed")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7


def _encode_table(present: np.ndarray, counts: np.ndarray) -> bytes:
    out = bytearray()
    previous = -1
    for symbol, count in zip(present.tolist(), counts.tolist()):
        _put_varint(out, symbol - previous - 1)
        _put_varint(out, count - 1)
        previous = symbol
    return bytes(out)


def _decode_table(data: bytes, offset: int, end: int, distinct: int) -> tuple[np.ndarray, np.ndarray]:
    present = np.empty(distinct, dtype=np.int64)
    counts = np.empty(distinct, dtype=np.int64)
    previous = -1
    for index in range(distinct):
        gap, offset = _get_varint(data, offset, end)
        count, offset = _get_varint(data, offset, end)
        previous += gap + 1
        present[index], counts[index] = previous, count + 1
    if offset != end:
        raise OutputFormatError("compressed file: a model table has trailing bytes")
    if distinct and present[-1] >= _ALPHABET:
        raise OutputFormatError("compressed file: a model table names a code outside the codebook")
    return present, counts


def _categorical(counts: np.ndarray) -> Any:
    # perfect=False: the fast, documented-stable quantisation; encoder and decoder must agree on it.
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    p = counts / total
    return float(-(counts * np.log2(p)).sum())


# ---------------------------------------------------------------------------------------------
# Writer


def check_codes(codes: np.ndarray) -> np.ndarray:
    """Codes as int64 [N >= 1, 60, 60, 8] with values in [-1, 9999]."""
    if not isinstance(codes, np.ndarray):
        raise OutputFormatError(f"codes must be a numpy array, got {type(codes).__name__}")
    if codes.dtype.kind not in "iu":
        raise OutputFormatError(f"codes must be an integer array (INT64), got {codes.dtype}")
    expected = (*LATENT_SHAPE, CODEBOOK_LEVELS)
    if codes.ndim != 4 or codes.shape[1:] != expected or codes.shape[0] == 0:
        raise OutputFormatError(f"codes must have shape [N >= 1, {', '.join(map(str, expected))}], got {list(codes.shape)}")
    low, high = int(codes.min()), int(codes.max())
    if low < UNUSED_CODE or high >= CODEBOOK_SIZE:
        raise OutputFormatError(f"codes must be in [-1, {CODEBOOK_SIZE - 1}], found values in [{low}, {high}]")
    return codes.astype(np.int64, copy=False)


def _check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or not 1 <= levels <= CODEBOOK_LEVELS:
        raise OutputFormatError(f"levels must be an integer in [1, {CODEBOOK_LEVELS}], got {levels!r}")
    return int(levels)


# Header fields with one possible value in both format versions: written as they are, checked on reading.
_FILE_CONSTANTS: dict[str, Any] = {
    "codebook_size": CODEBOOK_SIZE,
    "codebook_levels": CODEBOOK_LEVELS,
    "latent_shape": list(LATENT_SHAPE),
    "unused_code": UNUSED_CODE,
    "coder": CODER,
}


def _shared_header(model_name: str, model_version: str, levels: int, band_scale: BandScale,
                   patches: Sequence[PatchMetadata]) -> dict[str, Any]:
    """Header fields of both format versions."""
    return {
        **_FILE_CONSTANTS,
        "model_name": model_name,
        "model_version": model_version,
        "levels": levels,
        "patch_size": PATCH_SIZE,
        "band_scale": band_scale.to_json(),
        "patches": [patch.to_json() for patch in patches],
    }


def write_compressed(
    codes: np.ndarray,
    levels: int,
    patches: Sequence[PatchMetadata],
    band_scale: BandScale,
    model_name: str,
    model_version: str,
    max_patches: int = MAX_PATCHES_PER_FILE,
) -> CompressedFile:
    """One version-1 file (residual-VQ codes, per-file histograms) for the N patches of an input, keeping the first
    ``levels`` code planes; compressors whose card has an entropy prior use ``write_transform_codes``.

    Deterministic: equal arguments give byte-identical files (no timestamps, sorted JSON keys).
    """
    codes = check_codes(codes)
    levels = _check_levels(levels)
    codes = _check_file_inputs(codes, patches, band_scale, model_name, model_version, max_patches)

    encoder = constriction.stream.queue.RangeEncoder()
    level_models: list[dict[str, Any]] = []
    tables = bytearray()
    entropy_bits = 0.0
    for level in range(levels):
        symbols = (codes[..., level].reshape(-1) + 1).astype(np.int32)
        counts_all = np.bincount(symbols, minlength=_ALPHABET)
        present = np.flatnonzero(counts_all)
        counts = counts_all[present]
        if present.size == 1:
            level_models.append({"kind": "constant", "code": int(present[0]) - 1})
            continue
        level_entropy = _entropy_bits(counts)
        entropy_bits += level_entropy
        table = _encode_table(present, counts)
        uniform_bits = symbols.size * math.log2(_ALPHABET)
        if level_entropy + 8 * len(table) < uniform_bits:
            encoder.encode(np.searchsorted(present, symbols).astype(np.int32), _categorical(counts))
            level_models.append({"kind": "categorical", "distinct": int(present.size), "table_bytes": len(table)})
            tables += table
        else:
            encoder.encode(symbols, constriction.stream.model.Uniform(_ALPHABET))
            level_models.append({"kind": "uniform"})
    words = encoder.get_compressed().astype("<u4", copy=False)
    body = bytes(tables) + words.tobytes()
    header = {
        **_shared_header(model_name, model_version, levels, band_scale, patches),
        "codec": RESIDUAL_CODEC,
        "level_models": level_models,
        "table_bytes": len(tables),
        "word_count": int(words.size),
        "payload_crc32": zlib.crc32(body),
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    data = _PREFIX.pack(CODE_MAGIC, FORMAT_VERSION_RESIDUAL, len(header_bytes), zlib.crc32(header_bytes)) + header_bytes + body
    stats = CompressionStats(
        patches=codes.shape[0],
        levels=levels,
        symbols=codes.shape[0] * LATENT_SHAPE[0] * LATENT_SHAPE[1] * levels,
        file_bytes=len(data),
        payload_bits=int(words.size) * 32,
        entropy_bits=entropy_bits,
        level_models=tuple(model["kind"] for model in level_models),
    )
    return CompressedFile(OutputFile(data=data, content_type=COMPRESSED_CONTENT_TYPE, suffix=COMPRESSED_SUFFIX), stats)


# ---------------------------------------------------------------------------------------------
# Writer, version 2: transform codes with a learned prior and a per-workflow operating point


def _check_file_inputs(codes: np.ndarray, patches: Sequence[PatchMetadata], band_scale: BandScale, model_name: str,
                       model_version: str, max_patches: int) -> np.ndarray:
    codes = check_codes(codes)
    if codes.shape[0] > max_patches:
        raise OutputFormatError(
            f"{codes.shape[0]} patches are more than {max_patches} per compressed file; write the input as several files"
        )
    check_patches(patches, codes.shape[0], "codes")
    if not isinstance(band_scale, BandScale):
        raise OutputFormatError(f"band_scale must be a BandScale, got {type(band_scale).__name__}")
    for name, value in (("model_name", model_name), ("model_version", model_version)):
        if not isinstance(value, str):
            raise OutputFormatError(f"{name} must be a string, got {type(value).__name__}")
    return codes


# Rate control works through a file's coefficients this many patches at a time: the estimates are sums over blocks,
# and their float64 temporaries for a whole 8192-patch file would take gigabytes.
_ESTIMATE_CHUNK = 256


def estimated_rms_percent(q: np.ndarray, quantiser_scale: int, levels: int, prior: LaplaceContextPrior,
                          symbols: np.ndarray | None = None) -> float:
    """RMS error (% of 10,000 DN) of a file of base coefficients ``q`` at (``quantiser_scale``, ``levels``).

    The transform's own error at the base step (truncation to ``levels`` and rounding to 100 DN, measured on the
    training corpus and shipped in the prior) and the error requantising adds (exact for this file: the transform is
    orthonormal) are independent, so their squares add."""
    base = float(prior.train_rms_percent[0, levels - 1])
    squares = 0.0
    for first in range(0, q.shape[0], _ESTIMATE_CHUNK):
        chunk = q[first:first + _ESTIMATE_CHUNK]
        chunk_symbols = None if symbols is None else symbols[first:first + _ESTIMATE_CHUNK]
        squares += tc.block_rms_of_requantisation(chunk, quantiser_scale, levels, chunk_symbols) ** 2 * chunk.shape[0]
    added = 100.0 * math.sqrt(squares / q.shape[0]) / 10000.0
    return math.sqrt(base * base + added * added)


def _ideal_bits(q: np.ndarray, quantiser_scale: int, levels: int, prior: LaplaceContextPrior,
                symbols: np.ndarray | None = None) -> float:
    """``transform_codes.ideal_bits`` of the file at a scale (block contexts are per block: a sum over chunks);
    ``symbols``: ``requantise(q, quantiser_scale)`` when the caller has it already."""
    def chunk_symbols(first: int) -> np.ndarray:
        if symbols is not None:
            return symbols[first:first + _ESTIMATE_CHUNK]
        return tc.requantise(q[first:first + _ESTIMATE_CHUNK], quantiser_scale)

    return sum(tc.ideal_bits(chunk_symbols(first), levels, quantiser_scale, prior)
               for first in range(0, q.shape[0], _ESTIMATE_CHUNK))


def write_transform_codes(
    codes: np.ndarray,
    point: OperatingPoint,
    prior: LaplaceContextPrior,
    patches: Sequence[PatchMetadata],
    band_scale: BandScale,
    model_name: str,
    model_version: str,
    max_patches: int = MAX_PATCHES_PER_FILE,
) -> CompressedFile:
    """One version-2 file for the N patches of an input at the operating point ``point``.

    ``quantiser_scale``: that scale. ``target_bpp``: the finest scale whose file (header included) is within the
    target, else the coarsest (``target_met: false``). ``target_rms_percent``: the coarsest scale whose estimated
    RMS error is within the target, else the finest (``target_met: false``). Deterministic, like version 1.
    """
    codes = _check_file_inputs(codes, patches, band_scale, model_name, model_version, max_patches)
    if not isinstance(point, OperatingPoint):
        raise OutputFormatError(f"point must be an OperatingPoint, got {type(point).__name__}")
    if not isinstance(prior, LaplaceContextPrior):
        raise OutputFormatError(f"prior must be a LaplaceContextPrior, got {type(prior).__name__}")
    try:
        q, used = tc.codes_to_coefficients(codes)
    except TransformCodesError as error:
        raise OutputFormatError(f"codes are not transform codes: {error}") from None
    levels = point.levels
    if used < levels:
        raise OutputFormatError(f"codes use {used} levels; {levels} were asked for")
    q[..., levels * tc.PER_LEVEL:] = 0  # not stored: keeps the estimates and the coder to the levels kept
    count = codes.shape[0]
    pixels = count * PIXELS_PER_PATCH
    prior_sha256 = prior.sha256
    header_base = {
        **_shared_header(model_name, model_version, levels, band_scale, patches),
        "codec": TRANSFORM_CODEC,
        "prior_sha256": prior_sha256,
        "requested": point.as_dict(),
    }

    def build(scale: int, target_met: bool | None) -> tuple[bytes, CompressionStats]:
        symbols = tc.requantise(q, scale)
        encoder = constriction.stream.queue.RangeEncoder()
        try:
            tc.encode_symbols(symbols, levels, scale, prior, encoder)
        except TransformCodesError as error:
            raise OutputFormatError(f"codes cannot be coded: {error}") from None
        words = encoder.get_compressed().astype("<u4", copy=False)
        body = words.tobytes()
        rms = estimated_rms_percent(q, scale, levels, prior, symbols)
        header = {**header_base, "quantiser_scale": scale, "estimated_rms_percent": round(rms, 6),
                  "word_count": int(words.size), "payload_crc32": zlib.crc32(body)}
        if target_met is not None:
            header["target_met"] = target_met
        header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
        data = (_PREFIX.pack(CODE_MAGIC, FORMAT_VERSION_TRANSFORM, len(header_bytes), zlib.crc32(header_bytes))
                + header_bytes + body)
        stats = CompressionStats(
            patches=count,
            levels=levels,
            symbols=count * LATENT_SHAPE[0] * LATENT_SHAPE[1] * levels,
            file_bytes=len(data),
            payload_bits=int(words.size) * 32,
            entropy_bits=_ideal_bits(q, scale, levels, prior, symbols),
            level_models=(TRANSFORM_CODEC,),
            format_version=FORMAT_VERSION_TRANSFORM,
            quantiser_scale=scale,
            estimated_rms_percent=rms,
            requested=point.as_dict(),
            target_met=target_met,
        )
        return data, stats

    if point.quantiser_scale is not None:
        data, stats = build(point.quantiser_scale, None)
    elif point.target_rms_percent is not None:
        fitting = [s for s in QUANTISER_SCALES
                   if estimated_rms_percent(q, s, levels, prior) <= point.target_rms_percent]
        data, stats = build(max(fitting), True) if fitting else build(QUANTISER_SCALES[0], False)
    else:
        assert point.target_bpp is not None
        target_bits = point.target_bpp * pixels
        # The header's size hardly depends on the scale (a few digits): measured once with placeholders.
        probe = {**header_base, "quantiser_scale": 64, "estimated_rms_percent": 0.0, "word_count": 0,
                 "payload_crc32": 0, "target_met": False}
        header_bits = 8 * (_PREFIX.size + len(json.dumps(probe, sort_keys=True, separators=(",", ":"))))
        chosen: tuple[bytes, CompressionStats] | None = None
        for scale in QUANTISER_SCALES:
            ideal = _ideal_bits(q, scale, levels, prior)
            if header_bits + ideal > _PRUNE_FACTOR * target_bits and scale != QUANTISER_SCALES[-1]:
                continue
            data, stats = build(scale, True)
            if stats.file_bytes * 8 <= target_bits:
                chosen = data, stats
                break
        if chosen is None:
            chosen = build(QUANTISER_SCALES[-1], False)
        data, stats = chosen
    return CompressedFile(OutputFile(data=data, content_type=COMPRESSED_CONTENT_TYPE, suffix=COMPRESSED_SUFFIX), stats)


# ---------------------------------------------------------------------------------------------
# Reader


def _read_header(data: bytes) -> tuple[dict[str, Any], int, int]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise OutputFormatError(f"compressed file must be bytes, got {type(data).__name__}")
    if len(data) < _PREFIX.size:
        raise OutputFormatError(f"compressed file is {len(data)} bytes, shorter than its {_PREFIX.size}-byte prefix")
    magic, version, header_length, header_crc = _PREFIX.unpack_from(data, 0)
    if magic != CODE_MAGIC:
        raise OutputFormatError(f"not a compressed codes file: magic {magic!r}, expected {CODE_MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise OutputFormatError(
            f"compressed codes format version {version} is not supported (this reader: {list(SUPPORTED_VERSIONS)})"
        )
    header_end = _PREFIX.size + header_length
    if header_end > len(data):
        raise OutputFormatError("compressed file is truncated inside its header")
    header_bytes = bytes(data[_PREFIX.size : header_end])
    if zlib.crc32(header_bytes) != header_crc:
        raise OutputFormatError("compressed file header is damaged (CRC-32 mismatch)")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OutputFormatError(f"compressed file header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise OutputFormatError("compressed file header must be a JSON object")
    header["format_version"] = version  # not stored in the JSON: the prefix says it
    return header, header_end, version


def _header_int(header: dict[str, Any], key: str, low: int, high: int) -> int:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OutputFormatError(f"compressed file header {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def read_compressed_header(data: bytes) -> dict[str, Any]:
    """The JSON header alone (model, levels, band scale, patches; version 2: codec, quantiser scale, prior sha256,
    operating point), checked for integrity, with ``format_version`` from the prefix; nothing is decoded."""
    return _read_header(data)[0]


def _common_header(header: dict[str, Any], max_patches: int) -> tuple[tuple[PatchMetadata, ...], BandScale, str, str]:
    """Patches, band scale, model name and version of either version's header."""
    raw_patches = header.get("patches")
    if not isinstance(raw_patches, list) or not raw_patches:
        raise OutputFormatError("compressed file header patches must be a non-empty list")
    if len(raw_patches) > max_patches:
        raise OutputFormatError(f"compressed file holds {len(raw_patches)} patches, more than the limit of {max_patches}")
    patches = tuple(PatchMetadata.from_json(p) for p in raw_patches)
    band_scale = BandScale.from_json(header.get("band_scale"))
    model_name, model_version = header.get("model_name"), header.get("model_version")
    if not isinstance(model_name, str) or not isinstance(model_version, str):
        raise OutputFormatError("compressed file header model_name and model_version must be strings")
    return patches, band_scale, model_name, model_version


def _check_constants(header: dict[str, Any], expected_constants: dict[str, Any]) -> None:
    for key, expected in expected_constants.items():
        if header.get(key) != expected:
            raise OutputFormatError(
                f"compressed file header {key} is {header.get(key)!r}; this reader handles {expected!r}"
            )


def _payload_words(header: dict[str, Any], data: bytes, offset: int, table_bytes: int) -> np.ndarray:
    """The coder's words after ``table_bytes`` of tables, once the payload's length and CRC-32 match the header."""
    word_count = _header_int(header, "word_count", 0, len(data) // 4)
    payload_crc = _header_int(header, "payload_crc32", 0, 0xFFFFFFFF)
    described = offset + table_bytes + 4 * word_count
    if described != len(data):
        raise OutputFormatError(f"compressed file is {len(data)} bytes; its header describes {described}")
    if zlib.crc32(data[offset:]) != payload_crc:
        raise OutputFormatError("compressed file payload is damaged (CRC-32 mismatch)")
    return np.frombuffer(data, dtype="<u4", count=word_count, offset=offset + table_bytes).astype(np.uint32)


@timed_stage(Stage.DECODE)
def read_compressed(
    data: bytes, prior: LaplaceContextPrior | ResidualVqPrior | None = None, max_patches: int = MAX_PATCHES_PER_FILE
) -> DecodedCodes:
    """Decode a file written by ``write_compressed`` (version 1), ``write_transform_codes`` (version 2, with the
    ``prior`` its header names) or ``residual_prior_codes.write_residual_prior_codes`` (version 3, with the RVQ
    ``prior`` its header names); any damage is an ``OutputFormatError``, never wrong codes.

    A file of more than ``max_patches`` patches is refused before anything is allocated for its codes.
    """
    header, offset, version = _read_header(data)
    data = bytes(data)
    if version == FORMAT_VERSION_TRANSFORM:
        return _read_transform_codes(header, offset, data, prior, max_patches)
    if version == FORMAT_VERSION_RESIDUAL_PRIOR:
        from services.wrapper.outputs.residual_prior_codes import read_residual_prior_codes  # it imports this module

        return read_residual_prior_codes(header, offset, data, prior, max_patches)
    # Files written before the header named its codec have none (still read); one that names another is refused.
    _check_constants(header, {**_FILE_CONSTANTS, **({"codec": RESIDUAL_CODEC} if "codec" in header else {})})
    levels = _header_int(header, "levels", 1, CODEBOOK_LEVELS)
    table_bytes = _header_int(header, "table_bytes", 0, len(data))
    words = _payload_words(header, data, offset, table_bytes)
    patches, band_scale, model_name, model_version = _common_header(header, max_patches)
    models = header.get("level_models")
    if not isinstance(models, list) or len(models) != levels or not all(isinstance(m, dict) for m in models):
        raise OutputFormatError(f"compressed file header level_models must list {levels} models")

    count = len(patches)
    per_level = count * LATENT_SHAPE[0] * LATENT_SHAPE[1]
    codes = np.full((count, *LATENT_SHAPE, CODEBOOK_LEVELS), UNUSED_CODE, dtype=np.int64)
    decoder = constriction.stream.queue.RangeDecoder(words)
    table_offset = offset
    table_end = offset + table_bytes
    for level, model in enumerate(models):
        kind = model.get("kind")
        try:
            if kind == "constant":
                code = _header_int(model, "code", UNUSED_CODE, CODEBOOK_SIZE - 1)
                symbols = np.full(per_level, code + 1, dtype=np.int64)
            elif kind == "uniform":
                symbols = decoder.decode(constriction.stream.model.Uniform(_ALPHABET), per_level).astype(np.int64)
            elif kind == "categorical":
                distinct = _header_int(model, "distinct", 2, _ALPHABET)
                size = _header_int(model, "table_bytes", 1, table_end - table_offset)
                present, counts = _decode_table(data, table_offset, table_offset + size, distinct)
                table_offset += size
                if counts.sum() != per_level:
                    raise OutputFormatError(
                        f"compressed file: level {level} histogram counts {counts.sum()} symbols, expected {per_level}"
                    )
                symbols = present[decoder.decode(_categorical(counts), per_level)]
            else:
                raise OutputFormatError(f"compressed file: level {level} has unknown model kind {kind!r}")
        except AssertionError:
            # constriction asserts on words that no symbol sequence produces.
            raise OutputFormatError(f"compressed file: coded words of level {level} are invalid") from None
        codes[..., level] = (symbols - 1).reshape(count, *LATENT_SHAPE)
    if table_offset != table_end:
        raise OutputFormatError("compressed file: the model tables section has unused bytes")
    return DecodedCodes(
        codes=codes,
        levels=levels,
        patches=patches,
        band_scale=band_scale,
        model_name=model_name,
        model_version=model_version,
    )


def _read_transform_codes(
    header: dict[str, Any], offset: int, data: bytes, prior: object, max_patches: int
) -> DecodedCodes:
    _check_constants(header, {"codec": TRANSFORM_CODEC, **_FILE_CONSTANTS})
    levels = _header_int(header, "levels", 1, CODEBOOK_LEVELS)
    scale = header.get("quantiser_scale")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale not in QUANTISER_SCALES:
        raise OutputFormatError(f"compressed file header quantiser_scale must be one of {list(QUANTISER_SCALES)}, "
                                f"got {scale!r}")
    wanted = header.get("prior_sha256")
    if not isinstance(wanted, str):
        raise OutputFormatError("compressed file header prior_sha256 must be a string")
    if not isinstance(prior, LaplaceContextPrior):
        raise OutputFormatError(f"compressed file was coded with entropy prior {wanted[:12]}...; no prior was given "
                                "to decode it (the decompressor's model card names one)")
    if prior.sha256 != wanted:
        raise OutputFormatError(f"compressed file was coded with entropy prior {wanted[:12]}..., not with the "
                                f"prior given ({prior.sha256[:12]}...)")
    words = _payload_words(header, data, offset, 0)
    patches, band_scale, model_name, model_version = _common_header(header, max_patches)
    decoder = constriction.stream.queue.RangeDecoder(words)
    try:
        symbols = tc.decode_symbols(decoder, len(patches), levels, scale, prior)
    except (AssertionError, ValueError, RuntimeError) as error:
        # constriction refuses words that no symbol sequence produces.
        raise OutputFormatError(f"compressed file: the coded words are invalid ({error})") from None
    if not decoder.maybe_exhausted():
        # The CRC holds, so this is a header that lies about the patches or levels: refuse rather than guess.
        raise OutputFormatError("compressed file: coded words are left over after the codes the header describes")
    codes = tc.coefficients_to_codes(symbols * scale, levels)
    return DecodedCodes(
        codes=codes,
        levels=levels,
        patches=patches,
        band_scale=band_scale,
        model_name=model_name,
        model_version=model_version,
        format_version=FORMAT_VERSION_TRANSFORM,
        quantiser_scale=scale,
    )


def keep_levels(codes: np.ndarray, levels: int) -> np.ndarray:
    """``codes`` with levels >= ``levels`` set to -1: what a file written with ``levels`` decodes to."""
    out = check_codes(codes).copy()
    out[..., _check_levels(levels):] = UNUSED_CODE
    return out


__all__ = [
    "CODE_MAGIC",
    "COMPRESSED_SUFFIX",
    "CompressedFile",
    "CompressionStats",
    "DecodedCodes",
    "FORMAT_VERSION",
    "FORMAT_VERSION_RESIDUAL",
    "FORMAT_VERSION_TRANSFORM",
    "OperatingPoint",
    "TRANSFORM_CODEC",
    "estimated_rms_percent",
    "MAX_PATCHES_PER_FILE",
    "RAW_BITS_PER_PIXEL",
    "check_codes",
    "keep_levels",
    "read_compressed",
    "read_compressed_header",
    "write_compressed",
    "write_transform_codes",
]
