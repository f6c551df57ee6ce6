"""The Wrapper process around ``run_step``: step configurations, a bounded worker pool, deliveries, shutdown.

Admission is bounded: ``workers`` steps run at once and ``queue_size`` more may wait; a delivery beyond that is
refused (the HTTP shell answers 503 and the KafkaSource retries later). There is no thread per request. A delivery
whose event is already queued, running or in the acceptance journal is acknowledged without being queued twice.

Durability (``acceptance_journal``): ``accept`` records each delivery in the step's workflow bucket before it is
acknowledged, the entry goes when the step has ended, and ``sweep`` (at startup, then every
``journal_sweep_interval_s``) runs the entries that dead Wrappers left behind. Assumption: a step's deliveries go
to one Knative Service, the Wrapper of ``ML.ServiceName``; its replicas share the journal through the bucket.

Delivery parsing is a plain function (``parse_delivery``) over headers and body, so tests call it directly.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Mapping

from pydantic import ValidationError

from services.core.contracts import StepMessage
from services.core.step_config import (
    LocalStepConfigStore,
    StepConfig,
    StepConfigNotFound,
    StepConfigStore,
    StepCredentials,
    step_config_name,
)
from services.wrapper.acceptance_journal import (
    AcceptanceJournal,
    ConditionFailed,
    HeldEntry,
    JournalOwner,
    JournalUnavailable,
    S3ClientCache,
    entry_id,
)
from services.wrapper.inputs.s3_listing import S3Client
from services.wrapper.notifications import dead_letter_record
from services.wrapper.pipeline import (
    StepOutcome,
    StepRequest,
    StepRuntime,
    publish_dead_letter,
    run_step,
    secret_values,
    step_s3_access,
)
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


@dataclass
class Reservation:
    """A place in the worker pool, held from admission until the step ends (or the delivery is refused)."""

    event_key: str
    released: bool = False


AcceptanceStatus = Literal["accepted", "duplicate", "busy", "stopping", "not_found", "invalid", "unavailable"]


@dataclass(frozen=True, slots=True)
class Acceptance:
    """What became of a delivery; ``detail`` says why when it was not accepted (no credentials in it)."""

    status: AcceptanceStatus
    detail: str = ""


@dataclass
class SweepReport:
    steps: int = 0  # steps of this Wrapper's service whose journal was looked at
    entries: int = 0  # entries seen
    resumed: int = 0  # taken over and queued
    given_up: int = 0  # failed for good: too many attempts, or unreadable
    deferred: bool = False  # the pool was full: the rest waits for the next sweep


@dataclass
class PoolState:
    capacity: int
    active: int = 0
    running: int = 0
    completed: int = 0
    in_progress: set[str] = field(default_factory=set)


def event_key(config_name: str, journal_entry_id: str) -> str:
    """The in-process name of an accepted event: its step and its journal entry (the same for a redelivery)."""
    return f"{config_name}/{journal_entry_id}"


class WrapperService:
    """Step configurations + a bounded worker pool around ``run_step`` + the acceptance journal.

    ``recover_on_start``: readiness waits for ``start_journal_keeping`` (the first sweep); the CLI sets it, tests
    that drive the service directly need not.
    """

    def __init__(self, runtime: StepRuntime, store: StepConfigStore,
                 on_outcome: Callable[[StepOutcome], None] | None = None, recover_on_start: bool = False) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.store = store
        self.on_outcome = on_outcome
        owner = JournalOwner.for_this_process(self.settings.pod_name)
        self.journal = AcceptanceJournal(self.settings.journal_prefix, owner, self.settings.journal_lease_s)
        self._s3_clients = S3ClientCache()
        self._pool = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="step")
        self._lock = threading.Lock()
        self._state = PoolState(capacity=self.settings.workers + self.settings.queue_size)
        self._stopping = False
        self._futures: set[Future[StepOutcome]] = set()
        self._held: dict[str, HeldEntry] = {}  # journal entries of queued and running steps, by event key
        self._keepers_stop = threading.Event()
        self._keepers: list[threading.Thread] = []
        self._startup_recovery_done = threading.Event()
        if not recover_on_start:
            self._startup_recovery_done.set()

    # ---- admission ---------------------------------------------------------------------------------------

    def reserve(self, event_key: str) -> Reservation | str:
        """A reservation, or why not: ``"duplicate"`` (already queued or running), ``"busy"`` or ``"stopping"``."""
        with self._lock:
            if self._stopping:
                return "stopping"
            if event_key and event_key in self._state.in_progress:
                return "duplicate"
            if self._state.active >= self._state.capacity:
                return "busy"
            self._state.active += 1
            if event_key:
                self._state.in_progress.add(event_key)
            return Reservation(event_key)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation.released:
                return
            reservation.released = True
            self._state.active -= 1
            self._state.in_progress.discard(reservation.event_key)

    def accept(self, config_name: str, delivery: Delivery, message: StepMessage, raw: Any) -> Acceptance:
        """Admit a delivery: reserve a place, load the step, journal the event, queue the step (blocking calls:
        the HTTP shell runs this in a thread). Only ``"accepted"`` and ``"duplicate"`` are acknowledged (202)."""
        journal_entry = entry_id(delivery.attributes)
        reservation = self.reserve(event_key(config_name, journal_entry))
        if isinstance(reservation, str):
            return Acceptance(reservation)  # type: ignore[arg-type]
        try:
            config, credentials = self.load_step(config_name)
        except StepConfigNotFound as error:
            self.release(reservation)
            return Acceptance("not_found", str(error.args[0] if error.args else error))
        except ValueError as error:  # a name the store refuses ("../x")
            self.release(reservation)
            return Acceptance("invalid", f"invalid step configuration name: {error}")
        except Exception:  # noqa: BLE001 - the store (Kubernetes API) failed: the source retries
            self.release(reservation)
            log.exception("step configuration could not be read", extra={"config_name": config_name})
            return Acceptance("unavailable", "step configuration store unavailable: retry later")
        entry = self.journal.new_entry(config_name, self.runtime.spec.name, delivery.attributes, raw, journal_entry)
        try:
            held = self.journal.record(self._journal_client(config, credentials), config.bucket, entry)
        except ConditionFailed:
            # Journalled already: accepted earlier here or by another replica, whose entry sees it through.
            self.release(reservation)
            return Acceptance("duplicate")
        except JournalUnavailable as error:
            self.release(reservation)
            log.warning("delivery not journalled: refused for a retry",
                        extra={"config_name": config_name, "event_id": delivery.event_id, "reason": str(error)})
            return Acceptance("unavailable", "the step could not be recorded in its workflow bucket: retry later")
        request = StepRequest(
            config_name=config_name, message=message, raw_message=raw,
            event_id=delivery.event_id, event_time=delivery.event_time,
        )
        try:
            self.submit(reservation, request, config, credentials, held)
        except RuntimeError:  # the pool shut down since the reservation; the entry stays for a successor
            return Acceptance("stopping")
        return Acceptance("accepted")

    def submit(
        self, reservation: Reservation, request: StepRequest, config: StepConfig, credentials: StepCredentials,
        held: HeldEntry | None = None,
    ) -> Future[StepOutcome]:
        def work() -> StepOutcome:
            with self._lock:
                self._state.running += 1
            try:
                outcome = run_step(self.runtime, request, config, credentials)
                if held is not None:
                    self._end_entry(held, request, outcome)
                if self.on_outcome is not None:
                    self.on_outcome(outcome)
                return outcome
            finally:
                if held is not None:
                    held.keep()  # no-op once ended; after an unexpected error the step is retried after the lease
                with self._lock:
                    self._state.running -= 1
                    self._state.completed += 1
                    self._held.pop(reservation.event_key, None)
                self.release(reservation)

        with self._lock:
            if held is not None:
                self._held[reservation.event_key] = held
        try:
            future = self._pool.submit(work)
        except RuntimeError:  # shut down: nothing runs, the journal entry (if any) stays
            with self._lock:
                self._held.pop(reservation.event_key, None)
            if held is not None:
                held.keep()
            self.release(reservation)
            raise
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _end_entry(self, held: HeldEntry, request: StepRequest, outcome: StepOutcome) -> None:
        if outcome.status != "CRITICAL" or outcome.dead_letter_delivered:
            held.remove()
            return
        held.keep()
        log.warning("step failure could not be put on record: its journal entry is kept and the step runs again "
                    "after the lease", extra={"config_name": request.config_name, "event_id": request.event_id,
                                              "lease_s": self.settings.journal_lease_s})

    def _forget(self, future: Future[StepOutcome]) -> None:
        with self._lock:
            self._futures.discard(future)
        if future.exception() is not None:  # run_step reports failures itself; this would be a bug
            log.error("step worker raised", exc_info=future.exception())

    def load_step(self, config_name: str) -> tuple[StepConfig, StepCredentials]:
        """The step's configuration and credentials; ``StepConfigNotFound`` when the store has none."""
        return self.store.get(self.settings.namespace, config_name)

    def _journal_client(self, config: StepConfig, credentials: StepCredentials) -> S3Client:
        return self._s3_clients.get(step_s3_access(self.runtime, config, credentials))

    def report_bad_delivery(self, config_name: str, delivery: Delivery, reason: str) -> bool:
        """CRITICAL + dead-letter record for an unprocessable delivery to a known step; False if the step is unknown."""
        try:
            config, credentials = self.load_step(config_name)
        except (StepConfigNotFound, ValueError):
            return False
        secrets = secret_values(credentials)
        try:
            raw: Any = json.loads(delivery.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raw = delivery.body
        record = dead_letter_record(
            reason, config_name, raw, task=self.runtime.spec.name, workflow_name=config.workflow_name,
            component_name=config.component_name, topic_in=config.topic_in, event_id=delivery.event_id, secrets=secrets,
        )
        publish_dead_letter(self.runtime, config, record)
        self.runtime.notifier(config, secrets).send("CRITICAL", f"Bad step message for {config_name}: {reason}")
        return True

    # ---- the journal: renewal and sweeps ------------------------------------------------------------------

    def renew_held(self) -> int:
        """Renew the entries of every queued and running step; how many are still held."""
        with self._lock:
            held = list(self._held.values())
        return sum(1 for entry in held if entry.renew())

    def sweep(self) -> SweepReport:
        """Queue the journal entries that dead Wrappers of this service left (bounded by the pool)."""
        report = SweepReport()
        service_name = self.settings.wrapper_service_name
        try:
            listed_steps = self.store.list(self.settings.namespace)
        except Exception as error:  # noqa: BLE001 - e.g. the Kubernetes API refused to list ConfigMaps
            log.error("step configurations could not be listed: no accepted step of a dead Wrapper is resumed",
                      extra={"namespace": self.settings.namespace, "error": f"{type(error).__name__}: {error}"[:300]})
            return report
        for listed_config in (c for c in listed_steps if c.service_name == service_name):
            if self._stopping:
                break
            try:
                config, credentials = self.load_step(listed_config.config_name)
            except StepConfigNotFound:
                continue  # stopped since it was listed
            except Exception as error:  # noqa: BLE001 - this step's configuration is unreadable; the others go on
                log.warning("step configuration not readable: its journal is not swept",
                            extra={"config_name": listed_config.config_name,
                                   "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            report.steps += 1
            if not self._sweep_step(config, credentials, report):
                report.deferred = True
                break
        if report.entries or report.deferred:
            log.info("journal swept", extra={"steps": report.steps, "entries": report.entries,
                                             "resumed": report.resumed, "given_up": report.given_up,
                                             "deferred": report.deferred})
        return report

    def _sweep_step(self, config: StepConfig, credentials: StepCredentials, report: SweepReport) -> bool:
        """False when the pool is full (or stopping): the sweep ends there."""
        client = self._journal_client(config, credentials)
        try:
            listed = self.journal.entries(client, config.bucket, config.config_name)
        except JournalUnavailable as error:
            log.warning("journal not readable", extra={"config_name": config.config_name, "reason": str(error)})
            return True
        for item in listed:
            report.entries += 1
            key = event_key(config.config_name, item.entry_id)
            with self._lock:
                if key in self._state.in_progress:
                    continue  # ours, queued or running
            try:
                read = self.journal.read(client, config.bucket, item.key)
            except JournalUnavailable as error:
                log.warning("journal entry not readable", extra={"key": item.key, "reason": str(error)})
                continue
            except ValueError as error:
                # Left in place: it may come from a newer Wrapper version that can read it.
                log.error("journal entry of an unknown format left in place", extra={"key": item.key,
                                                                                     "reason": str(error)})
                continue
            if read is None:
                continue  # ended meanwhile
            entry, etag = read
            if entry.task != self.runtime.spec.name or not self.journal.is_abandoned(entry, item.last_modified):
                continue
            reservation = self.reserve(key)
            if reservation == "duplicate":
                continue
            if isinstance(reservation, str):
                return False
            try:
                held = self.journal.take_over(client, config.bucket, item.key, entry, etag)
            except ConditionFailed:
                self.release(reservation)
                continue  # another Wrapper took it, or it ended
            except JournalUnavailable as error:
                self.release(reservation)
                log.warning("journal entry not taken over", extra={"key": item.key, "reason": str(error)})
                continue
            message: StepMessage | None = None
            reason = ""
            if held.entry.attempt > self.settings.journal_max_attempts:
                reason = (f"Gave up after {entry.attempt} attempts: the Wrapper stopped (killed, out of memory, or "
                          "unable to record a failure) each time it ran this step")
            else:
                try:
                    message = StepMessage.model_validate(entry.message)
                except ValidationError:
                    reason = "The journalled step message is not a step message"
            if message is None:
                self._give_up(held, config, credentials, reason)
                self.release(reservation)
                report.given_up += 1
                continue
            log.info("accepted step resumed from the journal",
                     extra={"config_name": config.config_name, "event_id": entry.event.get("id", ""),
                            "attempt": held.entry.attempt, "previous_owner": entry.owner.pod})
            request = StepRequest(
                config_name=config.config_name, message=message, raw_message=entry.message,
                event_id=entry.event.get("id", ""), event_time=_parse_time(entry.event.get("time", "")),
                attempt=held.entry.attempt,
            )
            try:
                self.submit(reservation, request, config, credentials, held)
            except RuntimeError:  # shutting down: the entry waits for a successor
                return False
            report.resumed += 1
        return True

    def _give_up(self, held: HeldEntry, config: StepConfig, credentials: StepCredentials, reason: str) -> None:
        """Fail a journalled step for good: dead-letter record and CRITICAL, as for any failed step."""
        secrets = secret_values(credentials)
        record = dead_letter_record(
            reason, config.config_name, held.entry.message, task=self.runtime.spec.name,
            workflow_name=config.workflow_name, component_name=config.component_name, topic_in=config.topic_in,
            event_id=held.entry.event.get("id", ""), secrets=secrets,
        )
        delivered = publish_dead_letter(self.runtime, config, record)
        self.runtime.notifier(config, secrets).send("CRITICAL", reason)
        log.error("journalled step given up", extra={"config_name": config.config_name, "reason": reason,
                                                      "event_id": held.entry.event.get("id", "")})
        if delivered:
            held.remove()
        else:
            held.keep()

    def start_journal_keeping(self) -> SweepReport | None:
        """At startup: sweep once (what a dead predecessor left), then renew and sweep in the background.

        Readiness turns true after the first sweep, whether or not it could read everything (an unreadable store
        must not keep the Wrapper from serving new deliveries; the next sweeps try again)."""
        report: SweepReport | None = None
        try:
            report = self.sweep()
        except Exception:  # noqa: BLE001 - logged; the periodic sweeps try again
            log.exception("startup journal sweep failed")
        finally:
            self._startup_recovery_done.set()
        self._keepers = [
            threading.Thread(target=self._renew_loop, name="journal-renew", daemon=True),
            threading.Thread(target=self._sweep_loop, name="journal-sweep", daemon=True),
        ]
        for thread in self._keepers:
            thread.start()
        return report

    def _renew_loop(self) -> None:
        interval = self.settings.journal_lease_s / 4
        while True:
            stopping = self._keepers_stop.wait(interval)
            try:
                self.renew_held()
            except Exception:  # noqa: BLE001 - a renewal bug must not end the renewals of the other entries
                log.exception("journal renewal failed")
            if stopping:
                with self._lock:
                    if not self._held:
                        return
                # A shutdown that timed out: steps still running keep their entries for as long as the process lives.
                time.sleep(interval)

    def _sweep_loop(self) -> None:
        while not self._keepers_stop.wait(self.settings.journal_sweep_interval_s):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - e.g. the store refused listing; the next sweep tries again
                log.exception("journal sweep failed")

    # ---- state and shutdown ---------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if not self._startup_recovery_done.is_set():
            return False, "resuming accepted steps from the journal"
        return self.runtime.model_client.model_ready()

    def state(self) -> dict[str, int]:
        with self._lock:
            return {"capacity": self._state.capacity, "active": self._state.active,
                    "running": self._state.running, "completed": self._state.completed}

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Refuse new deliveries, let accepted ones finish (up to ``timeout_s``); True when all finished.

        Steps that did not finish keep their journal entries (renewed while this process lives): a successor runs
        them once the lease has passed."""
        with self._lock:
            self._stopping = True
            pending = list(self._futures)
        timeout = self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
        _, not_done = wait(pending, timeout=timeout)
        if not_done:
            log.warning("shutdown: steps still running", extra={"steps": len(not_done)})
        self._keepers_stop.set()
        self._pool.shutdown(wait=not not_done, cancel_futures=False)
        self.runtime.close()
        return not not_done
