"""Inputs open only as what they claim to be (issue 18, item 1): the Wrapper's raster decoders against GDAL
meta-formats and file-referencing formats, GDAL's network file systems and sidecars, and fuzzed TIFF/JP2 headers.

Every decoder an uploaded file reaches is attacked directly: band files of patch folders and tar.gz archives
(``decode_band_file`` / ``assemble_patch``), SAFE bands on the scratch disk (``tile_safe_bands``), UC6 stacks
(``read_era5_stack``) and GeoTIFFs read back (``read_geotiff``). What must hold: no pixel of a local canary file ever
comes out, a loopback listener never gets a request, and the file is refused with a reason that says what it is.
The same attacks through the real ``eo-wrapper`` are in ``test_hostile_inputs_wrapper.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from hostile_rasters import HOSTILE, NETWORK, SIDE, Canary, canary_leaked, write
from security_support import PROJECT_ROOT
from services.wrapper.inputs.band_files import BandDecodeError, assemble_patch, decode_band_file
from services.wrapper.inputs.safe_products import tile_safe_bands
from services.wrapper.inputs.settings import InputLimits
from services.wrapper.inputs.types import InputPatch, PatchRejection
from services.wrapper.outputs.rasters import read_geotiff
from services.wrapper.outputs.types import OutputFormatError
from services.wrapper.preprocess import PatchInvalid, read_era5_stack

SAMPLE_PATCHES = PROJECT_ROOT / "data" / "bigearthnet-sample" / "patches"
SAFE_10M = ("B02", "B03", "B04", "B08")
SAFE_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
SAFE_CRS = "EPSG:32633"


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Canary]:
    made = Canary.make(tmp_path_factory.mktemp("canary"))
    yield made
    made.close()


@pytest.fixture(autouse=True)
def fresh_listener(canary: Canary) -> None:
    canary.listener.requests.clear()


def sample_patch() -> tuple[str, dict[str, bytes]]:
    folder = sorted(path for path in SAMPLE_PATCHES.iterdir() if path.is_dir())[0]
    bands = {path.stem.rsplit("_", 1)[1]: path.read_bytes() for path in folder.glob("*.tif")}
    return folder.name, bands


# -- every decoder refuses every file-referencing format -----------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_band_file_that_is_not_a_geotiff_is_refused_unopened(canary: Canary, kind: str) -> None:
    payload = HOSTILE[kind](canary)
    with pytest.raises(BandDecodeError) as refused:
        decoded = decode_band_file(payload)
        assert not canary_leaked(decoded.array), "a local file came out as band pixels"
    assert "is not a GeoTIFF file" in str(refused.value)
    assert canary.listener.requests == []


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_patch_with_a_disguised_band_is_rejected_with_its_reason_and_the_rest_decodes(canary: Canary,
                                                                                       kind: str) -> None:
    name, bands = sample_patch()
    good = assemble_patch(name, "in/x.tar.gz", bands)
    assert isinstance(good, InputPatch)
    hostile = assemble_patch(name, "in/x.tar.gz", {**bands, "B03": HOSTILE[kind](canary)})
    assert isinstance(hostile, PatchRejection), "a disguised band file was decoded"
    assert hostile.reason.startswith("band B03 is not a GeoTIFF file (it starts with ")
    assert "only GeoTIFF is opened here (GDAL driver GTiff)" in hostile.reason
    assert canary.listener.requests == []


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_uc6_stack_and_result_reader_open_geotiff_only(canary: Canary, kind: str) -> None:
    payload = HOSTILE[kind](canary)
    with pytest.raises(PatchInvalid, match=r"is not a readable GeoTIFF \(it starts with .*only GDAL's GTiff"):
        read_era5_stack(payload, "stack.tif")
    with pytest.raises(OutputFormatError, match="is not a GeoTIFF file"):
        read_geotiff(payload)
    assert canary.listener.requests == []


def _write_jp2(path: Path, array: np.ndarray, pixel_size: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=array.shape[1], height=array.shape[0], count=1,
                       dtype="uint16", crs=SAFE_CRS, transform=from_origin(500000, 5000000, pixel_size, pixel_size),
                       QUALITY=100, REVERSIBLE="YES", YCBCR420="NO") as dataset:
        dataset.write(array, 1)


@pytest.fixture(scope="module")
def safe_bands(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2 x 2 tile Sentinel-2 granule as JPEG 2000 band files (what ``read_safe_granule`` downloads)."""
    root = tmp_path_factory.mktemp("safe-bands")
    rng = np.random.default_rng(18)
    paths = {}
    for band in SAFE_10M + SAFE_20M:
        side = 2 * SIDE if band in SAFE_10M else SIDE
        paths[band] = root / f"{band}.jp2"
        _write_jp2(paths[band], rng.integers(1, 10_000, (side, side), dtype=np.uint16), 10.0 if side > SIDE else 20.0)
    return paths


