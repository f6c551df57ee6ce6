"""Where a step's results go and how they become visible: deterministic keys, manifest last, nothing stale.

Output folder: ``<result prefix>/<input folder name>-<8 hex of sha256(input folder[/filename])>``. It depends only
on the task's prefix and on what the step message names, so a redelivered message writes the same keys (and, the
writers being deterministic, the same bytes), and two messages naming different folders never share results.

Visibility: the manifest ``<output folder>.manifest.json`` (beside the folder, so that the folder holds result
files only, which is what the next component lists) is deleted first, every result object is written, objects of
an earlier run that this run did not write are deleted, and the manifest is written last. Only then is the next
component told. A reader that checks the manifest never sees a mix of two runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

from botocore.exceptions import BotoCoreError, ClientError

from services.wrapper.handlers import ResultObject, short_hash
from services.wrapper.inputs.s3_listing import S3Client, folder_prefix, s3_failure
from services.wrapper.inputs.types import InputError
from services.wrapper.outputs import OutputFormatError, input_name, sanitise_name

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "eoml-step-result/1"
MANIFEST_CONTENT_TYPE = "application/json"


class ResultWriteError(Exception):
    """Results could not be written (S3 refused or unreachable); the step fails and announces nothing."""


def output_folder(result_prefix: str, folder: str, filename: str = "") -> str:
    """``<result_prefix>/<name of the input>-<hash of the input path>`` (no trailing slash)."""
    prefix = result_prefix.strip("/")
    if not prefix or any(not part or part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"result prefix {result_prefix!r} must be '/'-separated non-empty segments")
    source = folder_prefix(folder, filename)
    try:
        name = input_name(source) if source else "root"
    except OutputFormatError:
        name = "input"
    return f"{'/'.join(sanitise_name(part) for part in prefix.split('/'))}/{name}-{short_hash(source)}"


def manifest_key(folder: str) -> str:
    return folder + MANIFEST_SUFFIX


@dataclass(frozen=True, slots=True)
class WrittenObject:
    key: str
    size: int
    sha256: str
    content_type: str
    patches: int
    input_key: str


class ResultStore:
    """Writes one step's results into one output folder of the workflow bucket."""

    def __init__(self, client: S3Client, bucket: str, folder: str) -> None:
        self.client = client
        self.bucket = bucket
        self.folder = folder
        self.written: list[WrittenObject] = []

    def _fail(self, error: Exception, action: str, key: str) -> ResultWriteError:
        translated: InputError = s3_failure(error, action, self.client, key)
        return ResultWriteError(translated.reason)

    def begin(self) -> None:
        """Withdraw the manifest of any earlier run: until this run's manifest is written, the result is incomplete."""
        key = manifest_key(self.folder)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as error:
            raise self._fail(error, f"removing the old manifest {key}", key) from None

    def put(self, obj: ResultObject, input_key: str) -> WrittenObject:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=obj.key, Body=obj.file.data, ContentType=obj.file.content_type
            )
        except (BotoCoreError, ClientError) as error:
            raise self._fail(error, f"writing {obj.key}", obj.key) from None
        written = WrittenObject(
            key=obj.key,
            size=len(obj.file.data),
            sha256=hashlib.sha256(obj.file.data).hexdigest(),
            content_type=obj.file.content_type,
            patches=obj.patches,
            input_key=input_key,
        )
        self.written.append(written)
        return written

    def remove_stale(self) -> list[str]:
        """Delete objects under the folder that this run did not write (left by a run over different input)."""
        keep = {w.key for w in self.written}
        stale: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.folder + "/"):
                stale.extend(entry["Key"] for entry in page.get("Contents", []) if entry["Key"] not in keep)
            for start in range(0, len(stale), 1000):
                chunk = stale[start:start + 1000]
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True}
                )
        except (BotoCoreError, ClientError) as error:
            raise self._fail(error, f"removing stale results under {self.folder}/", self.folder) from None
        if stale:
            log.info("stale results removed", extra={"folder": self.folder, "objects": len(stale)})
        return stale

    def discard(self) -> None:
        """Best effort, after a failure: remove what this run wrote, so no half result lingers."""
        for written in self.written:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=written.key)
            except (BotoCoreError, ClientError) as error:
                log.warning("could not remove a partial result", extra={"key": written.key, "error": type(error).__name__})

    def finish(self, manifest: dict[str, Any]) -> str:
        key = manifest_key(self.folder)
        body = json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=MANIFEST_CONTENT_TYPE)
        except (BotoCoreError, ClientError) as error:
            raise self._fail(error, f"writing the manifest {key}", key) from None
        return key


def build_manifest(
    *,
    task: str,
    model_name: str,
    model_version: str,
    weights: str,
    bucket: str,
    folder: str,
    filename: str,
    output_folder_key: str,
    created: datetime,
    objects: Sequence[WrittenObject],
    patches: int,
    rejections: Iterable[dict[str, str]],
    rejection_count: int,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """The manifest: deterministic for equal input (no wall-clock time; ``created`` is the event's time)."""
    return {
        "format": MANIFEST_FORMAT,
        "task": task,
        "model": {"name": model_name, "version": model_version, "weights": weights},
        "input": {"bucket": bucket, "folder": folder, "filename": filename},
        "folder": output_folder_key,
        "created": created.isoformat(),
        "patches": patches,
        "objects": [
            {"key": o.key, "size": o.size, "sha256": o.sha256, "content_type": o.content_type,
             "patches": o.patches, "input": o.input_key}
            for o in objects
        ],
        "rejected": rejection_count,
        "rejections": list(rejections),
        "stats": stats,
    }
