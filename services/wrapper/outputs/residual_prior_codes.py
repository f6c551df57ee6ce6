"""``.codes`` format 3: residual-VQ codes coded with the model card's static prior (``services/core/rvq_prior.py``).

Same prefix and header rules as formats 1 and 2 (``compressed.py``); the header names the codec
(``residual-vq/1``), the prior by its sha256 (``prior_sha256``) and the levels kept. The body is one
``constriction`` range-coder stream: level by level (all of level 0, then level 1, ...), each level in C order of
[patch, row, col], symbol = code + 1 under the prior's distribution of that level (``perfect=False`` categorical).
No tables: what format 1 stores per file, the prior carries once for every file. The compress step writes this
format only when it is smaller than format 1 for the same codes (``smaller_residual_file``); a reader without the
prior refuses the file instead of guessing.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Sequence

import constriction
import numpy as np

from services.core.rvq_prior import ResidualVqPrior
from services.wrapper.outputs import compressed as fmt
from services.wrapper.outputs.types import BandScale, OutputFile, OutputFormatError, PatchMetadata

FORMAT_VERSION_RESIDUAL_PRIOR = 3
RESIDUAL_PRIOR_MODEL = "rvq-level-frequencies/1"
_PREFIX = struct.Struct("<8sHII")


def _level_model(prior: ResidualVqPrior, level: int) -> Any:
    return constriction.stream.model.Categorical(prior.probabilities(level), perfect=False)


def write_residual_prior_codes(
    codes: np.ndarray,
    levels: int,
    prior: ResidualVqPrior,
    patches: Sequence[PatchMetadata],
    band_scale: BandScale,
    model_name: str,
    model_version: str,
    max_patches: int = fmt.MAX_PATCHES_PER_FILE,
) -> fmt.CompressedFile:
    """One format-3 file of the first ``levels`` levels of ``codes``; deterministic like the other writers."""
    codes = fmt._check_file_inputs(codes, patches, band_scale, model_name, model_version, max_patches)
    levels = fmt._check_levels(levels)
    encoder = constriction.stream.queue.RangeEncoder()
    entropy_bits = 0.0
    for level in range(levels):
        symbols = (codes[..., level].reshape(-1) + 1).astype(np.int32)
        encoder.encode(symbols, _level_model(prior, level))
        entropy_bits += prior.ideal_bits(symbols, level)
    words = encoder.get_compressed().astype("<u4", copy=False)
    body = words.tobytes()
    header = {
        **fmt._shared_header(model_name, model_version, levels, band_scale, patches),
        "codec": fmt.RESIDUAL_CODEC,
        "prior_sha256": prior.sha256,
        "word_count": int(words.size),
        "payload_crc32": zlib.crc32(body),
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    data = (_PREFIX.pack(fmt.CODE_MAGIC, FORMAT_VERSION_RESIDUAL_PRIOR, len(header_bytes), zlib.crc32(header_bytes))
            + header_bytes + body)
    stats = fmt.CompressionStats(
        patches=codes.shape[0],
        levels=levels,
        symbols=codes.shape[0] * fmt.LATENT_SHAPE[0] * fmt.LATENT_SHAPE[1] * levels,
        file_bytes=len(data),
        payload_bits=int(words.size) * 32,
        entropy_bits=entropy_bits,
        level_models=(RESIDUAL_PRIOR_MODEL,),
        format_version=FORMAT_VERSION_RESIDUAL_PRIOR,
    )
    return fmt.CompressedFile(OutputFile(data=data, content_type=fmt.COMPRESSED_CONTENT_TYPE,
                                         suffix=fmt.COMPRESSED_SUFFIX), stats)


def smaller_residual_file(codes: np.ndarray, levels: int, prior: ResidualVqPrior | None,
                          patches: Sequence[PatchMetadata], band_scale: BandScale, model_name: str,
                          model_version: str) -> fmt.CompressedFile:
    """Format 1 (the file's own histograms), or format 3 (the card's prior) when that file is strictly smaller."""
    own = fmt.write_compressed(codes, levels, patches, band_scale, model_name, model_version)
    if prior is None:
        return own
    with_prior = write_residual_prior_codes(codes, levels, prior, patches, band_scale, model_name, model_version)
    return with_prior if len(with_prior.file.data) < len(own.file.data) else own


def read_residual_prior_codes(header: dict[str, Any], offset: int, data: bytes, prior: object,
                              max_patches: int) -> fmt.DecodedCodes:
    """The body of a format-3 file whose header ``compressed._read_header`` checked."""
    fmt._check_constants(header, {"codec": fmt.RESIDUAL_CODEC, **fmt._FILE_CONSTANTS})
    levels = fmt._header_int(header, "levels", 1, fmt.CODEBOOK_LEVELS)
    wanted = header.get("prior_sha256")
    if not isinstance(prior, ResidualVqPrior):
        raise OutputFormatError(f"compressed file was coded with RVQ prior {str(wanted)[:12]}...; no RVQ prior given")
    if prior.sha256 != wanted:
        raise OutputFormatError(f"compressed file was coded with RVQ prior {str(wanted)[:12]}..., not with "
                                f"{prior.sha256[:12]}...")
    words = fmt._payload_words(header, data, offset, 0)
    patches, band_scale, model_name, model_version = fmt._common_header(header, max_patches)
    count = len(patches)
    per_level = count * fmt.LATENT_SHAPE[0] * fmt.LATENT_SHAPE[1]
    codes = np.full((count, *fmt.LATENT_SHAPE, fmt.CODEBOOK_LEVELS), fmt.UNUSED_CODE, dtype=np.int64)
    decoder = constriction.stream.queue.RangeDecoder(words)
    for level in range(levels):
        try:
            symbols = decoder.decode(_level_model(prior, level), per_level).astype(np.int64)
        except AssertionError:
            raise OutputFormatError(f"compressed file: coded words of level {level} are invalid") from None
        codes[..., level] = (symbols - 1).reshape(count, *fmt.LATENT_SHAPE)
    return fmt.DecodedCodes(codes=codes, levels=levels, patches=patches, band_scale=band_scale, model_name=model_name,
                            model_version=model_version, format_version=FORMAT_VERSION_RESIDUAL_PRIOR)
