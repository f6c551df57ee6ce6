"""Re-publication does not replay (issue 17, item 7): a step's consumer positions survive the deletion of its source
and its consumer group, through the Kafka admin API (services/controller/consumer_positions.py).

Real tansu broker, real controller and local event plane, a real HTTP receiver standing in for the Wrapper (every
delivery it sees would be a step run). Deleting a source deletes its consumer group upstream (eventing-kafka-broker
consumergroup.go ``FinalizeKind``); these tests delete the group themselves right where that happens, so they hold
whether or not the local driver models the deletion."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from confluent_kafka import Producer

from controller_test_support import RecordingReceiver, unique, wait_until, workflow_message
from fake_kubernetes import FakeKubernetesApiServer, RecordedRequest
from services.controller.consumer_positions import ConsumerPositions, positions_group
from services.controller.kubernetes_driver import KubernetesSourceDriver
from services.controller.local_event_plane import LocalSourceDriver
from services.controller.reconciler import UNWIRED, WIRED, WorkflowController
from services.controller.settings import ControllerSettings
from services.controller.wiring import consumer_group, kafka_source_name
from services.core.kafka import admin_config, encode_json, ensure_topics, producer_config
from services.core.step_config import LocalStepConfigStore, StepConfig, step_config_name
from services.core.step_config_k8s import KubernetesStepConfigStore

RETAINED = 1000
PARTITIONS = 2


@pytest.fixture
def receiver() -> Iterator[RecordingReceiver]:
    recording = RecordingReceiver().start()
    yield recording
    recording.stop()


def delete_group(bootstrap_servers: str, group: str) -> None:
    """What Knative's ConsumerGroup finalizer does when a source is deleted. A group already gone is fine."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(admin_config(bootstrap_servers))  # kept referenced until the answer is in
    try:
        admin.delete_consumer_groups([group], request_timeout=10)[group].result(15)
    except Exception as error:  # noqa: BLE001 - GROUP_ID_NOT_FOUND: the driver deleted it already
        if "GROUP_ID_NOT_FOUND" not in str(error) and "not found" not in str(error).lower():
            raise


def produce(bootstrap_servers: str, topic: str, count: int, start: int = 0) -> None:
    producer = Producer(producer_config(bootstrap_servers))
    for number in range(start, start + count):
        producer.produce(topic, value=encode_json({"previous_component_end": "True",
                                                   "S3_bucket_desc": {"folder": f"in/{number}/", "filename": ""}}),
                         partition=number % PARTITIONS)
    assert producer.flush(30) == 0


def folders(seen: list[Any], config_name: str) -> list[str]:
    return [r.json["S3_bucket_desc"]["folder"] for r in seen if r.path == f"/{config_name}"]


class RecordingLocalDriver(LocalSourceDriver):
    """The local driver, noting the step group's committed offsets at the moment its dispatcher is started."""

    def __init__(self, settings: ControllerSettings) -> None:
        super().__init__(settings)
        self.positions = ConsumerPositions(settings.bootstrap_servers)
        self.offsets_at_wire: list[tuple[str, dict[int, int]]] = []

    def wire(self, config: StepConfig) -> dict[str, Any]:
        group = consumer_group(config.workflow_name, config.topic_in)
        self.offsets_at_wire.append((group, self.positions.committed(group, config.topic_in)))
        return super().wire(config)


