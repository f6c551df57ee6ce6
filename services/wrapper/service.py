"""The Wrapper process around ``run_step``: step configurations, a bounded set of running deliveries, shutdown.

A delivery is processed while its HTTP request waits (``deliver`` runs in a worker thread; the HTTP shell awaits
it): the answer says what became of the step only once that is durable, so Kafka (the KafkaSource's committed
offset) is the only queue of step messages. Admission (``admission.RunAdmission``) matches Knative's queue-proxy:
``workers`` (= ``containerConcurrency``) runs with a caller at once; a request queue-proxy admitted waits for a
worker (bounded by ``WORKER_WAIT_S``) instead of an instant 503; a run whose caller hung up (queue-proxy's 504)
goes on outside that count, at most ``max_orphaned_runs`` of them. A redelivery of an event that is running here
right now shares that run's outcome instead of starting another.

Shutdown (``shutdown``) never fails a step: running steps get ``SHUTDOWN_TIMEOUT_S``; then the inference pool stops,
so a step asking for more inference ends ``RETRY`` (``stopping.ProcessStopping``, transient: nothing put on record)
and is answered 503; a step blocked elsewhere is answered 503 too and left to the process exit. Kafka redelivers
both, and the next pod writes the same bytes into the same run folder.

Delivery parsing is a plain function (``parse_delivery``) over headers and body, so tests call it directly.
"""

from __future__ import annotations

import importlib
import json
import logging
from concurrent.futures import wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Mapping

from pydantic import ValidationError

from services.core.contracts import StepMessage
from services.core.tracing import event_trace_attributes
from services.core.step_config import (
    LocalStepConfigStore,
    StepConfig,
    StepConfigNotFound,
    StepConfigStore,
    StepCredentials,
    step_config_name,
)
from services.wrapper.admission import AdmissionState, Admitted, Refused, RunAdmission
from services.wrapper.inputs import make_s3_client
from services.wrapper.pipeline import (
    UNREADABLE_FOLDER,
    StepOutcome,
    StepRequest,
    StepRuntime,
    fail_for_good,
    run_step,
    step_s3_access,
)
from services.wrapper.results import ResultWriteError, failed_key, read_json_object, run_folder, run_id
from services.wrapper.settings import WrapperSettings

log = logging.getLogger(__name__)

# How a delivery to "/" names its step (the production sink URI carries it in the path instead):
# 1. the CloudEvent extension attribute ``stepconfig`` (binary mode: header ``ce-stepconfig``);
# 2. a Kafka record header ``stepconfig`` (a KafkaSource forwards it as ``ce-kafkaheaderstepconfig``);
# 3. the topic in a KafkaSource's ``ce-source`` (``/apis/v1/namespaces/<ns>/kafkasources/<name>#<topic>``):
#    the configuration of the step that consumes that topic, ``step_config_name(topic)``.
STEP_CONFIG_EXTENSION = "stepconfig"
CLOUDEVENTS_JSON = "application/cloudevents+json"


class BadDelivery(ValueError):
    """A delivery that can never be processed (bad JSON, not a step message): answered 400."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One KafkaSource delivery: the CloudEvent's attributes and the step message it carries."""

    event_id: str
    event_time: datetime | None
    source: str
    event_type: str
    attributes: Mapping[str, str]  # every ce-* attribute, lower-cased names without the prefix
    body: bytes
    # The HTTP request's own W3C ``traceparent``/``tracestate`` (a caller that is no CloudEvent producer, e.g. a
    # direct POST): the trace a step continues when the event itself carries none.
    transport_trace: Mapping[str, str] = field(default_factory=dict)

    def trace_attributes(self) -> dict[str, str]:
        return event_trace_attributes(self.attributes) or dict(self.transport_trace)

    def run_id(self, config_name: str) -> str:
        """The delivery's run id (``results.run_id``): the same for every redelivery of one event."""
        return run_id(config_name, self.source, self.event_id, self.attributes.get("time", ""))


