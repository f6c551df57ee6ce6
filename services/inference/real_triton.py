"""Run NVIDIA's real Triton Inference Server (from the ``nvidia-pytriton`` wheel) on this machine's CPU.

``make triton`` installs the wheel into its own virtual environment (``.venv-triton``) and runs
``python -m services.inference.real_triton --venv .venv-triton --model-repository model_repository``,
which lays out a backend directory and replaces itself with ``tritonserver`` (foreground, signals go
straight to Triton). The tests and ``eo-platform --inference triton`` use the same functions.

The wheel ships only Triton's Python backend, so the backend directory gets:
- ``python/``: ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the Python 3.11 stub;
- ``onnxruntime/model.py``: :mod:`services.inference.triton_onnx_shim`, which Triton then uses for
  every ``backend: "onnxruntime"`` / ``platform: "onnxruntime_onnx"`` model, configs unchanged.

Restricted APIs without the key on the command line: tritonserver reads ``--http-restricted-api`` /
``--grpc-restricted-protocol`` from argv only (no environment variable or config file; see
``triton_restricted_key_preload.c``). Given ``--restricted-api-key-file``, the options go on the command line
without their value and a small ``LD_PRELOAD`` library, built here with ``cc``, fills it in from the file inside
the process: ``ps`` and ``/proc/<pid>/cmdline`` show ``<apis>:<key>`` only.

Only the standard library is used here: any Python 3.11 can run it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SHIM_SOURCE = Path(__file__).with_name("triton_onnx_shim.py")
KEY_PRELOAD_SOURCE = Path(__file__).with_name("triton_restricted_key_preload.c")
KEY_FILE_VARIABLE = "EOML_RESTRICTED_API_KEY_FILE"  # read by the preload library
PYTHON_STUB_VERSION = "3.11"
DEFAULT_BACKEND_DIRECTORY = Path("build/triton/backends")


class TritonNotInstalled(RuntimeError):
    """The virtual environment has no nvidia-pytriton (run ``make triton-install``)."""


@dataclass(frozen=True)
class TritonInstallation:
    """Where the wheel put Triton inside a virtual environment."""

    venv: Path
    root: Path  # .../site-packages/pytriton/tritonserver

    @classmethod
    def from_venv(cls, venv: str | Path) -> "TritonInstallation":
        venv = Path(venv).absolute()
        for site_packages in sorted(venv.glob("lib/python3*/site-packages")):
            root = site_packages / "pytriton" / "tritonserver"
            if (root / "bin" / "tritonserver").exists():
                return cls(venv=venv, root=root)
        raise TritonNotInstalled(f"no nvidia-pytriton in {venv} (make triton-install installs it)")

    @property
    def server_binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def python_stub(self) -> Path:
        return self.root / "python_backend_stubs" / PYTHON_STUB_VERSION / "triton_python_backend_stub"

    @property
    def library_directory(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"


def prepare_backend_directory(installation: TritonInstallation, destination: str | Path) -> Path:
    """Lay out ``destination`` as Triton's ``--backend-directory`` (idempotent); returns its absolute path."""
    destination = Path(destination).absolute()
    python_dir = destination / "python"
    shim_dir = destination / "onnxruntime"
    python_dir.mkdir(parents=True, exist_ok=True)
    shim_dir.mkdir(parents=True, exist_ok=True)
    # Copies, not symbolic links: Triton refuses a backend library whose real path leaves the backend directory.
    copies = {
        python_dir / "libtriton_python.so": installation.python_backend / "libtriton_python.so",
        python_dir / "triton_python_backend_utils.py": installation.python_backend / "triton_python_backend_utils.py",
        python_dir / "triton_python_backend_stub": installation.python_stub,
        shim_dir / "model.py": SHIM_SOURCE,
    }
    for copy, source in copies.items():
        if copy.is_symlink():
            copy.unlink()
        if not copy.exists() or copy.stat().st_size != source.stat().st_size or copy.read_bytes() != source.read_bytes():
            shutil.copy2(source, copy)
    return destination


