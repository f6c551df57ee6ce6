"""The controller's own source on ``system.ML`` (issue 17, Why 7), Knative mode.

- A replay of ``system.ML`` (the controller source re-created: its group was deleted with it, ``initialOffset:
  earliest``) is absorbed: the controller's handling is idempotent (FAKE Kubernetes API server).
- "Controller down 10 minutes": ``eo-controller serve`` (a real process) behind the EKB dispatcher model
  (``StepDispatcher``) delivering a real tansu ``system.ML`` with the delivery spec the chart renders for the
  controller's KafkaSource (retry 12, exponential from PT1S, ordered), on a compressed clock
  (``DispatcherTuning.time_scale``). Killed for the scaled 10 minutes, every workflow published meanwhile is wired
  exactly once and nothing is dead-lettered; killed for longer than the whole retry window, the message lands on
  ``system.ML.dlq`` (locally the dispatcher's dead-letter write stands for the chart's KafkaSink), not lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from controller_test_support import RecordingReceiver, read_topic, unique, wait_until, workflow_message
from services.controller.event_plane.delivery import DispatchTarget
from services.controller.event_plane.dispatcher import DispatcherTuning, Ordering, SourceSpec, StepDispatcher
from services.controller.kubernetes_driver import KubernetesSourceDriver
from services.controller.notifications import NullNotifier
from services.controller.reconciler import UNWIRED, WIRED, WorkflowController
from services.controller.settings import ControllerSettings
from services.controller.wiring import DeliveryPolicy
from services.core.kafka import encode_json, ensure_topics, producer_config, publish_json
from services.core.step_config import LocalStepConfigStore
from services.core.step_config_k8s import KubernetesStepConfigStore
from services.local_platform.infra import free_port

SOURCES = "/kafkasources"
TEN_MINUTES_S = 600.0


# ---- replay of system.ML is absorbed --------------------------------------------------------------------------------

def kubernetes_controller(fake_api, notifier: NullNotifier) -> WorkflowController:
    from kubernetes import client

    api_client = client.ApiClient(client.Configuration(host=fake_api.url))
    driver = KubernetesSourceDriver(client.CustomObjectsApi(api_client),
                                    ControllerSettings(bootstrap_servers="kafka:9092"), sleep=lambda _s: None)
    return WorkflowController(KubernetesStepConfigStore(client.CoreV1Api(api_client), client.CustomObjectsApi(
        api_client)), driver, "kafka:9092", notifier=notifier)


def _state(fake_api) -> dict[str, Any]:
    """What the workflows left in the cluster: sources (name -> spec) and ConfigMaps/Secrets (name -> data)."""
    return {
        "sources": {s["metadata"]["name"]: s["spec"] for s in fake_api.objects("kafkasources", "uc1")},
        "configmaps": {c["metadata"]["name"]: c.get("data") for c in fake_api.objects("configmaps", "uc1")},
        "secrets": {c["metadata"]["name"]: c.get("data") for c in fake_api.objects("secrets", "uc1")},
    }


def test_a_replay_of_system_ml_is_absorbed_by_idempotent_handling(fake_api) -> None:
    """The retained topic delivered again, in order (``ordering: ordered``): publishing an existing workflow updates
    it in place (same source, same consumer group: no second source, no step replay), stopping an absent one does
    nothing, and nothing is refused, retried or notified."""
    notifier = NullNotifier()
    controller = kubernetes_controller(fake_api, notifier)
    topic = [
        workflow_message("wf-kept", "kept.in"),
        workflow_message("wf-gone", "gone.in"),
        {"workflow_status": "stopping", "workflow_name": "wf-gone", "Topics": {"in": "gone.in"},
         "ML": {"Namespace": "uc1"}},
        {"workflow_status": "stopping", "workflow_name": "wf-never", "Topics": {"in": "never.in"},
         "ML": {"Namespace": "uc1"}},
    ]
    expected = [WIRED, WIRED, UNWIRED, UNWIRED]

    def replay() -> list[str]:
        results = [controller.handle(encode_json(message)) for message in topic]
        assert all(r.valid and not r.retryable and not r.dead_lettered for r in results), results
        return [r.action for r in results]

    assert replay() == expected
    after_first = _state(fake_api)
    assert len(after_first["sources"]) == 1 and "kept" in next(iter(after_first["sources"]))
    (kept_uid,) = [s["metadata"]["uid"] for s in fake_api.objects("kafkasources", "uc1")]
    for _ in range(2):  # the whole retained topic again (re-created source at earliest), twice
        assert replay() == expected
        assert _state(fake_api) == after_first  # same objects, same consumer group, same configuration
    # wf-kept's source was updated in place, never deleted and re-created (its group, and positions, stay).
    assert [s["metadata"]["uid"] for s in fake_api.objects("kafkasources", "uc1")] == [kept_uid]
    assert not [call for call in fake_api.calls("DELETE", SOURCES) if "kept" in call.path]
    assert notifier.sent == []


# ---- controller down: serve mode behind the dispatcher model --------------------------------------------------------

def chart_controller_source_spec() -> dict[str, Any]:
    """The controller KafkaSource's ``spec`` as the chart renders it (real helm, like tests/deploy)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from deploy.render import CI_VALUES, Tools, helm_template

    tools = Tools()
    if not tools.helm.is_file():
        pytest.fail(f"missing {tools.helm}: run 'make tools'")
    documents = [d for d in yaml.safe_load_all(helm_template(tools, [CI_VALUES])) if d]
    (source,) = [d for d in documents if d.get("kind") == "KafkaSource"]
    return source["spec"]