def _parse_time(value: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def parse_delivery(headers: Mapping[str, str], body: bytes) -> Delivery:
    """A CloudEvent in binary mode (``ce-*`` headers, body = data) or structured mode (JSON envelope)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    content_type = lowered.get("content-type", "").split(";")[0].strip().lower()
    if content_type == CLOUDEVENTS_JSON:
        try:
            envelope = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadDelivery(f"structured CloudEvent is not valid JSON: {error}") from None
        if not isinstance(envelope, dict) or "data" not in envelope:
            raise BadDelivery("structured CloudEvent has no 'data'")
        data = envelope.pop("data")
        attributes = {str(k).lower(): str(v) for k, v in envelope.items()}
        body = json.dumps(data).encode("utf-8") if not isinstance(data, str) else data.encode("utf-8")
    else:
        attributes = {name[3:]: value for name, value in lowered.items() if name.startswith("ce-")}
    return Delivery(
        event_id=attributes.get("id", ""),
        event_time=_parse_time(attributes.get("time", "")),
        source=attributes.get("source", ""),
        event_type=attributes.get("type", ""),
        attributes=attributes,
        body=body,
        transport_trace={name: lowered[name] for name in ("traceparent", "tracestate") if lowered.get(name)},
    )


def config_name_of(delivery: Delivery, path_name: str = "") -> str:
    """The step configuration a delivery is for: the URI path, else the extension, Kafka header or source topic."""
    if path_name:
        return path_name
    for attribute in (STEP_CONFIG_EXTENSION, f"kafkaheader{STEP_CONFIG_EXTENSION}"):
        if delivery.attributes.get(attribute):
            return delivery.attributes[attribute]
    if "#" in delivery.source:
        topic = delivery.source.rsplit("#", 1)[1]
        if topic:
            return step_config_name(topic)
    raise BadDelivery(
        "cannot tell which step this delivery is for: POST to /<config name>, or set the CloudEvent extension "
        f"'{STEP_CONFIG_EXTENSION}', the Kafka header '{STEP_CONFIG_EXTENSION}', or a KafkaSource ce-source ending in #<topic>"
    )


def parse_step_message(body: bytes) -> tuple[StepMessage, Any]:
    """(validated message, the JSON as received); ``BadDelivery`` with a reason naming the faulty fields."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadDelivery(f"body is not valid JSON: {error}") from None
    try:
        return StepMessage.model_validate(raw), raw
    except ValidationError as error:
        # Without input values: a body may carry anything, and the reason goes into logs and notifications.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'message'}: {problem['msg']}"
            for problem in error.errors(include_input=False, include_url=False)
        )
        raise BadDelivery(f"body is not a step message (contracts section 3): {problems}") from None


def make_store(settings: WrapperSettings) -> StepConfigStore:
    if settings.store == "kubernetes":
        # Imported here: the kubernetes client is a dependency of Kubernetes deployments only.
        module = importlib.import_module("services.core.step_config_k8s")
        return module.KubernetesStepConfigStore.from_environment()
    return LocalStepConfigStore(settings.store_root)



