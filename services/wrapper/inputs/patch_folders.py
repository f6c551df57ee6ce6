"""BigEarthNet patch folders stored as plain S3 objects: ``<folder>/.../<patch>/<patch>_<BAND>.tif``.

Band objects are small and many (12 per patch), so GET latency dominates: a few threads fetch patches ahead of
the consumer, and patches still come out in plan order.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

from botocore.exceptions import BotoCoreError, ClientError

from services.wrapper.inputs.band_files import assemble_patch, band_file_size_fault
from services.wrapper.inputs.s3_listing import PatchFolderSource, S3Client, s3_failure
from services.wrapper.inputs.settings import InputLimits
from services.wrapper.inputs.types import InputItem, PatchRejection

_MISSING_CODES = frozenset({"NoSuchKey", "404"})


def fetch_patch_bands(
    client: S3Client, bucket: str, source: PatchFolderSource, limits: InputLimits
) -> dict[str, bytes] | str:
    """The band files of one patch folder, or the reason the patch is rejected. S3 outages raise ``InputError``."""
    band_files: dict[str, bytes] = {}
    for band, obj in sorted(source.band_objects.items()):
        fault = band_file_size_fault(band, obj.size, limits.max_band_file_bytes)
        if fault is not None:
            return fault
        try:
            response = client.get_object(Bucket=bucket, Key=obj.key)
            with response["Body"] as body:
                # The listing's size is a claim; read no more than the limit allows whatever the object became.
                data = body.read(limits.max_band_file_bytes + 1)
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in _MISSING_CODES:
                return f"band {band} object {obj.key!r} disappeared after the input was listed"
            raise s3_failure(error, f"reading {obj.key}", client, obj.key) from None
        except BotoCoreError as error:
            raise s3_failure(error, f"reading {obj.key}", client, obj.key) from None
        fault = band_file_size_fault(band, len(data), limits.max_band_file_bytes)
        if fault is not None:
            return fault
        band_files[band] = data
    return band_files


def read_patch_folders(
    client: S3Client, bucket: str, sources: Sequence[PatchFolderSource], limits: InputLimits
) -> Iterator[InputItem]:
    """Patches (or rejections) of ``sources``, in order, fetched ``limits.fetch_concurrency`` patches at a time."""
    read_ahead = 2 * limits.fetch_concurrency
    in_flight: deque[tuple[PatchFolderSource, Future[dict[str, bytes] | str]]] = deque()
    pool = ThreadPoolExecutor(max_workers=limits.fetch_concurrency, thread_name_prefix="patch-fetch")
    try:
        for source in sources:
            in_flight.append((source, pool.submit(fetch_patch_bands, client, bucket, source, limits)))
            if len(in_flight) >= read_ahead:
                yield _finish(*in_flight.popleft())
        while in_flight:
            yield _finish(*in_flight.popleft())
    finally:
        # A consumer that stops early (or an error) must not leave GETs running for nobody.
        pool.shutdown(wait=True, cancel_futures=True)


def _finish(source: PatchFolderSource, fetched: Future[dict[str, bytes] | str]) -> InputItem:
    band_files = fetched.result()
    if isinstance(band_files, str):
        return PatchRejection(source.patch_id, source.prefix, band_files)
    return assemble_patch(source.patch_id, source.prefix, band_files)
