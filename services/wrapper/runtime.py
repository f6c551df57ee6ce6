"""What every step run of one Wrapper process shares: ``StepRuntime`` (settings, task handler, model client, Kafka
publisher, inference threads), and how a step reaches its bucket (``step_s3_access``)."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from services.core.metrics import WrapperMetrics
from services.core.step_config import StepConfig, StepCredentials
from services.wrapper.handlers import TaskHandler, handler_for
from services.wrapper.inference_client import ModelClient, ModelMismatch, RetryPolicy, ServedModel
from services.wrapper.inputs import InputLimits, S3Access
from services.wrapper.notifications import EventPublisher, KafkaPublisher, StepNotifier
from services.wrapper.outputs.keys import sanitise_name
from services.wrapper.s3_capability import ConditionalCreateCheck
from services.wrapper.settings import WrapperSettings
from services.wrapper.stopping import StoppableExecutor
from services.wrapper.tasks import GENERIC_RESULT_PREFIX, GENERIC_TASK, TaskSpec, task_spec


@dataclass
class StepRuntime:
    """What every step of one Wrapper process shares: settings, the task, the model client, the Kafka producers."""

    settings: WrapperSettings
    spec: TaskSpec
    handler: TaskHandler
    model_client: ModelClient
    publisher: EventPublisher
    limits: InputLimits
    # Inference requests of every step run here: long-lived threads keep their tritonclient clients (and
    # connections) from one step to the next. Stopped at shutdown: a step asking for more then gets ProcessStopping.
    inference_pool: ThreadPoolExecutor = field(default_factory=lambda: StoppableExecutor(thread_name_prefix="infer"))
    metrics: WrapperMetrics = field(default_factory=WrapperMetrics)  # this process's series (services/core/metrics.py)

    @classmethod
    def from_settings(cls, settings: WrapperSettings, publisher: EventPublisher | None = None) -> "StepRuntime":
        spec = task_spec(settings.task)
        client = ModelClient(
            settings.inference_url,
            settings.inference_protocol,
            settings.model_name or spec.default_model,
            settings.model_version,
            retry=RetryPolicy(
                # Bounded in time only: an outage of up to INFER_RETRY_MAX_S is waited out, whatever the count.
                max_attempts=1_000_000,
                max_total_s=settings.infer_retry_max_s,
                initial_backoff_s=settings.infer_backoff_initial_s,
                max_backoff_s=settings.infer_backoff_max_s,
            ),
            request_timeout_s=settings.infer_timeout_s,
        )
        return cls(
            settings=settings,
            spec=spec,
            handler=handler_for(spec),
            model_client=client,
            publisher=publisher or KafkaPublisher(settings.kafka_timeout_s),
            limits=InputLimits(),
            inference_pool=StoppableExecutor(
                max_workers=settings.requests_in_flight * settings.workers, thread_name_prefix="infer"
            ),
        )

    # The served s2-cloud-mask model for workflows that ask for a cloud filter (made on first use).
    cloud_mask_client: ModelClient | None = None
    _cloud_mask_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The (endpoint, bucket) pairs found to honour conditional create (checked on first use, see s3_capability).
    conditional_create: ConditionalCreateCheck = field(default_factory=ConditionalCreateCheck)

    def outputs_profile(self) -> dict[str, Any]:
        """The deployment settings that decide which objects a run writes and their bytes, with their hash: a run's
        attempt id carries it and its manifest lists it, so runs under other settings never share a folder."""
        settings = self.settings
        profile: dict[str, Any] = {
            "task": self.spec.name, "result_prefix": self.result_prefix,
            "model_name": self.model_client.model_name, "model_version": settings.model_version,
            "codes_patches_per_file": settings.codes_patches_per_file, "quicklooks": settings.quicklooks,
            "quicklook_max_side": settings.quicklook_max_side, "classify_threshold": settings.classify_threshold,
            "compress_levels": settings.compress_levels,
            "compress_quantiser_scale": settings.compress_quantiser_scale,
            "cloud_mask_model": settings.cloud_mask_model,
        }
        text = json.dumps(profile, sort_keys=True).encode("utf-8")
        return {**profile, "sha256": hashlib.sha256(text).hexdigest()}

    @property
    def result_prefix(self) -> str:
        if self.settings.result_prefix:
            return self.settings.result_prefix
        if self.spec.name == GENERIC_TASK:
            return f"{GENERIC_RESULT_PREFIX}{sanitise_name(self.model_client.model_name)}"
        return self.spec.result_prefix

    def cloud_mask(self) -> ModelClient:
        with self._cloud_mask_lock:  # two first cloud-filter steps at once must not each make (and leak) a client
            if self.cloud_mask_client is None:
                self.cloud_mask_client = ModelClient(
                    self.settings.inference_url, self.settings.inference_protocol, self.settings.cloud_mask_model, "",
                    retry=self.model_client.retry, request_timeout_s=self.settings.infer_timeout_s,
                )
            return self.cloud_mask_client

    def batch_size(self, served: ServedModel) -> int:
        if served.max_batch_size < 1:
            raise ModelMismatch(f"model {served.name!r} has max_batch_size {served.max_batch_size}: it does not batch")
        wanted = self.settings.batch_size or served.max_batch_size
        return min(wanted, served.max_batch_size)

    def bootstrap_servers(self, config: StepConfig) -> str:
        return self.settings.bootstrap_servers or config.bootstrap_servers

    def dead_letter_topic(self, config: StepConfig) -> str:
        return self.settings.dlq_topic or f"{config.topic_in}.dlq"

    def notifier(self, config: StepConfig, secrets: tuple[str, ...]) -> StepNotifier:
        return StepNotifier(
            publisher=self.publisher,
            bootstrap_servers=self.bootstrap_servers(config),
            topic=self.settings.notify_topic,
            component_name=config.component_name or config.service_name,
            workflow_name=config.workflow_name,
            namespace=config.namespace,
            pod=self.settings.pod_name,
            secrets=secrets,
        )

    def close(self) -> None:
        self.inference_pool.shutdown(wait=True)
        self.model_client.close()
        if self.cloud_mask_client is not None:
            self.cloud_mask_client.close()
        close = getattr(self.publisher, "close", None)
        if close is not None:
            close()


def secret_values(credentials: StepCredentials) -> tuple[str, ...]:
    return tuple(sorted(credentials.secret_values()))


def step_s3_access(runtime: StepRuntime, config: StepConfig, credentials: StepCredentials) -> S3Access:
    settings = runtime.settings
    return S3Access(
        bucket_name=config.bucket,
        aws_access_key_id=credentials.aws_access_key_id,
        aws_secret_access_key=credentials.aws_secret_access_key,
        region_name=config.region_name,
        endpoint_url=config.endpoint_url,
        max_attempts=settings.s3_max_attempts,
        connect_timeout_s=settings.s3_connect_timeout_s,
        read_timeout_s=settings.s3_read_timeout_s,
    )