def build_key_preload(destination: str | Path) -> Path:
    """Compile ``triton_restricted_key_preload.c`` into ``destination`` (again only when the source changed)."""
    destination = Path(destination).absolute()
    destination.mkdir(parents=True, exist_ok=True)
    library = destination / "libeoml_restricted_key.so"
    if library.exists() and library.stat().st_mtime >= KEY_PRELOAD_SOURCE.stat().st_mtime:
        return library
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError("building the restricted-API key preload library needs a C compiler (cc)")
    partial = library.with_suffix(".tmp")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(partial), str(KEY_PRELOAD_SOURCE)], check=True)
    os.replace(partial, library)
    return library


def triton_environment(installation: TritonInstallation, base: dict[str, str] | None = None,
                       restricted_api_key_file: str | Path | None = None,
                       key_preload: str | Path | None = None) -> dict[str, str]:
    """The environment ``tritonserver`` needs: the wheel's shared libraries, and the venv's ``python3`` first
    on PATH (the stub's embedded interpreter finds numpy and onnxruntime through it, not through PYTHONPATH).
    With a key file, the preload library that completes value-less restricted-API options from it."""
    environment = dict(os.environ if base is None else base)
    if restricted_api_key_file is not None:
        if key_preload is None:
            raise ValueError("a restricted API key file needs the preload library (build_key_preload)")
        environment["LD_PRELOAD"] = ":".join(filter(None, [str(key_preload), environment.get("LD_PRELOAD", "")]))
        environment[KEY_FILE_VARIABLE] = str(Path(restricted_api_key_file).absolute())
    libraries = str(installation.library_directory)
    environment["LD_LIBRARY_PATH"] = ":".join(filter(None, [libraries, environment.get("LD_LIBRARY_PATH", "")]))
    environment["PATH"] = ":".join(filter(None, [str(installation.venv / "bin"), environment.get("PATH", "")]))
    environment.pop("PYTHONPATH", None)
    environment.pop("PYTHONHOME", None)
    return environment


def triton_command(
    installation: TritonInstallation,
    model_repository: str | Path,
    backend_directory: str | Path,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    address: str = "0.0.0.0",
    extra_args: Sequence[str] = (),
) -> list[str]:
    return [
        str(installation.server_binary),
        f"--model-repository={Path(model_repository).absolute()}",
        f"--backend-directory={Path(backend_directory).absolute()}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        f"--http-address={address}",
        f"--grpc-address={address}",
        "--allow-gpu-metrics=false",
        *extra_args,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.inference.real_triton",
        description="Serve a model repository with NVIDIA's real Triton (CPU, ONNX Runtime through the Python "
        "backend shim). Options after '--' go to tritonserver unchanged.",
    )
    parser.add_argument("--venv", default=".venv-triton", help="virtual environment holding nvidia-pytriton")
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--backend-directory", default=str(DEFAULT_BACKEND_DIRECTORY))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--address", default="0.0.0.0", help="HTTP and gRPC bind address")
    parser.add_argument("--restricted-api-key-file", default="", metavar="PATH",
                        help="value of --http-restricted-api/--grpc-restricted-protocol options given as "
                             "<apis>:<key> (kept off the command line by a preload library)")
    parser.add_argument("tritonserver_args", nargs="*", help="passed to tritonserver after the options above")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        installation = TritonInstallation.from_venv(options.venv)
    except TritonNotInstalled as error:
        print(error, file=sys.stderr)
        return 2
    backends = prepare_backend_directory(installation, options.backend_directory)
    command = triton_command(
        installation, options.model_repository, backends,
        http_port=options.http_port, grpc_port=options.grpc_port, metrics_port=options.metrics_port,
        address=options.address, extra_args=options.tritonserver_args,
    )
    key_file = options.restricted_api_key_file or None
    preload = build_key_preload(Path(options.backend_directory).parent / "preload") if key_file else None
    sys.stdout.flush()
    os.execve(command[0], command, triton_environment(installation, restricted_api_key_file=key_file,
                                                      key_preload=preload))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
