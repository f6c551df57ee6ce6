"""BigEarthNet nomenclatures, the published 43 -> 19 mapping, and the labels of the bundled sample."""

from __future__ import annotations

import numpy as np
import pytest

from models import sample_data
from services.core import bigearthnet as ben


def test_nomenclature_sizes_and_ends() -> None:
    assert len(ben.BIGEARTHNET_43_LABELS) == len(set(ben.BIGEARTHNET_43_LABELS)) == 43
    assert len(ben.BIGEARTHNET_19_LABELS) == len(set(ben.BIGEARTHNET_19_LABELS)) == 19
    assert ben.BIGEARTHNET_43_LABELS[0] == "Continuous urban fabric"
    assert ben.BIGEARTHNET_43_LABELS[42] == "Sea and ocean"
    assert ben.BIGEARTHNET_19_LABELS[0] == "Urban fabric"
    assert ben.BIGEARTHNET_19_LABELS[18] == "Marine waters"


def test_label_conversion_is_the_published_one() -> None:
    # label_indices.json "label_conversion" of the BigEarthNet-19 models (Sumbul et al., arXiv:2105.07921).
    published = [[0, 1], [2], [11, 12, 13], [14, 15, 16, 18], [17], [19], [20], [21], [22], [23], [24],
                 [25, 31], [26, 27], [28], [29], [33, 34], [35, 36], [38, 39], [40, 41, 42]]
    assert [list(olds) for olds in ben.LABEL_CONVERSION_43_TO_19] == published
    assert set(ben.UNMAPPED_43) == {3, 4, 5, 6, 7, 8, 9, 10, 30, 32, 37}
    sources = [old for olds in ben.LABEL_CONVERSION_43_TO_19 for old in olds]
    assert len(sources) == len(set(sources))  # each 43-class feeds at most one 19-class
    assert set(sources) | set(ben.UNMAPPED_43) == set(range(43))


def test_names_in_both_nomenclatures_map_onto_themselves() -> None:
    shared = set(ben.BIGEARTHNET_43_LABELS) & set(ben.BIGEARTHNET_19_LABELS)
    assert "Pastures" in shared and "Mixed forest" in shared
    for name in shared:
        old = ben.BIGEARTHNET_43_LABELS.index(name)
        assert ben.BIGEARTHNET_19_LABELS[ben.INDEX_43_TO_19[old]] == name


def test_merged_classes_group_related_corine_classes() -> None:
    groups = {
        ben.BIGEARTHNET_19_LABELS[new]: {ben.BIGEARTHNET_43_LABELS[old] for old in olds}
        for new, olds in enumerate(ben.LABEL_CONVERSION_43_TO_19)
    }
    assert groups["Urban fabric"] == {"Continuous urban fabric", "Discontinuous urban fabric"}
    assert groups["Arable land"] == {"Non-irrigated arable land", "Permanently irrigated land", "Rice fields"}
    assert groups["Inland wetlands"] == {"Inland marshes", "Peatbogs"}
    assert groups["Marine waters"] == {"Coastal lagoons", "Estuaries", "Sea and ocean"}
    assert groups["Transitional woodland, shrub"] == {"Transitional woodland/shrub"}


def test_multi_hot_vectors() -> None:
    labels = ["Non-irrigated arable land", "Pastures", "Airports"]
    v43 = ben.multi_hot_43(labels)
    assert v43.shape == (43,) and v43.dtype == np.float32
    assert ben.labels_from_multi_hot(v43, ben.BIGEARTHNET_43_LABELS) == ["Airports", "Non-irrigated arable land", "Pastures"]
    v19 = ben.multi_hot_19(labels)  # Airports has no 19-class
    assert ben.labels_from_multi_hot(v19, ben.BIGEARTHNET_19_LABELS) == ["Arable land", "Pastures"]
    np.testing.assert_array_equal(ben.convert_43_to_19(v43), v19)


def test_conversion_of_probabilities_takes_the_most_likely_member() -> None:
    probabilities = np.zeros((2, 43), dtype=np.float32)
    probabilities[0, 40], probabilities[0, 42] = 0.2, 0.7  # coastal lagoons, sea
    probabilities[1, 3] = 0.9  # road and rail: dropped
    out = ben.convert_43_to_19(probabilities)
    assert out.shape == (2, 19)
    assert out[0, 18] == pytest.approx(0.7) and out[0].sum() == pytest.approx(0.7)
    assert not out[1].any()
    with pytest.raises(ValueError, match="43 classes"):
        ben.convert_43_to_19(np.zeros(19))


def test_label_errors() -> None:
    with pytest.raises(ValueError, match="BigEarthNet-19 class"):
        ben.multi_hot_43(["Arable land"])
    with pytest.raises(ValueError, match="unknown BigEarthNet label 'Moon dust'"):
        ben.multi_hot_19(["Moon dust"])
    with pytest.raises(ValueError, match="unknown"):
        ben.multi_hot_43(["Moon dust"])
    with pytest.raises(TypeError):
        ben.multi_hot_19("Pastures")


def test_every_sample_patch_label_converts() -> None:
    entries = sample_data.sample_index()
    assert len(entries) == 42
    names_43, names_19 = set(ben.BIGEARTHNET_43_LABELS), set(ben.BIGEARTHNET_19_LABELS)
    seen_43_only = seen_19_only = 0
    for entry in entries:
        labels = entry["labels"]
        assert set(labels) <= names_43 | names_19, labels
        v19 = ben.multi_hot_19(labels)
        if set(labels) <= names_43:
            # BigEarthNet v1 patches: 43-class names; both vectors are defined and consistent.
            np.testing.assert_array_equal(ben.convert_43_to_19(ben.multi_hot_43(labels)), v19)
        else:
            # BigEarthNet v2 patches: 19-class names; the 43-class vector is undefined for merged classes.
            assert set(labels) <= names_19
            with pytest.raises(ValueError):
                ben.multi_hot_43(labels)
            assert v19.sum() == len(labels)
        seen_43_only += not set(labels) <= names_19
        seen_19_only += not set(labels) <= names_43
    assert seen_43_only and seen_19_only  # the sample really holds both nomenclatures
