"""The controller's logic as plain methods: one ``system.ML`` record in, the step stored and wired (or unwired).

``WorkflowController.handle`` never raises: every outcome, a malformed record included, is a ``HandlingResult``
that says what was done, the production answer to send (contracts section 1), and whether the sender should
retry (infrastructure failures only; a bad message is never worth retrying). Every failure is also reported on
``monitoring.notify``: CRITICAL when it is final (a refused message, a permanent API error), WARNING when the
sender retries (a temporary one; if every retry fails, the dead-letter path reports it CRITICAL).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from services.core.contracts import IGNORED_STATUSES, PUBLISHED, STOPPING, WorkflowMessage
from services.core.metrics import ControllerMetrics
from services.core.step_config import (
    StepConfig,
    StepConfigNotFound,
    StepConfigStore,
    step_config_from_message,
    step_config_name,
)

from .api_retry import is_transient
from .consumer_positions import ConsumerPositions
from .dead_letters import DeadLetterWriter, refused_message_record
from .messages import ANSWER_INVALID, ANSWER_VALID, MessageRejected, parse_workflow_message
from .notifications import ControllerNotifier, NullNotifier
from .registry import WorkflowRegistry
from .wiring import StepRejected, consumer_group, dead_letter_topic

# Creates Kafka topics that do not exist yet (an admin call); raises when it cannot.
TopicCreator = Callable[[str, list[str]], None]

log = logging.getLogger(__name__)

WIRED = "wired"
UNWIRED = "unwired"
IGNORED = "ignored"
REJECTED = "rejected"
FAILED = "failed"


class SourceDriver(Protocol):
    """Connects a step's input topic to its Wrapper: KafkaSources on Kubernetes, dispatcher threads locally."""

    def check(self, config: StepConfig) -> None:
        """Raise ``StepRejected`` when the step cannot be wired whatever is retried."""

    def release_conflicting(self, config: StepConfig) -> bool:
        """Before the configuration is overwritten: remove a wired source that the new configuration cannot update
        in place, so that it never delivers into the new settings; True when one was removed."""

    def wire(self, config: StepConfig) -> dict[str, Any]:
        """Create or replace (idempotent); returns what was wired, for the status API."""

    def unwire(self, config: StepConfig | None, namespace: str, topic_in: str) -> bool:
        """Remove; False when nothing was wired (not an error)."""

    def source_info(self, config: StepConfig) -> dict[str, Any]: ...

    def describe(self, config: StepConfig) -> dict[str, Any]: ...

    def resume(self, configs: list[StepConfig]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class HandlingResult:
    action: str
    valid: bool
    reason: str = ""
    retryable: bool = False
    workflow_name: str = ""
    config_name: str = ""
    # Refused for good and kept on ``<system topic>.dlq`` (dead_letters.py).
    dead_lettered: bool = False

    @property
    def refused_for_good(self) -> bool:
        return self.action in (REJECTED, FAILED) and not self.retryable

    @property
    def answer(self) -> dict[str, str]:
        return ANSWER_VALID if self.valid else ANSWER_INVALID


class TopicsNotCreated(ConnectionError):
    """The step's dead-letter topic could not be created: Kafka trouble, worth a retry."""


def _error_text(error: BaseException) -> str:
    status = getattr(error, "status", None)
    reason = getattr(error, "reason", None)
    if status is not None:
        # ApiException's str() includes response headers and body; status and reason say enough.
        return f"{type(error).__name__}: HTTP {status} {reason or ''}".strip()
    return f"{type(error).__name__}: {error}"[:300]


class WorkflowController:
    def __init__(self, store: StepConfigStore, driver: SourceDriver, bootstrap_servers: str,
                 registry: WorkflowRegistry | None = None, namespaces: list[str] | None = None,
                 notifier: ControllerNotifier | None = None, create_topics: TopicCreator | None = None,
                 dead_letter_suffix: str = ".dlq", positions: ConsumerPositions | None = None,
                 dead_letter_writer: DeadLetterWriter | None = None, system_topic: str = "system.ML",
                 metrics: ControllerMetrics | None = None) -> None:
        self.store = store
        self.driver = driver
        self.bootstrap_servers = bootstrap_servers
        self.registry = registry or WorkflowRegistry()
        self.metrics = metrics if metrics is not None else ControllerMetrics()
        self.metrics.count_wired(self.registry.count_in_state)
        self.notifier: ControllerNotifier = notifier or NullNotifier()
        # None: dead-letter topics are not created here (e.g. no Kafka in a unit test).
        self.create_topics = create_topics
        self.dead_letter_suffix = dead_letter_suffix
        # Consumer positions kept across source deletion (consumer_positions.py); None: not kept (no Kafka).
        self.positions = positions
        # Where a message refused for good is kept (``<system_topic><dead_letter_suffix>``); None: only reported.
        self.dead_letter_writer = dead_letter_writer
        self.system_topic = system_topic
        # None or empty: any namespace (stored steps listed cluster-wide); else only these.
        self.namespaces = sorted(set(namespaces or []))
        # Messages are rare and each touches a few API objects: handling them one at a time keeps a publish and a
        # stop of the same step from interleaving.
        self._lock = threading.Lock()

    def resume(self) -> int:
        """Load the stored steps into the registry and let the driver restart what it must; returns the count."""
        configs = self.stored_steps()
        self.driver.resume(configs)
        for config in configs:
            self.registry.wired(config, self.driver.source_info(config))
        if configs:
            log.info("stored steps resumed", extra={"steps": len(configs)})
        return len(configs)

    def stored_steps(self) -> list[StepConfig]:
        if not self.namespaces:
            return self.store.list()
        return [config for namespace in self.namespaces for config in self.store.list(namespace)]

    def handle(self, body: bytes | str | Mapping[str, Any], content_type: str = "",
               event_id: str = "") -> HandlingResult:
        """``event_id``: where the message came from (``ce-id``, or ``partition:<p>/offset:<o>``), for its dead
        letter."""
        result, message = self._handle(body, content_type)
        self.metrics.handled(result.action)
        self._report(result, message, body)
        if result.refused_for_good and self.dead_letter_writer is not None:
            result = self._keep_refused(result, message, body, event_id)
        return result

    def _keep_refused(self, result: HandlingResult, message: WorkflowMessage | None,
                      body: bytes | str | Mapping[str, Any], event_id: str) -> HandlingResult:
        """Write the dead-letter record of a refused message; not written: retryable (answered 503 / retried)."""
        assert self.dead_letter_writer is not None
        secrets = list(message.S3_bucket.reveal_credentials().values()) \
            if message is not None and message.S3_bucket is not None else []
        raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
        workflow_name = result.workflow_name or _best_effort_names(body)[0]
        topic = dead_letter_topic(self.system_topic, self.dead_letter_suffix)
        record = refused_message_record(raw, result.reason, self.system_topic, event_id=event_id,
                                        workflow_name=workflow_name, config_name=result.config_name, secrets=secrets)
        try:
            self.dead_letter_writer(topic, record, [])
        except Exception as error:  # noqa: BLE001 - e.g. DeadLetterNotWritten: the broker is away
            log.error("refused workflow message not dead-lettered, to be retried",
                      extra={"workflow": workflow_name, "dead_letter_topic": topic, "error": str(error)[:300]})
            return dataclasses.replace(result, retryable=True, valid=True,
                                       reason=f"{result.reason}; dead-letter write failed: {error}"[:300])
        log.error("refused workflow message dead-lettered", extra={"workflow": workflow_name, "event_id": event_id,
                                                                   "dead_letter_topic": topic,
                                                                   "reason": result.reason})
        return dataclasses.replace(result, dead_lettered=True)

    def _handle(self, body: bytes | str | Mapping[str, Any], content_type: str
                ) -> tuple[HandlingResult, WorkflowMessage | None]:
        try:
            message = parse_workflow_message(body, content_type)
        except MessageRejected as rejected:
            log.warning("workflow message rejected", extra={"reason": rejected.reason})
            return HandlingResult(REJECTED, valid=False, reason=rejected.reason), None
        if self.namespaces and message.ML.Namespace not in self.namespaces \
                and message.workflow_status in (PUBLISHED, STOPPING):
            reason = (f"ML.Namespace {message.ML.Namespace!r} is not a workflow namespace of this controller "
                      f"({', '.join(self.namespaces)})")
            log.warning("workflow message rejected", extra={"workflow": message.workflow_name, "reason": reason})
            return HandlingResult(REJECTED, valid=False, reason=reason, workflow_name=message.workflow_name), message
        with self._lock:
            try:
                return self._dispatch(message), message
            except Exception as error:  # the controller keeps serving whatever went wrong
                config_name = step_config_name(message.Topics.in_)
                transient = is_transient(error)
                text = _error_text(error)
                log.error("workflow message not applied",
                          extra={"workflow": message.workflow_name, "status": message.workflow_status,
                                 "config_name": config_name, "error": text, "retryable": transient},
                          exc_info=not transient)
                self.registry.failed(message.workflow_name, message.ML.Namespace, config_name, message.Topics.in_,
                                     text)
                # A permanent failure is answered like an invalid message (contracts section 1): the DSL must not
                # take "valid" for "wired". A temporary one is answered 503 by the shell, and retried.
                return HandlingResult(FAILED, valid=transient, reason=text, retryable=transient,
                                      workflow_name=message.workflow_name, config_name=config_name), message

    def _report(self, result: HandlingResult, message: WorkflowMessage | None,
                body: bytes | str | Mapping[str, Any]) -> None:
        """Every failure on ``monitoring.notify`` (see the module docstring)."""
        if result.action not in (REJECTED, FAILED):
            return
        status = "WARNING" if result.retryable else "CRITICAL"
        what = "workflow message refused" if result.action == REJECTED else (
            f"workflow step {result.config_name} not applied" + (" (retried)" if result.retryable else ""))
        secrets: list[str] = []
        if message is not None:
            workflow_name, component, namespace = (message.workflow_name, message.ML.component_name,
                                                   message.ML.Namespace)
            secrets = sorted(message.credential_values())
        else:
            workflow_name, component, namespace = _best_effort_names(body)
        self.notifier.notify(status, f"{what}: {result.reason}", workflow_name=workflow_name,
                             component_name=component, namespace=namespace, secrets=secrets)

    def report_given_up(self, value: bytes | str | Mapping[str, Any], why: str) -> None:
        """A workflow message given up after every retry (dead-lettered): CRITICAL."""
        workflow_name, component, namespace = _best_effort_names(value)
        self.notifier.notify("CRITICAL", f"workflow message given up after every retry: {why}",
                             workflow_name=workflow_name, component_name=component, namespace=namespace)

    def _dispatch(self, message: WorkflowMessage) -> HandlingResult:
        status = message.workflow_status
        if status == PUBLISHED:
            return self.publish(message)
        if status == STOPPING:
            return self.stop(message)
        known = status in IGNORED_STATUSES
        log.info("workflow status needs no action" if known else "unknown workflow status ignored",
                 extra={"workflow": message.workflow_name, "status": status})
        return HandlingResult(IGNORED, valid=True, reason=f"status {status!r}: nothing to do",
                              workflow_name=message.workflow_name)

    def publish(self, message: WorkflowMessage) -> HandlingResult:
        config, credentials = step_config_from_message(message, self.bootstrap_servers)
        try:
            self.driver.check(config)
        except StepRejected as rejected:
            log.warning("workflow step rejected", extra={"workflow": config.workflow_name,
                                                         "config_name": config.config_name, "reason": str(rejected)})
            self.registry.failed(config.workflow_name, config.namespace, config.config_name, config.topic_in,
                                 str(rejected), config)
            return HandlingResult(REJECTED, valid=False, reason=str(rejected), workflow_name=config.workflow_name,
                                  config_name=config.config_name)
        # The dead-letter topic exists before anything can be delivered (never left to broker auto-creation).
        if self.create_topics is not None:
            topic = dead_letter_topic(config.topic_in, self.dead_letter_suffix)
            try:
                self.create_topics(config.bootstrap_servers or self.bootstrap_servers, [topic])
            except Exception as error:
                raise TopicsNotCreated(f"dead-letter topic {topic!r} not created: {error}"[:300]) from None
        group = consumer_group(config.workflow_name, config.topic_in)
        previous_group = self._stored_group(config.namespace, config.config_name, config.topic_in)
        if self.positions is not None and previous_group is not None and previous_group != group:
            # Releasing the source below deletes its consumer group: keep its positions first.
            self.positions.save(previous_group, config.topic_in)
        # A source that cannot be updated in place (a re-publish under another workflow name changes its consumer
        # group) goes before the configuration is overwritten: it must never deliver into the new settings.
        released = self.driver.release_conflicting(config)
        if released and self.positions is not None and previous_group is not None and previous_group != group:
            # What the stopped source committed after the first read, where its group outlives it.
            self.positions.save(previous_group, config.topic_in)
        if previous_group != group and self.positions is not None:
            # No source of this group exists now (never wired, stopped, or just released): it starts where the
            # topic's last source stopped, not at initialOffset.
            self.positions.seed(group, config.topic_in)
        # Configuration first: once the source exists, deliveries may arrive, and the Wrapper must find it.
        self.store.put(config.namespace, config, credentials)
        source = self.driver.wire(config)
        self.registry.wired(config, source)
        log.info("workflow step wired", extra={"workflow": config.workflow_name, "namespace": config.namespace,
                                               "config_name": config.config_name, "topic_in": config.topic_in,
                                               "service": config.service_name, **{f"source_{k}": v for k, v in
                                                                                  source.items()}})
        return HandlingResult(WIRED, valid=True, workflow_name=config.workflow_name, config_name=config.config_name)

    def stop(self, message: WorkflowMessage) -> HandlingResult:
        namespace, topic_in = message.ML.Namespace, message.Topics.in_
        config_name = step_config_name(topic_in)
        stored_group = self._stored_group(namespace, config_name, topic_in)
        if self.positions is not None and stored_group is not None:
            # Deleting the source deletes its consumer group: keep its positions for a later re-publish. Every
            # step reads the controller's Kafka cluster (step_config_from_message): one admin client serves all.
            self.positions.save(stored_group, topic_in)
        # Source first, then configuration: a delivery in flight can still read its configuration.
        unwired = self.driver.unwire(None, namespace, topic_in)
        if self.positions is not None and stored_group is not None:
            self.positions.save(stored_group, topic_in)  # what it committed meanwhile, where its group outlives it
        deleted = self.store.delete(namespace, config_name)
        self.registry.stopped(message.workflow_name, namespace, config_name, topic_in)
        log.info("workflow step stopped", extra={"workflow": message.workflow_name, "namespace": namespace,
                                                 "config_name": config_name, "source_deleted": unwired,
                                                 "config_deleted": deleted})
        return HandlingResult(UNWIRED, valid=True, workflow_name=message.workflow_name, config_name=config_name)

    def _stored_group(self, namespace: str, config_name: str, topic_in: str) -> str | None:
        """The consumer group of the step as it is wired now (from its stored configuration); None: not wired, or
        positions are not kept (nothing to read then)."""
        if self.positions is None:
            return None
        try:
            stored, _ = self.store.get(namespace, config_name)
        except StepConfigNotFound:
            return None
        return consumer_group(stored.workflow_name, topic_in)

    # -- status API ------------------------------------------------------------------------------------------

    def workflow_status(self, name: str, live: bool = True) -> dict[str, Any] | None:
        steps = self.registry.steps(name)
        details: dict[tuple[str, str], dict[str, Any]] = {}
        if live:
            for config in self.stored_steps():
                if config.workflow_name == name:
                    try:
                        details[(config.namespace, config.config_name)] = self.driver.describe(config)
                    except Exception as error:  # status is best effort; the API must still answer
                        details[(config.namespace, config.config_name)] = {"describe_error": _error_text(error)}
        return self.registry.summary(name, details) if steps else None

    def workflows(self) -> list[dict[str, Any]]:
        return [s for s in (self.registry.summary(n) for n in self.registry.workflow_names()) if s]


def _best_effort_names(body: bytes | str | Mapping[str, Any]) -> tuple[str, str, str]:
    """(workflow_name, ML.component_name, ML.Namespace) of a record that may not be a valid message: only string
    values of those three fields are read, nothing else (the record may hold credentials)."""
    value: Any = body
    if isinstance(body, (bytes, bytearray, str)):
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return "", "", ""
    if not isinstance(value, Mapping):
        return "", "", ""
    ml = value.get("ML") if isinstance(value.get("ML"), Mapping) else {}

    def text(item: Any) -> str:
        return item[:200] if isinstance(item, str) else ""

    return text(value.get("workflow_name")), text(ml.get("component_name")), text(ml.get("Namespace"))
