"""What every writer shares: the file it returns, the per-patch metadata it records, and its error type."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from affine import Affine
from rasterio.errors import CRSError

from services.wrapper.gdal_policy import CrsRefused, parse_crs


class OutputFormatError(ValueError):
    """Input a writer cannot turn into a result file, or bytes a reader cannot read as one.

    The message names what is wrong (shape, dtype, field, offset) and never contains data values in bulk.
    """


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One result object, ready to upload: ``data`` under ``result_key(prefix, input, suffix)``."""

    data: bytes
    content_type: str
    suffix: str
    # Large results are spooled to a file instead (``data`` is then empty); size and hash were taken while writing.
    path: str | None = None
    spooled_size: int = 0
    spooled_sha256: str = ""

    @property
    def size(self) -> int:
        return self.spooled_size if self.path is not None else len(self.data)

    @property
    def sha256(self) -> str:
        return self.spooled_sha256 if self.path is not None else hashlib.sha256(self.data).hexdigest()

    def read_bytes(self) -> bytes:
        """The whole content (tests and small files; the pipeline uploads spooled files from disk)."""
        if self.path is None:
            return self.data
        with open(self.path, "rb") as handle:
            return handle.read()

    def __repr__(self) -> str:
        where = f"spooled at {self.path}" if self.path is not None else "in memory"
        return f"OutputFile({self.size} bytes {where}, content_type={self.content_type!r}, suffix={self.suffix!r})"


@dataclass(frozen=True, slots=True)
class ResultObject:
    """An output file and the key it is written under in the run's folder."""

    key: str
    file: OutputFile
    patches: int


