"""Settings of one Wrapper deployment: ``EOML_WRAPPER_*`` environment variables (CLI flags mirror them).

One deployment runs one task. Everything a workflow step brings (bucket, endpoint, credentials, topics, component
name) comes from the step's stored configuration, not from here; ``bootstrap_servers`` may override the step's
Kafka address (e.g. when the Wrapper reaches Kafka through another listener than the controller).
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.core.settings import ENV_PREFIX, ServiceSettings
from services.core.transform_codes import QUANTISER_SCALES

TaskName = Literal[
    "ssl-features", "classify", "classify-19", "compress", "decompress", "uc5-cfactor", "uc6-locust", "generic"
]
TASK_NAMES: tuple[str, ...] = TaskName.__args__  # type: ignore[attr-defined]

_SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
GIB = 1024**3


def _default_namespace() -> str:
    """The pod's namespace when running in Kubernetes (service-account mount), else ``default``."""
    try:
        with open(_SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


class WrapperSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}WRAPPER_", extra="ignore")

    task: TaskName
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)

    # The inference server (Triton-compatible): gRPC "host:port" by default, HTTP "host:port" with protocol http.
    inference_url: str = "127.0.0.1:8001"
    inference_protocol: Literal["grpc", "http"] = "grpc"
    # "" = the task's model (see services.wrapper.tasks); task ``generic`` serves any model whose card says
    # ``task: generic`` (default: s2-cloud-mask), its results under ``result-<model name>``.
    model_name: str = ""
    model_version: str = ""  # "" = the newest ready version, resolved per step
    batch_size: int = Field(0, ge=0)  # 0 = the model's max_batch_size; larger values are clamped to it
    # 3, not 2: with one batch computing and one queued, a third covers the Wrapper's own read/decode gaps
    # (bench/wrapper_bench.py: server busy 88.9% with 2, 91.5% with 3, ssl-features, 512 patches, 2 cores).
    requests_in_flight: int = Field(3, ge=1, le=64)
    infer_timeout_s: float = Field(300.0, gt=0)  # one request, client side
    # Retries on UNAVAILABLE with exponential backoff, bounded in time only (no attempt count): an inference outage
    # shorter than this is waited out; past it the delivery is answered 503 and Kafka redelivers it.
    infer_retry_max_s: float = Field(900.0, ge=0)
    infer_backoff_initial_s: float = Field(0.5, gt=0)
    infer_backoff_max_s: float = Field(15.0, gt=0)

    # Step configuration store: a directory (local) or ConfigMap + Secret per step (kubernetes).
    store: Literal["local", "kubernetes"] = "local"
    store_root: str = "step-configs"
    namespace: str = Field(default_factory=lambda: os.environ.get("POD_NAMESPACE") or _default_namespace())
    pod_name: str = Field(default_factory=lambda: os.environ.get("POD_NAME") or socket.gethostname())

    # Kafka
    bootstrap_servers: str = ""  # "" = the step configuration's
    notify_topic: str = "monitoring.notify"
    dlq_topic: str = ""  # "" = "<Topics.in>.dlq"
    kafka_timeout_s: float = Field(30.0, gt=0)

    # Steps run at once for callers (Knative ``containerConcurrency`` must equal it; services/wrapper/admission.py).
    # A delivery that finds them all taken waits up to WORKER_WAIT_S for one (the revision's timeoutSeconds:
    # queue-proxy has answered 504 by then), then 503 + Retry-After. Kafka holds what waits beyond that.
    workers: int = Field(2, ge=1, le=64)
    worker_wait_s: float = Field(300.0, ge=0)
    # Runs whose caller hung up (queue-proxy's 504) go on to their durable end outside ``workers``; at most this
    # many at once (None = ``workers``), so threads, memory and scratch space stay bounded.
    max_orphaned_runs: int | None = Field(None, ge=0, le=64)
    # SIGTERM: running steps get this long; then they are cut off (ProcessStopping: RETRY, never a failure) and
    # the process exits. Kubernetes counts the grace period (= the revision's timeoutSeconds) from before
    # queue-proxy's 30 s drain, so the chart sets timeoutSeconds - drain - a margin.
    shutdown_timeout_s: float = Field(120.0, ge=0)
    # A delivery that lost the create-only manifest write to another run of the same event waits this long for
    # that run's announced marker (then 200), else answers 503.
    announce_wait_s: float = Field(60.0, ge=0)
    # Where a unit's results are spooled before upload ("" = the system temp dir; an emptyDir on Kubernetes).
    spool_dir: str = ""

    # Results
    result_prefix: str = ""  # "" = the task's production prefix (result-image2feature, ...)
    classify_threshold: float = Field(0.5, ge=0.0, le=1.0)
    # The compress step's operating point when its message's ``meta_information.compression`` does not give one
    # (services/wrapper/compression_request.py): levels kept and, for compressors with an entropy prior, the
    # quantiser scale (one of QUANTISER_SCALES; 1 keeps the served codes exactly).
    compress_levels: int = Field(8, ge=1, le=8)
    compress_quantiser_scale: int = 8
    # A unit with more patches gets several codes files, <unit>.part-0001.codes ... (the format's limit is 8192).
    codes_patches_per_file: int = Field(8192, ge=1, le=8192)
    progress_interval_s: float = Field(5.0, ge=0)
    max_rejections_listed: int = Field(1000, ge=0)  # in the manifest; the count is always complete
    # PNG quicklooks next to the results of Sentinel-2 steps (listed in the manifest like every result):
    # ``auto``: per-pixel generic models write one per patch (true colour with the class overlay, or true colour);
    # task-specific tasks write none, so their production results stay as they are; ``always``: every Sentinel-2
    # step writes a true-colour one per patch as well; ``never``: none.
    quicklooks: Literal["auto", "always", "never"] = "auto"
    quicklook_max_side: int = Field(512, ge=16, le=4096)
    # The served model a workflow's ``meta_information.cloud_filter`` measures cloud fractions with.
    cloud_mask_model: str = "s2-cloud-mask"

    # S3 (bounded retries and timeouts; the endpoint and credentials come from the step configuration)
    s3_max_attempts: int = Field(3, ge=1, le=10)
    s3_connect_timeout_s: float = Field(5.0, gt=0)
    s3_read_timeout_s: float = Field(60.0, gt=0)
    # Non-image inputs read whole (feature files, codes files, UC6 stacks).
    max_file_bytes: int = Field(1 * GIB, ge=1)

    @property
    def orphaned_runs_cap(self) -> int:
        return self.workers if self.max_orphaned_runs is None else self.max_orphaned_runs

    @field_validator("compress_quantiser_scale")
    @classmethod
    def _on_the_ladder(cls, value: int) -> int:
        if value not in QUANTISER_SCALES:
            raise ValueError(f"must be one of {list(QUANTISER_SCALES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "WrapperSettings":
        if self.infer_backoff_max_s < self.infer_backoff_initial_s:
            raise ValueError("infer_backoff_max_s must be >= infer_backoff_initial_s")
        if not self.inference_url.strip():
            raise ValueError("inference_url must be host:port")
        return self
