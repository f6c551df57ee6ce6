"""BigEarthNet label nomenclatures (43 CORINE classes and BigEarthNet-19) and the 43 -> 19 mapping.

numpy only: the Wrapper and the model export both use it.

Sources:
- 43-class order: the ``original_labels`` of BigEarthNet's ``label_indices.json`` (CORINE Land Cover
  level-3 classes present in BigEarthNet, in CLC code order; Sumbul et al., "BigEarthNet: A Large-Scale
  Benchmark Archive for Remote Sensing Image Understanding", IGARSS 2019).
- 19-class nomenclature: Sumbul et al., "BigEarthNet-MM: A Large Scale Multi-Modal Multi-Label Benchmark
  Archive for Remote Sensing Image Classification and Retrieval", arXiv:2105.07921, and the
  ``BigEarthNet-19_labels`` / ``label_conversion`` entries of the ``label_indices.json`` published with
  the BigEarthNet-19 models. BigEarthNet v2 (reBEN, Clasen et al. 2024) labels patches with these 19 names.

43-classes 3-10 (road/rail, port, airports, mineral extraction, dump, construction, green urban, sport),
30 (bare rock), 32 (burnt areas) and 37 (intertidal flats) have no 19-class: BigEarthNet-19 drops them.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

BIGEARTHNET_43_LABELS: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)

BIGEARTHNET_19_LABELS: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)

# label_conversion: for each 19-class (in order), the 43-class indices it merges.
LABEL_CONVERSION_43_TO_19: tuple[tuple[int, ...], ...] = (
    (0, 1), (2,), (11, 12, 13), (14, 15, 16, 18), (17,), (19,), (20,), (21,), (22,), (23,), (24,),
    (25, 31), (26, 27), (28,), (29,), (33, 34), (35, 36), (38, 39), (40, 41, 42),
)

# 43-class index -> 19-class index, or -1 where BigEarthNet-19 has no class.
INDEX_43_TO_19: tuple[int, ...] = tuple(
    next((new for new, olds in enumerate(LABEL_CONVERSION_43_TO_19) if old in olds), -1) for old in range(43)
)
UNMAPPED_43: tuple[int, ...] = tuple(old for old, new in enumerate(INDEX_43_TO_19) if new < 0)

_INDEX_43 = {name: i for i, name in enumerate(BIGEARTHNET_43_LABELS)}
_INDEX_19 = {name: i for i, name in enumerate(BIGEARTHNET_19_LABELS)}


def _names(labels: Iterable[str]) -> list[str]:
    if isinstance(labels, str):
        raise TypeError("labels must be a list of class names, not one string")
    return [label.strip() for label in labels]


def multi_hot_43(labels: Iterable[str]) -> np.ndarray:
    """43-class multi-hot float32 vector of a patch labelled with 43-class names.

    Raises ``ValueError`` for a BigEarthNet-19 name that merges several 43-classes (e.g. "Arable land"):
    the 43-class vector is then undefined. Names common to both nomenclatures are accepted.
    """
    vector = np.zeros(len(BIGEARTHNET_43_LABELS), dtype=np.float32)
    for name in _names(labels):
        if name in _INDEX_43:
            vector[_INDEX_43[name]] = 1.0
        elif name in _INDEX_19:
            raise ValueError(f"label {name!r} is a BigEarthNet-19 class; its 43-class labels are undefined")
        else:
            raise ValueError(f"unknown BigEarthNet label {name!r}")
    return vector


def multi_hot_19(labels: Iterable[str]) -> np.ndarray:
    """19-class multi-hot float32 vector from 43-class names, 19-class names, or a mix of both.

    43-classes without a 19-class (see ``UNMAPPED_43``) contribute nothing.
    """
    vector = np.zeros(len(BIGEARTHNET_19_LABELS), dtype=np.float32)
    for name in _names(labels):
        if name in _INDEX_19:
            vector[_INDEX_19[name]] = 1.0
        elif name in _INDEX_43:
            new = INDEX_43_TO_19[_INDEX_43[name]]
            if new >= 0:
                vector[new] = 1.0
        else:
            raise ValueError(f"unknown BigEarthNet label {name!r}")
    return vector


def convert_43_to_19(values: np.ndarray) -> np.ndarray:
    """Map 43-class vectors [..., 43] (multi-hot or probabilities) to 19 classes [..., 19].

    A 19-class takes the maximum over the 43-classes it merges: logical OR for multi-hot vectors, and
    for probabilities the probability of the most likely member (a lower bound of the union).
    """
    values = np.asarray(values)
    if values.shape[-1] != len(BIGEARTHNET_43_LABELS):
        raise ValueError(f"expected a last axis of 43 classes, got shape {values.shape}")
    return np.stack([values[..., list(olds)].max(axis=-1) for olds in LABEL_CONVERSION_43_TO_19], axis=-1)


def labels_from_multi_hot(vector: np.ndarray, names: tuple[str, ...]) -> list[str]:
    """Names of the classes set in a multi-hot vector (in index order)."""
    vector = np.asarray(vector)
    if vector.shape != (len(names),):
        raise ValueError(f"expected a vector of {len(names)} entries, got shape {vector.shape}")
    return [names[i] for i in np.flatnonzero(vector > 0.5)]
