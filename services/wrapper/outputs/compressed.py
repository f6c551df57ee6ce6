"""``compress`` results: the compressor's residual-VQ codes, entropy-coded, in one self-describing file per input.

Codes are INT64 [N, 60, 60, 8]: a code index in [0, 9999] per latent position and level, -1 where a level is not
used (the decompressor's convention). Compressing at L < 8 levels keeps only the first L planes; the reader gives
back all 8 planes with -1 in the dropped ones, which the decompressor decodes as "level not used".

File layout (all integers little-endian)::

    offset 0   magic  b"EOMLRVQC"                      8 bytes
    offset 8   format version (uint16) = 1
    offset 10  header length H in bytes (uint32)
    offset 14  CRC-32 of the header bytes (uint32)
    offset 18  header: H bytes of UTF-8 JSON (sorted keys)
               model tables: ``table_bytes`` bytes (the categorical histograms, see below)
               coded words: ``word_count`` uint32 words of one ``constriction`` range-coder stream

The header records the model name and version, the number of levels kept, the latent grid, the per-band scale
the decoder side needs to go back to digital numbers (band order, mean, std from the model card), each patch's
source metadata (patch id, CRS as WKT, affine transform, i, j), one entropy model per kept level, and a CRC-32 of
everything after the header, so a damaged file is refused instead of decoded into wrong codes.

Entropy coding: symbol = code + 1 (so -1 is symbol 0), alphabet 10001. Symbols are coded level by level (all of
level 0, then level 1, ...), each level in C order of [patch, row, col], with one model per level chosen from
this file's own histogram of that level, whichever is smaller in total (model + coded bits):

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

from services.wrapper.outputs.types import BandScale, OutputFile, OutputFormatError, PatchMetadata, check_patches

CODE_MAGIC = b"EOMLRVQC"
FORMAT_VERSION = 1
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


@dataclass(frozen=True, slots=True)
class CompressionStats:
    """Sizes of one compressed file. ``*_bits_per_pixel`` divide by N x 120 x 120 spatial pixels."""

    patches: int
    levels: int
    symbols: int  # coded symbols: N x 60 x 60 x levels
    file_bytes: int
    payload_bits: int  # the range coder's words
    entropy_bits: float  # sum over levels of the level's empirical (zeroth-order) entropy x its symbol count
    level_models: tuple[ModelKind, ...]

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

    def __repr__(self) -> str:
        return f"DecodedCodes({len(self.patches)} patches, levels={self.levels}, model={self.model_name!r})"


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


def write_compressed(
    codes: np.ndarray,
    levels: int,
    patches: Sequence[PatchMetadata],
    band_scale: BandScale,
    model_name: str,
    model_version: str,
    max_patches: int = MAX_PATCHES_PER_FILE,
) -> CompressedFile:
    """One file for the N patches of an input, keeping the first ``levels`` code planes.

    Deterministic: equal arguments give byte-identical files (no timestamps, sorted JSON keys).
    """
    codes = check_codes(codes)
    levels = _check_levels(levels)
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
        "model_name": model_name,
        "model_version": model_version,
        "codebook_size": CODEBOOK_SIZE,
        "codebook_levels": CODEBOOK_LEVELS,
        "levels": levels,
        "latent_shape": list(LATENT_SHAPE),
        "patch_size": PATCH_SIZE,
        "unused_code": UNUSED_CODE,
        "band_scale": band_scale.to_json(),
        "patches": [patch.to_json() for patch in patches],
        "coder": CODER,
        "level_models": level_models,
        "table_bytes": len(tables),
        "word_count": int(words.size),
        "payload_crc32": zlib.crc32(body),
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    data = _PREFIX.pack(CODE_MAGIC, FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes)) + header_bytes + body
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
# Reader


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise OutputFormatError(f"compressed file must be bytes, got {type(data).__name__}")
    if len(data) < _PREFIX.size:
        raise OutputFormatError(f"compressed file is {len(data)} bytes, shorter than its {_PREFIX.size}-byte prefix")
    magic, version, header_length, header_crc = _PREFIX.unpack_from(data, 0)
    if magic != CODE_MAGIC:
        raise OutputFormatError(f"not a compressed codes file: magic {magic!r}, expected {CODE_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise OutputFormatError(
            f"compressed codes format version {version} is not supported (this reader: {FORMAT_VERSION})"
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
    return header, header_end


def _header_int(header: dict[str, Any], key: str, low: int, high: int) -> int:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OutputFormatError(f"compressed file header {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def read_compressed_header(data: bytes) -> dict[str, Any]:
    """The JSON header alone (model, levels, band scale, patches), checked for integrity; nothing is decoded."""
    return _read_header(data)[0]


def read_compressed(data: bytes, max_patches: int = MAX_PATCHES_PER_FILE) -> DecodedCodes:
    """Decode a file written by ``write_compressed`` bit-exactly; any damage is an ``OutputFormatError``.

    A file of more than ``max_patches`` patches is refused before anything is allocated for its codes.
    """
    header, offset = _read_header(data)
    data = bytes(data)
    expected_constants = {
        "codebook_size": CODEBOOK_SIZE,
        "codebook_levels": CODEBOOK_LEVELS,
        "latent_shape": list(LATENT_SHAPE),
        "unused_code": UNUSED_CODE,
        "coder": CODER,
    }
    for key, expected in expected_constants.items():
        if header.get(key) != expected:
            raise OutputFormatError(
                f"compressed file header {key} is {header.get(key)!r}; this reader handles {expected!r}"
            )
    levels = _header_int(header, "levels", 1, CODEBOOK_LEVELS)
    table_bytes = _header_int(header, "table_bytes", 0, len(data))
    word_count = _header_int(header, "word_count", 0, len(data) // 4)
    payload_crc = _header_int(header, "payload_crc32", 0, 0xFFFFFFFF)
    if offset + table_bytes + 4 * word_count != len(data):
        raise OutputFormatError(
            f"compressed file is {len(data)} bytes; its header describes {offset + table_bytes + 4 * word_count}"
        )
    if zlib.crc32(data[offset:]) != payload_crc:
        raise OutputFormatError("compressed file payload is damaged (CRC-32 mismatch)")
    raw_patches = header.get("patches")
    if not isinstance(raw_patches, list) or not raw_patches:
        raise OutputFormatError("compressed file header patches must be a non-empty list")
    if len(raw_patches) > max_patches:
        raise OutputFormatError(f"compressed file holds {len(raw_patches)} patches, more than the limit of {max_patches}")
    patches = tuple(PatchMetadata.from_json(p) for p in raw_patches)
    band_scale = BandScale.from_json(header.get("band_scale"))
    models = header.get("level_models")
    if not isinstance(models, list) or len(models) != levels or not all(isinstance(m, dict) for m in models):
        raise OutputFormatError(f"compressed file header level_models must list {levels} models")
    model_name, model_version = header.get("model_name"), header.get("model_version")
    if not isinstance(model_name, str) or not isinstance(model_version, str):
        raise OutputFormatError("compressed file header model_name and model_version must be strings")

    count = len(patches)
    per_level = count * LATENT_SHAPE[0] * LATENT_SHAPE[1]
    codes = np.full((count, *LATENT_SHAPE, CODEBOOK_LEVELS), UNUSED_CODE, dtype=np.int64)
    words = np.frombuffer(data, dtype="<u4", count=word_count, offset=offset + table_bytes).astype(np.uint32)
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
    "MAX_PATCHES_PER_FILE",
    "RAW_BITS_PER_PIXEL",
    "check_codes",
    "keep_levels",
    "read_compressed",
    "read_compressed_header",
    "write_compressed",
]