DeliveryStatus = Literal["SUCCESS", "CRITICAL", "RETRY", "DUPLICATE", "IGNORED", "not_found", "invalid",
                         "unavailable"]


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What became of a delivery: a step outcome, or why no step ran (``detail`` never holds credentials)."""

    status: DeliveryStatus
    detail: str = ""
    run_folder: str | None = None
    earlier: str = ""  # DUPLICATE: "announced" or "failed"

    @classmethod
    def of(cls, outcome: StepOutcome) -> "DeliveryResult":
        return cls(outcome.status, outcome.reason, outcome.output_folder, outcome.earlier)


# After SHUTDOWN_TIMEOUT_S and stopping the inference pool: how long steps get to reach their next inference
# request (and end RETRY) before their callers are answered 503 and the process exits under them.
CUT_OFF_WAIT_S = 10.0
WAITING_PER_WORKER = 10  # queue-proxy's queue depth per containerConcurrency slot (pkg/queue/sharedmain/main.go)
STOPPING_RESULT = DeliveryResult("unavailable", "wrapper stopping: retry later")


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """How shutdown went: ``finished`` ran to their end, ``cut_off`` ended RETRY when inference stopped,
    ``abandoned`` were still running at the end (answered 503; the process must exit under them)."""

    finished: int
    cut_off: int
    abandoned: int

    @property
    def clean(self) -> bool:
        return self.cut_off == 0 and self.abandoned == 0


class WrapperService:
    """Step configurations + deliveries running ``run_step`` under ``RunAdmission``."""

    def __init__(self, runtime: StepRuntime, store: StepConfigStore,
                 on_outcome: Callable[[StepOutcome], None] | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.store = store
        self.on_outcome = on_outcome
        workers = self.settings.workers
        self.admission: RunAdmission[DeliveryResult] = RunAdmission(
            workers, self.settings.orphaned_runs_cap,
            # queue-proxy has at most containerConcurrency requests open here at once, but it sends the next one as
            # soon as it gives up on one (504), a moment before this process sees that caller go: a whole wave of
            # timed-out requests may still be counted. Bounded like queue-proxy's own queue (10 x CC); beyond
            # that something bypasses queue-proxy: 503 at once.
            max_waiting=WAITING_PER_WORKER * workers,
        )
        self.metrics = runtime.metrics
        self.metrics.runs_in_flight.set_function(lambda: self.admission.state().running)
        self.metrics.workers.set(workers)

    # ---- admission ---------------------------------------------------------------------------------------

    def submit(self, run_key: str, work: Callable[[], DeliveryResult]) -> Admitted[DeliveryResult] | Refused:
        """Start ``work`` (or queue it for a worker), join the running run of ``run_key``, or refuse (``Refused``)."""
        return self.admission.admit(run_key, work)

    # ---- deliveries (blocking: run in a worker) -------------------------------------------------------------

    def deliver(self, config_name: str, delivery: Delivery, message: StepMessage, raw: Any) -> DeliveryResult:
        """Run the step of one delivery to a durable end (see ``pipeline``)."""
        loaded = self._load(config_name)
        if isinstance(loaded, DeliveryResult):
            return loaded
        config, credentials = loaded
        request = StepRequest(
            config_name=config_name, message=message, raw_message=raw, event_id=delivery.event_id,
            event_time=delivery.event_time, event_source=delivery.source, run_id=delivery.run_id(config_name),
            trace_attributes=delivery.trace_attributes(),
        )
        with self.metrics.step(self.runtime.spec.name) as clock:
            outcome = run_step(self.runtime, request, config, credentials)
        self.metrics.step_ended(self.runtime.spec.name, outcome.status, clock, outcome.patches,
                                len(outcome.rejections))
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return DeliveryResult.of(outcome)

    def deliver_unreadable(self, config_name: str, delivery: Delivery, reason: str) -> DeliveryResult:
        """A body that is no step message, for a known step: put on record once (dead-letter record, CRITICAL, a
        failed marker under ``<result prefix>/_unreadable-messages/``); ``invalid`` when the step is unknown."""
        loaded = self._load(config_name)
        if isinstance(loaded, DeliveryResult):
            return DeliveryResult("invalid", reason) if loaded.status == "not_found" else loaded
        config, credentials = loaded
        folder = run_folder(f"{self.runtime.result_prefix.strip('/')}/{UNREADABLE_FOLDER}", delivery.run_id(config_name))
        try:
            client = make_s3_client(step_s3_access(self.runtime, config, credentials))
            if read_json_object(client, config.bucket, failed_key(folder)) is not None:
                return DeliveryResult("DUPLICATE", reason, folder, "failed")
        except ResultWriteError as error:
            return DeliveryResult("RETRY", f"the workflow bucket cannot be read: {error}")
        try:
            raw: Any = json.loads(delivery.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raw = delivery.body
        fields = {"config_name": config_name, "raw_message": raw, "event_id": delivery.event_id,
                  "run_id": delivery.run_id(config_name)}
        critical = f"Bad step message for {config_name}: {reason}"
        if not fail_for_good(self.runtime, fields, config, credentials, client, folder, critical):
            return DeliveryResult("RETRY", "the dead-letter record could not be written")
        self.metrics.dead_letter(self.runtime.spec.name)
        return DeliveryResult("CRITICAL", critical, folder)

    def _load(self, config_name: str) -> tuple[StepConfig, StepCredentials] | DeliveryResult:
        try:
            return self.load_step(config_name)
        except StepConfigNotFound as error:
            return DeliveryResult("not_found", str(error.args[0] if error.args else error))
        except ValueError as error:  # a name the store refuses ("../x")
            return DeliveryResult("invalid", f"invalid step configuration name: {error}")
        except Exception:  # noqa: BLE001 - the store (Kubernetes API) failed: the source retries
            log.exception("step configuration could not be read", extra={"config_name": config_name})
            return DeliveryResult("unavailable", "step configuration store unavailable: retry later")

    def load_step(self, config_name: str) -> tuple[StepConfig, StepCredentials]:
        """The step's configuration and credentials; ``StepConfigNotFound`` when the store has none."""
        return self.store.get(self.settings.namespace, config_name)

    # ---- state and shutdown ---------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Ready while taking deliveries; the inference server's state does not matter (steps wait for it)."""
        return (False, "stopping") if self.admission.stopping else (True, "ready")

    def state(self) -> AdmissionState:
        return self.admission.state()

    def shutdown(self, timeout_s: float | None = None, cut_off_wait_s: float = CUT_OFF_WAIT_S) -> ShutdownReport:
        """Refuse new deliveries (503), let running ones finish (up to ``timeout_s``), then cut off the rest.

        A step cut off is never failed for good: it ends ``RETRY`` at its next inference request
        (``ProcessStopping``) or is answered 503 while it runs on until the process exits; Kafka redelivers it,
        and its run folder (never announced) is where the redelivery writes the same bytes again."""
        running = self.admission.stop(STOPPING_RESULT)
        timeout = self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
        done, not_done = wait(running, timeout=timeout)
        cut_off = abandoned = 0
        if not_done:
            log.warning("shutdown: steps still running after the shutdown timeout: stopping their inference",
                        extra={"steps": len(not_done), "timeout_s": timeout})
            self.runtime.inference_pool.shutdown(wait=False)  # their next request: ProcessStopping, RETRY
            ended, _ = wait(not_done, timeout=cut_off_wait_s)
            cut_off = len(ended)
            abandoned = self.admission.answer_unfinished(STOPPING_RESULT)
            if abandoned:
                log.warning("shutdown: steps left to the process exit, their deliveries answered 503",
                            extra={"steps": abandoned})
        self.admission.close(wait=not abandoned)
        if not abandoned:
            self.runtime.close()  # nothing uses the runtime any more
        return ShutdownReport(finished=len(done), cut_off=cut_off, abandoned=abandoned)
