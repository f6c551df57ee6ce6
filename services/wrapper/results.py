"""Where a step's results go and how they are announced: one run folder per delivery, one attempt folder per run
of it, and only the winning attempt is ever announced.

Output folder: ``<result prefix>/<input folder name>-<8 hex of sha256(input folder[/filename])>`` (depends only on
what the step message names). Run folder: ``<output folder>/<run id>``, the run id coming from the delivery
(``run_id``): a redelivery of one event finds the same run folder, a new event for the same input gets a new one.
Attempt folder: ``<run folder>/<attempt id>``, ``a-<8 hex of the outputs profile>-<8 random hex>``: every run of a
delivery writes its result objects into a folder of its own, so no run ever writes where another run wrote (a late
or concurrent duplicate cannot touch an announced object, whatever its settings or model version).

Objects beside the run folder (so that an attempt folder holds result files only, which is what the next component
lists):

- ``<run folder>.manifest.json``: written last, create-only (``If-None-Match: *``): names the winning attempt
  (``folder``) and lists its objects. Of two runs of the same delivery, the one whose manifest write wins is the
  one announced; the other deletes its own attempt folder;
- ``<run folder>.announced.json``: the next-step message is on Kafka (topic, partition, offset, CloudEvent id);
- ``<run folder>.failed.json``: the run failed for good and its dead-letter record is on Kafka.

Nothing here overwrites an object; the only deletes are of never announced attempt objects: a losing run's own,
and, once a run is announced, what runs cut off mid-way left beside the announced attempt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit
from datetime import datetime
from typing import Any, Iterable, Sequence

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from services.core.metrics import Stage, timed_stage
from services.wrapper.inputs.s3_listing import S3Client, folder_prefix, s3_failure
from services.wrapper.inputs.types import InputError
from services.wrapper.outputs.keys import input_name, sanitise_name, short_hash
from services.wrapper.outputs.types import OutputFormatError, ResultObject

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
ANNOUNCED_SUFFIX = ".announced.json"
FAILED_SUFFIX = ".failed.json"
MANIFEST_FORMAT = "eoml-step-result/2"
MANIFEST_CONTENT_TYPE = "application/json"
RUN_ID_PREFIX = "r-"
ATTEMPT_ID_PREFIX = "a-"
# boto3 switches to a multipart upload above this size (a part per chunk): no single PUT limit, bounded memory.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_PRECONDITION_CODES = frozenset({"412", "PreconditionFailed", "ConditionalRequestConflict", "409"})
# An S3 implementation without conditional writes: a configuration error, never retried.
_NOT_IMPLEMENTED_CODES = frozenset({"501", "NotImplemented"})


class ResultWriteError(Exception):
    """Results could not be written (S3 refused or unreachable); the run announces nothing."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


class S3ConfigurationError(Exception):
    """The workflow's S3 endpoint cannot give the Wrapper's guarantees (it ignores or refuses conditional create):
    permanent, and the message names the endpoint and bucket (never credentials)."""


def shown_endpoint(client: S3Client) -> str:
    """The client's endpoint as scheme://host[:port]: no user info, path or query."""
    url = client.meta.endpoint_url or ""
    parts = urlsplit(url)
    if not parts.hostname:
        return url or "(default AWS endpoint)"
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


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


def run_id(config_name: str, source: str, event_id: str, event_time: str) -> str:
    """``r-<16 hex>`` of the delivery: the step, the CloudEvent's source, id and time (a re-created topic re-uses
    offsets, its records have other times). Without an event id: a random id (no duplicate detection)."""
    if not event_id:
        return RUN_ID_PREFIX + secrets.token_hex(8)
    digest = hashlib.sha256("\n".join((config_name, source, event_id, event_time)).encode("utf-8")).hexdigest()
    return RUN_ID_PREFIX + digest[:16]


def run_folder(output_folder_key: str, run: str) -> str:
    return f"{output_folder_key}/{run}"


def new_attempt_id(profile_sha256: str) -> str:
    """``a-<8 hex of the outputs profile>-<8 random hex>``: unique per run, telling which settings made it."""
    return f"{ATTEMPT_ID_PREFIX}{profile_sha256[:8]}-{secrets.token_hex(4)}"