def test_republish_under_a_new_name_and_stop_then_republish_replay_nothing(kafka_broker, receiver,
                                                                           tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    topic = unique("repub.in")
    config_name = step_config_name(topic)
    ensure_topics(bootstrap, [topic], partitions=PARTITIONS)
    produce(bootstrap, topic, RETAINED)
    ends = {p: RETAINED // PARTITIONS for p in range(PARTITIONS)}
    settings = ControllerSettings(bootstrap_servers=bootstrap, source_driver="local", store="local",
                                  store_root=str(tmp_path), wrapper_urls={"ssl-features": receiver.url})
    driver = RecordingLocalDriver(settings)
    controller = WorkflowController(LocalStepConfigStore(tmp_path), driver, bootstrap, create_topics=ensure_topics,
                                    positions=ConsumerPositions(bootstrap))

    def handle(message: dict[str, Any]) -> str:
        result = controller.handle(encode_json(message))
        assert result.action != "failed", result.reason
        return result.action

    started = time.monotonic()
    try:
        assert handle(workflow_message("wf-first", topic, namespace="local")) == WIRED
        receiver.wait_for(lambda seen: len(folders(seen, config_name)) >= RETAINED, timeout_s=120)
        first_pass_s = time.monotonic() - started
        # Every retained record once: the baseline the re-publications are measured against.
        assert sorted(folders(receiver.snapshot(), config_name)) == sorted(f"in/{n}/" for n in range(RETAINED))
        wait_until(lambda: ConsumerPositions(bootstrap).committed(consumer_group("wf-first", topic), topic) == ends)

        # 1. Republish under a new workflow name: a new consumer group, which starts where the old one stopped.
        assert handle(workflow_message("wf-renamed", topic, namespace="local")) == WIRED
        assert driver.offsets_at_wire[-1] == (consumer_group("wf-renamed", topic), ends)
        produce(bootstrap, topic, 1, start=RETAINED)
        receiver.wait_for(lambda seen: f"in/{RETAINED}/" in folders(seen, config_name))
        renamed_s = time.monotonic() - started - first_pass_s
        after_rename_count = len(folders(receiver.snapshot(), config_name))

        # 2. Stop, the group deleted with its source, then republish: positions come back from Kafka. The saved
        # position is the group's last commit; a KafkaSource commits every 5 s (and on close, just before its group
        # is deleted), so what it finished in the last seconds before a stop is delivered again (at least once).
        # Here the stop comes after that commit.
        after_rename = {0: ends[0] + 1, 1: ends[1]}  # record RETAINED went to partition 0
        wait_until(lambda: ConsumerPositions(bootstrap).committed(consumer_group("wf-renamed", topic), topic)
                   == after_rename, timeout_s=15)
        stop = {"workflow_status": "stopping", "workflow_name": "wf-renamed", "Topics": {"in": topic},
                "ML": {"Namespace": "local"}}
        assert handle(stop) == UNWIRED
        delete_group(bootstrap, consumer_group("wf-renamed", topic))
        assert ConsumerPositions(bootstrap).committed(consumer_group("wf-renamed", topic), topic) == {}
        assert handle(workflow_message("wf-renamed", topic, namespace="local")) == WIRED
        assert driver.offsets_at_wire[-1] == (consumer_group("wf-renamed", topic), after_rename)
        produce(bootstrap, topic, 1, start=RETAINED + 1)
        receiver.wait_for(lambda seen: f"in/{RETAINED + 1}/" in folders(seen, config_name))
        time.sleep(1.0)  # anything replayed would be on its way by now (1,000 records took first_pass_s)
    finally:
        controller.driver.close()
    delivered = folders(receiver.snapshot(), config_name)
    wall_s = time.monotonic() - started
    print(f"\nrepublication ({RETAINED} retained records, delivered once in {first_pass_s:.1f} s): "
          f"republish under a new name: {after_rename_count - RETAINED - 1} re-runs ({renamed_s:.1f} s); "
          f"stop then republish: {len(delivered) - after_rename_count - 1} re-runs; "
          f"duplicates overall {len(delivered) - len(set(delivered))}; wall {wall_s:.1f} s")
    assert after_rename_count == RETAINED + 1 and len(delivered) == len(set(delivered)) == RETAINED + 2
    assert ConsumerPositions(bootstrap).committed(positions_group(topic), topic) == after_rename


def test_positions_never_move_back_and_an_unknown_topic_has_none(kafka_broker) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    topic = unique("positions.in")
    ensure_topics(bootstrap, [topic], partitions=PARTITIONS)
    positions = ConsumerPositions(bootstrap)
    ahead, behind = unique("g-ahead"), unique("g-behind")
    positions.commit(ahead, topic, {0: 7, 1: 3})
    positions.commit(behind, topic, {0: 2, 1: 5})
    assert positions.save(ahead, topic) == {0: 7, 1: 3}
    assert positions.save(behind, topic) == {0: 7, 1: 5}  # per partition the further one
    fresh = unique("g-fresh")
    assert positions.seed(fresh, topic) == {0: 7, 1: 5} == positions.committed(fresh, topic)
    assert positions.seed(ahead, topic) == {0: 7, 1: 5}  # a group behind is moved forward, never back
    assert positions.committed(unique("g"), unique("no.such.topic")) == {}


def test_kubernetes_source_is_recreated_only_after_its_group_got_the_positions(kafka_broker) -> None:
    """Kubernetes driver against the FAKE API server, real broker: the positions are committed for the new group
    before the API server sees the new KafkaSource, after the old one (deleted in the foreground, so that Knative's
    group deletion is complete when it is gone) has disappeared."""
    from kubernetes import client

    bootstrap = kafka_broker.bootstrap_servers
    topic = unique("k8s.repub.in")
    ensure_topics(bootstrap, [topic], partitions=PARTITIONS)
    positions = ConsumerPositions(bootstrap)
    offsets_at_create: list[tuple[str, dict[int, int]]] = []
    deletions: list[RecordedRequest] = []

    def knative(request: RecordedRequest) -> None:
        """What Knative does around the API calls: its group is deleted with the source."""
        if "/kafkasources" not in request.path:
            return
        if request.method == "POST":
            group = request.body["spec"]["consumerGroup"]
            offsets_at_create.append((group, positions.committed(group, topic)))
        elif request.method == "DELETE":
            deletions.append(request)
            for group in (consumer_group("wf-a", topic), consumer_group("wf-b", topic)):
                delete_group(bootstrap, group)

    with FakeKubernetesApiServer() as fake_api:
        fake_api.on_request = knative
        api_client = client.ApiClient(client.Configuration(host=fake_api.url))
        settings = ControllerSettings(bootstrap_servers=bootstrap)
        controller = WorkflowController(
            KubernetesStepConfigStore(client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)),
            KubernetesSourceDriver(client.CustomObjectsApi(api_client), settings, sleep=lambda _s: None), bootstrap,
            positions=positions)
        message = workflow_message("wf-a", topic, namespace="uc1")
        assert controller.handle(encode_json(message)).action == WIRED
        positions.commit(consumer_group("wf-a", topic), topic, {0: 500, 1: 500})  # the source consumed 1,000
        assert controller.handle(encode_json(workflow_message("wf-b", topic, namespace="uc1"))).action == WIRED
        stop = {"workflow_status": "stopping", "workflow_name": "wf-b", "Topics": {"in": topic},
                "ML": {"Namespace": "uc1"}}
        positions.commit(consumer_group("wf-b", topic), topic, {0: 510, 1: 500})  # ... then 10 more
        # The stop deletes the source (and, in the cluster, its group), then the republish restores the group.
        assert controller.handle(encode_json(stop)).action == UNWIRED
        assert controller.handle(encode_json(workflow_message("wf-b", topic, namespace="uc1"))).action == WIRED
    assert offsets_at_create == [(consumer_group("wf-a", topic), {}),
                                 (consumer_group("wf-b", topic), {0: 500, 1: 500}),
                                 (consumer_group("wf-b", topic), {0: 510, 1: 500})]
    assert [r.query.get("propagationPolicy") for r in deletions] == ["Foreground", "Foreground"]
    wait_until(lambda: positions.committed(positions_group(topic), topic) == {0: 510, 1: 500}, timeout_s=5)


def test_a_republish_waits_for_the_terminating_source_before_restoring_its_positions(kafka_broker) -> None:
    """Stop then republish on Kubernetes: the old source is still terminating (Knative's finalizer deletes its
    consumer group); the positions are committed only once it is gone, else the deletion would wipe them."""
    from kubernetes import client

    bootstrap = kafka_broker.bootstrap_servers
    topic = unique("k8s.terminating.in")
    ensure_topics(bootstrap, [topic], partitions=PARTITIONS)
    positions = ConsumerPositions(bootstrap)
    group = consumer_group("wf-t", topic)
    positions.commit(positions_group(topic), topic, {0: 300, 1: 200})  # saved when the workflow was stopped
    positions.commit(group, topic, {0: 300, 1: 200})  # the group, not deleted yet
    seen: list[tuple[str, dict[int, int]]] = []
    gets = []

    with FakeKubernetesApiServer() as fake_api:
        api_client = client.ApiClient(client.Configuration(host=fake_api.url))
        settings = ControllerSettings(bootstrap_servers=bootstrap)
        driver = KubernetesSourceDriver(client.CustomObjectsApi(api_client), settings, sleep=lambda _s: None)
        config_name = step_config_name(topic)
        old = {"apiVersion": "sources.knative.dev/v1beta1", "kind": "KafkaSource",
               "metadata": {"name": kafka_source_name(topic), "namespace": "uc1", "finalizers": ["kafkasources"],
                            "deletionTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"consumerGroup": group, "topics": [topic]}}
        fake_api.seed("apis/sources.knative.dev/v1beta1", "kafkasources", old)

        def knative(request: RecordedRequest) -> None:
            if request.method == "GET" and request.path.endswith(f"/kafkasources/{kafka_source_name(topic)}"):
                gets.append(request)
                if len(gets) == 3:  # the finalizer is done: the group is deleted, then the source goes
                    delete_group(bootstrap, group)
                    fake_api.finalize("kafkasources", "uc1", kafka_source_name(topic))
            elif request.method == "POST" and request.path.endswith("/kafkasources"):
                seen.append((request.body["spec"]["consumerGroup"], positions.committed(group, topic)))

        fake_api.on_request = knative
        controller = WorkflowController(
            KubernetesStepConfigStore(client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)), driver,
            bootstrap, positions=positions)
        assert controller.handle(encode_json(workflow_message("wf-t", topic, namespace="uc1"))).action == WIRED
        assert config_name in [c.config_name for c in controller.store.list("uc1")]
    assert len(gets) >= 3
    assert seen == [(group, {0: 300, 1: 200})]
