"""One workflow step, end to end, as a plain function: ``run_step(runtime, request, config, credentials)``.

1. START notification; resolve the model (card, version, batch size) and check it fits the task;
2. list the input (``InputError`` when there is none) and stream it unit by unit through preprocessing and
   batched inference; rejected patches are reported (log + WARNING) and the rest goes on;
3. write each unit's results as soon as its last item is back, then remove stale objects, then the manifest;
4. publish the next step message (``folder`` = the output folder, ``meta_information`` unchanged) to
   ``Topics.out``, then SUCCESS.

Any failure ends in a CRITICAL notification and a dead-letter record (reason, original message, config name;
never credentials), with this run's partial results removed and nothing announced. ``run_step`` never raises for
a step failure: it returns a ``StepOutcome`` saying what happened.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from services.core.contracts import S3BucketDesc, StepMessage
from services.core.step_config import StepConfig, StepCredentials
from services.wrapper.batching import Work, batched_inference
from services.wrapper.handlers import (
    InputUnit,
    Rejection,
    StepContext,
    TaskHandler,
    bits_per_pixel,
    handler_for,
)
from services.wrapper.inference_client import (
    InferenceError,
    InferenceUnavailable,
    ModelClient,
    ModelMismatch,
    RetryPolicy,
    ServedModel,
)
from services.wrapper.inputs import InputLimits, S3Access, make_s3_client
from services.wrapper.inputs.types import InputError
from services.wrapper.notifications import (
    EventPublisher,
    KafkaPublisher,
    ProgressReporter,
    StepNotifier,
    dead_letter_record,
    scrub,
)
from services.wrapper.outputs import OutputFormatError
from services.wrapper.results import ResultStore, ResultWriteError, WrittenObject, build_manifest, output_folder
from services.wrapper.settings import WrapperSettings
from services.wrapper.tasks import TaskSpec, task_spec

log = logging.getLogger(__name__)

StepStatus = Literal["SUCCESS", "CRITICAL", "IGNORED"]


class NoUsableInput(Exception):
    """Every patch or file of the input was rejected."""


class PublishError(Exception):
    """The next step message could not be delivered."""


@dataclass(frozen=True, slots=True)
class StepRequest:
    """A step message as delivered, with what the delivery says about it."""

    config_name: str
    message: StepMessage
    raw_message: Any  # the body as received (parsed JSON), for the dead-letter record
    event_id: str = ""
    # The event's time (CloudEvent ``time``; a KafkaSource sets the record's timestamp): stamps time-tagged outputs,
    # so that a redelivery writes identical bytes.
    event_time: datetime | None = None
    # 1 for a delivery; more when the acceptance journal resumes a step whose Wrapper died while running it.
    attempt: int = 1


@dataclass
class StepOutcome:
    status: StepStatus
    reason: str = ""
    output_folder: str | None = None
    patches: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    objects: list[WrittenObject] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    next_message: dict[str, Any] | None = None
    dead_letter: dict[str, Any] | None = None
    # Whether the failure is on record (dead-letter topic): until it is, the acceptance journal keeps the step.
    dead_letter_delivered: bool = False
    model_version: str = ""


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
    # connections) from one step to the next.
    inference_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(thread_name_prefix="infer"))

    @classmethod
    def from_settings(cls, settings: WrapperSettings, publisher: EventPublisher | None = None) -> "StepRuntime":
        spec = task_spec(settings.task)
        client = ModelClient(
            settings.inference_url,
            settings.inference_protocol,
            settings.model_name or spec.default_model,
            settings.model_version,
            retry=RetryPolicy(
                max_attempts=settings.infer_max_attempts,
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
            inference_pool=ThreadPoolExecutor(
                max_workers=settings.requests_in_flight * settings.workers, thread_name_prefix="infer"
            ),
        )

    @property
    def result_prefix(self) -> str:
        return self.settings.result_prefix or self.spec.result_prefix

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
        close = getattr(self.publisher, "close", None)
        if close is not None:
            close()


def secret_values(credentials: StepCredentials) -> tuple[str, ...]:
    return (credentials.aws_access_key_id.get_secret_value(), credentials.aws_secret_access_key.get_secret_value())


def failure_reason(error: BaseException) -> str:
    """A sentence for people (CRITICAL description, dead-letter record) saying why the step failed."""
    if isinstance(error, InputError):
        return f"Input error: {error}"
    if isinstance(error, InferenceUnavailable):
        return f"Inference server unavailable: {error}"
    if isinstance(error, ModelMismatch):
        return f"Model does not fit the task: {error}"
    if isinstance(error, InferenceError):
        return f"Inference failed: {error}"
    if isinstance(error, ResultWriteError):
        return f"Writing results failed: {error}"
    if isinstance(error, OutputFormatError):
        return f"Results could not be encoded: {error}"
    if isinstance(error, (NoUsableInput, PublishError)):
        return str(error)
    return f"Internal error: {type(error).__name__}: {error}"


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


def _rejection_text(rejection: Rejection) -> str:
    return f"Rejected {rejection.patch_id} of {rejection.source}: {rejection.reason}"


def run_step(
    runtime: StepRuntime, request: StepRequest, config: StepConfig, credentials: StepCredentials
) -> StepOutcome:
    """Process one step message completely; see the module docstring. Never raises for a step failure."""
    settings = runtime.settings
    message = request.message
    log_fields = {"config_name": request.config_name, "event_id": request.event_id, "task": runtime.spec.name,
                  "workflow": config.workflow_name}
    if not message.previous_component_end:
        log.info("step message does not mark the previous component's end: nothing to do", extra=log_fields)
        return StepOutcome(status="IGNORED", reason="previous_component_end is not True")

    secrets = secret_values(credentials)
    notifier = runtime.notifier(config, secrets)
    folder, filename = message.S3_bucket_desc.folder, message.S3_bucket_desc.filename
    shown_input = "/".join(part for part in (folder.strip("/"), filename.strip("/")) if part) or "(bucket root)"
    resumed = f", attempt {request.attempt}: resumed after its Wrapper stopped" if request.attempt > 1 else ""
    notifier.send("START", f"{runtime.spec.name} started on {shown_input} (step {request.config_name}{resumed})")
    log.info("step started", extra={**log_fields, "folder": folder, "input_filename": filename,
                                    "attempt": request.attempt})
    started = time.monotonic()
    outcome = StepOutcome(status="CRITICAL")
    store: ResultStore | None = None
    manifest_written = False
    try:
        served = runtime.model_client.resolve()
        runtime.handler.check_model(served)
        outcome.model_version = served.version
        batch_size = runtime.batch_size(served)
        client = make_s3_client(step_s3_access(runtime, config, credentials))
        outcome.output_folder = output_folder(runtime.result_prefix, folder, filename)
        created = (request.event_time or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
        ctx = StepContext(
            served=served, client=client, bucket=config.bucket, folder=folder, filename=filename,
            output_folder=outcome.output_folder, created=created, settings=settings, limits=runtime.limits,
        )
        planned = runtime.handler.open(ctx)
        store = ResultStore(client, config.bucket, outcome.output_folder)
        store.begin()
        progress = ProgressReporter(notifier, len(planned.units), settings.progress_interval_s)
        unit_stats: list[dict[str, Any]] = []
        current: InputUnit | None = None
        kept: list[Any] = []

        def finish_unit() -> None:
            if current is None:
                return
            if kept:
                result = runtime.handler.write_unit(ctx, current, kept)
                for obj in result.objects:
                    store.put(obj, current.key)
                outcome.patches += result.patches
                if result.stats:
                    unit_stats.append({"input": current.key, **result.stats})
            progress.end_file()
            kept.clear()

        def infer(rows: Any) -> Any:
            return runtime.model_client.infer(served, rows)

        for item in batched_inference(
            planned.items, infer, batch_size, settings.requests_in_flight, runtime.inference_pool
        ):
            unit = item.unit if isinstance(item, Rejection) else item[0].context.unit
            if unit is not current:
                finish_unit()
                current = unit
                progress.start_file(unit.index + 1, unit.expected_items)
            if isinstance(item, Rejection):
                outcome.rejections.append(item)
                log.warning("input rejected", extra={**log_fields, "patch_id": item.patch_id, "source": item.source,
                                                     "reason": item.reason})
                notifier.warning(_rejection_text(item))
            else:
                work, outputs = item
                kept.append(runtime.handler.collect(ctx, work, outputs))
            progress.item_done()
        finish_unit()

        if outcome.patches == 0:
            first = f" (first: {_rejection_text(outcome.rejections[0])})" if outcome.rejections else ""
            raise NoUsableInput(f"No usable input: all {len(outcome.rejections)} patch(es)/file(s) were rejected{first}")

        store.remove_stale()
        outcome.objects = list(store.written)
        outcome.stats = {"units": len(planned.units), "batch_size": batch_size}
        bpp = bits_per_pixel(unit_stats)
        if bpp is not None:
            outcome.stats["bits_per_pixel"] = bpp
        if unit_stats:
            outcome.stats["per_input"] = unit_stats
        limit = settings.max_rejections_listed
        manifest = build_manifest(
            task=runtime.spec.name, model_name=served.name, model_version=served.version, weights=served.card.weights,
            bucket=config.bucket, folder=folder, filename=filename, output_folder_key=outcome.output_folder,
            created=created, objects=outcome.objects, patches=outcome.patches,
            rejections=[{"patch_id": r.patch_id, "source": r.source, "reason": r.reason} for r in outcome.rejections[:limit]],
            rejection_count=len(outcome.rejections), stats=outcome.stats,
        )
        store.finish(scrub(manifest, secrets))
        manifest_written = True

        outcome.next_message = StepMessage(
            previous_component_end=True,
            S3_bucket_desc=S3BucketDesc(folder=outcome.output_folder, filename=""),
            meta_information=message.meta_information,
        ).model_dump(mode="json", by_alias=True)
        if config.topic_out:
            try:
                runtime.publisher.publish(runtime.bootstrap_servers(config), config.topic_out, outcome.next_message)
            except Exception as error:  # noqa: BLE001 - reported as the step's failure
                raise PublishError(f"Publishing the next step message to {config.topic_out!r} failed: {error}") from None
        else:
            log.warning("the step has no Topics.out: the next step message is not published", extra=log_fields)

        elapsed = time.monotonic() - started
        description = (
            f"{runtime.spec.name} done: {outcome.patches} patches of {len(planned.units)} file(s) in {elapsed:.0f} s "
            f"-> {outcome.output_folder}"
        )
        if bpp is not None:
            description += f", {bpp:.3f} bits per pixel"
        if outcome.rejections:
            description += f"; {len(outcome.rejections)} rejected ({_rejection_text(outcome.rejections[0])})"
        outcome.status = "SUCCESS"
        notifier.send("SUCCESS", description)
        log.info("step succeeded", extra={**log_fields, "output_folder": outcome.output_folder,
                                          "patches": outcome.patches, "rejected": len(outcome.rejections),
                                          "seconds": round(elapsed, 3), **({"bits_per_pixel": bpp} if bpp else {})})
        return outcome
    except Exception as error:  # noqa: BLE001 - every failure ends the same documented way
        reason = scrub(failure_reason(error), secrets)
        if not isinstance(error, (InputError, InferenceError, ResultWriteError, OutputFormatError, NoUsableInput,
                                  PublishError)):
            log.exception("step failed unexpectedly", extra=log_fields)
        if store is not None and not manifest_written:
            store.discard()
        outcome.status = "CRITICAL"
        outcome.reason = reason
        outcome.next_message = None
        outcome.dead_letter = dead_letter_record(
            reason, request.config_name, request.raw_message, task=runtime.spec.name,
            workflow_name=config.workflow_name, component_name=config.component_name, topic_in=config.topic_in,
            event_id=request.event_id, secrets=secrets,
        )
        outcome.dead_letter_delivered = publish_dead_letter(runtime, config, outcome.dead_letter)
        notifier.send("CRITICAL", reason)
        log.error("step failed", extra={**log_fields, "reason": reason})
        return outcome


def publish_dead_letter(runtime: StepRuntime, config: StepConfig, record: dict[str, Any]) -> bool:
    topic = runtime.dead_letter_topic(config)
    try:
        runtime.publisher.publish(runtime.bootstrap_servers(config), topic, record)
    except Exception as error:  # noqa: BLE001 - the log line is then the only record left
        log.error("dead-letter record not delivered", extra={"topic": topic, "error": str(error),
                                                             "config_name": record.get("config_name")})
        return False
    return True


__all__ = [
    "NoUsableInput",
    "PublishError",
    "StepOutcome",
    "StepRequest",
    "StepRuntime",
    "Work",
    "failure_reason",
    "publish_dead_letter",
    "run_step",
    "secret_values",
    "step_s3_access",
]
