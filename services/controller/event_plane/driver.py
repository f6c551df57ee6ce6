"""``SourceDriver`` of the local event plane: one ``StepDispatcher`` per wired step, as one KafkaSource each.

The dispatcher is configured from the very KafkaSource body the Kubernetes driver would create
(``wiring.kafka_source_body``: consumer group, ``initialOffset``, ``ordering``, ``spec.delivery``), so the local
stack dispatches as the chart's rendered settings say. Source lifecycle as EKB's control plane:
- ``wire`` starts consuming (nothing is consumed before it: a reconciler may commit carried-over offsets for the
  group first, with ``groups.commit_group_offsets``; ``initialOffset`` applies only where none is committed);
- ``unwire`` (the KafkaSource deleted) stops the dispatcher, which commits its finished prefix, and THEN deletes
  the consumer group (consumergroup.go ``FinalizeKind``): a source created again for the topic starts from
  ``initialOffset``, ``earliest`` = the whole retained topic again, unless offsets were carried over;
- ``release_conflicting`` (a KafkaSource deleted because an immutable field such as ``consumerGroup`` changes) does
  the same to the old group; ``close`` (the controller stops) only stops dispatchers: their groups stay.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from services.core.kafka import producer_config
from services.core.step_config import StepConfig, step_config_name

from ..settings import ControllerSettings
from ..wiring import StepRejected, consumer_group, kafka_source_body, kafka_source_name
from .delivery import DispatchTarget, HttpPoster, http_post
from .dispatcher import DispatcherTuning, SourceSpec, StepDispatcher
from .groups import delete_consumer_group

log = logging.getLogger(__name__)


class LocalSourceDriver:
    """``SourceDriver`` for the local event plane."""

    def __init__(self, settings: ControllerSettings, post: HttpPoster = http_post,
                 producer_factory: Callable[[], Any] | None = None, tuning: DispatcherTuning | None = None) -> None:
        self.settings = settings
        self.post = post
        self.tuning = tuning or DispatcherTuning()
        self._producer_factory = producer_factory
        self._producer: Any = None
        self._dispatchers: dict[tuple[str, str], StepDispatcher] = {}
        self._lock = threading.Lock()

    def _wrapper_url(self, config: StepConfig) -> str:
        url = self.settings.wrapper_urls.get(config.service_name)
        if not url:
            known = ", ".join(sorted(self.settings.wrapper_urls)) or "none"
            raise StepRejected(f"no Wrapper for ML.ServiceName {config.service_name!r} (known: {known})")
        return url

    def target(self, config: StepConfig) -> DispatchTarget:
        return DispatchTarget(namespace=config.namespace, config_name=config.config_name,
                              workflow_name=config.workflow_name, topic_in=config.topic_in,
                              consumer_group=consumer_group(config.workflow_name, config.topic_in),
                              source_name=kafka_source_name(config.topic_in),
                              url=f"{self._wrapper_url(config).rstrip('/')}/{config.config_name}",
                              service_name=config.service_name)

    def source_spec(self, config: StepConfig) -> SourceSpec:
        """What the KafkaSource of this step would say (the body the Kubernetes driver creates)."""
        return SourceSpec.from_kafka_source(kafka_source_body(config, self.settings)["spec"],
                                            self.settings.dead_letter_suffix)

    def _bootstrap(self, config: StepConfig | None) -> str:
        return (config.bootstrap_servers if config is not None else "") or self.settings.bootstrap_servers

    def _shared_producer(self) -> Any:
        if self._producer is None:
            if self._producer_factory is not None:
                self._producer = self._producer_factory()
            else:
                from confluent_kafka import Producer

                # message.timeout.ms bounds one dead-letter write attempt.
                self._producer = Producer(producer_config(self.settings.bootstrap_servers,
                                                          **{"message.timeout.ms": 30000}))
        return self._producer

    def check(self, config: StepConfig) -> None:
        self._wrapper_url(config)

    def source_info(self, config: StepConfig) -> dict[str, Any]:
        return {"driver": "local", "kafka_source": kafka_source_name(config.topic_in),
                "consumer_group": consumer_group(config.workflow_name, config.topic_in),
                "sink": f"{self.settings.wrapper_urls.get(config.service_name, '?').rstrip('/')}/{config.config_name}"}

    def _delete_source(self, dispatcher: StepDispatcher) -> None:
        """The KafkaSource is deleted: its dispatcher stops (and commits), then its consumer group goes."""
        dispatcher.stop()
        delete_consumer_group(dispatcher.bootstrap_servers, dispatcher.spec.consumer_group)

    def release_conflicting(self, config: StepConfig) -> bool:
        """Before the step's configuration is overwritten: a source that would deliver differently (another
        workflow's consumer group, another Wrapper) is deleted first, as the Kubernetes driver deletes a KafkaSource
        whose immutable fields change, so that it never delivers into the new settings."""
        target, spec = self.target(config), self.source_spec(config)
        with self._lock:
            current = self._dispatchers.get((config.namespace, config.config_name))
            if current is None or (current.target == target and current.spec == spec):
                return False
            del self._dispatchers[(config.namespace, config.config_name)]
        if current.spec.consumer_group != spec.consumer_group:
            self._delete_source(current)
        else:
            current.stop()  # same KafkaSource updated in place: the group and its offsets stay
        log.info("dispatcher stopped before re-wiring", extra={"config_name": config.config_name,
                                                                "consumer_group": current.spec.consumer_group})
        return True

    def wire(self, config: StepConfig) -> dict[str, Any]:
        target, spec = self.target(config), self.source_spec(config)
        key = (config.namespace, config.config_name)
        with self._lock:
            current = self._dispatchers.get(key)
            if current is not None and current.target == target and current.spec == spec and current.running:
                return self.source_info(config)  # re-publish of an unchanged step: keep consuming
            if current is not None:
                current.stop()
            self._dispatchers[key] = StepDispatcher(target, spec, self._bootstrap(config), self._shared_producer(),
                                                    self.post, self.tuning).start()
        return self.source_info(config)

    def unwire(self, config: StepConfig | None, namespace: str, topic_in: str) -> bool:
        with self._lock:
            dispatcher = self._dispatchers.pop((namespace, step_config_name(topic_in)), None)
        if dispatcher is None:
            return False
        self._delete_source(dispatcher)
        return True

    def dispatcher(self, config: StepConfig) -> StepDispatcher | None:
        return self._dispatchers.get((config.namespace, config.config_name))

    def describe(self, config: StepConfig) -> dict[str, Any]:
        dispatcher = self.dispatcher(config)
        if dispatcher is None:
            return {"source_present": False}
        stats = dispatcher.stats
        described: dict[str, Any] = {"source_present": True, "source_ready": dispatcher.running,
                                     "delivered": stats.delivered, "dead_lettered": stats.dead_lettered,
                                     "failed_attempts": stats.failed_attempts, "in_flight": stats.in_flight}
        if stats.dead_letter_failed:
            described["dead_letter_failed"] = stats.dead_letter_failed
        if stats.last_error:
            described["last_error"] = stats.last_error
        if dispatcher.error:
            described["dispatcher_error"] = dispatcher.error
        return described

    def resume(self, configs: list[StepConfig]) -> None:
        """After a restart: dispatch every stored step again (each resumes at its group's committed offset)."""
        for config in configs:
            try:
                self.wire(config)
            except StepRejected as error:
                log.error("stored step not resumed", extra={"config_name": config.config_name, "reason": str(error)})

    def close(self) -> None:
        """The controller stops: dispatchers stop and commit; the sources (and their groups) stay."""
        with self._lock:
            dispatchers, self._dispatchers = list(self._dispatchers.values()), {}
        for dispatcher in dispatchers:
            dispatcher.request_stop()
        for dispatcher in dispatchers:
            dispatcher.stop()
        if self._producer is not None:
            self._producer.flush(10)
