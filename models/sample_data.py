"""The bundled BigEarthNet sample (data/bigearthnet-sample): listing, splitting and loading patches.

Loading goes through ``services.core.sentinel2``: the same preprocessing the Wrapper applies at serving time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from services.core import sentinel2
from services.core.model_card import ModelCard

SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "data" / "bigearthnet-sample"


def sample_index(root: Path = SAMPLE_ROOT) -> list[dict]:
    """Entries of ``index.json``: patch name, labels, source."""
    index_path = root / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"BigEarthNet sample index {index_path} not found")
    return json.loads(index_path.read_text())


def sample_patch_names(root: Path = SAMPLE_ROOT) -> list[str]:
    """All patch names of the sample, sorted (a stable order for seeded splits)."""
    return sorted(entry["patch"] for entry in sample_index(root))


def seeded_split(names: Sequence[str], first: int, seed: int) -> tuple[list[str], list[str]]:
    """Split ``names`` into ``first`` names and the rest by a seeded permutation (each part sorted)."""
    if not 0 < first < len(names):
        raise ValueError(f"cannot take {first} of {len(names)} patches and keep some held out")
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = sorted(names[i] for i in order[:first])
    rest = sorted(names[i] for i in order[first:])
    return chosen, rest


def load_patches(names: Sequence[str], card: ModelCard, root: Path = SAMPLE_ROOT) -> np.ndarray:
    """Read, stack and normalise patches as ``card`` says: float32 [N, C, 120, 120]."""
    resampling = card.resampling_20m or "bilinear"
    stacks = []
    for name in names:
        bands = sentinel2.read_bigearthnet_patch(root / "patches" / name, card.bands)
        stacks.append(sentinel2.stack_bands(bands, card.bands, resampling))
    return sentinel2.normalise(np.stack(stacks), card)