def _scratch_with(safe_bands: dict[str, Path], root: Path, band: str, data: bytes) -> dict[str, str]:
    """The scratch folder as ``read_safe_granule`` lays it out, ``band`` replaced by ``data``."""
    paths = {}
    for name, source in safe_bands.items():
        target = root / f"{name}.jp2"
        if name == band:
            write(target, data)
        else:
            shutil.copyfile(source, target)
        paths[name] = str(target)
    return paths


def test_real_safe_bands_still_tile(safe_bands: dict[str, Path]) -> None:
    items = list(tile_safe_bands({band: str(path) for band, path in safe_bands.items()}, "T33", "p.SAFE",
                                 InputLimits()))
    assert [type(item) for item in items] == [InputPatch] * 4
    assert items[0].crs == SAFE_CRS


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_safe_band_that_is_not_jpeg2000_rejects_the_product_unopened(canary: Canary, safe_bands: dict[str, Path],
                                                                      tmp_path: Path, kind: str) -> None:
    paths = _scratch_with(safe_bands, tmp_path, "B04", HOSTILE[kind](canary))
    items = list(tile_safe_bands(paths, "T33", "p.SAFE", InputLimits()))
    assert len(items) == 1 and isinstance(items[0], PatchRejection), items
    assert items[0].reason.startswith("band B04 is not a JPEG 2000 file (it starts with "), items[0].reason
    assert canary.listener.requests == []


# -- GDAL's own settings, the second layer -------------------------------------------------------------------------


NETWORK_FILE_SYSTEMS = ("/vsicurl/{url}/a.tif", "/vsicurl_streaming/{url}/b.tif", "/vsicurl?url={url}/c.tif",
                        "/vsis3/bucket/d.tif", "/vsis3_streaming/bucket/e.tif", "/vsigs/bucket/f.tif",
                        "/vsiaz/container/g.tif", "/vsiadls/container/h.tif", "/vsiwebhdfs/{url}/k.tif")


@pytest.mark.parametrize("template", NETWORK_FILE_SYSTEMS)
def test_gdal_network_file_systems_send_nothing(canary: Canary, template: str) -> None:
    # Every cloud file system pointed at the listener, as a file naming /vsis3/ etc. would use them.
    host = canary.url.removeprefix("http://")
    endpoints = {"AWS_S3_ENDPOINT": host, "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
                 "AWS_NO_SIGN_REQUEST": "YES", "CPL_GS_ENDPOINT": f"{canary.url}/", "GS_NO_SIGN_REQUEST": "YES",
                 "AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=http;AccountName=a;AccountKey=YQ==;"
                                                    f"BlobEndpoint={canary.url}/a;",
                 "AZURE_NO_SIGN_REQUEST": "YES"}
    with rasterio.Env(**endpoints):
        with pytest.raises(rasterio.errors.RasterioIOError):
            with rasterio.open(template.format(url=canary.url)):
                pass
    assert canary.listener.requests == []


