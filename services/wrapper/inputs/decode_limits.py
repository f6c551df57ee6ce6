"""Size limits checked BEFORE a compressed input is decoded: a small file must not make the Wrapper allocate gigabytes.

- ``.npz`` (zip of ``.npy``): number of members, the declared uncompressed size of each (zipfile never inflates past
  it), and each array's header (shape x itemsize) against that size and the total limit. ``numpy.load`` allocates
  an array as large as its header says before it reads a byte of data, so the header is what needs bounding.
- ``.npy``: the header alone.
- rasters (GeoTIFF, JP2 through GDAL): width x height x bands x bytes per sample from the dataset's metadata,
  before ``read()``.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np

MIB = 1024 * 1024
# Features of 2048 float32 per patch: 512 MiB is ~65,000 patches per file.
MAX_NPZ_DECOMPRESSED_BYTES = 512 * MIB
MAX_NPZ_MEMBERS = 64
# One decoded band of a patch file (BigEarthNet: 120 x 120 at most); generous for larger crops.
MAX_BAND_FILE_PIXELS = 4096 * 4096
# One band of a Sentinel-2 granule read in strips (10980 x 10980 at 10 m).
MAX_SAFE_BAND_PIXELS = 12000 * 12000
# A UC6 input stack (8 bands) decoded at once.
MAX_RASTER_DECODED_BYTES = 2048 * MIB


class DecodeLimitExceeded(ValueError):
    """An input that would decode to more than a limit allows; the message says which limit."""


def _npy_header(handle: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    return shape, dtype


def npy_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * max(int(dtype.itemsize), 1)


def check_npy(data: bytes, max_bytes: int = MAX_NPZ_DECOMPRESSED_BYTES) -> None:
    try:
        shape, dtype = _npy_header(io.BytesIO(data))
    except (ValueError, OSError, EOFError) as error:
        raise DecodeLimitExceeded(f"not a readable .npy header ({error})") from None
    if npy_nbytes(shape, dtype) > max_bytes:
        raise DecodeLimitExceeded(f".npy array {list(shape)} {dtype} exceeds {max_bytes // MIB} MiB decoded")


def check_npz(data: bytes, max_bytes: int = MAX_NPZ_DECOMPRESSED_BYTES, max_members: int = MAX_NPZ_MEMBERS) -> None:
    """Raise ``DecodeLimitExceeded`` unless every array of the ``.npz`` fits the limits (headers only: cheap)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > max_members:
                raise DecodeLimitExceeded(f".npz has {len(members)} members, more than {max_members}")
            declared = sum(member.file_size for member in members)
            if declared > max_bytes:
                raise DecodeLimitExceeded(f".npz declares {declared // MIB} MiB decompressed, more than "
                                          f"{max_bytes // MIB} MiB")
            total = 0
            for member in members:
                with archive.open(member) as handle:
                    shape, dtype = _npy_header(handle)
                nbytes = npy_nbytes(shape, dtype)
                if dtype.hasobject:
                    raise DecodeLimitExceeded(f".npz member {member.filename!r} holds Python objects")
                if nbytes > member.file_size:
                    raise DecodeLimitExceeded(f".npz member {member.filename!r} declares an array larger than "
                                              "its data")
                total += nbytes
            if total > max_bytes:
                raise DecodeLimitExceeded(f".npz arrays total {total // MIB} MiB, more than {max_bytes // MIB} MiB")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        if isinstance(error, DecodeLimitExceeded):
            raise
        raise DecodeLimitExceeded(f".npz cannot be read ({type(error).__name__}: {error})") from None


def check_raster(dataset: Any, max_pixels: int | None = None, max_bytes: int = MAX_RASTER_DECODED_BYTES) -> None:
    """A rasterio dataset's decoded size from its metadata, before any ``read()``."""
    pixels = int(dataset.width) * int(dataset.height)
    if max_pixels is not None and pixels > max_pixels:
        raise DecodeLimitExceeded(f"raster is {dataset.height}x{dataset.width}, more than {max_pixels} pixels")
    itemsize = max((np.dtype(dtype).itemsize for dtype in dataset.dtypes), default=1)
    decoded = pixels * int(dataset.count) * itemsize
    if decoded > max_bytes:
        raise DecodeLimitExceeded(f"raster decodes to {decoded // MIB} MiB, more than {max_bytes // MIB} MiB")
