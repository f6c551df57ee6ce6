"""Where the input lives (S3 access) and how much of it the Wrapper is willing to read (limits)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.contracts import S3Bucket
from services.core.settings import ENV_PREFIX

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class S3Access(BaseSettings):
    """Endpoint, region and credentials of the workflow bucket (env ``EOML_S3_*``, or built from the contract).

    Credentials are ``SecretStr``: no repr, log line or error message shows them.
    """

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}S3_", extra="ignore")

    bucket_name: str = Field(min_length=1)
    aws_access_key_id: SecretStr
    aws_secret_access_key: SecretStr
    region_name: str = "us-east-1"
    endpoint_url: str | None = None
    # Bounded retries and timeouts: an unreachable S3 must end in a clear error, never a hang (reference defect 3).
    max_attempts: int = Field(default=3, ge=1, le=10)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)

    @classmethod
    def from_contract(cls, bucket: S3Bucket, **overrides: object) -> "S3Access":
        """The access described by a workflow message's ``S3_bucket``; ``overrides`` set retry/timeout fields."""
        return cls(
            bucket_name=bucket.bucket_name,
            aws_access_key_id=bucket.aws_access_key_id,
            aws_secret_access_key=bucket.aws_secret_access_key,
            region_name=bucket.region_name,
            endpoint_url=bucket.endpoint_url,
            **overrides,
        )


class InputLimits(BaseSettings):
    """Bounds on what one input may make the Wrapper read or hold (env ``EOML_INPUT_*``).

    The defaults fit BigEarthNet components (a band file is at most ~30 KiB, a patch ~200 KiB) and full Sentinel-2
    L2A tiles (the ten needed JP2 bands of one granule are ~0.5-1 GiB), with room to spare.
    """

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}INPUT_", extra="ignore")

    # Listing: every key is held while the input is planned.
    max_listed_objects: int = Field(default=500_000, ge=1)
    # One band file (tar member or S3 object) of a patch.
    max_band_file_bytes: int = Field(default=64 * MIB, ge=1)
    # One tar.gz archive, counted on the decompressed stream, tar headers included.
    max_archive_uncompressed_bytes: int = Field(default=8 * GIB, ge=1)
    max_archive_members: int = Field(default=2_000_000, ge=1)
    # Extended headers (pax records, GNU long names) before one member: tarfile holds them in memory whole.
    max_tar_header_bytes: int = Field(default=1 * MIB, ge=4 * KIB)
    # Patches whose members are still arriving; past either bound the oldest is emitted with what it has.
    max_pending_patches: int = Field(default=64, ge=1)
    max_pending_bytes: int = Field(default=64 * MIB, ge=1)
    # Patch folders straight in S3: band GETs in flight (threads) and patches read ahead of the consumer.
    fetch_concurrency: int = Field(default=8, ge=1, le=64)
    # SAFE products: the needed bands of one granule are downloaded (JP2 needs random access) and read in strips.
    max_safe_granule_bytes: int = Field(default=4 * GIB, ge=1)
    safe_tile_rows_per_read: int = Field(default=4, ge=1)
    scratch_dir: str | None = None  # where SAFE bands are downloaded; None: the system temp dir
