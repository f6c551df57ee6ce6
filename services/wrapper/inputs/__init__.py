"""The Wrapper's input layer: every patch or tile found under a step's S3 folder, streamed with bounded memory.

Three layouts are recognised, and may be mixed under one folder (contracts doc sections 3 and 6, D3.4 3.2.2):

1. ``*.tar.gz`` / ``*.tgz`` archives of BigEarthNet patch folders, read as a stream (``tar_stream``);
2. BigEarthNet patch folders stored as plain objects, ``<folder>/.../<patch>/<patch>_<BAND>.tif`` (``patch_folders``);
3. Sentinel-2 L2A SAFE products, ``<name>.SAFE/GRANULE/*/IMG_DATA/R10m|R20m/*_<BAND>_<res>.jp2``, cut into
   120 x 120 tiles (``safe_products``).

Typical use::

    client = make_s3_client(access)
    plan = plan_input(client, access.bucket_name, step.S3_bucket_desc.folder, limits)  # InputError if empty
    for item in iter_plan(client, access.bucket_name, plan, limits):
        if isinstance(item, PatchRejection): ...   # one bad patch: report it, go on
        else: ...                                    # InputPatch: batch it

Sources are read in S3 key order, so patch ids and their order are deterministic. Patch ids are relative to the
step's folder for patch folders, relative to the archive for archive members (unique together with ``source``),
and ``<product>_<i>_<j>`` for SAFE tiles. A patch with a missing band is yielded with what it has: the stacking
step, which knows which bands the model needs, rejects it if they are not all there.
"""

from __future__ import annotations

import itertools
from typing import Iterator

from services.wrapper.inputs.patch_folders import read_patch_folders
from services.wrapper.inputs.s3_listing import (
    InputPlan,
    InputSource,
    PatchFolderSource,
    S3Client,
    SafeGranuleSource,
    TarArchiveSource,
    make_s3_client,
    plan_input,
)
from services.wrapper.inputs.safe_products import read_safe_granule, tile_safe_bands
from services.wrapper.inputs.settings import InputLimits, S3Access
from services.wrapper.inputs.tar_stream import read_tar_archive, read_tar_stream
from services.wrapper.inputs.types import InputError, InputItem, InputPatch, PatchRejection


def iter_plan(client: S3Client, bucket: str, plan: InputPlan, limits: InputLimits) -> Iterator[InputItem]:
    """Every patch and rejection of a planned input, source by source in plan order."""
    for source_type, group in itertools.groupby(plan.sources, key=type):
        if source_type is PatchFolderSource:
            # Consecutive patch folders share one fetch pipeline, so that GET latency overlaps across patches.
            yield from read_patch_folders(client, bucket, [s for s in group if isinstance(s, PatchFolderSource)], limits)
            continue
        for source in group:
            if isinstance(source, TarArchiveSource):
                yield from read_tar_archive(client, bucket, source, limits)
            elif isinstance(source, SafeGranuleSource):
                yield from read_safe_granule(client, bucket, source, limits)


def read_input(
    access: S3Access, folder: str, filename: str = "", limits: InputLimits | None = None
) -> Iterator[InputItem]:
    """List, plan and read a step's input (``S3_bucket_desc.folder`` / ``filename``) in one call."""
    limits = limits or InputLimits()
    client = make_s3_client(access)
    plan = plan_input(client, access.bucket_name, folder, limits, filename=filename)
    yield from iter_plan(client, access.bucket_name, plan, limits)


__all__ = [
    "InputError",
    "InputItem",
    "InputLimits",
    "InputPatch",
    "InputPlan",
    "InputSource",
    "PatchFolderSource",
    "PatchRejection",
    "S3Access",
    "SafeGranuleSource",
    "TarArchiveSource",
    "iter_plan",
    "make_s3_client",
    "plan_input",
    "read_input",
    "read_tar_stream",
    "tile_safe_bands",
]
