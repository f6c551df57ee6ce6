"""The residual-VQ compressor's part of ``make eval-compression`` (``bench/eval_compression.py`` calls it).

- ``rvq_points``: the exported RVQ encoder's codes of every validation patch, written as the Wrapper writes them
  (``services.wrapper.outputs.compressed.write_compressed``, format 1: per-file histograms), one file per validation
  scene (the Wrapper writes one file per input), at L = 1..8 levels; bpp = bytes of the files (headers included);
  each file is read back (``read_compressed``) and the exported decoder reconstructs.
- ``learned_prior``: what a static per-level index-frequency prior, fitted on codes of training scenes, would cost
  instead of format 1's per-file histograms on the same validation files: cross-entropy of the codes under the
  prior (Laplace-smoothed counts) plus the file's header without its tables. A measurement only: the Wrapper
  (format 1) is unchanged.
- ``jpeg2000_multicomponent``: JPEG 2000 with one codestream per resolution group (10 m: B02 B03 B04 B08; 20 m:
  B05 B06 B07 B8A B11 B12, as upsampled in the patch), multi-component (imagecodecs / OpenJPEG).
- ``SslCosine``: the served SSL model's features of original vs reconstruction (cosine), on a fixed seeded subset
  of the validation patches, for every operating point of every codec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.core import sentinel2
from services.core.model_card import ModelCard
from services.wrapper.outputs.compressed import read_compressed, write_compressed
from services.wrapper.outputs.types import BandScale, PatchMetadata

RVQ_ENCODER = "Bigearth-net-rvq-compress"
RVQ_DECODER = "Bigearth-net-rvq-decompress"
LEVELS = 8
ALPHABET = 10_001  # format 1: symbol = code + 1
RESOLUTION_GROUPS = {"10 m": ("B02", "B03", "B04", "B08"), "20 m": ("B05", "B06", "B07", "B8A", "B11", "B12")}
J2K_MULTI_PSNR_TARGETS = (34, 38, 41, 44, 48, 52, 56, 60, 66, 72)


class SslCosine:
    """Cosine of the served SSL model's features of original and restored patches (a fixed subset)."""

    def __init__(self, model: Callable[[np.ndarray], np.ndarray], card: ModelCard, original: np.ndarray,
                 subset: np.ndarray) -> None:
        self.model, self.card, self.subset = model, card, subset
        self.features = self._features(original[subset])

    def _features(self, patches: np.ndarray) -> np.ndarray:
        return self.model(sentinel2.normalise(patches.astype(np.float32), self.card))

    def __call__(self, restored: np.ndarray) -> float:
        other = self._features(restored[self.subset])
        cosine = (self.features * other).sum(1) / np.maximum(
            np.linalg.norm(self.features, axis=1) * np.linalg.norm(other, axis=1), 1e-12)
        return float(cosine.mean())


def jpeg2000_multicomponent(patches: np.ndarray, bands: tuple[str, ...], point: Callable[..., dict],
                            cosine: SslCosine | None) -> list[dict]:
    import imagecodecs

    groups = [[bands.index(b) for b in group] for group in RESOLUTION_GROUPS.values()]
    points = []
    for target in J2K_MULTI_PSNR_TARGETS:
        bits, restored = 0, np.empty_like(patches)
        for n in range(patches.shape[0]):
            for group in groups:
                data = imagecodecs.jpeg2k_encode(np.ascontiguousarray(patches[n, group].transpose(1, 2, 0)),
                                                 level=target)
                bits += len(data) * 8
                restored[n, group] = imagecodecs.jpeg2k_decode(data).transpose(2, 0, 1)
        result = point("JPEG 2000 multi-component", f"psnr16={target}", bits, patches, restored)
        if cosine is not None:
            result["ssl_cosine"] = cosine(restored)
        points.append(result)
    return points


def scene_files(scenes: list[str]) -> list[np.ndarray]:
    """Patch indices of each validation scene, in first-seen order (one .codes file per scene)."""
    order = list(dict.fromkeys(scenes))
    names = np.array(scenes)
    return [np.flatnonzero(names == scene) for scene in order]


