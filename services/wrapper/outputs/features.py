"""``ssl-features`` results: production's JSON list and a compact ``.npz``, and one reader for both.

JSON (production, contracts doc section 7), one file per input::

    [{"i": row, "j": col, "result": [2048 floats], "patch_id": "<patch>"}, ...]

``i``/``j``/``result`` are exactly production's keys; ``patch_id`` is our addition (a JSON-list reader ignores
keys it does not know). BigEarthNet patches have no grid position: they get i = index in input order, j = 0.
Floats are written as the shortest decimal that reads back to the same float64 value of each float32, so the
file reads back bit-exactly.

NPZ: a zip of ``.npy`` arrays, readable with plain ``numpy.load(..., allow_pickle=False)``:
``patch_ids`` (unicode [N]), ``features`` (float32 [N, D]), ``i``/``j`` (int64 [N]), ``model_name`` and
``model_version`` (0-d unicode). Zip entries carry a fixed timestamp, so equal input gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator, Sequence

import numpy as np

from services.wrapper.inputs.decode_limits import DecodeLimitExceeded, check_npz
from services.wrapper.outputs.types import OutputFile, OutputFormatError, PatchMetadata, check_patches, grid_positions

REPRESENTATION_DIM = 2048
JSON_CONTENT_TYPE = "application/json"
NPZ_CONTENT_TYPE = "application/octet-stream"
FEATURES_JSON_SUFFIX = ".features.json"
FEATURES_NPZ_SUFFIX = ".features.npz"
# zip cannot store dates before 1980; any fixed value makes the archive reproducible.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP_MAGIC = b"PK\x03\x04"
_NPZ_ARRAYS = ("patch_ids", "features", "i", "j", "model_name", "model_version")


@dataclass(frozen=True, slots=True)
class FeatureSet:
    """Features of N patches in file order. ``patch_ids`` of a production JSON (which has none) are ``"<i>_<j>"``."""

    patch_ids: tuple[str, ...]
    i: np.ndarray  # int64 [N]
    j: np.ndarray  # int64 [N]
    features: np.ndarray  # float32 [N, D]
    model_name: str = ""
    model_version: str = ""

    def __len__(self) -> int:
        return len(self.patch_ids)

    def __repr__(self) -> str:
        return f"FeatureSet({len(self)} patches, features {self.features.shape}, model={self.model_name!r})"


def check_features(features: np.ndarray, dimension: int = REPRESENTATION_DIM) -> np.ndarray:
    """``features`` as float32 [N, dimension], N >= 1, all finite; anything else is an ``OutputFormatError``."""
    if not isinstance(features, np.ndarray):
        raise OutputFormatError(f"features must be a numpy array, got {type(features).__name__}")
    if features.dtype != np.float32:
        raise OutputFormatError(f"features must be float32, got {features.dtype}")
    if features.ndim != 2 or features.shape[1] != dimension or features.shape[0] == 0:
        raise OutputFormatError(f"features must have shape [N >= 1, {dimension}], got {list(features.shape)}")
    if not np.isfinite(features).all():
        rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise OutputFormatError(f"features of rows {rows[:5].tolist()} are not finite (NaN or inf)")
    return features


def feature_records(features: np.ndarray, patches: Sequence[PatchMetadata]) -> list[dict[str, Any]]:
    """Production's list entries ``{"i", "j", "result", "patch_id"}`` (the classify writer extends them)."""
    check_patches(patches, features.shape[0], "features")
    rows, cols = grid_positions(patches)
    # float32 -> float64 is exact, and json writes the shortest repr of a float64: reading it back and casting
    # to float32 gives the original bits.
    results = features.astype(np.float64).tolist()
    return [
        {"i": int(row), "j": int(col), "result": result, "patch_id": patch.patch_id}
        for row, col, result, patch in zip(rows, cols, results, patches)
    ]


def stream_features_json(
    out: IO[bytes], chunks: Iterable[np.ndarray], patches: Sequence[PatchMetadata], dimension: int = REPRESENTATION_DIM
) -> None:
    """Production's feature list written chunk by chunk: the same bytes as one ``json.dumps`` of the whole list
    (compact separators), with only one chunk of records in memory."""
    rows, cols = grid_positions(patches)
    first = 0
    out.write(b"[")
    for chunk in chunks:
        check_features(chunk, dimension)
        stop = first + chunk.shape[0]
        if stop > len(patches):
            raise OutputFormatError(f"features: more rows than the {len(patches)} patches")
        records = [
            {"i": int(row), "j": int(col), "result": result, "patch_id": patch.patch_id}
            for row, col, result, patch in zip(rows[first:stop], cols[first:stop],
                                               chunk.astype(np.float64).tolist(), patches[first:stop])
        ]
        text = json.dumps(records, allow_nan=False, separators=(",", ":"))[1:-1]
        out.write(((b"," if first else b"") + text.encode("utf-8")))
        first = stop
    if first != len(patches) or first == 0:
        raise OutputFormatError(f"features: {first} rows for {len(patches)} patches (N >= 1 needed)")
    out.write(b"]")