def attempt_folder(run_folder_key: str, attempt: str) -> str:
    return f"{run_folder_key}/{attempt}"


def run_folder_of(announced_folder: str) -> str:
    """The run folder of an announced (attempt) folder: where its manifest and markers are."""
    return announced_folder.rstrip("/").rsplit("/", 1)[0]


def manifest_key(folder: str) -> str:
    return folder + MANIFEST_SUFFIX


def announced_key(folder: str) -> str:
    return folder + ANNOUNCED_SUFFIX


def failed_key(folder: str) -> str:
    return folder + FAILED_SUFFIX


class ObjectExists(Exception):
    """A create-only write was refused: the key exists (for the manifest: another run of the delivery won)."""



def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


@dataclass(frozen=True, slots=True)
class WrittenObject:
    key: str
    size: int
    sha256: str
    content_type: str
    patches: int
    input_key: str


class ResultStore:
    """Writes one run's results into its run folder of the workflow bucket; never deletes or overwrites."""

    def __init__(self, client: S3Client, bucket: str, folder: str) -> None:
        self.client = client
        self.bucket = bucket
        self.folder = folder
        self.written: list[WrittenObject] = []

    def _fail(self, error: Exception, action: str, key: str) -> ResultWriteError:
        translated: InputError = s3_failure(error, action, self.client, key)
        return ResultWriteError(translated.reason, transient=translated.transient)

    @timed_stage(Stage.WRITE)
    def put(self, obj: ResultObject, input_key: str) -> WrittenObject:
        """Upload one result: from its spooled file (``obj.file.path``; boto3's managed upload, multipart above
        ``MULTIPART_THRESHOLD``) or its bytes."""
        from boto3.s3.transfer import TransferConfig

        # By file name, not file object: s3transfer then reads each part from the file as it sends it, where a file
        # object's parts are read into memory first (up to 10 of them: +160 MiB measured on a granule's features).
        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK_BYTES,
                                max_concurrency=2)
        extra = {"ContentType": obj.file.content_type}
        try:
            if obj.file.path is not None:
                self.client.upload_file(obj.file.path, self.bucket, obj.key, ExtraArgs=extra, Config=config)
            else:
                self.client.put_object(Bucket=self.bucket, Key=obj.key, Body=obj.file.data, **extra)
        except (BotoCoreError, ClientError) as error:
            raise self._fail(error, f"writing {obj.key}", obj.key) from None
        except Boto3Error as error:  # S3UploadFailedError wraps what failed in a (multipart) upload
            raise ResultWriteError(f"S3 upload of {obj.key} failed: {error}", transient=True) from None
        written = WrittenObject(
            key=obj.key, size=obj.file.size, sha256=obj.file.sha256, content_type=obj.file.content_type,
            patches=obj.patches, input_key=input_key,
        )
        self.written.append(written)
        return written

    def discard(self) -> None:
        """Delete what this store wrote (best effort): a run's own attempt objects, which no manifest lists."""
        for obj in self.written:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=obj.key)
            except (BotoCoreError, ClientError) as error:
                log.warning("unannounced result object not deleted", extra={"key": obj.key, "error": str(error)})
        self.written = []

    @timed_stage(Stage.WRITE)
    def finish(self, manifest: dict[str, Any], run_folder_key: str) -> str:
        """The manifest at the run folder's fixed key, create-only: ``ObjectExists`` when another run of this
        delivery wrote it first."""
        key = manifest_key(run_folder_key)
        create_only(self.client, self.bucket, key, encode_json(manifest), "the manifest")
        return key


def sweep_other_attempts(client: S3Client, bucket: str, run_folder_key: str, announced_folder: str) -> int:
    """After the announcement: delete (best effort) what runs of the delivery other than the announced one left in
    the run folder (a run cut off mid-way, e.g. SIGKILL). Never touches the announced folder; returns the count."""
    keep = announced_folder.rstrip("/") + "/"
    deleted = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=run_folder_key + "/"):
            for entry in page.get("Contents", []):
                if not entry["Key"].startswith(keep):
                    client.delete_object(Bucket=bucket, Key=entry["Key"])
                    deleted += 1
    except (BotoCoreError, ClientError) as error:
        log.warning("unannounced attempt objects not swept", extra={"run_folder": run_folder_key, "error": str(error)})
    return deleted