def retry_window_s(policy: DeliveryPolicy) -> float:
    """Every backoff wait of one record's delivery (Knative: delay * 2^n before retry n)."""
    return sum(policy.backoff_s(n) for n in range(1, policy.attempts))


def test_the_time_scale_compresses_the_schedule_and_nothing_else() -> None:
    spec = SourceSpec.from_kafka_source(chart_controller_source_spec())
    scaled = DispatcherTuning(time_scale=0.01).scaled(spec.policy)
    assert retry_window_s(spec.policy) == 8190  # 2 h 16 min, as values.yaml says
    assert retry_window_s(scaled) == pytest.approx(81.9)
    assert scaled.timeout_s == pytest.approx(spec.policy.timeout_s / 100)
    assert (scaled.retry, scaled.backoff_policy, scaled.dead_letter_suffix) == (
        spec.policy.retry, spec.policy.backoff_policy, spec.policy.dead_letter_suffix)
    assert DispatcherTuning().scaled(spec.policy) is spec.policy
    with pytest.raises(ValueError):
        DispatcherTuning(time_scale=0)


class ControllerDown:
    """``eo-controller serve`` (local driver and store) on a fixed port, killed and restarted like a pod, fed by
    a ``StepDispatcher`` for ``system.ML`` with the chart's controller-source spec on a compressed clock."""

    def __init__(self, bootstrap: str, tmp_path: Path, time_scale: float) -> None:
        self.bootstrap = bootstrap
        self.tmp_path = tmp_path
        self.system_topic = unique("system.ML")
        self.port = free_port()
        self.receiver = RecordingReceiver().start()
        self.store = LocalStepConfigStore(tmp_path / "store")
        self.logs: list[Path] = []
        self.process: subprocess.Popen | None = None
        self.env = {**os.environ, "EOML_CONTROLLER_HTTP_HOST": "127.0.0.1",
                    "EOML_CONTROLLER_HTTP_PORT": str(self.port), "EOML_CONTROLLER_BOOTSTRAP_SERVERS": bootstrap,
                    "EOML_CONTROLLER_SYSTEM_TOPIC": self.system_topic, "EOML_CONTROLLER_SOURCE_DRIVER": "local",
                    "EOML_CONTROLLER_STORE": "local", "EOML_CONTROLLER_STORE_ROOT": str(tmp_path / "store"),
                    "EOML_CONTROLLER_WRAPPER_URLS": json.dumps({"ssl-features": self.receiver.url}),
                    "EOML_CONTROLLER_NOTIFY_TOPIC": unique("monitoring.notify"), "EOML_LOG_FORMAT": "json"}
        ensure_topics(bootstrap, [self.system_topic, f"{self.system_topic}.dlq"])
        chart_spec = SourceSpec.from_kafka_source(chart_controller_source_spec())
        assert chart_spec.ordering is Ordering.ORDERED
        # The chart's spec, in a group of this test's own (the session's broker is shared).
        self.spec = dataclasses.replace(chart_spec, consumer_group=unique("eoml-controller"))
        self.tuning = DispatcherTuning(auto_commit_interval_s=0.5, poll_timeout_s=0.1,
                                       dead_letter_write_timeout_s=5.0, time_scale=time_scale)
        self.producer = Producer(producer_config(bootstrap))
        target = DispatchTarget(namespace="eoml", config_name="eoml-controller", workflow_name="",
                                topic_in=self.system_topic, consumer_group=self.spec.consumer_group,
                                source_name="eoml-controller", url=f"http://127.0.0.1:{self.port}/",
                                service_name="eoml-controller")
        self.dispatcher = StepDispatcher(target, self.spec, bootstrap, self.producer, tuning=self.tuning)

    def start_controller(self) -> None:
        log_path = self.tmp_path / f"controller-{len(self.logs)}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen([sys.executable, "-m", "services.controller.cli", "serve"],
                                            env=self.env, stdout=log_file, stderr=subprocess.STDOUT)

    def kill_controller(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)  # no goodbye, as a crashed or evicted pod
        self.process.wait(10)

    def publish(self, workflow: str) -> None:
        publish_json(self.producer, self.system_topic,
                     workflow_message(workflow, unique(f"{workflow}.in"), namespace="local"), key=workflow)

    def wired(self) -> list[str]:
        return [json.loads(line).get("workflow", "") for log in self.logs for line in log.read_text().splitlines()
                if line.startswith("{") and '"workflow step wired"' in line]

    def dead_letters(self, count: int, timeout_s: float) -> list[Any]:
        return read_topic(self.bootstrap, f"{self.system_topic}.dlq", count, timeout_s=timeout_s)

    def close(self) -> None:
        self.dispatcher.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self.receiver.stop()