def rvq_points(patches: np.ndarray, scenes: list[str], encoder: Callable, decoder: Callable, card: ModelCard,
               point: Callable[..., dict], cosine: SslCosine | None) -> tuple[list[dict], np.ndarray, list[dict]]:
    """(points at L = 1..8, the validation codes, per-L file records for the prior measurement)."""
    normalised = sentinel2.normalise(patches.astype(np.float32), card)
    codes = encoder(normalised)
    scale = BandScale(tuple(card.bands), tuple(card.band_mean), tuple(card.band_std))
    files = scene_files(scenes)
    results, records = [], []
    for levels in range(1, LEVELS + 1):
        bits, restored, one_file_bits, file_records = 0, np.empty_like(patches), 0, []
        for index in files:
            metadata = [PatchMetadata(patch_id=f"p{n}") for n in index]
            written = write_compressed(codes[index], levels, metadata, scale, RVQ_ENCODER, "1")
            bits += len(written.file.data) * 8
            decoded = read_compressed(written.file.data)
            output = decoder(decoded.codes)
            restored[index] = np.clip(np.rint(sentinel2.denormalise(output, card)), 0, 65535)
            file_records.append({"data": written.file.data, "index": index})
        everything = write_compressed(codes, levels, [PatchMetadata(patch_id=f"p{n}") for n in range(len(codes))],
                                      scale, RVQ_ENCODER, "1")
        one_file_bits = len(everything.file.data) * 8
        result = point("RVQ (D3.4 VQ-VAE)", f"L={levels}", bits, patches, restored)
        result.update(levels=levels, files=len(files), bpp_one_file=one_file_bits / (len(patches) * 14_400))
        if cosine is not None:
            result["ssl_cosine"] = cosine(restored)
        results.append(result)
        records.append({"levels": levels, "files": file_records})
    return results, codes, records


def _header_bits_without_tables(data: bytes) -> int:
    """Bits of a format-1 file minus its model tables and coded words (what a static prior would still write)."""
    from services.wrapper.outputs.compressed import read_compressed_header

    header = read_compressed_header(data)
    return 8 * (len(data) - int(header["table_bytes"]) - 4 * int(header["word_count"]))


def fit_level_prior(training_codes: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """-log2 p per level and symbol (code + 1), Laplace-smoothed counts of training codes [M, 60, 60, 8]."""
    flat = training_codes.reshape(-1, training_codes.shape[-1]) + 1
    bits = np.empty((flat.shape[1], ALPHABET))
    for level in range(flat.shape[1]):
        counts = np.bincount(flat[:, level], minlength=ALPHABET).astype(np.float64) + alpha
        bits[level] = -np.log2(counts / counts.sum())
    return bits


def learned_prior(records: list[dict], codes: np.ndarray, training_codes: np.ndarray, pixels: int,
                  training_source: str) -> dict:
    """Format 1 (per-file histograms) vs a static per-level prior fitted on training scenes, same files."""
    bits_table = fit_level_prior(training_codes)
    rows = []
    for record in records:
        levels = record["levels"]
        histogram_bits = sum(8 * len(f["data"]) for f in record["files"])
        prior_bits = 0.0
        for f in record["files"]:
            symbols = codes[f["index"]][..., :levels].reshape(-1, levels) + 1
            cross_entropy = sum(float(bits_table[l][symbols[:, l]].sum()) for l in range(levels))
            prior_bits += _header_bits_without_tables(f["data"]) + math.ceil(cross_entropy / 32) * 32
        rows.append({"levels": levels, "bpp_format1": histogram_bits / pixels, "bpp_learned_prior": prior_bits / pixels,
                     "saving_percent": 100.0 * (1 - prior_bits / histogram_bits)})
    best = max(rows, key=lambda r: r["saving_percent"])
    worst = min(rows, key=lambda r: r["saving_percent"])
    summary = (f"Learned index prior (measured, not deployed): a static per-level frequency prior fitted on "
               f"{training_source} would code the validation files at "
               + ", ".join(f"L={r['levels']} {r['bpp_learned_prior']:.3f} bpp (format 1: {r['bpp_format1']:.3f})"
                           for r in rows)
               + f"; change {-worst['saving_percent']:+.1f} % to {-best['saving_percent']:+.1f} % of the bits "
               "(negative = fewer bits).")
    return {"training_source": training_source, "rows": rows, "summary": summary}


def training_codes(encoder: Callable, card: ModelCard, corpus_root: Path | None, patches: int, seed: int) -> tuple[np.ndarray, str]:
    """Codes of a seeded choice of training-split patches (the prior's fitting data; never validation scenes)."""
    from models import corpus

    train = corpus.load_split("train", corpus_root, levels=("L2A",))
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:patches])
    normalised = sentinel2.normalise(train.patches[pick].astype(np.float32), card)
    scenes = {train.scenes[i] for i in pick}
    return encoder(normalised), f"{len(pick)} training patches of {len(scenes)} training scenes"