def encode_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")


def create_only(client: S3Client, bucket: str, key: str, body: bytes, what: str) -> None:
    """PUT with ``If-None-Match: *``: ``ObjectExists`` if the key exists, ``S3ConfigurationError`` if the endpoint
    does not implement conditional writes (``s3_capability`` checks that it honours them before a bucket is used)."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=MANIFEST_CONTENT_TYPE, IfNoneMatch="*")
    except ClientError as error:
        code = _error_code(error)
        if code in _PRECONDITION_CODES:
            raise ObjectExists(key) from None
        status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _NOT_IMPLEMENTED_CODES or status == "501":
            raise S3ConfigurationError(
                f"S3 endpoint {shown_endpoint(client)} (bucket {bucket!r}) does not implement conditional writes "
                f"(If-None-Match: * answered {status or code} {code}): the Wrapper needs create-only writes"
            ) from None
        raise _write_error(client, error, f"writing {what} {key}", key) from None
    except BotoCoreError as error:
        raise _write_error(client, error, f"writing {what} {key}", key) from None


def _write_error(client: S3Client, error: Exception, action: str, key: str) -> "ResultWriteError":
    translated = s3_failure(error, action, client, key)
    return ResultWriteError(translated.reason, transient=translated.transient)


def read_json_object(client: S3Client, bucket: str, key: str) -> dict[str, Any] | None:
    """The JSON object at ``key``, None when there is none; ``ResultWriteError`` (transient) when S3 fails."""
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        with body:
            data = body.read()
    except ClientError as error:
        if _error_code(error) in _NOT_FOUND_CODES:
            return None
        raise _write_error(client, error, f"reading {key}", key) from None
    except BotoCoreError as error:
        raise _write_error(client, error, f"reading {key}", key) from None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def put_marker(client: S3Client, bucket: str, key: str, marker: dict[str, Any]) -> None:
    """A small marker object (announced / failed). Written after what it records; re-writing it is harmless."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=encode_json(marker), ContentType=MANIFEST_CONTENT_TYPE)
    except (BotoCoreError, ClientError) as error:
        raise _write_error(client, error, f"writing {key}", key) from None


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
    run_folder_key: str,
    attempt: str,
    outputs_profile: dict[str, Any],
    created: datetime,
    objects: Sequence[WrittenObject],
    patches: int,
    run: str,
    next_message: dict[str, Any],
    rejections: Iterable[dict[str, str]],
    rejection_count: int,
    stats: dict[str, Any],
    stac_objects: Sequence[WrittenObject] = (),
) -> dict[str, Any]:
    """The manifest: deterministic for equal input (no wall-clock time; ``created`` is the event's time)."""
    return {
        "format": MANIFEST_FORMAT,
        "task": task,
        "model": {"name": model_name, "version": model_version, "weights": weights},
        "input": {"bucket": bucket, "folder": folder, "filename": filename},
        "folder": output_folder_key,  # the winning attempt's folder: what was announced
        "run_folder": run_folder_key,
        "attempt": attempt,
        "run_id": run,
        # The settings that decide which objects a run writes and their bytes (the attempt id carries its hash).
        "outputs_profile": outputs_profile,
        "created": created.isoformat(),
        # What the next component is told: a run whose announcement was interrupted is announced from here.
        "next_message": next_message,
        "patches": patches,
        "objects": [
            {"key": o.key, "size": o.size, "sha256": o.sha256, "content_type": o.content_type,
             "patches": o.patches, "input": o.input_key}
            for o in objects
        ],
        # The run folder's STAC Collection (first) and Items: not results, so apart from ``objects``.
        "stac": [{"key": o.key, "size": o.size, "sha256": o.sha256, "content_type": o.content_type}
                 for o in stac_objects],
        "rejected": rejection_count,
        "rejections": list(rejections),
        "stats": stats,
    }
