"""Hostile "rasters" for the Wrapper's decoders: files that GDAL, left to pick its driver, opens as a meta-format
that reads another local file or a URL. Each was checked against GDAL 3.10 (rasterio 1.4 wheels) without the
Wrapper's ``gdal_policy``: the local ones come out as pixels, the network ones make GDAL send requests.

``Canary`` is what must never leak: a raw file and a GeoTIFF on the test host whose pixels carry a marker value,
and a loopback listener (``security_support.RecordingServer``) that counts every request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import rasterio

from security_support import RecordingServer

SIDE = 120  # a 10 m BigEarthNet band
CANARY_VALUE = 0xC0DE  # every canary pixel (uint16); never a value of a real band (L2A DNs stay below 20000)
# Enough ``../`` to climb from any scratch directory to ``/``: labels name their data file relative to themselves.
CLIMB = "../" * 24


@dataclass(frozen=True)
class Canary:
    raw: Path  # SIDE x SIDE uint16 little-endian, every pixel CANARY_VALUE
    geotiff: Path  # the same pixels as a GeoTIFF (a source any VRT can name)
    listener: RecordingServer

    @classmethod
    def make(cls, root: Path) -> "Canary":
        root.mkdir(parents=True, exist_ok=True)
        pixels = np.full((SIDE, SIDE), CANARY_VALUE, dtype="<u2")
        raw = root / "canary.raw"
        raw.write_bytes(pixels.tobytes())
        geotiff = root / "canary.tif"
        with rasterio.open(geotiff, "w", driver="GTiff", width=SIDE, height=SIDE, count=1, dtype="uint16") as out:
            out.write(pixels, 1)
        return cls(raw=raw, geotiff=geotiff, listener=RecordingServer(status=404))

    @property
    def url(self) -> str:
        return self.listener.url

    def close(self) -> None:
        self.listener.close()


def _vrt_band(inner: str) -> str:
    return (f'<VRTDataset rasterXSize="{SIDE}" rasterYSize="{SIDE}">'
            f'<VRTRasterBand dataType="UInt16" band="1"{inner}</VRTRasterBand></VRTDataset>')


def vrt_raw_band(canary: Canary) -> bytes:
    """VRTRawRasterBand: any local file, read as raw pixels."""
    return _vrt_band(
        f' subClass="VRTRawRasterBand"><SourceFilename relativeToVRT="0">{canary.raw}</SourceFilename>'
        f'<ImageOffset>0</ImageOffset><PixelOffset>2</PixelOffset><LineOffset>{2 * SIDE}</LineOffset>'
        '<ByteOrder>LSB</ByteOrder>').encode()


def vrt_local_raster(canary: Canary) -> bytes:
    """A VRT SimpleSource naming a local GeoTIFF."""
    return _vrt_band(f'><SimpleSource><SourceFilename relativeToVRT="0">{canary.geotiff}</SourceFilename>'
                     '<SourceBand>1</SourceBand></SimpleSource>').encode()


def vrt_vsicurl(canary: Canary) -> bytes:
    """A VRT source on ``/vsicurl/``: HEAD + GET to the listener."""
    return _vrt_band(f'><SimpleSource><SourceFilename relativeToVRT="0">/vsicurl/{canary.url}/vrt-source.tif'
                     '</SourceFilename><SourceBand>1</SourceBand></SimpleSource>').encode()


def wms_tms(canary: Canary) -> bytes:
    """A GDAL WMS service description (TMS): tile GETs to the listener on read (CPLHTTPFetch, not /vsicurl/)."""
    return (f'<GDAL_WMS><Service name="TMS"><ServerUrl>{canary.url}/wms/${{z}}/${{x}}/${{y}}.png</ServerUrl>'
            '</Service><DataWindow><UpperLeftX>0</UpperLeftX><UpperLeftY>1200</UpperLeftY>'
            '<LowerRightX>1200</LowerRightX><LowerRightY>0</LowerRightY><TileLevel>0</TileLevel>'
            '<TileCountX>1</TileCountX><TileCountY>1</TileCountY></DataWindow>'
            f'<BlockSizeX>{SIDE}</BlockSizeX><BlockSizeY>{SIDE}</BlockSizeY><BandsCount>1</BandsCount>'
            '<DataType>UInt16</DataType></GDAL_WMS>').encode()


def wcs_service(canary: Canary) -> bytes:
    """A GDAL WCS service description: DescribeCoverage to the listener on open."""
    return (f'<WCS_GDAL><ServiceURL>{canary.url}/wcs?</ServiceURL><CoverageName>c</CoverageName>'
            '</WCS_GDAL>').encode()


def gti_index(canary: Canary) -> bytes:
    """A GDAL tile index (GTI) whose index dataset is on ``/vsicurl/``."""
    return (f'<GDALTileIndexDataset><IndexDataset>/vsicurl/{canary.url}/index.fgb</IndexDataset>'
            '</GDALTileIndexDataset>').encode()


def isis3_label(canary: Canary) -> bytes:
    """An ISIS3 detached label: ``^Core`` names the data file relative to the label (so: ``../`` climbs)."""
    return (f"Object = IsisCube\n  Object = Core\n    ^Core = {CLIMB}{str(canary.raw).lstrip('/')}\n"
            "    Format = BandSequential\n    Group = Dimensions\n"
            f"      Samples = {SIDE}\n      Lines = {SIDE}\n      Bands = 1\n    End_Group\n"
            "    Group = Pixels\n      Type = UnsignedWord\n      ByteOrder = Lsb\n      Base = 0.0\n"
            "      Multiplier = 1.0\n    End_Group\n  End_Object\nEnd_Object\nEnd\n").encode()


def pds3_label(canary: Canary) -> bytes:
    """A PDS3 label: ``^IMAGE`` names the data file relative to the label."""
    return (f'PDS_VERSION_ID = PDS3\n^IMAGE = ("{CLIMB}{str(canary.raw).lstrip("/")}", 1)\nOBJECT = IMAGE\n'
            f" LINES = {SIDE}\n LINE_SAMPLES = {SIDE}\n SAMPLE_TYPE = LSB_UNSIGNED_INTEGER\n SAMPLE_BITS = 16\n"
            " BANDS = 1\nEND_OBJECT = IMAGE\nEND\n").encode()


HOSTILE: Mapping[str, Callable[[Canary], bytes]] = {
    "vrt-raw-band": vrt_raw_band,
    "vrt-local-raster": vrt_local_raster,
    "vrt-vsicurl": vrt_vsicurl,
    "wms": wms_tms,
    "wcs": wcs_service,
    "gti-vsicurl": gti_index,
    "isis3-label": isis3_label,
    "pds3-label": pds3_label,
}
# Payloads that reach the network when GDAL opens and reads them.
NETWORK = ("vrt-vsicurl", "wms", "wcs", "gti-vsicurl")


def canary_leaked(array: np.ndarray) -> bool:
    return bool(np.any(np.asarray(array) == CANARY_VALUE))


def canary_bytes_in(data: bytes) -> bool:
    """The canary's pixels, as they would appear in an uncompressed output (a run of 16 marker values)."""
    return np.full(16, CANARY_VALUE, dtype="<u2").tobytes() in data


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)
    return path