def test_controller_down_ten_minutes_every_message_is_wired_once(kafka_broker, tmp_path: Path) -> None:
    scale = 0.01  # 10 minutes -> 6 s; the 8190 s retry window -> 82 s
    down = ControllerDown(kafka_broker.bootstrap_servers, tmp_path, time_scale=scale)
    started = time.monotonic()
    try:
        down.start_controller()
        down.dispatcher.start()
        for n in range(5):
            down.publish(f"wf-before-{n}")
        wait_until(lambda: down.dispatcher.stats.delivered == 5, timeout_s=60)
        down.kill_controller()
        killed_at = time.monotonic()
        for n in range(5):  # published while the controller is down
            down.publish(f"wf-while-down-{n}")
        time.sleep(max(0.0, TEN_MINUTES_S * scale - (time.monotonic() - killed_at)))
        down_s = time.monotonic() - killed_at
        down.start_controller()
        wait_until(lambda: down.dispatcher.stats.delivered == 10, timeout_s=60)
        wait_until(lambda: len(down.store.list("local")) == 10, timeout_s=10)
        time.sleep(1.0)  # a redelivery would show by now
        failed_attempts = down.dispatcher.stats.failed_attempts
    finally:
        down.close()
    wired = down.wired()
    dead_letters = down.dead_letters(1, timeout_s=3)
    print(f"\ncontroller down {down_s:.1f} s (= {down_s / scale / 60:.0f} min at 1/{1 / scale:.0f}): 10 workflow "
          f"messages (5 published while down), wired {len(wired)} times, {failed_attempts} failed delivery "
          f"attempts, {len(dead_letters)} records on system.ML.dlq, wall {time.monotonic() - started:.1f} s")
    assert down_s >= TEN_MINUTES_S * scale
    assert failed_attempts > 0  # the outage was met by the retry schedule, not missed
    assert sorted(wired) == sorted([f"wf-before-{n}" for n in range(5)] + [f"wf-while-down-{n}" for n in range(5)])
    assert (down.dispatcher.stats.delivered, down.dispatcher.stats.dead_lettered) == (10, 0)
    assert dead_letters == []


def test_controller_down_past_the_retry_window_dead_letters_to_system_ml_dlq(kafka_broker, tmp_path: Path) -> None:
    scale = 0.001  # the 8190 s retry window -> 8.2 s
    down = ControllerDown(kafka_broker.bootstrap_servers, tmp_path, time_scale=scale)
    window_s = retry_window_s(down.dispatcher.policy)
    started = time.monotonic()
    try:
        down.start_controller()
        down.dispatcher.start()
        down.publish("wf-before")
        wait_until(lambda: down.dispatcher.stats.delivered == 1, timeout_s=60)
        down.kill_controller()
        killed_at = time.monotonic()
        down.publish("wf-past-the-window")
        wait_until(lambda: down.dispatcher.stats.dead_lettered == 1, timeout_s=window_s + 30)
        down_s = time.monotonic() - killed_at
        down.start_controller()
        down.publish("wf-after")  # the source goes on past the dead letter
        wait_until(lambda: down.dispatcher.stats.delivered == 2, timeout_s=60)
        dead_letters = down.dead_letters(2, timeout_s=5)
    finally:
        down.close()
    wired = down.wired()
    print(f"\ncontroller down {down_s:.1f} s > the retry window {window_s:.1f} s (1/{1 / scale:.0f} of "
          f"{window_s / scale:.0f} s): 3 workflow messages, wired {len(wired)}, {len(dead_letters)} on "
          f"system.ML.dlq, wall {time.monotonic() - started:.1f} s")
    assert down_s > window_s
    assert sorted(wired) == ["wf-after", "wf-before"]
    (record,) = dead_letters
    kept = json.loads(record.value())
    # The workflow message is kept, replayable (publish input_message to system.ML again): which one, from where,
    # after how many attempts, and where it was going (Knative's knativeerror* extensions as headers).
    assert kept["input_message"]["workflow_name"] == "wf-past-the-window" and record.key() == b"wf-past-the-window"
    assert kept["topic_in"] == down.system_topic
    assert kept["delivery"]["attempts"] == down.spec.policy.attempts == 13
    headers = dict(record.headers() or [])
    assert headers["knativeerrordest"] == down.dispatcher.target.url.encode()