def write_features_json(
    features: np.ndarray, patches: Sequence[PatchMetadata], dimension: int = REPRESENTATION_DIM
) -> OutputFile:
    """Production's feature list for one input: ``[{"i", "j", "result", "patch_id"}, ...]``."""
    check_features(features, dimension)
    check_patches(patches, features.shape[0], "features")
    buffer = io.BytesIO()
    stream_features_json(buffer, [features], patches, dimension)
    return OutputFile(data=buffer.getvalue(), content_type=JSON_CONTENT_TYPE, suffix=FEATURES_JSON_SUFFIX)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array, order="C"), allow_pickle=False)
    return buffer.getvalue()


def _zip_info(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    info.file_size = size  # known in advance: zip64 is chosen from it exactly as ``writestr`` would
    return info


def write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """A deflated ``.npz`` with fixed zip timestamps (``numpy.savez`` stamps the current time)."""
    buffer = io.BytesIO()
    stream_npz(buffer, {name: [array] for name, array in arrays.items()})
    return buffer.getvalue()


def stream_npz(out: IO[bytes], arrays: dict[str, Sequence[np.ndarray] | Iterable[np.ndarray]],
               shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None) -> None:
    """An ``.npz`` written array by array into a seekable file; an array given as chunks along its first axis
    (with its full shape and dtype in ``shapes``) is never whole in memory. Same bytes as ``write_npz``."""
    shapes = shapes or {}
    with zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, parts in arrays.items():
            if name in shapes:
                shape, dtype = shapes[name]
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                             "shape": tuple(shape)})
                size = len(header.getvalue()) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                with archive.open(_zip_info(name, size), mode="w") as entry:
                    entry.write(header.getvalue())
                    for part in parts:
                        entry.write(np.ascontiguousarray(part, dtype=dtype).tobytes())
            else:
                (array,) = list(parts)
                data = _npy_bytes(array)
                with archive.open(_zip_info(name, len(data)), mode="w") as entry:
                    entry.write(data)


def stream_features_npz(
    out: IO[bytes],
    chunks: Iterable[np.ndarray],
    count: int,
    patches: Sequence[PatchMetadata],
    model_name: str = "",
    model_version: str = "",
    dimension: int = REPRESENTATION_DIM,
) -> None:
    """``write_features_npz`` into a seekable file from chunks of rows (``count`` rows in all)."""
    check_patches(patches, count, "features")
    rows, cols = grid_positions(patches)

    def checked() -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield check_features(chunk, dimension)

    stream_npz(
        out,
        {
            "patch_ids": [np.array([p.patch_id for p in patches], dtype=np.str_)],
            "features": checked(),
            "i": [rows],
            "j": [cols],
            "model_name": [np.array(model_name, dtype=np.str_)],
            "model_version": [np.array(model_version, dtype=np.str_)],
        },
        shapes={"features": ((count, dimension), np.dtype(np.float32))},
    )


def write_features_npz(
    features: np.ndarray,
    patches: Sequence[PatchMetadata],
    model_name: str = "",
    model_version: str = "",
    dimension: int = REPRESENTATION_DIM,
) -> OutputFile:
    """The compact binary file: ``patch_ids``, ``features`` float32 [N, D], ``i``, ``j``, model name/version."""
    check_features(features, dimension)
    buffer = io.BytesIO()
    stream_features_npz(buffer, [features], features.shape[0], patches, model_name, model_version, dimension)
    return OutputFile(data=buffer.getvalue(), content_type=NPZ_CONTENT_TYPE, suffix=FEATURES_NPZ_SUFFIX)


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OutputFormatError(f"{what} must be an integer, got {type(value).__name__}")
    return value