def test_the_wrapper_process_registers_no_meta_format_or_network_driver() -> None:
    # A fresh interpreter as eo-wrapper starts: importing the Wrapper's input layer puts the policy in force before
    # GDAL registers its drivers.
    script = ("import services.wrapper.inputs, rasterio\n"
              "with rasterio.Env() as env:\n"
              "    print(' '.join(sorted(env.drivers())))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert run.returncode == 0, run.stderr
    registered = set(run.stdout.split())
    assert {"GTiff", "JP2OpenJPEG", "MEM"} <= registered
    assert not registered & {"VRT", "GTI", "WMS", "WMTS", "WCS", "HTTP", "ISIS3", "PDS", "PDS4", "ERS",
                             "KMLSUPEROVERLAY", "MBTiles", "SENTINEL2", "SAFE", "STACIT", "OGCAPI"}


def test_sidecar_files_next_to_a_band_are_not_read(tmp_path: Path) -> None:
    # A band on disk with a world file and a PAM .aux.xml beside it: neither sets georeferencing (GDAL alone reads
    # the world file). The SAFE scratch folder holds only the bands it downloads; this is the layer behind that.
    band = tmp_path / "B02.jp2"
    with rasterio.open(band, "w", driver="JP2OpenJPEG", width=SIDE, height=SIDE, count=1, dtype="uint16",
                       GMLJP2="NO", GeoJP2="NO", QUALITY=100, REVERSIBLE="YES") as dataset:
        dataset.write(np.ones((SIDE, SIDE), np.uint16), 1)
    (tmp_path / "B02.j2w").write_text("10\n0\n0\n-10\n500005\n5000000\n")
    (tmp_path / "B02.jp2.aux.xml").write_text(
        "<PAMDataset><SRS>EPSG:4326</SRS><GeoTransform>1, 1, 0, 1, 0, -1</GeoTransform></PAMDataset>")
    from services.wrapper.gdal_policy import JPEG2000, open_raster_file  # here: the other tests run on any version

    with open_raster_file(str(band), JPEG2000) as dataset:
        assert dataset.crs is None
        assert dataset.transform.is_identity


# -- fuzzing: meta-formats in many spellings, malformed TIFF and JPEG 2000 headers ---------------------------------


FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
xml_prologues = st.sampled_from([b"", b"<?xml version='1.0'?>", b"\xef\xbb\xbf", b"  \n", b"<!-- x -->", b"II*\x00"])
trailers = st.binary(max_size=64)


@FUZZ
@given(kind=st.sampled_from(sorted(HOSTILE)), prologue=xml_prologues, trailer=trailers)
def test_fuzz_band_decoder_with_meta_formats(canary: Canary, kind: str, prologue: bytes, trailer: bytes) -> None:
    payload = prologue + HOSTILE[kind](canary) + trailer
    try:
        decoded = decode_band_file(payload)
    except BandDecodeError:
        pass
    else:
        assert not canary_leaked(decoded.array)
    try:
        read_era5_stack(payload, "stack.tif")
    except PatchInvalid:
        pass
    assert canary.listener.requests == []


def _mutations() -> st.SearchStrategy[list[tuple[int, int]]]:
    return st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), min_size=1, max_size=12)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    mutable = bytearray(data)
    for offset, value in edits:
        if offset < len(mutable):
            mutable[offset] = value
    return bytes(mutable if cut is None else mutable[:cut])


@FUZZ
@given(edits=_mutations(), cut=st.one_of(st.none(), st.integers(0, 4096)),
       magic=st.sampled_from([b"", b"II*\x00", b"MM\x00*", b"II+\x00"]))
def test_fuzz_band_decoder_with_malformed_tiff_headers(canary: Canary, edits: list[tuple[int, int]],
                                                       cut: int | None, magic: bytes) -> None:
    _, bands = sample_patch()
    data = _mutate(bands["B02"], edits, cut)
    data = magic + data[len(magic):]
    try:
        decoded = decode_band_file(data)
    except BandDecodeError as error:
        assert str(error)
    else:
        assert decoded.array.dtype == np.uint16 and not canary_leaked(decoded.array)
    assert canary.listener.requests == []


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=12),
       cut=st.one_of(st.none(), st.integers(0, 8192)))
def test_fuzz_safe_reader_with_malformed_jp2_headers(canary: Canary, safe_bands: dict[str, Path],
                                                     tmp_path_factory: pytest.TempPathFactory,
                                                     edits: list[tuple[int, int]], cut: int | None) -> None:
    scratch = tmp_path_factory.mktemp("jp2-fuzz")
    paths = _scratch_with(safe_bands, scratch, "B8A", _mutate(safe_bands["B8A"].read_bytes(), edits, cut))
    try:
        items = list(tile_safe_bands(paths, "T33", "p.SAFE", InputLimits()))
    except Exception as error:  # a read failure after tiles were yielded is an InputError, nothing else
        from services.wrapper.inputs.types import InputError

        assert isinstance(error, InputError), repr(error)
        items = []
    for item in items:
        if isinstance(item, InputPatch):
            assert not any(canary_leaked(array) for array in item.bands.values())
        elif "B8A" in item.reason or "JPEG 2000" in item.reason:
            pass  # the reason names the damaged band (or says it is not JPEG 2000)
        else:  # a band grid that no longer lines up names B8A too; anything else is an unexplained rejection
            raise AssertionError(item.reason)
    assert canary.listener.requests == []
    shutil.rmtree(scratch, ignore_errors=True)
