"""The Wrapper process around ``run_step``: step configurations, a bounded worker pool, deliveries, shutdown.

Admission is bounded: ``workers`` steps run at once and ``queue_size`` more may wait; a delivery beyond that is
refused (the HTTP shell answers 503 and the KafkaSource retries later). There is no thread per request. A delivery
whose event id is already queued or running is acknowledged without being queued twice.

Delivery parsing is a plain function (``parse_delivery``) over headers and body, so tests call it directly.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

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
from services.wrapper.notifications import dead_letter_record
from services.wrapper.pipeline import StepOutcome, StepRequest, StepRuntime, publish_dead_letter, run_step, secret_values
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


@dataclass
class PoolState:
    capacity: int
    active: int = 0
    running: int = 0
    completed: int = 0
    in_progress: set[str] = field(default_factory=set)


class WrapperService:
    """Step configurations + a bounded worker pool around ``run_step``."""

    def __init__(self, runtime: StepRuntime, store: StepConfigStore, on_outcome: Callable[[StepOutcome], None] | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.store = store
        self.on_outcome = on_outcome
        self._pool = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="step")
        self._lock = threading.Lock()
        self._state = PoolState(capacity=self.settings.workers + self.settings.queue_size)
        self._stopping = False
        self._futures: set[Future[StepOutcome]] = set()

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

    def submit(
        self, reservation: Reservation, request: StepRequest, config: StepConfig, credentials: StepCredentials
    ) -> Future[StepOutcome]:
        def work() -> StepOutcome:
            with self._lock:
                self._state.running += 1
            try:
                outcome = run_step(self.runtime, request, config, credentials)
                if self.on_outcome is not None:
                    self.on_outcome(outcome)
                return outcome
            finally:
                with self._lock:
                    self._state.running -= 1
                    self._state.completed += 1
                self.release(reservation)

        future = self._pool.submit(work)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[StepOutcome]) -> None:
        with self._lock:
            self._futures.discard(future)
        if future.exception() is not None:  # run_step reports failures itself; this would be a bug
            log.error("step worker raised", exc_info=future.exception())

    def load_step(self, config_name: str) -> tuple[StepConfig, StepCredentials]:
        """The step's configuration and credentials; ``StepConfigNotFound`` when the store has none."""
        return self.store.get(self.settings.namespace, config_name)

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

    # ---- state and shutdown ---------------------------------------------------------------------------------

    def state(self) -> dict[str, int]:
        with self._lock:
            return {"capacity": self._state.capacity, "active": self._state.active,
                    "running": self._state.running, "completed": self._state.completed}

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Refuse new deliveries, let accepted ones finish (up to ``timeout_s``); True when all finished."""
        with self._lock:
            self._stopping = True
            pending = list(self._futures)
        timeout = self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
        _, not_done = wait(pending, timeout=timeout)
        if not_done:
            log.warning("shutdown: steps still running", extra={"steps": len(not_done)})
        self._pool.shutdown(wait=not not_done, cancel_futures=False)
        self.runtime.close()
        return not not_done