def _read_features_json(data: bytes, dimension: int) -> FeatureSet:
    try:
        records = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OutputFormatError(f"features file is neither an npz nor valid JSON: {error}") from None
    if not isinstance(records, list):
        raise OutputFormatError(f"features JSON must be a list of entries, got {type(records).__name__}")
    rows: list[int] = []
    cols: list[int] = []
    ids: list[str] = []
    vectors: list[list[float]] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not {"i", "j", "result"} <= set(record):
            raise OutputFormatError(f"features JSON entry {index} must be an object with keys i, j and result")
        row = _as_int(record["i"], f"entry {index} i")
        col = _as_int(record["j"], f"entry {index} j")
        result = record["result"]
        if not isinstance(result, list) or len(result) != dimension:
            got = len(result) if isinstance(result, list) else type(result).__name__
            raise OutputFormatError(f"features JSON entry {index} result must be a list of {dimension} numbers, got {got}")
        patch_id = record.get("patch_id", f"{row}_{col}")
        if not isinstance(patch_id, str) or not patch_id:
            raise OutputFormatError(f"features JSON entry {index} patch_id must be a non-empty string")
        rows.append(row)
        cols.append(col)
        ids.append(patch_id)
        vectors.append(result)
    try:
        with np.errstate(over="ignore"):  # out-of-range values become inf and are refused just below
            features = np.array(vectors, dtype=np.float64).reshape(len(vectors), dimension).astype(np.float32)
    except (TypeError, ValueError):
        raise OutputFormatError("features JSON results must hold numbers only") from None
    if not np.isfinite(features).all():
        raise OutputFormatError("features JSON results hold numbers that are not finite float32 values")
    return FeatureSet(
        patch_ids=tuple(ids),
        i=np.array(rows, dtype=np.int64),
        j=np.array(cols, dtype=np.int64),
        features=features,
    )


def read_npz(data: bytes, required: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` read without pickles; missing ``required`` arrays are an ``OutputFormatError``."""
    try:
        check_npz(data)  # sizes from the headers before anything is inflated or allocated
    except DecodeLimitExceeded as error:
        raise OutputFormatError(str(error)) from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as error:
        raise OutputFormatError(f"npz cannot be read: {error}") from None
    missing = [name for name in required if name not in arrays]
    if missing:
        raise OutputFormatError(f"npz lacks the arrays {missing} (has {sorted(arrays)})")
    return arrays


def _read_features_npz(data: bytes, dimension: int) -> FeatureSet:
    arrays = read_npz(data, ("patch_ids", "features", "i", "j"))
    patch_ids, features, rows, cols = arrays["patch_ids"], arrays["features"], arrays["i"], arrays["j"]
    if patch_ids.dtype.kind != "U" or patch_ids.ndim != 1:
        raise OutputFormatError(f"npz patch_ids must be a unicode vector, got {patch_ids.dtype} {list(patch_ids.shape)}")
    count = patch_ids.shape[0]
    if features.dtype != np.float32 or features.shape != (count, dimension):
        raise OutputFormatError(
            f"npz features must be float32 [{count}, {dimension}], got {features.dtype} {list(features.shape)}"
        )
    for name, array in (("i", rows), ("j", cols)):
        if array.dtype.kind not in "iu" or array.shape != (count,):
            raise OutputFormatError(
                f"npz {name} must be an integer vector of {count}, got {array.dtype} {list(array.shape)}"
            )
    if not np.isfinite(features).all():
        raise OutputFormatError("npz features hold non-finite numbers")

    def text(name: str) -> str:
        value = arrays.get(name)
        return str(value[()]) if value is not None and value.dtype.kind == "U" and value.ndim == 0 else ""

    return FeatureSet(
        patch_ids=tuple(str(p) for p in patch_ids),
        i=rows.astype(np.int64),
        j=cols.astype(np.int64),
        features=features,
        model_name=text("model_name"),
        model_version=text("model_version"),
    )


def read_features(data: bytes, dimension: int = REPRESENTATION_DIM) -> FeatureSet:
    """Read a features file of either kind (zip magic -> npz, else production JSON)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise OutputFormatError(f"features file must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if data.startswith(_ZIP_MAGIC):
        return _read_features_npz(data, dimension)
    return _read_features_json(data, dimension)


__all__ = [
    "FEATURES_JSON_SUFFIX",
    "FEATURES_NPZ_SUFFIX",
    "FeatureSet",
    "REPRESENTATION_DIM",
    "check_features",
    "feature_records",
    "read_features",
    "read_npz",
    "stream_features_json",
    "stream_features_npz",
    "stream_npz",
    "write_features_json",
    "write_features_npz",
    "write_npz",
]
