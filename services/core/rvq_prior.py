"""A static entropy prior for residual-VQ codes: per-level symbol frequencies learned on training codes.

Residual-VQ codes (``codec: residual-vq/1``) are codebook indices, 0..9,999 per level, -1 where a level is not used.
``.codes`` format 1 codes each level with the file's own histogram, whose table a small file pays for in full. A
model may instead carry, in its card's ``entropy_prior``, the frequencies of each level's indices over its
training codes (``fit_rvq_prior``); the Wrapper then also codes the file under those (format 3) and keeps whichever
file is smaller, so the prior never costs bits. Symbol = code + 1 (so -1 is symbol 0), alphabet 10,001 per level;
every count gets half a count more, so an index never seen in training stays codable.

The text form (the card's field) is ``rvq-level-frequencies/1:<base64 of zlib of JSON>``; its sha256 names it in
the files coded with it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import zlib
from dataclasses import dataclass

import numpy as np

RVQ_PRIOR_FORMAT = "rvq-level-frequencies/1"
CODEBOOK_SIZE = 10000
LEVELS = 8
ALPHABET = CODEBOOK_SIZE + 1  # symbol = code + 1
_SMOOTHING = 0.5


class RvqPriorError(ValueError):
    """An RVQ prior that cannot be used; the message says why."""


def is_rvq_prior_text(text: str) -> bool:
    """Whether a card's ``entropy_prior`` is this kind of prior (checked by its prefix, nothing decoded)."""
    return text.startswith(f"{RVQ_PRIOR_FORMAT}:")


@dataclass(frozen=True, eq=False)
class ResidualVqPrior:
    """Training counts of each level's symbols, [LEVELS, ALPHABET]."""

    counts: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        if self.counts.shape != (LEVELS, ALPHABET) or self.counts.dtype != np.int64 or (self.counts < 0).any():
            raise RvqPriorError(f"RVQ prior counts must be non-negative int64 [{LEVELS}, {ALPHABET}]")

    def probabilities(self, level: int) -> np.ndarray:
        """The coding distribution of ``level``'s symbols (float64, every symbol > 0)."""
        weights = self.counts[level].astype(np.float64) + _SMOOTHING
        return weights / weights.sum()

    def ideal_bits(self, symbols: np.ndarray, level: int) -> float:
        """Code length of ``symbols`` (code + 1) of ``level`` under the prior, in bits."""
        return float(-np.log2(self.probabilities(level)[symbols]).sum())

    def to_text(self) -> str:
        payload = {
            "format": RVQ_PRIOR_FORMAT,
            "levels": LEVELS,
            "alphabet": ALPHABET,
            "counts": base64.b64encode(self.counts.astype("<u4").tobytes()).decode("ascii"),
            "source": self.source,
        }
        packed = zlib.compress(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode(), 9)
        return f"{RVQ_PRIOR_FORMAT}:{base64.b64encode(packed).decode('ascii')}"

    @classmethod
    def from_text(cls, text: str) -> "ResidualVqPrior":
        if not isinstance(text, str) or not is_rvq_prior_text(text):
            raise RvqPriorError(f"an RVQ prior must start with {RVQ_PRIOR_FORMAT + ':'!r}")
        try:
            payload = json.loads(zlib.decompress(base64.b64decode(text[len(RVQ_PRIOR_FORMAT) + 1:], validate=True)))
            if (payload["format"], payload["levels"], payload["alphabet"]) != (RVQ_PRIOR_FORMAT, LEVELS, ALPHABET):
                raise RvqPriorError("RVQ prior was made for another layout")
            counts = np.frombuffer(base64.b64decode(payload["counts"], validate=True), dtype="<u4")
            return cls(counts=counts.reshape(LEVELS, ALPHABET).astype(np.int64), source=str(payload.get("source", "")))
        except RvqPriorError:
            raise
        except (ValueError, KeyError, TypeError, zlib.error) as error:
            raise RvqPriorError(f"RVQ prior is not readable: {error}") from None

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_text().encode("ascii")).hexdigest()


def fit_rvq_prior(codes: np.ndarray, source: str = "") -> ResidualVqPrior:
    """Per-level counts of training codes [N, rows, cols, LEVELS] (values -1..9,999)."""
    codes = np.asarray(codes)
    if codes.ndim != 4 or codes.shape[-1] != LEVELS or codes.min() < -1 or codes.max() >= CODEBOOK_SIZE:
        raise RvqPriorError(f"training codes must be [N, rows, cols, {LEVELS}] in [-1, {CODEBOOK_SIZE - 1}]")
    counts = np.stack([np.bincount(codes[..., level].reshape(-1) + 1, minlength=ALPHABET) for level in range(LEVELS)])
    return ResidualVqPrior(counts=counts.astype(np.int64), source=source)


@functools.lru_cache(maxsize=8)
def parse_rvq_prior(text: str) -> ResidualVqPrior:
    """``ResidualVqPrior.from_text``, cached: a step reads the card's prior once per file."""
    return ResidualVqPrior.from_text(text)
