"""The compressor's codes as quantised transform coefficients, and the learned entropy prior that codes them.

The served contract stays ``int64_latent32_15``: INT64 [60, 60, 8], codes 0..9,999, -1 = level not used. Behind it
(``models/compression.py``) each 8 x 8 pixel block of the 10 bands (640 values, DN) is projected on 128 learned basis
vectors, ordered by the variance they carry on the training corpus, and each coefficient is quantised with the base
step ``BASE_STEP_DN``: ``code = round(coefficient / BASE_STEP_DN) + CODE_OFFSET``, clamped to 0..9,999.

Layout. Coefficient ``k`` of block (by, bx) sits at code position (4 by + dy, 4 bx + dx) and level ``l`` with
``l = k // 16`` and ``dy, dx = divmod(k % 16, 4)``: level 1 holds the 16 coefficients of largest variance of every
block, level 2 the next 16, and so on. Keeping the first ``L`` levels keeps the first 16 L coefficients of every block
(D3.4's "dynamic number of codebooks": fewer levels, fewer bits, larger error).

Rate control (per workflow, ``meta_information.compression``). A file stores ``symbol = round(q / s)`` for the base
codes ``q = code - CODE_OFFSET`` and a quantiser scale ``s`` from ``QUANTISER_SCALES``; the reader gives back
``q = symbol * s``. A larger ``s`` is a coarser quantiser (fewer bits, larger error); ``s = 1`` keeps the model's
codes exactly.

Entropy prior (``LaplaceContextPrior``). Each symbol is coded with a discretised Laplace distribution of mean 0 whose
scale is learned from the training corpus for every (quantiser scale, coefficient, context) triple. The context of
coefficient ``k`` is the activity already decoded in the same block: the mean ``|symbol|`` of its up to 16
predecessors ``k-16 .. k-1`` (a block whose large coefficients are busy has busy small ones: texture and edges),
bucketed on a log scale into ``CONTEXT_BUCKETS``. Coefficients are coded in order k = 0..127, each over every block
of the file at once, so encoding and decoding are vectorised over blocks. The scales are fitted by maximum likelihood
(``fit_prior``) and shipped with the model in its card (``card.entropy_prior``); a file names the prior it was coded
with by its sha256.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import zlib
from dataclasses import dataclass

import constriction
import numpy as np

BANDS = 10
BLOCK = 8
BLOCK_VALUES = BANDS * BLOCK * BLOCK  # 640
COEFFICIENTS = 128
LEVELS = 8
PER_LEVEL = COEFFICIENTS // LEVELS  # 16 = a 4 x 4 group of code positions
PATCH = 120
BLOCKS_PER_SIDE = PATCH // BLOCK  # 15
CODE_GRID = 60
CODEBOOK_SIZE = 10000
CODE_OFFSET = 5000
UNUSED_CODE = -1
BASE_STEP_DN = 100.0

QUANTISER_SCALES: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTEXT_WINDOW = 16
CONTEXT_BUCKETS = 12
PRIOR_FORMAT = "laplace-context/1"
# The scale table is stored as uint8 logarithms: scale = exp(u / 16 - 5), 0.0067 .. 5.4e4 symbols.
_LOG_SCALE_STEP = 16.0
_LOG_SCALE_BIAS = 5.0
_SYMBOL_RANGE = (-CODE_OFFSET, CODEBOOK_SIZE - 1 - CODE_OFFSET)


class TransformCodesError(ValueError):
    """Codes, a prior or an operating point that cannot be used; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Layout: codes [N, 60, 60, 8] <-> base quantised coefficients [N, 15, 15, 128]


