"""Sync the Triton model repository to S3, where KServe's ``storageUri`` points (``make upload-models``).

    python deploy/upload_models.py --bucket eo-models [--prefix model_repository] [--endpoint-url URL]
                                   [--region us-east-1] [--repository model_repository] [--delete] [--dry-run]

Refuses, before any upload, a repository whose models are not built: every model directory needs a numeric version
directory holding its model file (``model.onnx`` unless config.pbtxt names another), as the server would load it.
Uploads every file of the repository (configs, label files, model cards, model files and their external data)
except hidden files and caches; unchanged objects (same size and MD5) are skipped, so a second run uploads nothing.
``--delete`` removes objects under the prefix that no longer exist locally.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role);
they are never printed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from services.core.logging import configure_logging  # noqa: E402
from services.inference.model_config import ModelConfigError  # noqa: E402
from services.inference.repository import ModelRepository, RepositoryError, version_directories  # noqa: E402

log = logging.getLogger("deploy.upload_models")

# One PUT per file keeps the S3 ETag equal to the MD5 (multipart ETags are not), which is how unchanged files are
# recognised; S3 accepts single PUTs up to 5 GiB.
SINGLE_PUT_LIMIT = 5 * 1024**3 - 1
_IGNORED_DIRECTORIES = {"__pycache__"}


class RepositoryNotBuilt(Exception):
    """The repository lacks model files: nothing is uploaded."""


@dataclass(frozen=True)
class LocalFile:
    path: Path
    key: str
    size: int
    md5: str


@dataclass
class SyncReport:
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def check_built(repository: Path) -> list[str]:
    """The model names of a repository whose every model has its model files; raises RepositoryNotBuilt otherwise."""
    try:
        models = ModelRepository([repository]).scan()
    except RepositoryError as error:
        raise RepositoryNotBuilt(str(error)) from None
    if not models:
        raise RepositoryNotBuilt(f"{repository} holds no model directories")
    problems: list[str] = []
    for name, directory in sorted(models.items()):
        if not version_directories(directory):
            problems.append(f"{name}: no version directory with a model file")
            continue
        try:
            ModelRepository([repository]).read_definition(name)
        except ModelConfigError as error:
            problems.append(f"{name}: {error}")
    if problems:
        raise RepositoryNotBuilt("models are not built (run 'make models'):\n  " + "\n  ".join(problems))
    return sorted(models)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def local_files(repository: Path, prefix: str) -> list[LocalFile]:
    """Every file to upload, with its object key under ``prefix``."""
    files: list[LocalFile] = []
    for path in sorted(repository.rglob("*")):
        relative = path.relative_to(repository)
        if not path.is_file() or any(part.startswith(".") or part in _IGNORED_DIRECTORIES for part in relative.parts):
            continue
        size = path.stat().st_size
        if size > SINGLE_PUT_LIMIT:
            raise ValueError(f"{relative} is larger than one S3 PUT allows (5 GiB)")
        key = "/".join(part for part in (prefix.strip("/"), relative.as_posix()) if part)
        files.append(LocalFile(path, key, size, _md5(path)))
    return files


def remote_objects(s3: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    paginator = s3.get_paginator("list_objects_v2")
    listing_prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    for page in paginator.paginate(Bucket=bucket, Prefix=listing_prefix):
        yield from page.get("Contents", [])


def sync(s3: Any, repository: Path, bucket: str, prefix: str, *, delete: bool = False,
         dry_run: bool = False) -> SyncReport:
    """Upload what differs, optionally delete what is gone; checks the repository is built first."""
    check_built(repository)
    files = local_files(repository, prefix)
    remote = {obj["Key"]: obj for obj in remote_objects(s3, bucket, prefix)}
    report = SyncReport()
    for file in files:
        existing = remote.get(file.key)
        if existing and existing.get("Size") == file.size and existing.get("ETag", "").strip('"') == file.md5:
            report.unchanged.append(file.key)
            continue
        if not dry_run:
            with open(file.path, "rb") as body:
                s3.put_object(Bucket=bucket, Key=file.key, Body=body, ContentLength=file.size)
        report.uploaded.append(file.key)
        log.info("uploaded" if not dry_run else "would upload", extra={"key": file.key, "bytes": file.size})
    if delete:
        wanted = {file.key for file in files}
        for key in sorted(set(remote) - wanted):
            if not dry_run:
                s3.delete_object(Bucket=bucket, Key=key)
            report.deleted.append(key)
            log.info("deleted" if not dry_run else "would delete", extra={"key": key})
    return report


def s3_client(endpoint_url: str | None, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sync the Triton model repository to S3 (KServe storageUri).")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="model_repository", help="key prefix (the storageUri path)")
    parser.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS)")
    parser.add_argument("--region", default="", help="S3 region")
    parser.add_argument("--delete", action="store_true", help="delete objects under the prefix that are gone")
    parser.add_argument("--dry-run", action="store_true", help="list what would change, change nothing")
    parser.add_argument("--log-format", choices=["json", "text"], default="text")
    args = parser.parse_args(argv)
    configure_logging("INFO", args.log_format)
    if not args.bucket.strip():
        parser.exit(2, "upload_models: --bucket is empty (make upload-models S3_BUCKET=...)\n")
    try:
        report = sync(s3_client(args.endpoint_url, args.region), args.repository, args.bucket, args.prefix,
                      delete=args.delete, dry_run=args.dry_run)
    except RepositoryNotBuilt as error:
        print(f"upload_models: refusing to upload: {error}", file=sys.stderr)
        return 1
    storage_uri = f"s3://{args.bucket}/{args.prefix.strip('/')}".rstrip("/")
    print(f"upload_models: {len(report.uploaded)} uploaded, {len(report.unchanged)} unchanged, "
          f"{len(report.deleted)} deleted{' (dry run)' if args.dry_run else ''}; storageUri: {storage_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
