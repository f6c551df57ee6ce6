"""Deterministic result keys: ``<result-prefix>/<input name><suffix>``.

A key depends only on the result prefix, the input object's key and the suffix, never on time or a counter, so a
redelivered step message overwrites its earlier results instead of writing a second copy.
"""

from __future__ import annotations

import hashlib
import re
from typing import Mapping

from services.core.model_card import Task
from services.wrapper.outputs.types import OutputFormatError

# The bucket-root prefixes production's wrappers write under (contracts doc section 3), per task.
PRODUCTION_RESULT_PREFIXES: Mapping[Task, str] = {
    "ssl-features": "result-image2feature",
    "classify": "result-feature2class",
    "compress": "result-image2code",
    "decompress": "result-code2image",
    "uc5-cfactor": "result-uc5-cfactor",
    "uc6-locust": "result-uc6-classifier",
}

# Names that survive S3, file systems and URLs unquoted.
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_COMPOUND_EXTENSION = re.compile(r"\.tar\.(gz|bz2|xz|zst)$", re.IGNORECASE)
# One final extension: a dot, a letter, up to four more letters/digits (".SAFE", ".tif", ".jp2", ".json").
# A version-like tail (".2" in "v1.2") is part of the name.
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")
MAX_NAME_LENGTH = 160
_HASH_LENGTH = 8


def short_hash(text: str) -> str:
    """8 hex of the text's sha256: tells apart names that would otherwise collide."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HASH_LENGTH]


def sanitise_name(raw: str) -> str:
    """``raw`` as one safe key segment: ``[A-Za-z0-9._-]``, not starting with ``.`` or ``-``.

    A name that had to change gets ``-<8 hex of sha256(raw)>`` appended, so two different raw names never map to
    one key ("a b" and "a_b" stay apart). Already safe names come back unchanged, so the function is idempotent.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise OutputFormatError(f"cannot make a key segment from {raw!r}")
    if _SAFE_NAME.match(raw) and len(raw) <= MAX_NAME_LENGTH:
        return raw
    cleaned = _UNSAFE_RUN.sub("_", raw).lstrip(".-") or "_"
    cleaned = cleaned[: MAX_NAME_LENGTH - _HASH_LENGTH - 1]
    return f"{cleaned}-{short_hash(raw)}"


def input_name(input_key: str) -> str:
    """The input object's name without its folder and extension, sanitised.

    ``uploads/run 1/S2A_MSIL2A_x.SAFE/`` -> ``S2A_MSIL2A_x``; ``in/patches.tar.gz`` -> ``patches``;
    ``in/S2B_..._0_45`` (a patch folder) -> ``S2B_..._0_45``.
    """
    if not isinstance(input_key, str):
        raise OutputFormatError(f"input key must be a string, got {type(input_key).__name__}")
    base = input_key.rstrip("/").rsplit("/", 1)[-1]
    stem = _COMPOUND_EXTENSION.sub("", base)
    if stem == base:
        stem = _EXTENSION.sub("", base)
    if not stem.strip(". "):
        raise OutputFormatError(f"input key {input_key!r} has no name to derive a result key from")
    return sanitise_name(stem)


def _check_prefix(result_prefix: str) -> str:
    if not isinstance(result_prefix, str):
        raise OutputFormatError(f"result prefix must be a string, got {type(result_prefix).__name__}")
    prefix = result_prefix.strip("/")
    segments = prefix.split("/")
    if not prefix or any(not _SAFE_NAME.match(segment) or segment in (".", "..") for segment in segments):
        raise OutputFormatError(
            f"result prefix {result_prefix!r} must be '/'-separated segments of [A-Za-z0-9._-] "
            "(not starting with '.' or '-')"
        )
    return prefix


def _check_suffix(suffix: str) -> None:
    # The suffix continues the input name (".features.json") and may open sub-folders ("/<patch>.tif").
    if not isinstance(suffix, str) or not re.fullmatch(r"[A-Za-z0-9._/-]*", suffix):
        raise OutputFormatError(f"suffix {suffix!r} may only hold [A-Za-z0-9._/-]")
    if "//" in suffix or suffix.endswith("/") or any(seg in (".", "..") for seg in suffix.split("/")[1:]):
        raise OutputFormatError(f"suffix {suffix!r} has an empty, '.' or '..' path segment or ends with '/'")


def result_key(result_prefix: str, input_key: str, suffix: str) -> str:
    """``<result_prefix>/<input_name(input_key)><suffix>``, e.g.
    ``result_key("result-image2feature", "in/patches.tar.gz", ".features.json")`` ->
    ``result-image2feature/patches.features.json``."""
    prefix = _check_prefix(result_prefix)
    _check_suffix(suffix)
    return f"{prefix}/{input_name(input_key)}{suffix}"


__all__ = [
    "MAX_NAME_LENGTH",
    "PRODUCTION_RESULT_PREFIXES",
    "input_name",
    "result_key",
    "sanitise_name",
]