@dataclass(frozen=True, slots=True)
class PatchMetadata:
    """Where one patch or tile came from, as the result files record it.

    ``crs_wkt`` is the CRS as WKT (what GDAL writes back unchanged); ``transform`` is the affine transform of the
    patch's 10 m grid as GDAL-ordered coefficients ``(a, b, c, d, e, f)`` (``affine.Affine`` order). Both are None
    when the source carries no georeferencing. ``i``/``j`` are the tile's row/column in its product (SAFE tiles),
    None for BigEarthNet patches.
    """

    patch_id: str
    crs_wkt: str | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    i: int | None = None
    j: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.patch_id, str) or not self.patch_id:
            raise OutputFormatError(f"patch_id must be a non-empty string, got {self.patch_id!r}")
        if self.transform is not None:
            if len(self.transform) != 6 or not all(math.isfinite(float(v)) for v in self.transform):
                raise OutputFormatError(f"patch {self.patch_id}: transform must be 6 finite numbers (a, b, c, d, e, f)")
            object.__setattr__(self, "transform", tuple(float(v) for v in self.transform))
        for name in ("i", "j"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise OutputFormatError(f"patch {self.patch_id}: {name} must be an integer or None, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, int(value))

    @property
    def affine(self) -> Affine | None:
        return Affine(*self.transform) if self.transform is not None else None

    @classmethod
    def from_input_patch(cls, patch: Any) -> "PatchMetadata":
        """From the input layer's ``InputPatch`` (its CRS is whatever rasterio printed: EPSG code or WKT)."""
        transform = patch.transform
        return cls(
            patch_id=patch.patch_id,
            crs_wkt=crs_to_wkt(patch.crs) if patch.crs else None,
            transform=tuple(transform)[:6] if transform is not None else None,
            i=patch.i,
            j=patch.j,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "patch_id": self.patch_id,
            "crs_wkt": self.crs_wkt,
            "transform": list(self.transform) if self.transform is not None else None,
            "i": self.i,
            "j": self.j,
        }

    @classmethod
    def from_json(cls, value: Any) -> "PatchMetadata":
        if not isinstance(value, Mapping):
            raise OutputFormatError(f"patch metadata must be an object, got {type(value).__name__}")
        unknown = set(value) - {"patch_id", "crs_wkt", "transform", "i", "j"}
        if unknown:
            raise OutputFormatError(f"patch metadata has unknown fields {sorted(unknown)}")
        transform = value.get("transform")
        if transform is not None and (
            not isinstance(transform, list) or not all(isinstance(v, (int, float)) for v in transform)
        ):
            raise OutputFormatError("patch metadata transform must be a list of 6 numbers or null")
        crs_wkt = value.get("crs_wkt")
        if crs_wkt is not None and not isinstance(crs_wkt, str):
            raise OutputFormatError("patch metadata crs_wkt must be a string or null")
        if crs_wkt is not None:
            crs_to_wkt(crs_wkt)  # refused here when it is no CRS text (a URL or a file name: gdal_policy.parse_crs)
        return cls(
            patch_id=value.get("patch_id"),  # type: ignore[arg-type]  # validated in __post_init__
            crs_wkt=crs_wkt,
            transform=tuple(transform) if transform is not None else None,  # type: ignore[arg-type]
            i=value.get("i"),
            j=value.get("j"),
        )


def compose(first: Affine, second: Affine) -> Affine:
    """``first`` then ``second`` in pixel space (``first @ second``; affine < 3 only knows ``*``)."""
    if hasattr(Affine, "__matmul__"):
        return first @ second
    return first * second


def crs_to_wkt(crs: str) -> str:
    """Any CRS spelling rasterio understands (``EPSG:32634``, WKT, PROJ) as WKT."""
    try:
        return parse_crs(crs).to_wkt()
    except (CRSError, CrsRefused) as error:
        raise OutputFormatError(f"CRS {crs[:80]!r} is not a CRS GDAL understands: {error}") from None


@dataclass(frozen=True, slots=True)
class BandScale:
    """How a model's normalised channels map back to Sentinel-2 L2A digital numbers: ``DN = x * std + mean``."""

    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.bands) == len(self.mean) == len(self.std) > 0):
            raise OutputFormatError(
                f"band scale needs bands, mean and std of one non-zero length, got "
                f"{len(self.bands)}/{len(self.mean)}/{len(self.std)}"
            )
        if len(set(self.bands)) != len(self.bands):
            raise OutputFormatError(f"band scale names a band twice: {list(self.bands)}")
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise OutputFormatError("band scale mean must be finite and std finite and positive")
        object.__setattr__(self, "bands", tuple(str(b) for b in self.bands))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def from_card(cls, card: Any) -> "BandScale":
        """From a ``ModelCard`` that standardises its input (the compressor's and decompressor's cards do)."""
        if card.normalisation != "standardise":
            raise OutputFormatError(f"model card normalisation is {card.normalisation!r}; a band scale needs 'standardise'")
        return cls(tuple(card.bands), tuple(card.band_mean), tuple(card.band_std))

    def to_json(self) -> dict[str, list[Any]]:
        return {"bands": list(self.bands), "band_mean": list(self.mean), "band_std": list(self.std)}

    @classmethod
    def from_json(cls, value: Any) -> "BandScale":
        try:
            bands, mean, std = value["bands"], value["band_mean"], value["band_std"]
        except (TypeError, KeyError) as error:
            raise OutputFormatError(f"band scale lacks {error}") from None
        if not (isinstance(bands, list) and isinstance(mean, list) and isinstance(std, list)):
            raise OutputFormatError("band scale bands, band_mean and band_std must be lists")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*mean, *std]):
            raise OutputFormatError("band scale band_mean and band_std must be numbers")
        return cls(tuple(bands), tuple(mean), tuple(std))


def check_patches(patches: Sequence[PatchMetadata], count: int, what: str) -> None:
    """One metadata entry per row of ``what``, with distinct patch ids."""
    if len(patches) != count:
        raise OutputFormatError(f"{what} has {count} patches but {len(patches)} patch metadata entries were given")
    if not all(isinstance(p, PatchMetadata) for p in patches):
        raise OutputFormatError("patches must be PatchMetadata entries")
    ids = [p.patch_id for p in patches]
    if len(set(ids)) != len(ids):
        duplicate = next(pid for pid in ids if ids.count(pid) > 1)
        raise OutputFormatError(f"patch id {duplicate!r} appears more than once")


def grid_positions(patches: Sequence[PatchMetadata]) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) per patch as production's JSON lists carry them.

    Tiles cut from a product have their row/column. A patch without a grid position (a BigEarthNet patch) gets
    i = its index in input order and j = 0, so that every entry has distinct integer coordinates as a reader of
    production's format expects. Mixing both kinds in one file is refused: the positions could collide.
    """
    has_position = [p.i is not None and p.j is not None for p in patches]
    if any(has_position) and not all(has_position):
        raise OutputFormatError("some patches have a grid position (i, j) and some do not; write them to separate files")
    if all(has_position) and patches:
        i = np.array([p.i for p in patches], dtype=np.int64)
        j = np.array([p.j for p in patches], dtype=np.int64)
    else:
        i = np.arange(len(patches), dtype=np.int64)
        j = np.zeros(len(patches), dtype=np.int64)
    return i, j
