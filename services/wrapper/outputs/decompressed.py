"""``decompress`` results: decoded patches back to Sentinel-2 digital numbers, as BigEarthNet patch folders in a tar.gz.

The decompressor returns normalised reflectance [N, 10, 120, 120]; ``DN = x * std + mean`` per band (the band
scale the compressed file carries), rounded to the nearest integer and clipped to uint16. Each patch becomes a
folder ``<patch>/<patch>_<BAND>.tif`` of single-band uint16 GeoTIFFs with the patch's CRS and transform where known,
packed into one tar.gz, so the result is again an input the Wrapper reads (BigEarthNet layout, contracts doc
section 6).

``band_grid="native"`` (default) writes each band at its Sentinel-2 resolution like BigEarthNet does: 10 m bands
at 120 x 120, 20 m bands at 60 x 60 (mean of each 2 x 2 block of the decoded 10 m values, before rounding) with
the transform's pixel size doubled. ``band_grid="10m"`` writes every band at 120 x 120 on the 10 m grid.

Production writes JPEG 2000 per band (contracts doc section 7); GeoTIFF is lossless for uint16 too and is what
BigEarthNet patches are.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from datetime import datetime
from typing import IO, Iterable, Literal, Sequence

import numpy as np
from affine import Affine

from services.wrapper.inputs.types import BAND_RESOLUTION_M
from services.wrapper.outputs.keys import sanitise_name
from services.wrapper.outputs.rasters import GeoRaster, geotiff_bytes, read_geotiff
from services.wrapper.outputs.types import (
    BandScale,
    OutputFile,
    OutputFormatError,
    PatchMetadata,
    check_patches,
    compose,
)

ARCHIVE_CONTENT_TYPE = "application/gzip"
ARCHIVE_SUFFIX = ".tar.gz"
PATCH_SIZE = 120
UINT16_MAX = np.iinfo(np.uint16).max
BandGrid = Literal["native", "10m"]


def to_digital_numbers(decoded: np.ndarray, band_scale: BandScale) -> np.ndarray:
    """Normalised [N, C, H, W] -> float64 digital numbers (not yet rounded): ``x * std + mean`` per band."""
    if not isinstance(decoded, np.ndarray) or decoded.dtype != np.float32:
        got = decoded.dtype if isinstance(decoded, np.ndarray) else type(decoded).__name__
        raise OutputFormatError(f"decoded patches must be float32, got {got}")
    channels = len(band_scale.bands)
    if decoded.ndim != 4 or decoded.shape[1:] != (channels, PATCH_SIZE, PATCH_SIZE) or decoded.shape[0] == 0:
        raise OutputFormatError(
            f"decoded patches must have shape [N >= 1, {channels}, {PATCH_SIZE}, {PATCH_SIZE}], got {list(decoded.shape)}"
        )
    if not np.isfinite(decoded).all():
        rows = np.flatnonzero(~np.isfinite(decoded).reshape(decoded.shape[0], -1).all(axis=1))
        raise OutputFormatError(f"decoded patches {rows[:5].tolist()} hold non-finite values")
    std = np.asarray(band_scale.std, dtype=np.float64).reshape(1, -1, 1, 1)
    mean = np.asarray(band_scale.mean, dtype=np.float64).reshape(1, -1, 1, 1)
    return decoded.astype(np.float64) * std + mean


def quantise_uint16(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer (half to even) and clip to [0, 65535]."""
    return np.clip(np.rint(values), 0, UINT16_MAX).astype(np.uint16)


def _band_factor(band: str, band_grid: BandGrid) -> int:
    if band_grid == "10m":
        return 1
    resolution = BAND_RESOLUTION_M.get(band)
    if resolution is None:
        raise OutputFormatError(f"band {band!r} is not a Sentinel-2 band; write it with band_grid='10m'")
    return resolution // 10


def _block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return values
    height, width = values.shape
    return values.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))


def patch_folder_name(patch_id: str) -> str:
    """The folder a patch gets in the archive: the last segment of its id, made key-safe."""
    return sanitise_name(patch_id.rstrip("/").rsplit("/", 1)[-1])


def _add_member(archive: tarfile.TarFile, name: str, data: bytes | None, mtime: int) -> None:
    member = tarfile.TarInfo(name)
    member.mtime = mtime
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    if data is None:
        member.type = tarfile.DIRTYPE
        member.mode = 0o755
        archive.addfile(member)
        return
    member.mode = 0o644
    member.size = len(data)
    archive.addfile(member, io.BytesIO(data))


