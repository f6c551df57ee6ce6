"""classify results: JSON (production list + extensions) and CSV written, read back, refused when malformed."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from services.core.bigearthnet import BIGEARTHNET_19_LABELS, BIGEARTHNET_43_LABELS
from services.inference.engine import classify as server_classification
from services.wrapper.outputs import (
    FeatureSet,
    OutputFormatError,
    classification_entries,
    parse_classification_entry,
    read_classes_csv,
    read_classes_json,
    write_classes_csv,
    write_classes_json,
)


def _feature_set(count: int, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    return FeatureSet(
        patch_ids=tuple(f"S2B_MSIL2A_20180502T093039_{k}_3" for k in range(count)),
        i=np.arange(count, dtype=np.int64),
        j=np.zeros(count, dtype=np.int64),
        features=np.abs(rng.standard_normal((count, 2048), dtype=np.float32)),
    )


def _probabilities(count: int, classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((count, classes), dtype=np.float32)


def test_probability_entries_are_what_the_inference_server_returns() -> None:
    probabilities = _probabilities(3, 43)
    probabilities[1, 5] = probabilities[1, 9]  # a tie: the lower index comes first
    ours = classification_entries(probabilities, BIGEARTHNET_43_LABELS)
    server = server_classification(probabilities, 43, BIGEARTHNET_43_LABELS, batched=True)
    assert ours == [[entry.decode("utf-8") for entry in row] for row in server]


def test_json_round_trip_with_known_labels() -> None:
    features = _feature_set(2)
    probabilities = np.zeros((2, 19), dtype=np.float32)
    probabilities[0, [3, 7, 11]] = [0.9, 0.5, 0.49]  # 0.5 is at the threshold: included
    probabilities[1, 0] = 0.2  # nothing at or above the threshold
    output = write_classes_json(features, probabilities, BIGEARTHNET_19_LABELS, threshold=0.5)
    assert output.suffix == ".classes.json"

    records = json.loads(output.data)
    assert set(records[0]) == {"i", "j", "result", "probability", "patch_id", "labels", "scores"}
    assert records[0]["labels"] == [BIGEARTHNET_19_LABELS[3], BIGEARTHNET_19_LABELS[7]]
    assert records[1]["labels"] == []
    assert records[0]["probability"][0] == f"0.900000:3:{BIGEARTHNET_19_LABELS[3]}"
    assert len(records[0]["probability"]) == 19
    assert list(records[0]["scores"]) == list(BIGEARTHNET_19_LABELS)
    assert records[0]["result"] == features.features[0].astype(np.float64).tolist()  # the production list's features

    back = read_classes_json(output.data)
    assert back.label_names == BIGEARTHNET_19_LABELS
    assert back.patch_ids == features.patch_ids
    assert np.array_equal(back.probabilities, probabilities)
    assert back.predicted == ((BIGEARTHNET_19_LABELS[3], BIGEARTHNET_19_LABELS[7]), ())
    assert back.features is not None and np.array_equal(back.features, features.features)


def test_threshold_changes_the_labels_not_the_scores() -> None:
    features, probabilities = _feature_set(4), _probabilities(4, 43, seed=3)
    low = read_classes_json(write_classes_json(features, probabilities, BIGEARTHNET_43_LABELS, threshold=0.2).data)
    high = read_classes_json(write_classes_json(features, probabilities, BIGEARTHNET_43_LABELS, threshold=0.8).data)
    assert np.array_equal(low.probabilities, high.probabilities)
    for row in range(4):
        assert set(high.predicted[row]) < set(low.predicted[row])
        expected = {BIGEARTHNET_43_LABELS[k] for k in np.flatnonzero(probabilities[row] >= 0.8)}
        assert set(high.predicted[row]) == expected


def test_production_classes_json_is_read_from_its_entries() -> None:
    probabilities = _probabilities(2, 43, seed=4)
    entries = classification_entries(probabilities, BIGEARTHNET_43_LABELS)
    production = json.dumps(
        [{"i": 4, "j": k, "result": [0.5] * 2048, "probability": entries[k]} for k in range(2)]
    ).encode()
    back = read_classes_json(production)
    assert back.label_names == BIGEARTHNET_43_LABELS
    assert back.patch_ids == ("4_0", "4_1")
    assert np.allclose(back.probabilities, probabilities, atol=5e-7)
    assert back.predicted == ((), ())


def test_csv_round_trip_is_exact_and_quotes_labels_with_commas() -> None:
    features, probabilities = _feature_set(5, seed=2), _probabilities(5, 43, seed=2)
    probabilities[0, 0] = np.float32(1e-30)
    output = write_classes_csv(features, probabilities, BIGEARTHNET_43_LABELS, threshold=0.5)
    assert output.suffix == ".classes.csv" and output.content_type.startswith("text/csv")

    rows = list(csv.reader(io.StringIO(output.data.decode("utf-8"))))
    assert rows[0] == ["patch_id", "i", "j", *BIGEARTHNET_43_LABELS, "labels"]
    assert "Beaches, dunes, sands" in rows[0]
    assert len(rows) == 6

    back = read_classes_csv(output.data)
    assert back.label_names == BIGEARTHNET_43_LABELS
    assert back.patch_ids == features.patch_ids
    assert np.array_equal(back.probabilities.view(np.uint32), probabilities.view(np.uint32))
    for row in range(5):
        assert set(back.predicted[row]) == {BIGEARTHNET_43_LABELS[k] for k in np.flatnonzero(probabilities[row] >= 0.5)}


def test_writers_are_deterministic() -> None:
    features, probabilities = _feature_set(3), _probabilities(3, 19)
    for writer in (write_classes_json, write_classes_csv):
        first = writer(features, probabilities, BIGEARTHNET_19_LABELS).data
        assert writer(features, probabilities.copy(), BIGEARTHNET_19_LABELS).data == first


def test_entry_parser() -> None:
    assert parse_classification_entry(b"0.250000:7:Pastures") == (0.25, 7, "Pastures")
    assert parse_classification_entry("0.5:2:a:b") == (0.5, 2, "a:b")
    assert parse_classification_entry("0.5:2") == (0.5, 2, "")
    with pytest.raises(OutputFormatError, match="score:index:label"):
        parse_classification_entry("Pastures")


@pytest.mark.parametrize(
    ("probabilities", "labels", "threshold", "match"),
    [
        (np.full((2, 19), 1.5, dtype=np.float32), BIGEARTHNET_19_LABELS, 0.5, r"in \[0, 1\]"),
        (np.full((2, 19), np.nan, dtype=np.float32), BIGEARTHNET_19_LABELS, 0.5, r"in \[0, 1\]"),
        (np.zeros((2, 19), dtype=np.float64), BIGEARTHNET_19_LABELS, 0.5, "float32"),
        (np.zeros((2, 43), dtype=np.float32), BIGEARTHNET_19_LABELS, 0.5, "shape"),
        (np.zeros((3, 19), dtype=np.float32), BIGEARTHNET_19_LABELS, 0.5, "shape"),
        (np.zeros((2, 19), dtype=np.float32), BIGEARTHNET_19_LABELS, 1.5, "threshold"),
        (np.zeros((2, 2), dtype=np.float32), ("a", "a"), 0.5, "distinct"),
    ],
)
def test_bad_input_is_refused(probabilities: np.ndarray, labels: tuple[str, ...], threshold: float, match: str) -> None:
    for writer in (write_classes_json, write_classes_csv):
        with pytest.raises(OutputFormatError, match=match):
            writer(_feature_set(2), probabilities, labels, threshold)


def test_csv_refuses_labels_it_cannot_hold() -> None:
    probabilities = np.zeros((1, 2), dtype=np.float32)
    with pytest.raises(OutputFormatError, match="clash"):
        write_classes_csv(_feature_set(1), probabilities, ("patch_id", "b"))
    with pytest.raises(OutputFormatError, match="must not contain"):
        write_classes_csv(_feature_set(1), probabilities, ("a;b", "c"))


@pytest.mark.parametrize(
    ("reader", "data", "match"),
    [
        (read_classes_json, b"[1]", "keys i, j and probability"),
        (read_classes_json, b'[{"i": 0, "j": 0, "probability": ["bad"]}]', "score:index:label"),
        (read_classes_json, b'[{"i": 0, "j": 0, "probability": ["0.5:0:a", "0.4:0:b"]}]', "two labels"),
        (read_classes_json, b"{", "not valid JSON"),
        (read_classes_csv, b"", "empty"),
        (read_classes_csv, b"id,x\n", "header"),
        (read_classes_csv, b"patch_id,i,j,a,labels\np,0,0,zero,\n", "non-numeric"),
        (read_classes_csv, b"patch_id,i,j,a,labels\np,0,0,0.5\n", "fields"),
        (read_classes_csv, b"patch_id,i,j,a,labels\np,0,0,0.5,b\n", "no column"),
    ],
)
def test_bad_class_files_are_refused(reader: object, data: bytes, match: str) -> None:
    with pytest.raises(OutputFormatError, match=match):
        reader(data)  # type: ignore[operator]
