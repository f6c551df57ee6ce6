"""The input side shared by the tasks that read whole files (classify, decompress, uc6-locust).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from botocore.exceptions import BotoCoreError, ClientError

from services.wrapper.inputs.s3_listing import S3ObjectRef, folder_prefix, list_objects, s3_failure
from services.wrapper.inputs.types import InputError
from services.wrapper.outputs import input_name
from services.wrapper.handlers.base import FileRefused, InputUnit, StepContext, unique_names


def list_input_files(ctx: StepContext, accept: Callable[[str], bool], expected: str) -> list[S3ObjectRef]:
    """The objects under the step's folder (or its ``filename``) that ``accept`` takes, in key order."""
    prefix = folder_prefix(ctx.folder, ctx.filename)
    if ctx.filename:
        listed = [
            obj for obj in list_objects(ctx.client, ctx.bucket, prefix, ctx.limits)
            if obj.key == prefix or obj.key.startswith(prefix + "/")
        ]
    else:
        listed = list(list_objects(ctx.client, ctx.bucket, prefix + "/" if prefix else "", ctx.limits))
    files = [obj for obj in listed if accept(obj.key)]
    shown = "/".join(part for part in (ctx.folder.strip("/"), ctx.filename.strip("/")) if part)
    if not files:
        found = f"{len(listed)} objects, none is {expected}" + (f"; first: {listed[0].key!r}" if listed else "")
        raise InputError(f"no input found under {shown!r} in bucket {ctx.bucket!r}: {found}", prefix)
    return files


def read_object(ctx: StepContext, obj: S3ObjectRef) -> bytes | FileRefused:
    """The object's bytes, or why it is refused (over the size limit). S3 failures raise ``InputError``."""
    limit = ctx.settings.max_file_bytes
    if obj.size > limit:
        return FileRefused(f"file is {obj.size} bytes, over the limit of {limit} bytes (EOML_WRAPPER_MAX_FILE_BYTES)")
    try:
        response = ctx.client.get_object(Bucket=ctx.bucket, Key=obj.key)
        with response["Body"] as body:
            data = body.read(limit + 1)
    except (BotoCoreError, ClientError) as error:
        raise s3_failure(error, f"reading {obj.key}", ctx.client, obj.key) from None
    if len(data) > limit:
        return FileRefused(f"file is over the limit of {limit} bytes (EOML_WRAPPER_MAX_FILE_BYTES)")
    return data


def file_units(files: Sequence[S3ObjectRef], strip: Callable[[str], str] = lambda key: key) -> list[InputUnit]:
    keys = [obj.key for obj in files]
    names = unique_names(keys, lambda key: input_name(strip(key)))
    return [InputUnit(i, key, name) for i, (key, name) in enumerate(zip(keys, names))]


@dataclass(frozen=True, slots=True)
class FileContext:
    unit: InputUnit
    payload: Any  # what the task keeps: the feature set, the windows, or one patch's metadata
    extra: Any = None  # file-level facts (codes file info, UC6 georeferencing)