def write_decompressed_archive(
    decoded: np.ndarray,
    band_scale: BandScale,
    patches: Sequence[PatchMetadata],
    created: datetime,
    band_grid: BandGrid = "native",
) -> OutputFile:
    """The N decoded patches of one input as a tar.gz of BigEarthNet patch folders.

    ``created`` stamps every tar member and the gzip header, so equal input gives byte-identical archives.
    """
    check_patches(patches, decoded.shape[0], "decoded patches")
    buffer = io.BytesIO()
    stream_decompressed_archive(buffer, [decoded], band_scale, patches, created, band_grid)
    return OutputFile(data=buffer.getvalue(), content_type=ARCHIVE_CONTENT_TYPE, suffix=ARCHIVE_SUFFIX)


def stream_decompressed_archive(
    out: IO[bytes],
    chunks: Iterable[np.ndarray],
    band_scale: BandScale,
    patches: Sequence[PatchMetadata],
    created: datetime,
    band_grid: BandGrid = "native",
) -> None:
    """``write_decompressed_archive`` into a file from chunks of decoded patches (``patches`` in all): only one
    chunk is in memory. The same bytes as the in-memory form."""
    if band_grid not in ("native", "10m"):
        raise OutputFormatError(f"band_grid must be 'native' or '10m', got {band_grid!r}")
    if not isinstance(created, datetime) or created.tzinfo is None:
        raise OutputFormatError(f"created must be a timezone-aware datetime, got {created!r}")
    mtime = max(0, int(created.timestamp()))
    folders = [patch_folder_name(p.patch_id) for p in patches]
    if len(set(folders)) != len(folders):
        seen: set[str] = set()
        duplicate = next(name for name in folders if name in seen or seen.add(name))  # type: ignore[func-returns-value]
        raise OutputFormatError(f"two patches would share the folder {duplicate!r}; write them to separate archives")
    factors = [_band_factor(band, band_grid) for band in band_scale.bands]
    written = 0
    # filename="" and a fixed mtime keep the gzip header free of anything but the data.
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=mtime, compresslevel=6) as compressed:
        with tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for chunk in chunks:
                digital_numbers = to_digital_numbers(chunk, band_scale)
                if written + len(digital_numbers) > len(patches):
                    raise OutputFormatError(f"decoded patches: more than the {len(patches)} patches described")
                for index, bands in enumerate(digital_numbers, start=written):
                    patch, folder = patches[index], folders[index]
                    _add_member(archive, f"{folder}/", None, mtime)
                    for band, factor, values in zip(band_scale.bands, factors, bands):
                        transform = compose(patch.affine, Affine.scale(factor)) if patch.affine is not None else None
                        raster = geotiff_bytes(quantise_uint16(_block_mean(values, factor)), patch.crs_wkt, transform)
                        _add_member(archive, f"{folder}/{folder}_{band}.tif", raster, mtime)
                written += len(digital_numbers)
    if written != len(patches):
        raise OutputFormatError(f"decoded patches: {written} for {len(patches)} patches")


def read_decompressed_archive(data: bytes) -> dict[str, dict[str, GeoRaster]]:
    """``{folder: {band: GeoRaster}}`` of an archive written by ``write_decompressed_archive``."""
    patches: dict[str, dict[str, GeoRaster]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:gz") as archive:
            for member in archive:
                if member.isdir():
                    continue
                folder, _, file_name = member.name.partition("/")
                if not member.isreg() or not file_name.startswith(f"{folder}_") or not file_name.endswith(".tif"):
                    raise OutputFormatError(f"archive member {member.name!r} is not <patch>/<patch>_<BAND>.tif")
                band = file_name[len(folder) + 1 : -len(".tif")]
                extracted = archive.extractfile(member)
                assert extracted is not None  # regular file
                patches.setdefault(folder, {})[band] = read_geotiff(extracted.read())
    except (tarfile.TarError, OSError, EOFError) as error:
        raise OutputFormatError(f"not a readable tar.gz: {error}") from None
    return patches


__all__ = [
    "ARCHIVE_SUFFIX",
    "patch_folder_name",
    "quantise_uint16",
    "read_decompressed_archive",
    "to_digital_numbers",
    "write_decompressed_archive",
]
