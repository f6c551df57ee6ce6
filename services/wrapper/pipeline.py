"""One delivery of a step message, end to end, as a plain function: ``run_step(runtime, request, config, credentials)``.

The run folder (``results``) is ``<output folder>/<run id>``, the run id derived from the delivery. First what an
earlier run of the same delivery left is looked at:

- ``<run folder>.announced.json``: done before: ``DUPLICATE``, nothing sent, nothing processed;
- ``<run folder>.failed.json``: failed for good before (its dead-letter record exists): ``DUPLICATE``;
- ``<run folder>.manifest.json`` without the announced marker (a Wrapper stopped between the two): the next-step
  message from the manifest is published, the marker written: ``SUCCESS`` without processing again.

Otherwise:

1. START notification; resolve the model (card, version, batch size) and check it fits the task;
2. list the input (``InputError`` when there is none) and stream it unit by unit through preprocessing and
   batched inference; rejected patches are reported (log + WARNING) and the rest goes on;
3. write each unit's results (spooled to temporary files, uploaded multipart when large) into the run folder,
   then the manifest, create-only;
4. publish the next step message (``folder`` = the run folder, ``meta_information`` unchanged) to ``Topics.out``,
   write the announced marker, then SUCCESS.

Outcomes: ``SUCCESS`` / ``DUPLICATE`` / ``IGNORED``; ``CRITICAL`` for a permanent failure (bad input, model does
not fit, every patch rejected), put on record first: one dead-letter record, a CRITICAL notification, the failed
marker; ``RETRY`` for a transient one (inference server unavailable past ``INFER_RETRY_MAX_S``, S3 unreachable,
Kafka refusing the next-step message or the dead-letter record): nothing is announced and the delivery is to be
answered 5xx so that Kafka redelivers it. ``run_step`` never raises for a step failure.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from services.core.contracts import S3BucketDesc, StepMessage
from services.core.metrics import Stage, WrapperMetrics, stage, timed_items, timed_stage
from services.core.step_config import StepConfig, StepCredentials
from services.wrapper.batching import Work, batched_inference
from services.wrapper.handlers import (
    InputUnit,
    Rejection,
    StepContext,
    TaskHandler,
    bits_per_pixel,
    handler_for,
    served_prior,
)
from services.wrapper.compression_request import compression_request_of, operating_point
from services.wrapper.generic_task import CLOUD_FILTER_FIELD, QUICKLOOK_SUFFIX, CloudMeter, cloud_filter_of
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
from services.wrapper.inputs.s3_listing import S3Client
from services.wrapper.notifications import (
    EventPublisher,
    KafkaPublisher,
    ProgressReporter,
    RecordPosition,
    StepNotifier,
    dead_letter_record,
    scrub,
)
from services.wrapper.outputs import OutputFormatError
from services.wrapper.outputs.compressed import OperatingPoint
from services.wrapper.results import (
    ManifestExists,
    ResultStore,
    ResultWriteError,
    WrittenObject,
    announced_key,
    build_manifest,
    failed_key,
    manifest_key,
    output_folder,
    put_marker,
    read_json_object,
    run_folder,
    run_id,
)
from services.wrapper.settings import WrapperSettings
from services.wrapper.outputs.keys import sanitise_name
from services.wrapper.tasks import GENERIC_RESULT_PREFIX, GENERIC_TASK, TaskSpec, task_spec

log = logging.getLogger(__name__)

StepStatus = Literal["SUCCESS", "CRITICAL", "RETRY", "DUPLICATE", "IGNORED"]
# Where the failed markers of deliveries that are no step message go, under the task's result prefix.
UNREADABLE_FOLDER = "_unreadable-messages"


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
    event_source: str = ""
    # ``results.run_id`` of the delivery; "" = derived from the fields above (random without an event id).
    run_id: str = ""

    def __post_init__(self) -> None:
        if not self.run_id:
            time_text = self.event_time.isoformat() if self.event_time is not None else ""
            object.__setattr__(self, "run_id", run_id(self.config_name, self.event_source, self.event_id, time_text))


@dataclass
class StepOutcome:
    status: StepStatus
    reason: str = ""
    output_folder: str | None = None  # the run folder
    patches: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    objects: list[WrittenObject] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    next_message: dict[str, Any] | None = None
    model_version: str = ""
    # DUPLICATE: what the earlier run of this delivery ended with ("announced" or "failed").
    earlier: str = ""
    # SUCCESS without processing: the manifest was there, the announcement was not.
    resumed_announcement: bool = False


class StepRetry(Exception):
    """A failure that a later delivery may not meet: nothing is put on record, the delivery is answered 5xx."""


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
            inference_pool=ThreadPoolExecutor(
                max_workers=settings.requests_in_flight * settings.workers, thread_name_prefix="infer"
            ),
        )

    # The served s2-cloud-mask model for workflows that ask for a cloud filter (made on first use).
    cloud_mask_client: ModelClient | None = None

    @property
    def result_prefix(self) -> str:
        if self.settings.result_prefix:
            return self.settings.result_prefix
        if self.spec.name == GENERIC_TASK:
            return f"{GENERIC_RESULT_PREFIX}{sanitise_name(self.model_client.model_name)}"
        return self.spec.result_prefix

    def cloud_mask(self) -> ModelClient:
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
    if isinstance(error, (NoUsableInput, PublishError, StepRetry)):
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


def is_transient(error: BaseException) -> bool:
    """Failures a later delivery may not meet: the delivery is answered 5xx and redelivered, nothing is recorded."""
    if isinstance(error, (InferenceUnavailable, PublishError, StepRetry)):
        return True
    return isinstance(error, (InputError, ResultWriteError)) and bool(getattr(error, "transient", False))


def _now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@timed_stage(Stage.ANNOUNCE)
def announce(
    runtime: StepRuntime, config: StepConfig, client: S3Client, folder: str, request: StepRequest,
    next_message: dict[str, Any],
) -> RecordPosition | None:
    """Publish the next step message (flushed), then write the announced marker. ``StepRetry`` on failure."""
    position: RecordPosition | None = None
    if config.topic_out:
        try:
            position = runtime.publisher.publish(runtime.bootstrap_servers(config), config.topic_out, next_message)
        except Exception as error:  # noqa: BLE001 - Kafka refused or timed out: redelivered later
            raise PublishError(f"Publishing the next step message to {config.topic_out!r} failed: {error}") from None
    else:
        log.warning("the step has no Topics.out: the next step message is not published",
                    extra={"config_name": request.config_name})
    marker = {"event_id": request.event_id, "run_id": request.run_id, "announced_at": _now_text(),
              "topic": config.topic_out, "partition": position.partition if position else None,
              "offset": position.offset if position else None}
    put_marker(client, config.bucket, announced_key(folder), marker)
    return position


def fail_for_good(
    runtime: StepRuntime, request_fields: dict[str, Any], config: StepConfig, credentials: StepCredentials,
    client: S3Client | None, folder: str, reason: str,
) -> bool:
    """Put a permanent failure on record: one dead-letter record (flushed), CRITICAL, then the failed marker.

    False when the dead-letter record could not be written: then nothing else is done and the delivery is to be
    retried (5xx). ``request_fields``: ``config_name``, ``raw_message``, ``event_id``, ``run_id``."""
    secrets = secret_values(credentials)
    record = dead_letter_record(
        reason, request_fields["config_name"], request_fields["raw_message"], task=runtime.spec.name,
        workflow_name=config.workflow_name, component_name=config.component_name, topic_in=config.topic_in,
        event_id=request_fields["event_id"], secrets=secrets,
    )
    if not publish_dead_letter(runtime, config, record):
        return False
    runtime.notifier(config, secrets).send("CRITICAL", reason)
    if client is not None:
        marker = {"event_id": request_fields["event_id"], "run_id": request_fields["run_id"], "failed_at": _now_text(),
                  "reason": reason, "dead_letter_topic": runtime.dead_letter_topic(config)}
        try:
            put_marker(client, config.bucket, failed_key(folder), marker)
        except ResultWriteError as error:
            # The failure is on record (dead-letter topic); only a redelivery would record it a second time.
            log.warning("failed marker not written", extra={"config_name": config.config_name, "reason": str(error)})
    return True


def earlier_run(client: S3Client, bucket: str, folder: str) -> tuple[str, dict[str, Any] | None]:
    """What an earlier run of this delivery left: ("announced" | "failed" | "manifest" | "", the manifest)."""
    if read_json_object(client, bucket, announced_key(folder)) is not None:
        return "announced", None
    if read_json_object(client, bucket, failed_key(folder)) is not None:
        return "failed", None
    manifest = read_json_object(client, bucket, manifest_key(folder))
    if manifest is not None:
        return "manifest", manifest
    return "", None


def wait_for_announcement(client: S3Client, bucket: str, folder: str, timeout_s: float) -> bool:
    """After losing the manifest race: wait (bounded) until the winner's announced marker is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        if read_json_object(client, bucket, announced_key(folder)) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))


