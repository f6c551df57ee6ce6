"""S3 access: the client, error translation, and the plan of an input (what is under a folder, in which layout)."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Union
from urllib.parse import urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from services.core.s3_endpoint_policy import EndpointRefused, S3EndpointPolicy, guarded_s3_client_hooks
from services.core.metrics import ErrorSource, Stage, count_error, timed_stage
from services.wrapper.inputs.band_files import parse_band_file_path
from services.wrapper.inputs.s3_pinning import pin_client_connections
from services.wrapper.inputs.settings import InputLimits, S3Access
from services.wrapper.inputs.types import InputError

# boto3 builds its clients' classes at run time; BaseClient is the static type they all share.
S3Client = BaseClient

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
# Bands read from a SAFE product, each at the resolution its folder holds it natively.
SAFE_BANDS_10M = ("B02", "B03", "B04", "B08")
SAFE_BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
_SAFE_BAND_KEY = re.compile(
    r"(?P<product_dir>(?:.*/)?(?P<product>[^/]+)\.SAFE)/GRANULE/(?P<granule>[^/]+)/IMG_DATA/"
    r"R(?P<res>10|20)m/[^/]+_(?P<band>B\d\d|B8A)_(?P=res)m\.jp2"
)
_CONNECTION_ERRORS = (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "503", "500"})
_ACCESS_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"})


def make_s3_client(access: S3Access, policy: S3EndpointPolicy | None = None) -> S3Client:
    """A boto3 S3 client with bounded retries and timeouts, path-style addressing for non-AWS endpoints.

    The endpoint (it comes from a workflow message) passes the S3 endpoint policy first (``EOML_S3_POLICY_*``,
    services/core/s3_endpoint_policy.py) and the client is pinned to it: to its host (no redirect) and to the
    addresses the policy approved (s3_pinning.py); a refusal is an ``InputError``."""
    policy = policy or S3EndpointPolicy.from_settings()
    try:
        checked = policy.check(access.endpoint_url) if access.endpoint_url else None
    except EndpointRefused as refused:
        raise InputError(str(refused)) from None
    config = Config(
        # botocore's "max_attempts" counts retries only; "total_max_attempts" counts every try, as ours does.
        retries={"total_max_attempts": access.max_attempts, "mode": "standard"},
        connect_timeout=access.connect_timeout_s,
        read_timeout=access.read_timeout_s,
        # MinIO, Ceph and most on-premise endpoints do not serve bucket-named hosts.
        s3={"addressing_style": "path"} if access.endpoint_url else {},
    )
    client = guarded_s3_client_hooks(boto3.client(
        "s3",
        endpoint_url=access.endpoint_url,
        region_name=access.region_name,
        aws_access_key_id=access.aws_access_key_id.get_secret_value(),
        aws_secret_access_key=access.aws_secret_access_key.get_secret_value(),
        config=config,
    ), checked)
    # Connections go to the addresses just checked, never to what DNS answers later.
    return pin_client_connections(client, checked, policy) if checked is not None else client


def s3_failure(error: Exception, action: str, client: S3Client, source: str = "") -> InputError:
    """Translate a boto3 failure into an ``InputError`` that says what went wrong, without credentials."""
    count_error(ErrorSource.S3)
    parts = urlsplit(client.meta.endpoint_url or "")
    endpoint = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # no path, no query
    if isinstance(error, _CONNECTION_ERRORS):
        attempts = client.meta.config.retries.get("total_max_attempts", "?")
        return InputError(
            f"S3 endpoint {endpoint} unreachable while {action} ({type(error).__name__} after {attempts} attempts)",
            source, transient=True,
        )
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", "unknown"))
        message = str(error.response.get("Error", {}).get("Message", ""))
        http_status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if http_status >= 500 or code in _TRANSIENT_CODES:
            return InputError(f"S3 error {code} while {action}: {message}", source, transient=True)
        if code == "NoSuchBucket":
            bucket = error.response.get("Error", {}).get("BucketName", "")
            return InputError(f"bucket {bucket!r} does not exist at {endpoint} while {action}", source)
        if code in _ACCESS_CODES:
            return InputError(f"S3 refused access while {action} ({code}): check the workflow's credentials", source)
        return InputError(f"S3 error {code} while {action}: {message}", source)
    if isinstance(error, BotoCoreError):
        # Streaming errors, incomplete reads, timeouts: the connection failed, not the request.
        return InputError(f"S3 client failure while {action}: {type(error).__name__}", source, transient=True)
    return InputError(f"S3 failure while {action}: {type(error).__name__}: {error}", source)


def folder_prefix(folder: str, filename: str = "") -> str:
    """The key prefix of a step's input: ``folder`` as a directory (``in`` never matches ``in2/``).

    A non-empty ``filename`` narrows the input to ``<folder>/<filename>`` (an archive, or a folder such as a SAFE
    product).
    """
    parts = [part.strip("/") for part in (folder, filename) if part.strip("/")]
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class S3ObjectRef:
    key: str
    size: int


@dataclass(frozen=True, slots=True)
class TarArchiveSource:
    """A tar.gz of BigEarthNet patch folders."""

    archive: S3ObjectRef

    @property
    def order_key(self) -> str:
        return self.archive.key


@dataclass(frozen=True, slots=True)
class PatchFolderSource:
    """One BigEarthNet patch folder stored as plain S3 objects."""

    patch_id: str  # the folder's path relative to the input folder
    prefix: str  # the folder's key prefix, ending with "/"
    band_objects: Mapping[str, S3ObjectRef]

    @property
    def order_key(self) -> str:
        return self.prefix


@dataclass(frozen=True, slots=True)
class SafeGranuleSource:
    """The needed band files of one granule of a Sentinel-2 L2A SAFE product."""

    tile_id_prefix: str  # tiles are "<tile_id_prefix>_<i>_<j>"
    product_dir: str  # key of the ".SAFE" folder
    granule: str
    band_objects: Mapping[str, S3ObjectRef]

    @property
    def order_key(self) -> str:
        return f"{self.product_dir}/GRANULE/{self.granule}/"

    @property
    def missing_bands(self) -> list[str]:
        return [band for band in SAFE_BANDS_10M + SAFE_BANDS_20M if band not in self.band_objects]


InputSource = Union[TarArchiveSource, PatchFolderSource, SafeGranuleSource]


@dataclass(frozen=True, slots=True)
class InputPlan:
    """Everything a step will read, in the order it will be read (S3 key order: deterministic)."""

    prefix: str
    sources: tuple[InputSource, ...]
    listed_objects: int
    ignored_objects: int


@timed_stage(Stage.DOWNLOAD)
def list_objects(
    client: S3Client, bucket: str, prefix: str, limits: InputLimits, page_size: int = 1000
) -> Iterator[S3ObjectRef]:
    """Every object under ``prefix`` (recursively), following pagination, in S3's key order."""
    paginator = client.get_paginator("list_objects_v2")
    count = 0
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}):
            for entry in page.get("Contents", []):
                key = entry["Key"]
                if key.endswith("/"):
                    continue  # folder markers written by consoles carry no data
                count += 1
                if count > limits.max_listed_objects:
                    raise InputError(
                        f"more than {limits.max_listed_objects} objects under {prefix!r} "
                        "(limit max_listed_objects)",
                        prefix,
                    )
                yield S3ObjectRef(key=key, size=int(entry.get("Size", 0)))
    except (BotoCoreError, ClientError) as error:
        raise s3_failure(error, f"listing {bucket}/{prefix}", client) from None


