"""Test inputs built from real data: the BigEarthNet sample patches packed as tar.gz, uploaded as folders."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np
import tifffile

from services.wrapper.inputs.s3_listing import S3Client

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_PATCHES = PROJECT_ROOT / "data" / "bigearthnet-sample" / "patches"
# Credentials are fake but distinctive, so that a test can prove they never leak into messages.
TEST_ACCESS_KEY_ID = "AKIATESTWRAPPERINPUT"
TEST_SECRET_ACCESS_KEY = "wrapper-input-secret-never-shown-0123456789"
ALL_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def sample_patch_names() -> list[str]:
    return sorted(path.name for path in SAMPLE_PATCHES.iterdir() if path.is_dir())


def sample_band_path(patch: str, band: str) -> Path:
    return SAMPLE_PATCHES / patch / f"{patch}_{band}.tif"


def sample_band_array(patch: str, band: str) -> np.ndarray:
    """The band as tifffile reads it: an independent reader from the rasterio the code under test uses."""
    return tifffile.imread(sample_band_path(patch, band))


def sample_georeference(patch: str) -> tuple[str, float, float] | None:
    """(EPSG code, upper-left x, upper-left y) from the patch's labels_metadata.json, when it has them."""
    metadata = json.loads((SAMPLE_PATCHES / patch / f"{patch}_labels_metadata.json").read_text())
    if "coordinates" not in metadata:
        return None
    epsg = re.findall(r'AUTHORITY\["EPSG","(\d+)"\]', metadata["projection"])[-1]
    return f"EPSG:{epsg}", float(metadata["coordinates"]["ulx"]), float(metadata["coordinates"]["uly"])


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    archive.addfile(member, io.BytesIO(data))


def add_sample_patch(
    archive: tarfile.TarFile, patch: str, top_dir: str = "", skip_bands: Iterable[str] = ()
) -> None:
    """Every file of a sample patch folder (labels JSON included), under ``top_dir`` if given."""
    skipped = {f"{patch}_{band}.tif" for band in skip_bands}
    for path in sorted((SAMPLE_PATCHES / patch).iterdir()):
        if path.name not in skipped:
            archive.add(path, arcname=f"{top_dir}{patch}/{path.name}" if top_dir else f"{patch}/{path.name}")


def sample_tar_gz(patches: Iterable[str], top_dir: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for patch in patches:
            add_sample_patch(archive, patch, top_dir)
    return buffer.getvalue()


def upload_patch_folder(client: S3Client, bucket: str, prefix: str, patch: str, skip_bands: Iterable[str] = ()) -> None:
    skipped = {f"{patch}_{band}.tif" for band in skip_bands}
    for path in sorted((SAMPLE_PATCHES / patch).iterdir()):
        if path.name not in skipped:
            client.put_object(Bucket=bucket, Key=f"{prefix}{patch}/{path.name}", Body=path.read_bytes())
