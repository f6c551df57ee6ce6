"""How the Wrapper lets GDAL open files: only as the format their name claims, never anything they point to.

Band files, SAFE bands and UC6 stacks are uploaded by whoever runs a workflow. GDAL, left to itself, opens a file
with whichever of its ~150 drivers recognises the bytes, and several of those drivers read *other* files or URLs
named inside the file: a ``.tif`` holding VRT XML with a ``VRTRawRasterBand`` reads any local file as pixels, a VRT
source or a WMS description under ``/vsicurl/`` or ``http://`` makes the Wrapper send requests around the S3
endpoint policy, an ISIS3 or PDS label reads ``../../..``-relative files next to a downloaded SAFE band.

Two layers close that, both here so that every open goes through one place:

1. Every open names its one driver (``GTIFF``: GTiff, ``JPEG2000``: JP2OpenJPEG) after a check of the file's
   magic bytes, which turns a file of another format into a clear reason for people (``NotTheClaimedFormat``).
   GDAL then never asks any other driver, whatever the bytes say.
2. ``GDAL_CONFIG``, set once, process-wide, by ``ensure_gdal_policy`` when this module is imported (the input and
   output modules import it, so it is in force before GDAL registers its drivers): the meta-format and network
   drivers are not registered at all (``GDAL_SKIP``), every curl-based virtual file system (``/vsicurl/``,
   ``/vsis3/``, ``/vsigs/``, ``/vsiaz/``, ...) refuses every name (``CPL_VSIL_CURL_ALLOWED_FILENAME`` set to a name
   no path can have), sidecar files (``.ovr``, ``.aux.xml``, ``.msk``, world files, ``.IMD``/``.RPB``) are neither
   listed nor read, PROJ downloads no grids. This layer holds even for an open that forgot its driver.

The README's Security section lists each vector with the setting that closes it and the test that shows it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping

import rasterio
from rasterio.env import set_gdal_config
from rasterio.io import DatasetReader, MemoryFile

if TYPE_CHECKING:
    from rasterio.crs import CRS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RasterFormat:
    """A format the Wrapper accepts: the one GDAL driver that may open it and how to recognise it."""

    name: str  # for people: "GeoTIFF", "JPEG 2000"
    driver: str
    magics: tuple[bytes, ...]

    def check_magic(self, head: bytes) -> None:
        """Raise ``NotTheClaimedFormat`` unless ``head`` (the file's first bytes) starts like this format."""
        if not head.startswith(self.magics):
            found = _describe_head(head)
            raise NotTheClaimedFormat(
                f"is not a {self.name} file ({found}); only {self.name} is opened here (GDAL driver {self.driver})",
                found=found,
            )


GTIFF = RasterFormat(
    name="GeoTIFF",
    driver="GTiff",
    magics=(b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),  # classic TIFF and BigTIFF, both byte orders
)
JPEG2000 = RasterFormat(
    name="JPEG 2000",
    driver="JP2OpenJPEG",  # the only JPEG 2000 driver in the rasterio wheels
    # The JP2 signature box, or a bare J2K codestream (SOC + SIZ markers).
    magics=(b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"),
)
MAGIC_BYTES = 16  # enough for every magic above

# A name no path can have: every curl-based file system checks it before any request and refuses anything else.
_NO_NETWORK_FILENAME = "/vsicurl/eoml-gdal-policy:network-file-systems-are-disabled"

# Drivers that open other datasets, files or URLs named inside the file they are given (GDAL's security page lists
# the first group), or fetch over HTTP. Not registered at all: a second layer behind the per-open driver lists.
SKIPPED_DRIVERS: tuple[str, ...] = (
    # meta-formats that open other datasets
    "VRT", "GTI", "KMLSUPEROVERLAY", "MBTiles", "Rasterlite", "PCIDSK", "PDF", "RPFTOC", "ECRGTOC", "RS2", "RCM",
    "SAFE", "SENTINEL2", "STACIT", "STACTA", "ESRIC", "OGCAPI", "PLMOSAIC", "WMTS",
    # network services (CPLHTTPFetch, which the curl file-system setting does not cover)
    "WMS", "WCS", "HTTP", "DAAS", "EEDA", "EEDAI", "NGW",
    # labels/headers that name their data file by path (``^IMAGE = "../../x"``, ``DataFile = ...``)
    "ISIS3", "ISIS2", "PDS", "PDS4", "VICAR", "ERS", "ENVI", "EHdr", "GenBin", "ISCE", "MFF", "LAN", "CPG",
)

GDAL_CONFIG: Mapping[str, str] = {
    "GDAL_SKIP": " ".join(SKIPPED_DRIVERS),
    "CPL_VSIL_CURL_ALLOWED_FILENAME": _NO_NETWORK_FILENAME,
    # No directory listing on open, so no sidecar is found: external overviews (.ovr), masks (.msk), PAM (.aux.xml),
    # world files (.tfw/.wld/.j2w), .tab, .IMD/.RPB/_rpc.txt metadata. Also saves a listing per open.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_PAM_ENABLED": "NO",  # no .aux.xml read (or written next to a downloaded SAFE band)
    # Behind GDAL_SKIP=VRT, in case VRT is registered anyway (drivers registered before the policy was set).
    "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
    "GDAL_VRT_ENABLE_PYTHON": "NO",
    "PROJ_NETWORK": "OFF",  # CRS operations (UC5/UC6 reprojection) never download grids
}

_lock = threading.Lock()
_applied = False


class NotTheClaimedFormat(ValueError):
    """A file whose bytes are not the format its name (and the Wrapper) expects; the message says what it is."""

    def __init__(self, message: str, found: str) -> None:
        super().__init__(message)
        self.found = found  # what the file starts with, for people: "it starts with '<VRTDataset rast'"


class CrsRefused(ValueError):
    """A CRS text that is no EPSG code, WKT or plain PROJ string (e.g. a URL or a file name)."""


_EPSG_CODE = re.compile(r"(?i)EPSG:(\d{1,6})")
# WKT1 and WKT2 root keywords (OGC 01-009, ISO 19162): the CRS is spelled out, nothing is fetched.
_WKT_ROOT = re.compile(r"(?i)(PROJCS|GEOGCS|GEOCCS|COMPD_CS|LOCAL_CS|VERT_CS|FITTED_CS|PROJCRS|PROJECTEDCRS|GEOGCRS|"
                       r"GEOGRAPHICCRS|GEODCRS|GEODETICCRS|BASEGEOGCRS|COMPOUNDCRS|BOUNDCRS|ENGCRS|ENGINEERINGCRS|"
                       r"VERTCRS|VERTICALCRS|DERIVEDPROJCRS|TIMECRS|PARAMETRICCRS)\s*[\[(]")
# A PROJ string's parameters whose values name files or other definitions (init files, grids): refused.
_PROJ_PARAMETER = re.compile(r"\+([A-Za-z_][A-Za-z0-9_]*)(?:=([^\s+]*))?")
_PROJ_FILE_PARAMETERS = frozenset({"init", "nadgrids", "geoidgrids", "hgridshift", "vgridshift", "grids", "file",
                                   "catalog", "xy_grids", "z_grids"})
_PROJ_VALUE = re.compile(r"[A-Za-z0-9_.,\-]*")


def parse_crs(text: str) -> "CRS":
    """The CRS of an ``EPSG:<code>``, a WKT text or a plain PROJ string, and nothing else.

    rasterio's ``CRS.from_user_input`` hands any string to GDAL's ``OSRSetFromUserInput``, which fetches URLs with
    GDAL's own HTTP client (not a VSI file system: ``CPL_VSIL_CURL_ALLOWED_FILENAME`` does not stop it) and reads
    files named by the string. CRS texts reach the Wrapper from inputs (a ``.compressed`` header's ``crs_wkt``),
    so they are parsed only in forms that cannot name another resource. ``CrsRefused`` otherwise."""
    from rasterio.crs import CRS

    stripped = text.strip()
    if _EPSG_CODE.fullmatch(stripped):
        return CRS.from_epsg(int(stripped.split(":", 1)[1]))
    if _WKT_ROOT.match(stripped):
        return CRS.from_wkt(stripped)
    if stripped.startswith("+"):
        parameters = _PROJ_PARAMETER.findall(stripped)
        rebuilt = " ".join(f"+{k}={v}" if v else f"+{k}" for k, v in parameters)
        if (parameters and rebuilt.split() == stripped.split()
                and not any(k.lower() in _PROJ_FILE_PARAMETERS or not _PROJ_VALUE.fullmatch(v) for k, v in parameters)):
            return CRS.from_proj4(stripped)
    raise CrsRefused(f"CRS {stripped[:80]!r} is not an EPSG code, WKT or a plain PROJ string")


def ensure_gdal_policy() -> None:
    """Set ``GDAL_CONFIG`` process-wide (idempotent, cheap after the first call).

    ``GDAL_SKIP`` takes effect only if GDAL has not registered its drivers yet (rasterio does on its first open);
    if it has, the skipped drivers stay and a warning says so: the per-open driver lists still hold.
    """
    global _applied
    if _applied:
        return
    with _lock:
        if _applied:
            return
        for key, value in GDAL_CONFIG.items():
            # The environment too: GDAL falls back to it for every thread (rasterio may set an option thread-locally
            # when called off the main thread), and GDAL_SKIP is read from it when the drivers are registered.
            os.environ[key] = value
            set_gdal_config(key, value)
        still_registered = registered_skipped_drivers()
        if still_registered:
            log.warning(
                "GDAL drivers were registered before the GDAL policy was set; these stay available to opens "
                "without a driver list",
                extra={"drivers": still_registered},
            )
        _applied = True


def registered_skipped_drivers() -> list[str]:
    """Which of ``SKIPPED_DRIVERS`` GDAL has registered (empty once the policy is in force from the start)."""
    with rasterio.Env() as env:
        drivers = env.drivers()
    return sorted(name for name in SKIPPED_DRIVERS if name in drivers)


@contextmanager
def open_raster_bytes(data: bytes, fmt: RasterFormat) -> Iterator[DatasetReader]:
    """Open bytes held in memory as ``fmt`` and nothing else.

    Raises ``NotTheClaimedFormat`` for bytes of another format, ``RasterioError`` for a damaged file of this one.
    """
    ensure_gdal_policy()
    fmt.check_magic(bytes(data[:MAGIC_BYTES]))
    with MemoryFile(data) as memory_file:
        with memory_file.open(driver=fmt.driver) as dataset:
            yield dataset


def open_raster_file(path: str, fmt: RasterFormat) -> DatasetReader:
    """Open a local file as ``fmt`` and nothing else (the caller closes it); errors as ``open_raster_bytes``."""
    ensure_gdal_policy()
    with open(path, "rb") as handle:
        fmt.check_magic(handle.read(MAGIC_BYTES))
    return rasterio.open(path, driver=fmt.driver)


def _describe_head(head: bytes) -> str:
    # Printable ASCII is shown as text (XML and labels say what they are), anything else as hex.
    shown = head[:MAGIC_BYTES]
    if not shown:
        return "it is empty"
    if all(32 <= byte < 127 or byte in (9, 10, 13) for byte in shown):
        return f"it starts with {shown.decode('ascii').splitlines()[0]!r}"
    return f"it starts with bytes {shown[:8].hex(' ')}"


# In force from the first import on, before anything in the Wrapper has made GDAL register its drivers.
ensure_gdal_policy()


__all__ = [
    "CrsRefused",
    "GDAL_CONFIG",
    "GTIFF",
    "JPEG2000",
    "NotTheClaimedFormat",
    "RasterFormat",
    "SKIPPED_DRIVERS",
    "ensure_gdal_policy",
    "open_raster_bytes",
    "open_raster_file",
    "parse_crs",
    "registered_skipped_drivers",
]