def plan_input(
    client: S3Client, bucket: str, folder: str, limits: InputLimits, filename: str = ""
) -> InputPlan:
    """List the input of a step and sort its objects into sources; an input with nothing readable is an error."""
    prefix = folder_prefix(folder, filename)
    # A folder is a directory: "in" must not match "in2/...". A named file is matched exactly or as a directory,
    # and patch ids stay relative to the folder the step names.
    if filename:
        objects = [
            obj for obj in list_objects(client, bucket, prefix, limits)
            if obj.key == prefix or obj.key.startswith(prefix + "/")
        ]
        folder_only = folder_prefix(folder)
        directory = folder_only + "/" if folder_only else ""
    else:
        directory = prefix + "/" if prefix else ""
        objects = list(list_objects(client, bucket, directory, limits))
    plan = plan_from_objects(directory, objects)
    if not plan.sources:
        shown = folder if not filename else f"{folder}/{filename}"
        if plan.listed_objects == 0:
            raise InputError(f"no input found under {shown!r} in bucket {bucket!r}", prefix)
        raise InputError(
            f"no input found under {shown!r} in bucket {bucket!r}: {plan.listed_objects} objects, none is a "
            f".tar.gz archive, a BigEarthNet band file (<patch>/<patch>_<BAND>.tif) or a SAFE band "
            f"(<name>.SAFE/GRANULE/*/IMG_DATA/R10m|R20m/*_<BAND>_<res>.jp2); first: {objects[0].key!r}",
            prefix,
        )
    log.info(
        "input planned",
        extra={
            "bucket": bucket,
            "prefix": prefix,
            "sources": len(plan.sources),
            "listed_objects": plan.listed_objects,
            "ignored_objects": plan.ignored_objects,
        },
    )
    return plan


