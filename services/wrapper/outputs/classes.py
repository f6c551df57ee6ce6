"""``classify`` results: per-patch probability of every label and the labels at or above a threshold.

JSON, one file per input: production's list (contracts doc section 7: the feature entries ``i``, ``j``, ``result``
plus ``"probability": ["score:index:label", ...]``) extended with ``patch_id``, ``labels`` and ``scores``::

    [{"i": 0, "j": 0, "result": [2048 floats], "probability": ["0.912345:23:Coniferous forest", ...],
      "patch_id": "S2A_..._0_45", "labels": ["Coniferous forest", ...], "scores": {"Continuous urban fabric": 0.01, ...}}]

``result`` carries the features the probabilities were computed from, as production's classes list does.
``probability`` lists every class, highest score first, formatted exactly as the inference server's
classification extension formats it (6 decimals; ties keep the lower index first). ``labels`` are the classes with
probability >= threshold in the same order; ``scores`` maps every label to its float32 probability in label order.

CSV, one file per input: ``patch_id,i,j,<one column per label>,labels`` with ``labels`` joined by ``;``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any, IO, Sequence

import numpy as np

from services.wrapper.outputs.features import FeatureSet, check_features
from services.wrapper.outputs.types import OutputFile, OutputFormatError

JSON_CONTENT_TYPE = "application/json"
CSV_CONTENT_TYPE = "text/csv; charset=utf-8"
CLASSES_JSON_SUFFIX = ".classes.json"
CLASSES_CSV_SUFFIX = ".classes.csv"
DEFAULT_THRESHOLD = 0.5
LABEL_SEPARATOR = ";"
_CSV_FIXED_COLUMNS = ("patch_id", "i", "j")
_CSV_LABELS_COLUMN = "labels"


@dataclass(frozen=True, slots=True)
class ClassResults:
    """What a classes file says about N patches and C labels."""

    patch_ids: tuple[str, ...]
    i: np.ndarray  # int64 [N]
    j: np.ndarray  # int64 [N]
    label_names: tuple[str, ...]
    probabilities: np.ndarray  # float32 [N, C]; NaN where a production file left a class out
    predicted: tuple[tuple[str, ...], ...]  # per patch, the labels the file marks as present
    features: np.ndarray | None = None  # float32 [N, D] from the JSON's ``result``; None for CSV

    def __repr__(self) -> str:
        return f"ClassResults({len(self.patch_ids)} patches, {len(self.label_names)} labels)"


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    names = tuple(labels)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise OutputFormatError("labels must be a non-empty sequence of non-empty strings")
    if len(set(names)) != len(names):
        raise OutputFormatError("labels must be distinct")
    return names


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise OutputFormatError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def check_probabilities(probabilities: np.ndarray, count: int, labels: Sequence[str]) -> np.ndarray:
    """float32 [count, len(labels)] with every value in [0, 1]."""
    if not isinstance(probabilities, np.ndarray) or probabilities.dtype != np.float32:
        got = probabilities.dtype if isinstance(probabilities, np.ndarray) else type(probabilities).__name__
        raise OutputFormatError(f"probabilities must be a float32 array, got {got}")
    if probabilities.shape != (count, len(labels)):
        raise OutputFormatError(
            f"probabilities must have shape [{count}, {len(labels)}] (patches x labels), got {list(probabilities.shape)}"
        )
    inside = np.isfinite(probabilities) & (probabilities >= 0.0) & (probabilities <= 1.0)
    if not inside.all():
        rows = np.flatnonzero(~inside.all(axis=1))
        raise OutputFormatError(f"probabilities of rows {rows[:5].tolist()} are not all in [0, 1]")
    return probabilities


def descending_order(probabilities: np.ndarray) -> np.ndarray:
    """Class indices per row, highest probability first, lower index first on ties (the server's order)."""
    return np.argsort(-probabilities.astype(np.float64), axis=1, kind="stable")


def classification_entries(probabilities: np.ndarray, labels: Sequence[str]) -> list[list[str]]:
    """``"score:index:label"`` per class and patch, as the classification extension returns them with
    ``class_count = len(labels)``."""
    order = descending_order(probabilities)
    return [
        [f"{float(row[index]):f}:{int(index)}:{labels[index]}" for index in row_order]
        for row, row_order in zip(probabilities, order)
    ]


def parse_classification_entry(entry: str | bytes) -> tuple[float, int, str]:
    """``"score:index:label"`` (or ``"score:index"``) -> (score, index, label). Labels may contain ``:``."""
    text = entry.decode("utf-8") if isinstance(entry, bytes) else entry
    if not isinstance(text, str):
        raise OutputFormatError(f"classification entry must be a string, got {type(entry).__name__}")
    parts = text.split(":", 2)
    try:
        score, index = float(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise OutputFormatError(f"classification entry {text[:80]!r} is not 'score:index:label'") from None
    if index < 0 or not math.isfinite(score):
        raise OutputFormatError(f"classification entry {text[:80]!r} has a negative index or a non-finite score")
    return score, index, parts[2] if len(parts) == 3 else ""


def labels_over_threshold(probabilities: np.ndarray, labels: Sequence[str], threshold: float) -> list[list[str]]:
    """Per patch, the labels with probability >= threshold, highest first."""
    order = descending_order(probabilities)
    return [
        [labels[index] for index in row_order if row[index] >= threshold]
        for row, row_order in zip(probabilities, order)
    ]


def _validated(
    features: FeatureSet, probabilities: np.ndarray, labels: Sequence[str], threshold: float
) -> tuple[tuple[str, ...], float]:
    if not isinstance(features, FeatureSet):
        raise OutputFormatError(
            f"features must be the FeatureSet the probabilities were computed from, got {type(features).__name__}"
        )
    names = _check_labels(labels)
    check_probabilities(probabilities, len(features), names)
    return names, _check_threshold(threshold)


CHUNK_ROWS = 256  # records serialised at a time: a classes JSON with 2048-d vectors is ~145 KB per patch


def stream_classes_json(
    out: IO[bytes],
    features: FeatureSet,
    probabilities: np.ndarray,
    labels: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> None:
    """``write_classes_json`` into a file, ``CHUNK_ROWS`` records at a time (the same bytes)."""
    names, threshold = _validated(features, probabilities, labels, threshold)
    check_features(features.features, features.features.shape[1])
    out.write(b"[")
    for first in range(0, len(features), CHUNK_ROWS):
        stop = min(first + CHUNK_ROWS, len(features))
        chunk = probabilities[first:stop]
        entries = classification_entries(chunk, names)
        predicted = labels_over_threshold(chunk, names, threshold)
        vectors = features.features[first:stop].astype(np.float64).tolist()
        scores = chunk.astype(np.float64).tolist()
        records = [
            {
                "i": int(features.i[row]),
                "j": int(features.j[row]),
                "result": vectors[row - first],
                "probability": entries[row - first],
                "patch_id": features.patch_ids[row],
                "labels": predicted[row - first],
                "scores": dict(zip(names, scores[row - first])),
            }
            for row in range(first, stop)
        ]
        text = json.dumps(records, allow_nan=False, ensure_ascii=False, separators=(",", ":"))[1:-1]
        out.write((b"," if first else b"") + text.encode("utf-8"))
    out.write(b"]")


def write_classes_json(
    features: FeatureSet,
    probabilities: np.ndarray,
    labels: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> OutputFile:
    """Production's classes list plus ``patch_id``, ``labels`` and ``scores`` (see the module docstring)."""
    buffer = io.BytesIO()
    stream_classes_json(buffer, features, probabilities, labels, threshold)
    return OutputFile(data=buffer.getvalue(), content_type=JSON_CONTENT_TYPE, suffix=CLASSES_JSON_SUFFIX)


def stream_classes_csv(
    out: IO[bytes],
    features: FeatureSet,
    probabilities: np.ndarray,
    labels: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> None:
    """``patch_id,i,j,<label...>,labels``: one row per patch, probabilities as the shortest float32 decimals."""
    names, threshold = _validated(features, probabilities, labels, threshold)
    clash = set(names) & {*_CSV_FIXED_COLUMNS, _CSV_LABELS_COLUMN}
    if clash:
        raise OutputFormatError(f"label names {sorted(clash)} clash with the CSV's own columns")
    if any(LABEL_SEPARATOR in name for name in names):
        raise OutputFormatError(f"label names must not contain {LABEL_SEPARATOR!r}, the labels column separator")
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    try:
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow([*_CSV_FIXED_COLUMNS, *names, _CSV_LABELS_COLUMN])
        for first in range(0, len(features), CHUNK_ROWS):
            chunk = probabilities[first:first + CHUNK_ROWS]
            predicted = labels_over_threshold(chunk, names, threshold)
            for offset, row_values in enumerate(chunk):
                row = first + offset
                # str(np.float32) is the shortest decimal that reads back to the same float32.
                writer.writerow([features.patch_ids[row], int(features.i[row]), int(features.j[row]),
                                 *[str(value) for value in row_values], LABEL_SEPARATOR.join(predicted[offset])])
    finally:
        text.detach()  # leave ``out`` open for the caller


def write_classes_csv(
    features: FeatureSet,
    probabilities: np.ndarray,
    labels: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> OutputFile:
    """``patch_id,i,j,<label...>,labels``: one row per patch, probabilities as the shortest float32 decimals."""
    buffer = io.BytesIO()
    stream_classes_csv(buffer, features, probabilities, labels, threshold)
    return OutputFile(data=buffer.getvalue(), content_type=CSV_CONTENT_TYPE, suffix=CLASSES_CSV_SUFFIX)


def _label_names_from_entries(records: list[dict[str, Any]]) -> tuple[str, ...]:
    names: dict[int, str] = {}
    for record in records:
        for entry in record["probability"]:
            _, index, label = parse_classification_entry(entry)
            if names.setdefault(index, label) != label:
                raise OutputFormatError(f"class index {index} has two labels: {names[index]!r} and {label!r}")
    count = max(names) + 1 if names else 0
    return tuple(names.get(index, str(index)) for index in range(count))


def read_classes_json(data: bytes) -> ClassResults:
    """Read our classes JSON or production's (``i``, ``j``, ``result``, ``probability`` only).

    Probabilities come from ``scores`` when present (exact float32), else from the 6-decimal ``probability``
    entries; a class missing from a production entry is NaN. ``predicted`` is the file's ``labels`` (empty for
    production files, which record no threshold).
    """
    try:
        records = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OutputFormatError(f"classes file is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise OutputFormatError(f"classes JSON must be a list of entries, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not {"i", "j", "probability"} <= set(record):
            raise OutputFormatError(f"classes JSON entry {index} must be an object with keys i, j and probability")
        if not isinstance(record["probability"], list):
            raise OutputFormatError(f"classes JSON entry {index} probability must be a list of 'score:index:label'")
    if records and all(isinstance(r.get("scores"), dict) for r in records):
        names = tuple(records[0]["scores"])
        if any(tuple(r["scores"]) != names for r in records):
            raise OutputFormatError("classes JSON entries have different label sets in scores")
        try:
            probabilities = np.array([list(r["scores"].values()) for r in records], dtype=np.float64).astype(np.float32)
        except (TypeError, ValueError):
            raise OutputFormatError("classes JSON scores must be numbers") from None
    else:
        names = _label_names_from_entries(records)
        probabilities = np.full((len(records), len(names)), np.nan, dtype=np.float32)
        for row, record in enumerate(records):
            for entry in record["probability"]:
                score, index, _ = parse_classification_entry(entry)
                probabilities[row, index] = score
    predicted: list[tuple[str, ...]] = []
    for index, record in enumerate(records):
        present = record.get("labels", [])
        if not isinstance(present, list) or not all(isinstance(name, str) and name in names for name in present):
            raise OutputFormatError(f"classes JSON entry {index} labels must be a list of known label names")
        predicted.append(tuple(present))
    features = None
    if records and all("result" in r for r in records):
        try:
            features = np.array([r["result"] for r in records], dtype=np.float64).astype(np.float32)
        except (TypeError, ValueError):
            raise OutputFormatError("classes JSON results must be equal-length lists of numbers") from None
        if features.ndim != 2:
            raise OutputFormatError("classes JSON results must be equal-length lists of numbers")
    for index, record in enumerate(records):
        for key in ("i", "j"):
            if isinstance(record[key], bool) or not isinstance(record[key], int):
                raise OutputFormatError(f"classes JSON entry {index} {key} must be an integer")
    return ClassResults(
        patch_ids=tuple(str(r.get("patch_id", f"{r['i']}_{r['j']}")) for r in records),
        i=np.array([r["i"] for r in records], dtype=np.int64),
        j=np.array([r["j"] for r in records], dtype=np.int64),
        label_names=names,
        probabilities=probabilities.reshape(len(records), len(names)),
        predicted=tuple(predicted),
        features=features,
    )


def read_classes_csv(data: bytes) -> ClassResults:
    """Read a classes CSV written by ``write_classes_csv``."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as error:
        raise OutputFormatError(f"classes CSV is not UTF-8: {error}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise OutputFormatError("classes CSV is empty")
    header = rows[0]
    if tuple(header[:3]) != _CSV_FIXED_COLUMNS or len(header) < 5 or header[-1] != _CSV_LABELS_COLUMN:
        raise OutputFormatError(f"classes CSV header must be patch_id,i,j,<labels...>,labels; got {header[:4]}...")
    names = tuple(header[3:-1])
    patch_ids: list[str] = []
    positions: list[tuple[int, int]] = []
    probabilities = np.empty((len(rows) - 1, len(names)), dtype=np.float32)
    predicted: list[tuple[str, ...]] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise OutputFormatError(f"classes CSV line {line} has {len(row)} fields, the header has {len(header)}")
        try:
            positions.append((int(row[1]), int(row[2])))
            probabilities[line - 2] = np.array(row[3:-1], dtype=np.float32)
        except ValueError:
            raise OutputFormatError(f"classes CSV line {line} has a non-numeric i, j or probability") from None
        present = tuple(name for name in row[-1].split(LABEL_SEPARATOR) if name)
        if any(name not in names for name in present):
            raise OutputFormatError(f"classes CSV line {line} names a label that has no column")
        patch_ids.append(row[0])
        predicted.append(present)
    return ClassResults(
        patch_ids=tuple(patch_ids),
        i=np.array([p[0] for p in positions], dtype=np.int64),
        j=np.array([p[1] for p in positions], dtype=np.int64),
        label_names=names,
        probabilities=probabilities,
        predicted=tuple(predicted),
    )


__all__ = [
    "CLASSES_CSV_SUFFIX",
    "CLASSES_JSON_SUFFIX",
    "ClassResults",
    "DEFAULT_THRESHOLD",
    "check_probabilities",
    "classification_entries",
    "labels_over_threshold",
    "parse_classification_entry",
    "read_classes_csv",
    "read_classes_json",
    "write_classes_csv",
    "write_classes_json",
]