def run_step(
    runtime: StepRuntime, request: StepRequest, config: StepConfig, credentials: StepCredentials
) -> StepOutcome:
    """Process one delivery of a step message completely; see the module docstring. Never raises for a step failure."""
    settings = runtime.settings
    message = request.message
    log_fields = {"config_name": request.config_name, "event_id": request.event_id, "run_id": request.run_id,
                  "task": runtime.spec.name, "workflow": config.workflow_name}
    if not message.previous_component_end:
        log.info("step message does not mark the previous component's end: nothing to do", extra=log_fields)
        return StepOutcome(status="IGNORED", reason="previous_component_end is not True")

    secrets = secret_values(credentials)
    notifier = runtime.notifier(config, secrets)
    folder, filename = message.S3_bucket_desc.folder, message.S3_bucket_desc.filename
    shown_input = "/".join(part for part in (folder.strip("/"), filename.strip("/")) if part) or "(bucket root)"
    outcome = StepOutcome(status="CRITICAL")
    client: S3Client | None = None
    started = time.monotonic()
    try:
        client = make_s3_client(step_s3_access(runtime, config, credentials))
        outcome.output_folder = run_folder(output_folder(runtime.result_prefix, folder, filename), request.run_id)
        earlier, manifest = earlier_run(client, config.bucket, outcome.output_folder)
        if earlier in ("announced", "failed"):
            log.info("delivery already done: nothing to do", extra={**log_fields, "earlier": earlier,
                                                                   "run_folder": outcome.output_folder})
            outcome.status, outcome.earlier = "DUPLICATE", earlier
            return outcome
        if earlier == "manifest":
            assert manifest is not None
            # A run that wrote its manifest and stopped before announcing: announce it, do not run it again.
            outcome.next_message = manifest.get("next_message") or _next_message(outcome.output_folder, message)
            announce(runtime, config, client, outcome.output_folder, request, outcome.next_message)
            outcome.status, outcome.resumed_announcement = "SUCCESS", True
            outcome.patches = int(manifest.get("patches", 0))
            notifier.send("SUCCESS", f"{runtime.spec.name} done: {outcome.patches} patches -> {outcome.output_folder} "
                                     "(announced after an interrupted delivery)")
            log.info("step announced from its manifest", extra={**log_fields, "run_folder": outcome.output_folder})
            return outcome

        notifier.send("START", f"{runtime.spec.name} started on {shown_input} (step {request.config_name})")
        log.info("step started", extra={**log_fields, "folder": folder, "input_filename": filename,
                                        "run_folder": outcome.output_folder})
        served = runtime.model_client.resolve()
        runtime.handler.check_model(served)
        outcome.model_version = served.version
        batch_size = runtime.batch_size(served)
        created = (request.event_time or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
        compression = compression_point(runtime, message, served)
        cloud_meter = open_cloud_meter(runtime, message)
        with tempfile.TemporaryDirectory(prefix="eoml-run-", dir=settings.spool_dir or None) as spool:
            ctx = StepContext(
                served=served, client=client, bucket=config.bucket, folder=folder, filename=filename,
                output_folder=outcome.output_folder, created=created, settings=settings, limits=runtime.limits,
                spool_dir=spool, cloud_meter=cloud_meter, compression=compression,
            )
            planned = runtime.handler.open(ctx)
            store = ResultStore(client, config.bucket, outcome.output_folder)
            progress = ProgressReporter(notifier, len(planned.units), settings.progress_interval_s)
            unit_stats: list[dict[str, Any]] = []
            current: InputUnit | None = None
            collector: Any = None

            def finish_unit() -> None:
                if current is None:
                    return
                side = ctx.side_objects.pop(current.index, [])
                if collector is not None and not runtime.handler.collected(collector):
                    getattr(collector, "close", lambda: None)()  # a unit of rejections only: nothing to write
                    for obj in side:
                        if obj.file.path is not None:
                            os.unlink(obj.file.path)
                elif collector is not None:
                    with stage(Stage.WRITE):  # encoding; uploads count in ResultStore
                        result = runtime.handler.write_unit(ctx, current, collector)
                    for obj in [*result.objects, *side]:
                        store.put(obj, current.key)
                        if obj.file.path is not None:
                            os.unlink(obj.file.path)  # uploaded: the spool holds one unit at most
                    outcome.patches += result.patches
                    if result.stats:
                        unit_stats.append({"input": current.key, **result.stats})
                progress.end_file()

            def infer(rows: Any) -> Any:
                return runtime.model_client.infer(served, rows)

            for item in batched_inference(
                timed_items(Stage.DOWNLOAD, planned.items), infer, batch_size, settings.requests_in_flight, runtime.inference_pool
            ):
                unit = item.unit if isinstance(item, Rejection) else item[0].context.unit
                if unit is not current:
                    finish_unit()
                    current = unit
                    collector = runtime.handler.start_unit(ctx, unit)
                    progress.start_file(unit.index + 1, unit.expected_items)
                if isinstance(item, Rejection):
                    outcome.rejections.append(item)
                    log.warning("input rejected", extra={**log_fields, "patch_id": item.patch_id,
                                                         "source": item.source, "reason": item.reason})
                    notifier.warning(_rejection_text(item))
                else:
                    work, outputs = item
                    runtime.handler.collect(ctx, collector, work, outputs)
                progress.item_done()
            finish_unit()

        if outcome.patches == 0:
            first = f" (first: {_rejection_text(outcome.rejections[0])})" if outcome.rejections else ""
            raise NoUsableInput(f"No usable input: all {len(outcome.rejections)} patch(es)/file(s) were rejected{first}")

        outcome.objects = list(store.written)
        outcome.stats = {"units": len(planned.units), "batch_size": batch_size}
        bpp = bits_per_pixel(unit_stats)
        if bpp is not None:
            outcome.stats["bits_per_pixel"] = bpp
        if unit_stats:
            outcome.stats["per_input"] = unit_stats
        quicklooks = [obj.key for obj in outcome.objects if obj.key.endswith(QUICKLOOK_SUFFIX)]
        if quicklooks:
            outcome.stats["quicklooks"] = quicklooks
        if cloud_meter is not None:
            outcome.stats["cloud_filter"] = cloud_meter.manifest_entry()
        outcome.next_message = _next_message(outcome.output_folder, message)
        limit = settings.max_rejections_listed
        manifest = build_manifest(
            task=runtime.spec.name, model_name=served.name, model_version=served.version, weights=served.card.weights,
            bucket=config.bucket, folder=folder, filename=filename, output_folder_key=outcome.output_folder,
            created=created, objects=outcome.objects, patches=outcome.patches, run=request.run_id,
            next_message=outcome.next_message,
            rejections=[{"patch_id": r.patch_id, "source": r.source, "reason": r.reason} for r in outcome.rejections[:limit]],
            rejection_count=len(outcome.rejections), stats=outcome.stats,
        )
        try:
            store.finish(scrub(manifest, secrets))
        except ManifestExists:
            # The same delivery ran elsewhere at the same time and wrote the same bytes: the winner announces.
            log.info("another run of this delivery wrote the manifest first: waiting for its announcement",
                     extra={**log_fields, "run_folder": outcome.output_folder})
            if not wait_for_announcement(client, config.bucket, outcome.output_folder, settings.announce_wait_s):
                raise StepRetry("Another run of this delivery wrote the manifest but has not announced it yet") from None
            outcome.status, outcome.earlier = "DUPLICATE", "announced"
            return outcome
        announce(runtime, config, client, outcome.output_folder, request, outcome.next_message)

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
    except Exception as error:  # noqa: BLE001 - every failure ends one of two documented ways
        reason = scrub(failure_reason(error), secrets)
        outcome.reason = reason
        outcome.next_message = None
        if is_transient(error) or outcome.output_folder is None:
            outcome.status = "RETRY"
            log.warning("step interrupted: the delivery is to be retried", extra={**log_fields, "reason": reason})
            if "START" in notifier.sent:
                notifier.send("WARNING", f"{runtime.spec.name} interrupted, Kafka will deliver it again: {reason}")
            return outcome
        if not isinstance(error, (InputError, InferenceError, ResultWriteError, OutputFormatError, NoUsableInput)):
            log.exception("step failed unexpectedly", extra=log_fields)
        fields = {"config_name": request.config_name, "raw_message": request.raw_message,
                  "event_id": request.event_id, "run_id": request.run_id}
        if not fail_for_good(runtime, fields, config, credentials, client, outcome.output_folder, reason):
            outcome.status = "RETRY"
            outcome.reason = f"{reason} (and the dead-letter record could not be written)"
            return outcome
        outcome.status = "CRITICAL"
        log.error("step failed", extra={**log_fields, "reason": reason})
        return outcome


def compression_point(runtime: StepRuntime, message: StepMessage, served: ServedModel) -> OperatingPoint | None:
    """A compress step's operating point: ``meta_information.compression`` with the deployment's defaults.

    Checked before anything is read, so a malformed field fails the step at once (``InputError``). Other tasks
    pass the field on untouched: it travels with the workflow's ``meta_information``."""
    if runtime.spec.name != "compress":
        return None
    request = compression_request_of(message.meta_information)
    settings = runtime.settings
    return operating_point(request, settings.compress_levels, settings.compress_quantiser_scale,
                           served_prior(served) is not None, served.name)


def open_cloud_meter(runtime: StepRuntime, message: StepMessage) -> CloudMeter | None:
    """The step's cloud filter with the served cloud-mask model, when the workflow asks for one.

    ``InputError`` for a malformed filter or a task that does not read Sentinel-2 (both permanent)."""
    rule = cloud_filter_of(message.meta_information)
    if rule is None:
        return None
    if runtime.spec.input_kind != "sentinel2":
        raise InputError(f"meta_information.{CLOUD_FILTER_FIELD} applies to Sentinel-2 steps; task "
                         f"{runtime.spec.name} reads {runtime.spec.input_kind}")
    return CloudMeter.open(runtime.cloud_mask(), rule)


def _next_message(folder: str, message: StepMessage) -> dict[str, Any]:
    return StepMessage(
        previous_component_end=True,
        S3_bucket_desc=S3BucketDesc(folder=folder, filename=""),
        meta_information=message.meta_information,
    ).model_dump(mode="json", by_alias=True)


def publish_dead_letter(runtime: StepRuntime, config: StepConfig, record: dict[str, Any]) -> bool:
    topic = runtime.dead_letter_topic(config)
    try:
        runtime.publisher.publish(runtime.bootstrap_servers(config), topic, record)
    except Exception as error:  # noqa: BLE001 - reported: the delivery is answered 5xx and retried
        log.error("dead-letter record not delivered", extra={"topic": topic, "error": str(error),
                                                             "config_name": record.get("config_name")})
        return False
    return True


__all__ = [
    "UNREADABLE_FOLDER",
    "NoUsableInput",
    "StepRetry",
    "fail_for_good",
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