def plan_from_objects(directory: str, objects: Iterable[S3ObjectRef]) -> InputPlan:
    """Sort listed objects into sources: archives, patch folders, SAFE granules; everything else is ignored.

    ``directory`` is the input folder's prefix (ending with "/", or empty for the bucket root); patch ids are
    relative to it.
    """
    archives: list[InputSource] = []
    patch_bands: dict[str, dict[str, S3ObjectRef]] = defaultdict(dict)
    patch_names: dict[str, str] = {}
    granule_bands: dict[tuple[str, str, str], dict[str, S3ObjectRef]] = defaultdict(dict)
    listed = ignored = 0
    for obj in objects:
        listed += 1
        if obj.key.lower().endswith(ARCHIVE_SUFFIXES):
            archives.append(TarArchiveSource(archive=obj))
            continue
        safe_match = _SAFE_BAND_KEY.fullmatch(obj.key)
        if safe_match is not None:
            band, resolution = safe_match.group("band"), safe_match.group("res")
            native = SAFE_BANDS_10M if resolution == "10" else SAFE_BANDS_20M
            if band in native:
                product_key = (safe_match.group("product_dir"), safe_match.group("product"), safe_match.group("granule"))
                granule_bands[product_key][band] = obj
                continue
            ignored += 1
            continue
        band_file = parse_band_file_path(obj.key)
        if band_file is not None:
            patch_bands[band_file.patch_dir][band_file.band] = obj
            patch_names[band_file.patch_dir] = band_file.patch_name
            continue
        ignored += 1

    sources: list[InputSource] = list(archives)
    for patch_dir, bands in patch_bands.items():
        relative = patch_dir[len(directory):] if patch_dir.startswith(directory) else ""
        sources.append(
            PatchFolderSource(patch_id=relative or patch_names[patch_dir], prefix=patch_dir + "/", band_objects=bands)
        )
    granules_per_product: dict[str, int] = defaultdict(int)
    for product_dir, _, _ in granule_bands:
        granules_per_product[product_dir] += 1
    for (product_dir, product, granule), bands in granule_bands.items():
        # Current products hold one granule; the pre-2017 multi-granule format needs the granule in the id.
        tile_id_prefix = product if granules_per_product[product_dir] == 1 else f"{product}_{granule}"
        sources.append(
            SafeGranuleSource(tile_id_prefix=tile_id_prefix, product_dir=product_dir, granule=granule, band_objects=bands)
        )
    sources.sort(key=lambda source: source.order_key)
    return InputPlan(prefix=directory, sources=tuple(sources), listed_objects=listed, ignored_objects=ignored)