def codes_to_coefficients(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Base quantised coefficients q [N, 15, 15, 128] (int32, 0 where a level is unused) and the levels used.

    Levels must be used as a prefix (levels 1..L present, the rest -1 everywhere): that is what the writer keeps."""
    n = codes.shape[0]
    used_codes = codes >= 0
    level_used = used_codes.all(axis=(0, 1, 2))
    level_unused = ~used_codes.any(axis=(0, 1, 2))
    levels = int(level_used.sum())
    if not (level_used | level_unused).all() or not level_used[:levels].all() or level_used[levels:].any():
        raise TransformCodesError("codes must use a prefix of the levels (levels 1..L everywhere, -1 in the others)")
    grouped = codes.astype(np.int32).reshape(n, BLOCKS_PER_SIDE, 4, BLOCKS_PER_SIDE, 4, LEVELS)
    q = np.ascontiguousarray(grouped.transpose(0, 1, 3, 5, 2, 4)).reshape(n, BLOCKS_PER_SIDE, BLOCKS_PER_SIDE,
                                                                           COEFFICIENTS)
    q -= CODE_OFFSET
    q[..., levels * PER_LEVEL:] = 0
    return q, levels


def coefficients_to_codes(q: np.ndarray, levels: int) -> np.ndarray:
    """Codes [N, 60, 60, 8] int64 of base quantised coefficients q [N, 15, 15, 128]; levels > ``levels`` are -1."""
    n = q.shape[0]
    codes = np.clip(q.astype(np.int64) + CODE_OFFSET, 0, CODEBOOK_SIZE - 1)
    codes[..., levels * PER_LEVEL:] = UNUSED_CODE
    grouped = codes.reshape(n, BLOCKS_PER_SIDE, BLOCKS_PER_SIDE, LEVELS, 4, 4).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(grouped.reshape(n, CODE_GRID, CODE_GRID, LEVELS))


def requantise(q: np.ndarray, scale: int) -> np.ndarray:
    """Symbols of base coefficients q at quantiser scale ``scale``: round half away from zero of q / scale."""
    if scale == 1:
        return q.astype(np.int32, copy=True)
    return (np.sign(q) * ((np.abs(q) + scale // 2) // scale)).astype(np.int32)


def check_scale(scale: object) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or int(scale) not in QUANTISER_SCALES:
        raise TransformCodesError(f"quantiser scale must be one of {list(QUANTISER_SCALES)}, got {scale!r}")
    return int(scale)


def check_levels(levels: object) -> int:
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or not 1 <= int(levels) <= LEVELS:
        raise TransformCodesError(f"levels must be an integer in [1, {LEVELS}], got {levels!r}")
    return int(levels)


# ---------------------------------------------------------------------------------------------
# Context


def context_buckets(activity: np.ndarray) -> np.ndarray:
    """Bucket of a mean |symbol| activity: 0 for none, then about 1.5 buckets per doubling, capped."""
    buckets = np.floor(np.log2(1.0 + 2.0 * activity) * 1.5).astype(np.int64)
    return np.minimum(buckets, CONTEXT_BUCKETS - 1)


# Buckets of every (window, total) a block can have: activity = total / window with window 1..16; a total of 2,048
# or more is activity >= 128, already the last bucket. A lookup instead of a log per symbol: coding a file spends most
# of its time here otherwise.
_TOTAL_CAP = 2048
_BUCKET_OF_TOTAL = np.stack([
    context_buckets(np.arange(_TOTAL_CAP + 1) / max(window, 1)) for window in range(CONTEXT_WINDOW + 1)
]).astype(np.int64)


def _buckets_of_totals(total: np.ndarray, window: "int | np.ndarray") -> np.ndarray:
    return _BUCKET_OF_TOTAL[window, np.minimum(total, _TOTAL_CAP)]


class _RunningActivity:
    """Mean |symbol| of the up to 16 coefficients before k in each block, kept as a running int32 sum so coding a
    file needs O(blocks) memory beyond the symbols themselves."""

    def __init__(self, blocks: int) -> None:
        self.total = np.zeros(blocks, np.int64)

    def buckets(self, k: int) -> np.ndarray:
        return _buckets_of_totals(self.total, max(1, min(k, CONTEXT_WINDOW)))

    def add(self, symbols: np.ndarray, k: int, column: "np.ndarray | None") -> None:
        """Account for coefficient k; ``column`` = the symbols of coefficient k - 16 (None when k < 16)."""
        self.total += np.abs(symbols)
        if column is not None:
            self.total -= np.abs(column)


def contexts(symbols: np.ndarray) -> np.ndarray:
    """Context bucket of every coefficient of every block: symbols [M, 128] -> [M, 128] (training, estimates and
    tests; the coder computes the same buckets on the fly)."""
    activity = _RunningActivity(len(symbols))
    out = np.empty(symbols.shape, np.int64)
    for k in range(symbols.shape[1]):
        out[:, k] = activity.buckets(k)
        activity.add(symbols[:, k], k, symbols[:, k - CONTEXT_WINDOW] if k >= CONTEXT_WINDOW else None)
    return out


# ---------------------------------------------------------------------------------------------
# The prior


@dataclass(frozen=True)
class LaplaceContextPrior:
    """Laplace scales [len(QUANTISER_SCALES), 128, CONTEXT_BUCKETS] (in symbols) and the calibration that comes with
    them: the training corpus' RMS error (% of 10,000 DN) and bits per pixel at every (scale, levels)."""

    log_scales: np.ndarray  # uint8, scale = exp(u / 16 - 5)
    train_rms_percent: np.ndarray  # float [len(QUANTISER_SCALES), LEVELS]
    train_bpp: np.ndarray  # float [len(QUANTISER_SCALES), LEVELS]
    source: str = ""

    def __post_init__(self) -> None:
        shape = (len(QUANTISER_SCALES), COEFFICIENTS, CONTEXT_BUCKETS)
        if self.log_scales.shape != shape or self.log_scales.dtype != np.uint8:
            raise TransformCodesError(f"prior scale table must be uint8 {list(shape)}, got {self.log_scales.dtype} "
                                      f"{list(self.log_scales.shape)}")
        for name in ("train_rms_percent", "train_bpp"):
            if getattr(self, name).shape != (len(QUANTISER_SCALES), LEVELS):
                raise TransformCodesError(f"prior {name} must be [{len(QUANTISER_SCALES)}, {LEVELS}]")

    def scales(self, quantiser_scale: int) -> np.ndarray:
        """Laplace scales [128, CONTEXT_BUCKETS] for one quantiser scale."""
        table = self.log_scales[QUANTISER_SCALES.index(quantiser_scale)].astype(np.float64)
        return np.exp(table / _LOG_SCALE_STEP - _LOG_SCALE_BIAS)

    # -- serialisation: one string, the card's ``entropy_prior`` field

    def to_text(self) -> str:
        payload = {
            "format": PRIOR_FORMAT,
            "quantiser_scales": list(QUANTISER_SCALES),
            "coefficients": COEFFICIENTS,
            "context_buckets": CONTEXT_BUCKETS,
            "log_scales": base64.b64encode(self.log_scales.tobytes()).decode("ascii"),
            "train_rms_percent": np.round(self.train_rms_percent, 4).tolist(),
            "train_bpp": np.round(self.train_bpp, 4).tolist(),
            "source": self.source,
        }
        packed = zlib.compress(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode(), 9)
        return f"{PRIOR_FORMAT}:{base64.b64encode(packed).decode('ascii')}"

    @classmethod
    def from_text(cls, text: str) -> "LaplaceContextPrior":
        prefix = f"{PRIOR_FORMAT}:"
        if not isinstance(text, str) or not text.startswith(prefix):
            raise TransformCodesError(f"entropy prior must start with {prefix!r}")
        try:
            payload = json.loads(zlib.decompress(base64.b64decode(text[len(prefix):], validate=True)))
            if (payload["format"] != PRIOR_FORMAT or payload["quantiser_scales"] != list(QUANTISER_SCALES)
                    or payload["coefficients"] != COEFFICIENTS or payload["context_buckets"] != CONTEXT_BUCKETS):
                raise TransformCodesError("entropy prior was made for another layout")
            table = np.frombuffer(base64.b64decode(payload["log_scales"], validate=True), dtype=np.uint8)
            return cls(
                log_scales=table.reshape(len(QUANTISER_SCALES), COEFFICIENTS, CONTEXT_BUCKETS).copy(),
                train_rms_percent=np.asarray(payload["train_rms_percent"], dtype=np.float64),
                train_bpp=np.asarray(payload["train_bpp"], dtype=np.float64),
                source=str(payload.get("source", "")),
            )
        except TransformCodesError:
            raise
        except (ValueError, KeyError, TypeError, zlib.error) as error:
            raise TransformCodesError(f"entropy prior is not readable: {error}") from None

    @functools.cached_property
    def sha256(self) -> str:
        # Cached: readers and the decompress step compare it for every file, and to_text recompresses the tables.
        return hashlib.sha256(self.to_text().encode("ascii")).hexdigest()


def fit_prior(symbols_by_scale: dict[int, np.ndarray], train_rms_percent: np.ndarray, train_bpp: np.ndarray,
              source: str = "") -> LaplaceContextPrior:
    """Maximum-likelihood Laplace scales from training symbols: ``symbols_by_scale[s]`` is [M, 128] (all levels).

    A (coefficient, context) pair with fewer than 32 training symbols borrows the scale fitted over all contexts of
    its coefficient (a rare context gets a robust scale instead of an overfitted one)."""
    candidates = np.arange(256, dtype=np.float64)
    scale_grid = np.exp(candidates / _LOG_SCALE_STEP - _LOG_SCALE_BIAS)
    table = np.zeros((len(QUANTISER_SCALES), COEFFICIENTS, CONTEXT_BUCKETS), np.uint8)
    for si, s in enumerate(QUANTISER_SCALES):
        symbols = symbols_by_scale[s]
        buckets = contexts(symbols)
        magnitudes = np.minimum(np.abs(symbols), 4096)
        for k in range(COEFFICIENTS):
            overall = _best_log_scale(np.bincount(magnitudes[:, k]), scale_grid)
            for c in range(CONTEXT_BUCKETS):
                chosen = magnitudes[buckets[:, k] == c, k]
                table[si, k, c] = overall if chosen.size < 32 else _best_log_scale(np.bincount(chosen), scale_grid)
    return LaplaceContextPrior(table, np.asarray(train_rms_percent, float), np.asarray(train_bpp, float), source)


def _best_log_scale(histogram: np.ndarray, scale_grid: np.ndarray) -> int:
    """Index in ``scale_grid`` of the discretised Laplace scale of least code length for a |symbol| histogram."""
    bits = laplace_magnitude_bits(np.arange(len(histogram)), scale_grid[:, None])
    return int(np.argmin((bits * histogram[None, :]).sum(axis=1)))


def laplace_magnitude_bits(magnitude: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Ideal code length (bits, sign included) of a symbol of |value| ``magnitude`` under Laplace(0, ``scale``)."""
    magnitude = np.asarray(magnitude, dtype=np.float64)
    zero = 1.0 - np.exp(-0.5 / scale)
    # P(|x| = m) for m > 0, both signs together; the sign then costs one bit.
    either_sign = np.exp(-(np.maximum(magnitude, 0.5) - 0.5) / scale) * (1.0 - np.exp(-1.0 / scale))
    probability = np.where(magnitude == 0, zero, either_sign)
    sign = np.where(magnitude == 0, 0.0, 1.0)
    return -np.log2(np.maximum(probability, 2.0**-24)) + sign


# ---------------------------------------------------------------------------------------------
# Coding


def _family() -> object:
    return constriction.stream.model.QuantizedLaplace(*_SYMBOL_RANGE)


def encode_symbols(symbols: np.ndarray, levels: int, quantiser_scale: int, prior: LaplaceContextPrior,
                   encoder: object) -> None:
    """Append symbols [N, 15, 15, 128] (levels 1..``levels``) to a constriction RangeEncoder."""
    flat = symbols.reshape(-1, COEFFICIENTS)
    if flat.size and (flat.min() < _SYMBOL_RANGE[0] or flat.max() > _SYMBOL_RANGE[1]):
        raise TransformCodesError("symbols outside the code range")
    scales = prior.scales(quantiser_scale)
    activity = _RunningActivity(len(flat))
    means = np.zeros(len(flat))
    family = _family()
    columns = _columns(flat, levels * PER_LEVEL)
    for k in range(levels * PER_LEVEL):
        encoder.encode(columns[k], family, means, scales[k][activity.buckets(k)])
        activity.add(columns[k], k, columns[k - CONTEXT_WINDOW] if k >= CONTEXT_WINDOW else None)


def _columns(flat: np.ndarray, kept: int) -> np.ndarray:
    """Coefficients 0..kept-1 of every block as contiguous int32 rows [kept, blocks]: the coder walks coefficient by
    coefficient, and one transposing copy is much cheaper than a strided gather per coefficient."""
    return np.ascontiguousarray(flat[:, :kept].T, dtype=np.int32)


def decode_symbols(decoder: object, patches: int, levels: int, quantiser_scale: int,
                   prior: LaplaceContextPrior) -> np.ndarray:
    """The inverse of ``encode_symbols``: symbols [N, 15, 15, 128] (0 in levels > ``levels``)."""
    count = patches * BLOCKS_PER_SIDE * BLOCKS_PER_SIDE
    flat = np.zeros((count, COEFFICIENTS), np.int32)
    scales = prior.scales(quantiser_scale)
    activity = _RunningActivity(count)
    means = np.zeros(count)
    family = _family()
    for k in range(levels * PER_LEVEL):
        flat[:, k] = decoder.decode(family, means, scales[k][activity.buckets(k)])
        activity.add(flat[:, k], k, flat[:, k - CONTEXT_WINDOW] if k >= CONTEXT_WINDOW else None)
    return flat.reshape(patches, BLOCKS_PER_SIDE, BLOCKS_PER_SIDE, COEFFICIENTS)


_BITS_CAP = 64


def ideal_bits(symbols: np.ndarray, levels: int, quantiser_scale: int, prior: LaplaceContextPrior) -> float:
    """What ``encode_symbols`` costs up to the coder's rounding (used by rate control and calibration)."""
    kept = levels * PER_LEVEL
    flat = symbols.reshape(-1, COEFFICIENTS)
    scales = prior.scales(quantiser_scale)
    # Code lengths of magnitudes 0.._BITS_CAP per (coefficient, context) from a table; larger ones (rare) directly.
    table = laplace_magnitude_bits(np.arange(_BITS_CAP + 1)[None, None, :], scales[:kept, :, None])
    activity = _RunningActivity(len(flat))
    total = 0.0
    columns = _columns(flat, kept)
    for k in range(kept):
        column = columns[k]
        buckets = activity.buckets(k)
        magnitudes = np.abs(column)
        total += float(table[k][buckets, np.minimum(magnitudes, _BITS_CAP)].sum())
        large = magnitudes > _BITS_CAP
        if large.any():
            total += float((laplace_magnitude_bits(magnitudes[large], scales[k][buckets[large]])
                            - table[k][buckets[large], _BITS_CAP]).sum())
        activity.add(column, k, columns[k - CONTEXT_WINDOW] if k >= CONTEXT_WINDOW else None)
    return total


def block_rms_of_requantisation(q: np.ndarray, quantiser_scale: int, levels: int,
                                symbols: np.ndarray | None = None) -> float:
    """RMS (DN per pixel value) that requantising base coefficients adds, exact for the orthonormal transform.
    ``symbols``: ``requantise(q, quantiser_scale)`` when the caller has it already."""
    kept = q[..., : levels * PER_LEVEL]
    requantised = requantise(kept, quantiser_scale) if symbols is None else symbols[..., : levels * PER_LEVEL]
    difference = kept - requantised * quantiser_scale  # |difference| <= scale / 2: int32 safe
    flat = difference.reshape(-1).astype(np.float64)
    squares = float(np.dot(flat, flat))  # exact: each square <= 32**2, the sum far below 2**53
    return float(math.sqrt(squares * BASE_STEP_DN**2 / (q.shape[0] * PATCH * PATCH * BANDS)))
