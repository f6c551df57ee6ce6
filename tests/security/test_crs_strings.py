"""CRS texts from inputs never make GDAL fetch a URL or read a file.

rasterio's ``CRS.from_user_input`` hands a string to GDAL's ``OSRSetFromUserInput``, which fetches ``http(s)://``
URLs with GDAL's own HTTP client (outside the VSI file systems the GDAL policy closes) and reads a file a path names.
A ``.compressed`` file's header carries a ``crs_wkt`` per patch that the decompress step writes into its GeoTIFFs,
so the Wrapper parses CRS texts only as an EPSG code, WKT or a plain PROJ string (``gdal_policy.parse_crs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from security_support import RecordingServer
from services.wrapper.gdal_policy import CrsRefused, parse_crs
from services.wrapper.outputs import OutputFormatError
from services.wrapper.outputs.rasters import geotiff_bytes
from services.wrapper.outputs.types import PatchMetadata, crs_to_wkt


@pytest.fixture
def listener() -> Iterator[RecordingServer]:
    server = RecordingServer(status=404)
    try:
        yield server
    finally:
        server.close()


def hostile_crs_texts(listener: RecordingServer, tmp_path: Path) -> list[str]:
    local = tmp_path / "crs.wkt"
    local.write_text(CRS.from_epsg(32633).to_wkt())
    return [f"{listener.url}/crs", f"{listener.url.replace('http', 'https', 1)}/crs", str(local), f"file://{local}",
            "+init=epsg:32633", f"+proj=utm +zone=33 +nadgrids={local}"]


def test_every_crs_text_from_an_input_is_refused_unless_it_names_no_resource(
    listener: RecordingServer, tmp_path: Path
) -> None:
    for text in hostile_crs_texts(listener, tmp_path):
        with pytest.raises(CrsRefused):
            parse_crs(text)
        with pytest.raises(OutputFormatError):
            crs_to_wkt(text)
        with pytest.raises(OutputFormatError):
            PatchMetadata.from_json({"patch_id": "p", "crs_wkt": text, "transform": None, "i": 0, "j": 0})
        with pytest.raises(OutputFormatError):
            geotiff_bytes(np.zeros((4, 4), np.uint16), text, Affine(10, 0, 0, 0, -10, 0))
    assert listener.requests == []


def test_the_spellings_the_wrapper_writes_still_parse() -> None:
    wkt = CRS.from_epsg(32633).to_wkt()
    for text in ("EPSG:32633", "epsg:32633", wkt, "+proj=utm +zone=33 +datum=WGS84 +units=m +no_defs"):
        assert parse_crs(text).to_epsg() == 32633
    data = geotiff_bytes(np.zeros((4, 4), np.uint16), "EPSG:32633", Affine(10, 0, 500000, 0, -10, 5000000))
    assert data[:4] in (b"II*\x00", b"MM\x00*")
