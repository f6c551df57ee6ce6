"""The Triton model-repository layout on disk: which models exist, their files and versions.

``<repository>/<model>/config.pbtxt`` (optional: auto-completed from the ONNX graph when absent),
``<repository>/<model>/<version>/<default_model_filename>`` for numeric version directories, and
label files next to ``config.pbtxt``. Several repositories may be given; a model name must be
unique across them. Nothing here loads ONNX Runtime: it reads files only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from .model_config import (
    DEFAULT_MODEL_FILENAME,
    ModelConfigError,
    parse_config_json,
    parse_config_text,
    select_versions,
)

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.pbtxt"


@dataclass(frozen=True, slots=True)
class ModelDefinition:
    """What the repository says about one model, before ONNX Runtime sees it.

    ``config`` is the parsed config.pbtxt (or the override), not yet auto-completed;
    ``version_paths`` holds the ONNX file of each version the version policy selects.
    """

    name: str
    directory: Path
    config: model_config_pb2.ModelConfig
    version_paths: dict[int, Path]
    fingerprint: tuple = field(compare=False)
    config_overridden: bool = False


class RepositoryError(Exception):
    """A problem with the repository itself (missing directory, duplicate model names)."""


class ModelRepository:
    def __init__(self, roots: list[Path]) -> None:
        if not roots:
            raise RepositoryError("no model repository given")
        self.roots = [Path(root) for root in roots]
        for root in self.roots:
            if not root.is_dir():
                raise RepositoryError(f"model repository '{root}' is not a directory")

    def scan(self) -> dict[str, Path]:
        """Every model directory in the repositories, by model name (hidden entries skipped)."""
        models: dict[str, Path] = {}
        for root in self.roots:
            try:
                entries = sorted(os.scandir(root), key=lambda entry: entry.name)
            except OSError as error:
                log.error("cannot read the model repository", extra={"repository": str(root), "error": str(error)})
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                if entry.name in models:
                    # Triton refuses ambiguous names; keeping the first makes the choice visible in the log.
                    log.error(
                        "model name appears in more than one repository; keeping the first",
                        extra={"model": entry.name, "kept": str(models[entry.name]), "ignored": entry.path},
                    )
                    continue
                models[entry.name] = Path(entry.path)
        return models

    def locate(self, name: str) -> Path | None:
        if not name or name.startswith(".") or "/" in name or name in ("..",):
            return None
        for root in self.roots:
            candidate = root / name
            if candidate.is_dir():
                return candidate
        return None

    def read_definition(self, name: str, config_override_json: str | None = None) -> ModelDefinition:
        """Read a model's config and pick its versions; raise ModelConfigError with the reason."""
        directory = self.locate(name)
        if directory is None:
            raise ModelConfigError(f"no model directory '{name}' in the model repository")
        fingerprint = directory_fingerprint(directory)
        if config_override_json is not None:
            config = parse_config_json(config_override_json)
        else:
            config_path = directory / CONFIG_FILENAME
            if config_path.is_file():
                config = parse_config_text(config_path.read_text(), source=str(config_path))
            else:
                config = model_config_pb2.ModelConfig()
        if config.name and config.name != name:
            raise ModelConfigError(f"the configuration names the model '{config.name}' but its directory is '{name}'")
        filename = config.default_model_filename or DEFAULT_MODEL_FILENAME
        available = version_directories(directory)
        selected = select_versions(config.version_policy, available)
        version_paths: dict[int, Path] = {}
        for version in selected:
            path = directory / str(version) / filename
            if not path.is_file():
                raise ModelConfigError(f"version {version} has no model file '{filename}' (looked for {path})")
            version_paths[version] = path
        return ModelDefinition(
            name=name,
            directory=directory,
            config=config,
            version_paths=version_paths,
            fingerprint=fingerprint,
            config_overridden=config_override_json is not None,
        )


def version_directories(directory: Path) -> list[int]:
    """Numeric subdirectory names (Triton ignores the others)."""
    versions: list[int] = []
    for entry in os.scandir(directory):
        if entry.is_dir() and entry.name.isdigit():
            versions.append(int(entry.name))
    return versions


def directory_fingerprint(directory: Path) -> tuple:
    """Relative path, size and modification time of every file below ``directory``: poll mode
    reloads a model when this changes (Triton compares modification times the same way)."""
    entries: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = os.path.join(dirpath, filename)
            try:
                info = os.stat(path)
            except OSError:
                continue
            entries.append((os.path.relpath(path, directory), info.st_size, info.st_mtime_ns))
    return tuple(entries)


def read_label_file(directory: Path, filename: str) -> list[str]:
    """One label per line, as Triton reads ``label_filename`` (relative to the model directory)."""
    path = directory / filename
    if not path.is_file():
        raise ModelConfigError(f"label file '{filename}' not found in {directory}")
    return path.read_text(encoding="utf-8").splitlines()
