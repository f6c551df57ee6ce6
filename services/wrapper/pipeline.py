"""One delivery of a step message, end to end, as an explicit state machine: ``run_step(runtime, request, config,
credentials)``.

The run folder (``results``) is ``<output folder>/<run id>``, the run id derived from the delivery; this run writes
into its own attempt folder ``<run folder>/<attempt id>``. A run goes

    claimed -> processed -> manifest -> announced
        \\__________\\___________\\________-> failed        (or RETRY: nothing recorded, the delivery is answered 5xx)

and each transition is one named method of ``StepRun``, durable before the next begins (``RunState`` says what is
on record in each state):

- ``claim``: the bucket's endpoint must honour conditional create (``s3_capability``, once per process and bucket);
  then what an earlier run of the same delivery left decides: ``<run folder>.announced.json`` or ``.failed.json``
  -> ``DUPLICATE``; ``.manifest.json`` alone (a Wrapper stopped between the two) -> straight to ``announce`` from
  the manifest. Otherwise START is sent and a new attempt folder is this run's;
- ``process`` (``step_processing``): model resolved and checked, input streamed through batched inference, every
  unit's results uploaded into the attempt folder;
- ``write_manifest``: the manifest, create-only at the run folder's fixed key, naming this attempt. Losing that
  race to a concurrent run of the same delivery: this run deletes its attempt objects, and the winner's manifest is
  what gets announced (by the winner; by this run too if the winner's marker is not there within
  ``ANNOUNCE_WAIT_S``: harmless, the record's CloudEvent id is the same, see ``next_step``);
- ``announce``: the next-step record (``folder`` = the winning attempt folder, ``meta_information`` unchanged; a
  binary-mode CloudEvent whose id derives from the run) acknowledged by Kafka, then the announced marker ->
  ``SUCCESS``;
- ``fail``: a permanent failure (bad input, model does not fit, every patch rejected, an S3 endpoint without
  conditional writes) is put on record: one dead-letter record, CRITICAL, the failed marker -> ``CRITICAL``; a
  transient one (``is_transient``: inference server unavailable past ``INFER_RETRY_MAX_S``, S3 unreachable, Kafka
  refusing a record) -> ``RETRY``.

Every announcement of one run (first, resumed after a crash, by a race loser) is the same record: same value, same
``ce_id``/``ce_source``/``ce_time``; downstream it is one run (``next_step``). ``run_step`` never raises for a step
failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from services.core import tracing
from services.core.metrics import Stage, timed_stage
from services.core.step_config import StepConfig, StepCredentials
from services.wrapper.inputs import make_s3_client
from services.wrapper.inputs.s3_listing import S3Client
from services.wrapper.notifications import RecordPosition, StepNotifier, dead_letter_record, scrub
from services.wrapper.next_step import canonical, next_message, next_step_headers
from services.wrapper.results import (
    ObjectExists,
    ResultStore,
    ResultWriteError,
    S3ConfigurationError,
    attempt_folder,
    announced_key,
    build_manifest,
    failed_key,
    manifest_key,
    new_attempt_id,
    output_folder,
    put_marker,
    read_json_object,
    run_folder,
    sweep_other_attempts,
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
    run_folder_key: str = ""
    attempt: str = ""  # this run's attempt id (claimed runs only)
    store: ResultStore | None = None  # writes into this run's attempt folder
    started: float = field(default_factory=time.monotonic)

    @property
    def folder(self) -> str:
        """The run folder: its manifest and markers are beside it."""
        assert self.run_folder_key
        return self.run_folder_key

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
        this run is to process (START sent, a new attempt folder, state ``CLAIMED``)."""
        message = self.request.message
        self.client = make_s3_client(step_s3_access(self.runtime, self.config, self.credentials))
        source = message.S3_bucket_desc
        self.run_folder_key = run_folder(
            output_folder(self.runtime.result_prefix, source.folder, source.filename), self.request.run_id)
        self.outcome.run_folder = self.outcome.output_folder = self.run_folder_key
        earlier, left = earlier_run(self.client, self.config.bucket, self.folder)
        if earlier in (Earlier.ANNOUNCED, Earlier.FAILED):
            log.info("delivery already done: nothing to do",
                     extra={**self.log_fields, "earlier": earlier.value, "run_folder": self.folder})
            if earlier is Earlier.ANNOUNCED and left.get("folder"):
                self.outcome.output_folder = self.outcome.announced_folder = str(left["folder"])
            return self.end(StepStatus.DUPLICATE, earlier)
        if earlier is Earlier.MANIFEST:
            self.enter(RunState.MANIFEST, resumed=True)
            return left
        # Before this run writes anything create-only (reading markers works on any S3).
        self.runtime.conditional_create.ensure(self.client, self.config.bucket, self.runtime.result_prefix)
        shown = "/".join(p for p in (source.folder.strip("/"), source.filename.strip("/")) if p) or "(bucket root)"
        self.notifier.send("START", f"{self.runtime.spec.name} started on {shown} (step {self.request.config_name})")
        log.info("step started", extra={**self.log_fields, "folder": source.folder, "input_filename": source.filename,
                                        "run_folder": self.folder})
        self.attempt = new_attempt_id(self.runtime.outputs_profile()["sha256"])
        self.store = ResultStore(self.client, self.config.bucket, attempt_folder(self.folder, self.attempt))
        self.enter(RunState.CLAIMED, folder=source.folder, input_filename=source.filename, run_folder=self.folder,
                   attempt=self.attempt)
        return None

    def process(self) -> Processed:
        assert self.store is not None
        created = (self.request.event_time or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(
            microsecond=0)
        processed = process_input(self.runtime, self.request.message, self.store, created, self.notifier,
                                  self.log_fields, run_id=self.request.run_id)
        self.outcome.model_version = processed.served.version
        self.outcome.patches, self.outcome.rejections = processed.patches, processed.rejections
        self.outcome.objects, self.outcome.stats = processed.objects, processed.stats
        self.enter(RunState.PROCESSED, objects=len(processed.objects), event_time=created.isoformat())
        return processed

    def write_manifest(self, processed: Processed) -> dict[str, Any] | None:
        """The manifest, create-only at the run folder's key, naming this attempt; None when a concurrent run of
        this delivery wrote it first."""
        assert self.store is not None and self.client is not None
        request, served, message = self.request, processed.served, self.request.message
        announced = self.store.folder
        limit = self.runtime.settings.max_rejections_listed
        manifest = build_manifest(
            task=self.runtime.spec.name, model_name=served.name, model_version=served.version,
            weights=served.card.weights, bucket=self.config.bucket, folder=message.S3_bucket_desc.folder,
            filename=message.S3_bucket_desc.filename, output_folder_key=announced, run_folder_key=self.folder,
            attempt=self.attempt, outputs_profile=self.runtime.outputs_profile(), created=processed.created,
            objects=processed.objects, stac_objects=processed.stac_objects, patches=processed.patches,
            run=request.run_id, next_message=next_message(announced, message),
            rejections=[{"patch_id": r.patch_id, "source": r.source, "reason": r.reason}
                        for r in processed.rejections[:limit]],
            rejection_count=len(processed.rejections), stats=processed.stats,
        )
        # The trace context the next step continues (``ce_traceparent``): recorded here, so that every announcement
        # of the run, a resumed or a race loser's included, publishes the same record.
        manifest["trace_headers"] = tracing.kafka_headers()
        manifest = scrub(manifest, self.secrets)
        try:
            self.store.finish(manifest, self.folder)
        except ObjectExists:
            # The S3 client retries a PUT whose answer was lost; the retry of a write that had succeeded meets its
            # own manifest (412). Only a manifest naming another attempt means another run won.
            written = read_json_object(self.client, self.config.bucket, manifest_key(self.folder))
            if not written or written.get("attempt") != self.attempt:
                return None
        self.enter(RunState.MANIFEST, attempt=self.attempt)
        return manifest

    def announce(self, manifest: dict[str, Any]) -> RecordPosition | None:
        """Publish the manifest's next-step record (acknowledged), then write the announced marker."""
        assert self.client is not None
        # Derived from this delivery's own message (every delivery of a run carries the same one), not read from the
        # manifest: the manifest's copy has credentials redacted, the next step gets meta_information unchanged.
        message = next_message(str(manifest.get("folder", "")), self.request.message)
        created = str(manifest.get("created") or "")
        trace_headers = manifest.get("trace_headers") if isinstance(manifest.get("trace_headers"), dict) else {}
        position = announce(self.runtime, self.config, self.client, self.folder, self.request, message, created,
                            trace_headers)
        self.outcome.next_message = message
        self.outcome.output_folder = self.outcome.announced_folder = str(message["S3_bucket_desc"]["folder"])
        self.enter(RunState.ANNOUNCED, topic=self.config.topic_out,
                   offset=position.offset if position is not None else None,
                   announced_folder=self.outcome.announced_folder)
        swept = sweep_other_attempts(self.client, self.config.bucket, self.folder, self.outcome.announced_folder)
        if swept:
            log.info("unannounced attempt objects deleted", extra={**self.log_fields, "objects": swept})
        return position

    def fail(self, error: Exception) -> StepOutcome:
        """A failure: transient -> ``RETRY`` (nothing recorded); permanent -> on record, state ``FAILED``."""
        reason = scrub(failure_reason(error), self.secrets)
        if self.state is RunState.ANNOUNCED:
            # The next step has its message and the run its marker: what failed after that changes nothing recorded.
            log.warning("step announced, a later stage failed", extra={**self.log_fields, "reason": reason})
            return self.end(StepStatus.SUCCESS)
        self.outcome.reason, self.outcome.next_message = reason, None
        # Once the manifest is written the run is decided: a redelivery announces it, it is never dead-lettered.
        if is_transient(error) or not self.run_folder_key or self.state is RunState.MANIFEST:
            log.warning("step interrupted: the delivery is to be retried", extra={**self.log_fields, "reason": reason})
            if "START" in self.notifier.sent:
                self.notifier.send("WARNING", f"{self.runtime.spec.name} interrupted, Kafka will deliver it again: "
                                              f"{reason}")
            return self.end(StepStatus.RETRY)
        if not isinstance(error, EXPLAINED_FAILURES):
            log.exception("step failed unexpectedly", extra=self.log_fields)
        if isinstance(error, S3ConfigurationError):
            log.critical("S3 endpoint unusable for step results", extra={**self.log_fields, "reason": reason})
        request = self.request
        fields = {"config_name": request.config_name, "raw_message": request.raw_message,
                  "event_id": request.event_id, "run_id": request.run_id}
        if not fail_for_good(self.runtime, fields, self.config, self.credentials, self.client, self.folder, reason):
            self.outcome.reason = f"{reason} (and the dead-letter record could not be written)"
            return self.end(StepStatus.RETRY)
        if self.store is not None:
            self.store.discard()  # never announced, never to be: its partial objects go
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
                manifest = self.write_manifest(processed)
            if manifest is None:
                return self.lost_manifest_race()
            with tracing.stage("announce", topic=self.config.topic_out):
                self.announce(manifest)
            self.report_success(processed)
            return self.end(StepStatus.SUCCESS)
        except Exception as error:  # noqa: BLE001 - every failure ends one of two documented ways
            return self.fail(error)

    def resume(self, manifest: dict[str, Any]) -> StepOutcome:
        """A run that wrote its manifest and stopped before announcing: announce it, do not run it again."""
        with tracing.stage("announce", topic=self.config.topic_out, resumed=1):
            self.announce(manifest)
        self.outcome.resumed_announcement = True
        self.outcome.patches = int(manifest.get("patches", 0))
        self.notifier.send("SUCCESS", f"{self.runtime.spec.name} done: {self.outcome.patches} patches -> "
                                      f"{self.outcome.announced_folder} (announced after an interrupted delivery)")
        log.info("step announced from its manifest", extra={**self.log_fields, "run_folder": self.folder})
        return self.end(StepStatus.SUCCESS)

    def lost_manifest_race(self) -> StepOutcome:
        """The same delivery ran elsewhere at the same time and wrote its manifest first: that run's attempt is the
        one announced. This run's objects go; the winner announces, or (its marker not there within
        ``ANNOUNCE_WAIT_S``, e.g. it stopped) this run announces the winner's manifest: the same record."""
        assert self.client is not None and self.store is not None
        self.store.discard()
        log.info("another run of this delivery wrote the manifest first: its attempt is announced",
                 extra={**self.log_fields, "run_folder": self.folder, "attempt": self.attempt})
        marker = wait_for_announcement(self.client, self.config.bucket, self.folder,
                                       self.runtime.settings.announce_wait_s)
        if marker is not None:
            if marker.get("folder"):
                self.outcome.output_folder = self.outcome.announced_folder = str(marker["folder"])
            return self.end(StepStatus.DUPLICATE, Earlier.ANNOUNCED)
        manifest = read_json_object(self.client, self.config.bucket, manifest_key(self.folder))
        if not manifest:
            raise StepRetry("Another run of this delivery won the manifest, which cannot be read back yet")
        self.enter(RunState.MANIFEST, attempt=str(manifest.get("attempt", "")), resumed=True)
        return self.resume(manifest)

    def report_success(self, processed: Processed) -> None:
        outcome = self.outcome
        elapsed = time.monotonic() - self.started
        description = (f"{self.runtime.spec.name} done: {outcome.patches} patches of {processed.units} file(s) in "
                       f"{elapsed:.0f} s -> {outcome.announced_folder}")
        bpp = processed.bits_per_pixel
        if bpp is not None:
            description += f", {bpp:.3f} bits per pixel"
        if outcome.rejections:
            description += f"; {len(outcome.rejections)} rejected ({rejection_text(outcome.rejections[0])})"
        self.notifier.send("SUCCESS", description)
        log.info("step succeeded", extra={**self.log_fields, "output_folder": outcome.announced_folder,
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


@timed_stage(Stage.ANNOUNCE)
def announce(
    runtime: StepRuntime, config: StepConfig, client: S3Client, folder: str, request: StepRequest,
    next_message: dict[str, Any], created: str, trace_headers: Mapping[str, str] | None = None,
) -> RecordPosition | None:
    """Publish the next-step record (acknowledged), then write the run's announced marker. ``PublishError`` when
    Kafka did not acknowledge the record. The record is the same for every announcement of the run (``next_step``;
    ``trace_headers``: the manifest's ``ce_traceparent``/``ce_tracestate``)."""
    position: RecordPosition | None = None
    next_message = canonical(next_message)  # every announcement of the run: the same bytes
    headers = next_step_headers(request.run_id, config.topic_out, config.namespace, request.config_name, created)
    if config.topic_out:
        try:
            # ce_traceparent: the next step's delivery continues this trace (CloudEvents distributed tracing).
            traced = {name: str(value) for name, value in (trace_headers or {}).items()
                      if name in (tracing.KAFKA_TRACEPARENT, tracing.KAFKA_TRACESTATE)}
            position = runtime.publisher.publish(runtime.bootstrap_servers(config), config.topic_out, next_message,
                                                 headers={**headers, **traced})
        except Exception as error:  # noqa: BLE001 - Kafka refused or timed out: redelivered later
            raise PublishError(f"Publishing the next step message to {config.topic_out!r} failed: {error}") from None
    else:
        log.warning("the step has no Topics.out: the next step message is not published",
                    extra={"config_name": request.config_name})
    marker = {"event_id": request.event_id, "run_id": request.run_id, "announced_at": _now_text(),
              "ce_id": headers["ce_id"], "folder": next_message["S3_bucket_desc"]["folder"],
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


def earlier_run(client: S3Client, bucket: str, folder: str) -> tuple[Earlier, dict[str, Any]]:
    """What an earlier run of this delivery left: the marker (announced, failed) or the manifest it ended with."""
    for earlier, key in ((Earlier.ANNOUNCED, announced_key(folder)), (Earlier.FAILED, failed_key(folder)),
                         (Earlier.MANIFEST, manifest_key(folder))):
        found = read_json_object(client, bucket, key)
        if found is not None:
            return earlier, found
    return Earlier.NOTHING, {}


def wait_for_announcement(client: S3Client, bucket: str, folder: str, timeout_s: float) -> dict[str, Any] | None:
    """After losing the manifest race: wait (bounded) for the winner's announced marker; the marker, or None."""
    deadline = time.monotonic() + timeout_s
    while True:
        marker = read_json_object(client, bucket, announced_key(folder))
        if marker is not None:
            return marker
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))


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
    "fail_for_good",
    "failure_reason",
    "is_transient",
    "publish_dead_letter",
    "run_step",
    "secret_values",
    "step_s3_access",
]
