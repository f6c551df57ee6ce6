"""One delivery of a step message, end to end, as an explicit state machine: ``run_step(runtime, request, config,
credentials)``.

The run folder (``results``) is ``<output folder>/<run id>``, the run id derived from the delivery. A run goes

    claimed -> processed -> manifest -> announced
        \\__________\\___________\\________-> failed        (or RETRY: nothing recorded, the delivery is answered 5xx)

and each transition is one named function below, durable before the next begins (``RunState`` says what is on
record in each state):

- ``claim``: what an earlier run of the same delivery left decides: ``<run folder>.announced.json`` or
  ``.failed.json`` -> ``DUPLICATE``; ``.manifest.json`` alone (a Wrapper stopped between the two) -> straight to
  ``announce`` from the manifest. Otherwise START is sent and the run folder is this run's to write;
- ``process`` (``step_processing``): model resolved and checked, input streamed through batched inference, every
  unit's results uploaded into the run folder;
- ``write_manifest``: the manifest, create-only. Losing that race to a concurrent run of the same delivery means
  that run announces: this one waits (bounded) for its marker -> ``DUPLICATE``;
- ``announce``: the next-step message (``folder`` = the run folder, ``meta_information`` unchanged) published to
  ``Topics.out``, then the announced marker -> ``SUCCESS``;
- ``fail``: a permanent failure (bad input, model does not fit, every patch rejected) is put on record: one
  dead-letter record, CRITICAL, the failed marker -> ``CRITICAL``; a transient one (``is_transient``: inference
  server unavailable past ``INFER_RETRY_MAX_S``, S3 unreachable, Kafka refusing a record) -> ``RETRY``.

``run_step`` never raises for a step failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from services.core import tracing
from services.core.contracts import S3BucketDesc, StepMessage
from services.core.step_config import StepConfig, StepCredentials
from services.wrapper.batching import Work
from services.wrapper.inputs import make_s3_client
from services.wrapper.inputs.s3_listing import S3Client
from services.wrapper.notifications import RecordPosition, StepNotifier, dead_letter_record, scrub
from services.wrapper.results import (
    ManifestExists,
    ResultStore,
    ResultWriteError,
    announced_key,
    build_manifest,
    failed_key,
    manifest_key,
    output_folder,
    put_marker,
    read_json_object,
    run_folder,
)
from services.wrapper.runtime import StepRuntime, secret_values, step_s3_access
from services.wrapper.step_processing import Processed, process_input, rejection_text
from services.wrapper.step_types import (
    EXPLAINED_FAILURES,
    Earlier,
    NoUsableInput,
    PublishError,
    RunState,
    StepOutcome,
    StepRequest,
    StepRetry,
    StepStatus,
    failure_reason,
    is_transient,
)

log = logging.getLogger(__name__)

# Where the failed markers of deliveries that are no step message go, under the task's result prefix.
UNREADABLE_FOLDER = "_unreadable-messages"


def _now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class StepRun:
    """One run of one delivery: what it works with, the state it is in, and the outcome it builds."""

    runtime: StepRuntime
    request: StepRequest
    config: StepConfig
    credentials: StepCredentials
    notifier: StepNotifier
    secrets: tuple[str, ...]
    log_fields: dict[str, Any]
    outcome: StepOutcome = field(default_factory=lambda: StepOutcome(status=StepStatus.CRITICAL))
    client: S3Client | None = None
    state: RunState | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def folder(self) -> str:
        assert self.outcome.output_folder is not None
        return self.outcome.output_folder

    def enter(self, state: RunState, **details: Any) -> None:
        """Record a transition (it is durable when this is called) in the outcome and the log."""
        log.info("step run %s", state.value, extra={**self.log_fields, "state": state.value,
                                                    "from_state": self.state.value if self.state else "", **details})
        self.state = state
        self.outcome.states.append(state)

    def end(self, status: StepStatus, earlier: Earlier = Earlier.NOTHING) -> StepOutcome:
        self.outcome.status, self.outcome.earlier = status, earlier
        return self.outcome

    # ---- transitions --------------------------------------------------------------------------------------

    def claim(self) -> StepOutcome | dict[str, Any] | None:
        """Look at what an earlier run left: an ended outcome (``DUPLICATE``), a manifest to announce, or None when
        this run is to process (START sent, state ``CLAIMED``)."""
        message = self.request.message
        self.client = make_s3_client(step_s3_access(self.runtime, self.config, self.credentials))
        source = message.S3_bucket_desc
        self.outcome.output_folder = run_folder(
            output_folder(self.runtime.result_prefix, source.folder, source.filename), self.request.run_id)
        earlier, manifest = earlier_run(self.client, self.config.bucket, self.folder)
        if earlier in (Earlier.ANNOUNCED, Earlier.FAILED):
            log.info("delivery already done: nothing to do",
                     extra={**self.log_fields, "earlier": earlier.value, "run_folder": self.folder})
            return self.end(StepStatus.DUPLICATE, earlier)
        if earlier is Earlier.MANIFEST:
            assert manifest is not None
            self.enter(RunState.MANIFEST, resumed=True)
            return manifest
        shown = "/".join(p for p in (source.folder.strip("/"), source.filename.strip("/")) if p) or "(bucket root)"
        self.notifier.send("START", f"{self.runtime.spec.name} started on {shown} (step {self.request.config_name})")
        self.enter(RunState.CLAIMED, folder=source.folder, input_filename=source.filename, run_folder=self.folder)
        return None

    def process(self) -> Processed:
        assert self.client is not None
        created = (self.request.event_time or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(
            microsecond=0)
        processed = process_input(self.runtime, self.request.message, self.client, self.config.bucket, self.folder,
                                  created, self.notifier, self.log_fields, run_id=self.request.run_id)
        self.outcome.model_version = processed.served.version
        self.outcome.patches, self.outcome.rejections = processed.patches, processed.rejections
        self.outcome.objects, self.outcome.stats = processed.objects, processed.stats
        self.enter(RunState.PROCESSED, objects=len(processed.objects), event_time=created.isoformat())
        return processed

    def write_manifest(self, processed: Processed) -> bool:
        """The manifest, create-only; False when a concurrent run of this delivery wrote it first."""
        assert self.client is not None
        request, served, message = self.request, processed.served, self.request.message
        self.outcome.next_message = next_message(self.folder, message)
        limit = self.runtime.settings.max_rejections_listed
        manifest = build_manifest(
            task=self.runtime.spec.name, model_name=served.name, model_version=served.version,
            weights=served.card.weights, bucket=self.config.bucket, folder=message.S3_bucket_desc.folder,
            filename=message.S3_bucket_desc.filename, output_folder_key=self.folder, created=processed.created,
            objects=processed.objects, stac_objects=processed.stac_objects, patches=processed.patches,
            run=request.run_id,
            next_message=self.outcome.next_message,
            rejections=[{"patch_id": r.patch_id, "source": r.source, "reason": r.reason}
                        for r in processed.rejections[:limit]],
            rejection_count=len(processed.rejections), stats=processed.stats,
        )
        try:
            ResultStore(self.client, self.config.bucket, self.folder).finish(scrub(manifest, self.secrets))
        except ManifestExists:
            return False
        self.enter(RunState.MANIFEST)
        return True

    def announce(self, message: dict[str, Any]) -> RecordPosition | None:
        """Publish the next step message (acknowledged), then write the announced marker; state ``ANNOUNCED``."""
        assert self.client is not None
        position = announce(self.runtime, self.config, self.client, self.folder, self.request, message)
        self.enter(RunState.ANNOUNCED, topic=self.config.topic_out,
                   offset=position.offset if position is not None else None)
        return position

    def fail(self, error: Exception) -> StepOutcome:
        """A failure: transient -> ``RETRY`` (nothing recorded); permanent -> on record, state ``FAILED``."""
        reason = scrub(failure_reason(error), self.secrets)
        self.outcome.reason, self.outcome.next_message = reason, None
        if is_transient(error) or self.outcome.output_folder is None:
            log.warning("step interrupted: the delivery is to be retried", extra={**self.log_fields, "reason": reason})
            if "START" in self.notifier.sent:
                self.notifier.send("WARNING", f"{self.runtime.spec.name} interrupted, Kafka will deliver it again: "
                                              f"{reason}")
            return self.end(StepStatus.RETRY)
        if not isinstance(error, EXPLAINED_FAILURES):
            log.exception("step failed unexpectedly", extra=self.log_fields)
        request = self.request
        fields = {"config_name": request.config_name, "raw_message": request.raw_message,
                  "event_id": request.event_id, "run_id": request.run_id}
        if not fail_for_good(self.runtime, fields, self.config, self.credentials, self.client, self.folder, reason):
            self.outcome.reason = f"{reason} (and the dead-letter record could not be written)"
            return self.end(StepStatus.RETRY)
        self.enter(RunState.FAILED, reason=reason)
        log.error("step failed", extra={**self.log_fields, "reason": reason})
        return self.end(StepStatus.CRITICAL)

    # ---- the machine --------------------------------------------------------------------------------------

    def run(self) -> StepOutcome:
        """The transitions in order, each in its own trace span (a child of the delivery's ``step`` span)."""
        try:
            with tracing.stage("claim"):
                claimed = self.claim()
            if isinstance(claimed, StepOutcome):
                return claimed
            if claimed is not None:
                return self.resume(claimed)
            with tracing.stage("process"):
                processed = self.process()
            with tracing.stage("write_manifest"):
                if not self.write_manifest(processed):
                    return self.lost_manifest_race()
            assert self.outcome.next_message is not None
            with tracing.stage("announce", topic=self.config.topic_out):
                self.announce(self.outcome.next_message)
            self.report_success(processed)
            return self.end(StepStatus.SUCCESS)
        except Exception as error:  # noqa: BLE001 - every failure ends one of two documented ways
            return self.fail(error)

    def resume(self, manifest: dict[str, Any]) -> StepOutcome:
        """A run that wrote its manifest and stopped before announcing: announce it, do not run it again."""
        self.outcome.next_message = manifest.get("next_message") or next_message(self.folder, self.request.message)
        with tracing.stage("announce", topic=self.config.topic_out, resumed=1):
            self.announce(self.outcome.next_message)
        self.outcome.resumed_announcement = True
        self.outcome.patches = int(manifest.get("patches", 0))
        self.notifier.send("SUCCESS", f"{self.runtime.spec.name} done: {self.outcome.patches} patches -> "
                                      f"{self.folder} (announced after an interrupted delivery)")
        log.info("step announced from its manifest", extra={**self.log_fields, "run_folder": self.folder})
        return self.end(StepStatus.SUCCESS)

    def lost_manifest_race(self) -> StepOutcome:
        """The same delivery ran elsewhere at the same time and wrote its manifest first: the winner announces."""
        assert self.client is not None
        log.info("another run of this delivery wrote the manifest first: waiting for its announcement",
                 extra={**self.log_fields, "run_folder": self.folder})
        if not wait_for_announcement(self.client, self.config.bucket, self.folder,
                                     self.runtime.settings.announce_wait_s):
            raise StepRetry("Another run of this delivery wrote the manifest but has not announced it yet")
        return self.end(StepStatus.DUPLICATE, Earlier.ANNOUNCED)

    def report_success(self, processed: Processed) -> None:
        outcome = self.outcome
        elapsed = time.monotonic() - self.started
        description = (f"{self.runtime.spec.name} done: {outcome.patches} patches of {processed.units} file(s) in "
                       f"{elapsed:.0f} s -> {self.folder}")
        bpp = processed.bits_per_pixel
        if bpp is not None:
            description += f", {bpp:.3f} bits per pixel"
        if outcome.rejections:
            description += f"; {len(outcome.rejections)} rejected ({rejection_text(outcome.rejections[0])})"
        self.notifier.send("SUCCESS", description)
        log.info("step succeeded", extra={**self.log_fields, "output_folder": self.folder,
                                          "patches": outcome.patches, "rejected": len(outcome.rejections),
                                          "seconds": round(elapsed, 3), **({"bits_per_pixel": bpp} if bpp else {})})


def run_step(
    runtime: StepRuntime, request: StepRequest, config: StepConfig, credentials: StepCredentials
) -> StepOutcome:
    """Process one delivery of a step message completely; see the module docstring. Never raises for a step failure."""
    log_fields = {"config_name": request.config_name, "event_id": request.event_id, "run_id": request.run_id,
                  "task": runtime.spec.name, "workflow": config.workflow_name}
    if not request.message.previous_component_end:
        log.info("step message does not mark the previous component's end: nothing to do", extra=log_fields)
        return StepOutcome(status=StepStatus.IGNORED, reason="previous_component_end is not True")
    secrets = secret_values(credentials)
    run = StepRun(runtime, request, config, credentials, runtime.notifier(config, secrets), secrets, log_fields)
    span_attributes = {"eoml.task": runtime.spec.name, "eoml.config_name": request.config_name,
                       "eoml.run_id": request.run_id, "eoml.workflow": config.workflow_name,
                       "cloudevents.event_id": request.event_id}
    with tracing.step_span(f"step {runtime.spec.name}", tracing.context_of_event(request.trace_attributes),
                           span_attributes) as span:
        outcome = run.run()
        span.set_attribute("eoml.status", outcome.status.value)
        if outcome.status in (StepStatus.CRITICAL, StepStatus.RETRY):
            tracing.mark_failed(span, outcome.reason)
    return outcome


def announce(
    runtime: StepRuntime, config: StepConfig, client: S3Client, folder: str, request: StepRequest,
    next_message: dict[str, Any],
) -> RecordPosition | None:
    """Publish the next step message (acknowledged), then write the announced marker. ``PublishError`` on failure."""
    position: RecordPosition | None = None
    if config.topic_out:
        try:
            # ce_traceparent: the next step's delivery continues this trace (CloudEvents distributed tracing).
            position = runtime.publisher.publish(runtime.bootstrap_servers(config), config.topic_out, next_message,
                                                 headers=tracing.kafka_headers())
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
    """Put a permanent failure on record: one dead-letter record (acknowledged), CRITICAL, then the failed marker.

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


def earlier_run(client: S3Client, bucket: str, folder: str) -> tuple[Earlier, dict[str, Any] | None]:
    """What an earlier run of this delivery left, and its manifest when that is all it left."""
    if read_json_object(client, bucket, announced_key(folder)) is not None:
        return Earlier.ANNOUNCED, None
    if read_json_object(client, bucket, failed_key(folder)) is not None:
        return Earlier.FAILED, None
    manifest = read_json_object(client, bucket, manifest_key(folder))
    if manifest is not None:
        return Earlier.MANIFEST, manifest
    return Earlier.NOTHING, None


def wait_for_announcement(client: S3Client, bucket: str, folder: str, timeout_s: float) -> bool:
    """After losing the manifest race: wait (bounded) until the winner's announced marker is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        if read_json_object(client, bucket, announced_key(folder)) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))


def next_message(folder: str, message: StepMessage) -> dict[str, Any]:
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
    "Earlier",
    "NoUsableInput",
    "PublishError",
    "RunState",
    "StepOutcome",
    "StepRequest",
    "StepRetry",
    "StepRun",
    "StepRuntime",
    "StepStatus",
    "Work",
    "fail_for_good",
    "failure_reason",
    "is_transient",
    "publish_dead_letter",
    "run_step",
    "secret_values",
    "step_s3_access",
]
