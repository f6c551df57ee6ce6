"""The local event plane as EKB's KafkaSource dispatcher, against real tansu and real HTTP receivers: in-flight cap
(unordered) and one per partition (ordered), commit of the contiguous finished prefix only, backoff schedule and
retry bound, commit after a failing dead-letter sink, consumer group deleted with its source and ``initialOffset``
on re-creation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest
from aiohttp import web
from confluent_kafka import Producer

from controller_test_support import RecordingReceiver, ThreadedApp, read_topic, unique, wait_until, workflow_message
from services.controller.event_plane.delivery import DEFAULT_TIMEOUT_S, delivery_policy_from_spec
from services.controller.local_event_plane import (
    DispatcherTuning,
    InitialOffset,
    LocalSourceDriver,
    Ordering,
    SourceSpec,
    StepDispatcher,
    commit_group_offsets,
    committed_group_offsets,
    ensure_topic,
)
from services.controller.messages import parse_workflow_message
from services.controller.settings import ControllerSettings
from services.controller.wiring import DeliveryPolicy, consumer_group
from services.core.kafka import ensure_topics, producer_config
from services.core.step_config import StepConfig, step_config_from_message
from services.local_platform.infra import free_port

FAST = DispatcherTuning(auto_commit_interval_s=0.3, poll_timeout_s=0.1, dead_letter_write_timeout_s=2.0)


@dataclass
class HoldingReceiver:
    """A real HTTP receiver that holds each request ``hold(ce_id)`` seconds (or until ``release``), answers
    ``status(ce_id, attempt)``, and records arrivals, concurrency overall and per partition."""

    hold: Callable[[str], float] = lambda _id: 0.0
    status: Callable[[str, int], int] = lambda _id, _n: 202
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    max_active_per_partition: int = 0
    _per_partition: dict[str, int] = field(default_factory=dict)
    server: ThreadedApp | None = None
    _release: asyncio.Event | None = None

    def start(self) -> "HoldingReceiver":
        async def receive(request: web.Request) -> web.Response:
            await request.read()
            event_id = request.headers.get("ce-id", "")
            partition = event_id.split("/")[0]
            attempt = sum(1 for _, seen in self.arrivals if seen == event_id)
            self.arrivals.append((time.monotonic(), event_id))
            self.active += 1
            self._per_partition[partition] = self._per_partition.get(partition, 0) + 1
            self.max_active = max(self.max_active, self.active)
            self.max_active_per_partition = max(self.max_active_per_partition, self._per_partition[partition])
            try:
                if self._release is None:
                    self._release = asyncio.Event()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._release.wait(), self.hold(event_id))
            finally:
                self.active -= 1
                self._per_partition[partition] -= 1
            return web.json_response({}, status=self.status(event_id, attempt))

        app = web.Application()
        app.router.add_post("/{tail:.*}", receive)
        self.server = ThreadedApp(app).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def ids(self) -> list[str]:
        return [event_id for _, event_id in list(self.arrivals)]

    def stop(self) -> None:
        assert self.server is not None and self.server.loop is not None
        if self._release is not None:
            self.server.loop.call_soon_threadsafe(self._release.set)
        self.server.stop()


@pytest.fixture
def producer(kafka_broker) -> Producer:
    return Producer(producer_config(kafka_broker.bootstrap_servers, **{"linger.ms": 5}))


def new_topic(kafka_broker, prefix: str, partitions: int = 1) -> str:
    topic = unique(prefix)
    ensure_topics(kafka_broker.bootstrap_servers, [topic], partitions=partitions)
    return topic


def fill(producer: Producer, topic: str, count: int, partitions: int = 1) -> None:
    for n in range(count):
        producer.produce(topic, value=json.dumps({"n": n}).encode(), partition=n % partitions)
    assert producer.flush(30) == 0


def make_step(kafka_broker, topic: str, workflow: str = "wf-dispatch") -> StepConfig:
    message = parse_workflow_message(workflow_message(workflow, topic, service="ssl-features", namespace="local"))
    return step_config_from_message(message, kafka_broker.bootstrap_servers)[0]


def make_driver(kafka_broker, url: str, ordering: str = "unordered", retry: int = 0, delay_s: float = 0.05,
                timeout_s: float = 10, tuning: DispatcherTuning = FAST, **kwargs) -> LocalSourceDriver:
    settings = ControllerSettings(bootstrap_servers=kafka_broker.bootstrap_servers,
                                  wrapper_urls={"ssl-features": url}, delivery_retry=retry,
                                  delivery_backoff_delay_s=delay_s, delivery_timeout_s=timeout_s,
                                  source_ordering=ordering)
    return LocalSourceDriver(settings, tuning=tuning, **kwargs)


@contextlib.contextmanager
def receiving(receiver) -> Iterator:
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def test_delivery_spec_defaults_only_when_delivery_is_omitted() -> None:
    assert delivery_policy_from_spec(None) == DeliveryPolicy(retry=10, backoff_policy="exponential",
                                                             backoff_delay_s=0.3, timeout_s=600.0)
    present = delivery_policy_from_spec({"timeout": "PT5S"})  # present, retry unset: 0 retries, no backoff
    assert (present.retry, present.backoff_delay_s, present.timeout_s, present.attempts) == (0, 0.0, 5.0, 1)
    full = delivery_policy_from_spec({"retry": 8, "backoffPolicy": "exponential", "backoffDelay": "PT1S"})
    assert [full.backoff_s(n) for n in range(1, 9)] == [2, 4, 8, 16, 32, 64, 128, 256]  # ~510 s in all
    assert full.timeout_s == DEFAULT_TIMEOUT_S
    linear = delivery_policy_from_spec({"retry": 3, "backoffPolicy": "linear", "backoffDelay": "PT0.5S"})
    assert [linear.backoff_s(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]


def test_unordered_keeps_up_to_max_poll_records_in_flight(kafka_broker, producer) -> None:
    topic = new_topic(kafka_broker, "dispatch.unordered")
    fill(producer, topic, 130)
    with receiving(HoldingReceiver(hold=lambda _id: 3.0)) as receiver:
        driver = make_driver(kafka_broker, receiver.url)
        try:
            driver.wire(make_step(kafka_broker, topic))
            wait_until(lambda: len(receiver.arrivals) >= 50, timeout_s=30)
            time.sleep(1.5)  # what the first deliveries hold: no more polling meanwhile
            held = receiver.max_active
        finally:
            driver.close()
    # Stops polling at >= 50 in flight; one poll can add up to 50 more (UnorderedConsumerVerticle): 50..99.
    assert 50 <= held <= 99


def test_ordered_keeps_one_in_flight_per_partition(kafka_broker, producer) -> None:
    topic = new_topic(kafka_broker, "dispatch.ordered", partitions=3)
    fill(producer, topic, 12, partitions=3)
    with receiving(HoldingReceiver(hold=lambda _id: 0.2)) as receiver:
        driver = make_driver(kafka_broker, receiver.url, ordering="ordered")
        try:
            driver.wire(make_step(kafka_broker, topic))
            wait_until(lambda: len(receiver.arrivals) >= 12, timeout_s=30)
        finally:
            driver.close()
    assert receiver.max_active_per_partition == 1 and 2 <= receiver.max_active <= 3
    for partition in range(3):
        offsets = [int(i.rsplit(":", 1)[1]) for i in receiver.ids() if i.startswith(f"partition:{partition}/")]
        assert offsets == sorted(offsets) == list(range(4))


def test_only_the_contiguous_finished_prefix_is_committed(kafka_broker, producer) -> None:
    topic = new_topic(kafka_broker, "dispatch.prefix")
    step = make_step(kafka_broker, topic)
    group = consumer_group(step.workflow_name, topic)
    fill(producer, topic, 10)
    stuck = "partition:0/offset:3"
    with receiving(HoldingReceiver(hold=lambda i: 60.0 if i == stuck else 0.0)) as receiver:
        driver = make_driver(kafka_broker, receiver.url)
        try:
            driver.wire(step)
            wait_until(lambda: driver.describe(step).get("delivered") == 9, timeout_s=30)
            time.sleep(FAST.auto_commit_interval_s * 3)
            committed_while_running = committed_group_offsets(kafka_broker.bootstrap_servers, group, topic)
        finally:
            driver.close()  # stopped mid-way: offset 3 never finished
    assert committed_while_running == {0: 3}
    assert committed_group_offsets(kafka_broker.bootstrap_servers, group, topic) == {0: 3}
    with receiving(HoldingReceiver()) as again:
        driver = make_driver(kafka_broker, again.url, ordering="ordered")
        try:
            driver.wire(step)
            wait_until(lambda: len(again.arrivals) >= 7, timeout_s=30)
            time.sleep(0.5)
        finally:
            driver.close()
    # Only the unfinished record and everything after it come again, even those delivered before.
    assert again.ids() == [f"partition:0/offset:{n}" for n in range(3, 10)]


def test_backoff_schedule_and_retry_bound(kafka_broker, producer) -> None:
    topic = new_topic(kafka_broker, "dispatch.backoff")
    fill(producer, topic, 1)
    with receiving(HoldingReceiver(status=lambda _id, _n: 503)) as receiver:
        driver = make_driver(kafka_broker, receiver.url, retry=3, delay_s=0.2)
        try:
            driver.wire(make_step(kafka_broker, topic))
            (dead,) = read_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", 1)
            time.sleep(0.5)
        finally:
            driver.close()
    times = [t for t, _ in receiver.arrivals]
    assert len(times) == 4  # 1 + retry 3, then the dead-letter sink
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Exponential: delay * 2^n before retry n = 0.4, 0.8, 1.6 s.
    for gap, expected in zip(gaps, (0.4, 0.8, 1.6)):
        assert expected - 0.05 <= gap < expected + 0.4, gaps
    assert json.loads(dead.value())["delivery"] == {"attempts": 4, "http_status": 503}


def test_per_attempt_timeout_is_retried(kafka_broker, producer) -> None:
    topic = new_topic(kafka_broker, "dispatch.timeout")
    fill(producer, topic, 1)
    step = make_step(kafka_broker, topic)
    # The first attempt outlasts delivery.timeout (1 s): aborted, retried; the second answers at once.
    receiver = HoldingReceiver(hold=lambda _id: 5.0)
    with receiving(receiver):
        driver = make_driver(kafka_broker, receiver.url, retry=2, delay_s=0.05, timeout_s=1)
        try:
            driver.wire(step)
            wait_until(lambda: len(receiver.arrivals) >= 1, timeout_s=30)
            receiver.hold = lambda _id: 0.0
            wait_until(lambda: driver.describe(step).get("delivered") == 1, timeout_s=30)
            described = driver.describe(step)
        finally:
            driver.close()
    assert len(receiver.arrivals) == 2 and described["failed_attempts"] == 1
    assert "timed out" in described["last_error"]


def test_a_failing_dead_letter_sink_still_commits_the_record(kafka_broker, producer, caplog) -> None:
    topic = new_topic(kafka_broker, "dispatch.dlsfail")
    step = make_step(kafka_broker, topic)
    group = consumer_group(step.workflow_name, topic)
    fill(producer, topic, 2)
    # The dead-letter sink is a Kafka broker that is not there (a real producer to a closed port).
    unreachable = f"127.0.0.1:{free_port()}"

    def dead_sink() -> Producer:
        return Producer(producer_config(unreachable, **{"message.timeout.ms": 300}))

    status = lambda event_id, _n: 500 if event_id.endswith("offset:0") else 202  # noqa: E731
    with receiving(HoldingReceiver(status=status)) as receiver, caplog.at_level(logging.ERROR):
        driver = make_driver(kafka_broker, receiver.url, producer_factory=dead_sink)
        try:
            driver.wire(step)
            wait_until(lambda: driver.describe(step).get("dead_letter_failed") == 1, timeout_s=30)
            wait_until(lambda: committed_group_offsets(kafka_broker.bootstrap_servers, group, topic) == {0: 2},
                       timeout_s=10)
        finally:
            driver.close()
    lost = [r for r in caplog.records if r.getMessage().startswith("dead-letter sink failed")]
    assert len(lost) == 1 and lost[0].event_id == "partition:0/offset:0"
    with receiving(HoldingReceiver()) as again:
        driver = make_driver(kafka_broker, again.url)
        try:
            driver.wire(step)
            time.sleep(1.5)
        finally:
            driver.close()
    assert again.ids() == []  # gone from the group: nothing comes again


def test_unwire_deletes_the_group_and_recreation_replays_from_earliest(kafka_broker, producer) -> None:
    """The emulation reproduces the production defect (issue 17, item 6): deleting a source deletes its group, so
    re-creating it with ``initialOffset: earliest`` replays the retained topic, unless offsets are carried over
    (committed for the group between the deletion and the re-creation)."""
    topic = new_topic(kafka_broker, "dispatch.unwire")
    step = make_step(kafka_broker, topic)
    group = consumer_group(step.workflow_name, topic)
    bootstrap = kafka_broker.bootstrap_servers
    fill(producer, topic, 3)
    with receiving(HoldingReceiver()) as receiver:
        driver = make_driver(kafka_broker, receiver.url, ordering="ordered")
        try:
            driver.wire(step)
            wait_until(lambda: len(receiver.arrivals) >= 3, timeout_s=30)
            wait_until(lambda: committed_group_offsets(bootstrap, group, topic) == {0: 3}, timeout_s=10)
            assert driver.unwire(step, step.namespace, topic) is True
            assert committed_group_offsets(bootstrap, group, topic) == {}  # the group is gone
            driver.wire(step)  # re-created: earliest, the whole topic again
            wait_until(lambda: len(receiver.arrivals) >= 6, timeout_s=30)
            wait_until(lambda: committed_group_offsets(bootstrap, group, topic) == {0: 3}, timeout_s=10)
            replayed = receiver.ids()[3:]
            # Carried over: the position committed for the new group before it is wired again.
            carried = committed_group_offsets(bootstrap, group, topic)
            driver.unwire(step, step.namespace, topic)
            commit_group_offsets(bootstrap, group, topic, carried)
            driver.wire(step)
            fill(producer, topic, 1)
            wait_until(lambda: len(receiver.arrivals) >= 7, timeout_s=30)
            time.sleep(0.5)
        finally:
            driver.close()
    assert replayed == [f"partition:0/offset:{n}" for n in range(3)]
    assert receiver.ids()[6:] == ["partition:0/offset:3"]


def test_initial_offset_latest_applies_only_where_nothing_is_committed(kafka_broker, producer) -> None:
    topic = new_topic(kafka_broker, "dispatch.latest")
    bootstrap = kafka_broker.bootstrap_servers
    ensure_topic(bootstrap, f"{topic}.dlq")
    # One record per produce request: tansu's end offset counts a multi-record batch as one (see
    # docs/delivery-semantics.md), which only ``latest`` looks at.
    fill(producer, topic, 1)
    fill(producer, topic, 1)
    policy = DeliveryPolicy(retry=0, backoff_policy="exponential", backoff_delay_s=0.05, timeout_s=5)
    fresh, known = unique("grp-latest"), unique("grp-known")
    commit_group_offsets(bootstrap, known, topic, {0: 1})
    with receiving(RecordingReceiver()) as receiver:
        step = make_step(kafka_broker, topic)
        driver = make_driver(kafka_broker, receiver.url)
        dispatchers = []
        try:
            for group in (fresh, known):
                spec = SourceSpec(consumer_group=group, initial_offset=InitialOffset.LATEST,
                                  ordering=Ordering.ORDERED, policy=policy)
                target = driver.target(step)
                dispatchers.append(StepDispatcher(target, spec, bootstrap, producer, tuning=FAST).start())
            time.sleep(1.5)
            fill(producer, topic, 1)  # offset 2
            receiver.wait_for(lambda s: len(s) >= 3)
            time.sleep(0.5)
        finally:
            for dispatcher in dispatchers:
                dispatcher.stop()
    # fresh group: only what arrived after it started; known group: from its committed offset 1.
    seen = sorted(r.headers["ce-id"] for r in receiver.snapshot())
    assert seen == \
        ["partition:0/offset:1", "partition:0/offset:2", "partition:0/offset:2"], seen
