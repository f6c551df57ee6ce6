"""The controller's ``GET /metrics``: workflow messages by outcome (wired, stopped, refused), steps wired now, and
the dead-letter records its /dead-letter sink wrote. Real broker and local event plane; the controller's HTTP app."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from controller_test_support import ThreadedApp, unique, workflow_message
from services.controller.http_app import build_app, kafka_dead_letter_writer
from services.controller.local_event_plane import LocalSourceDriver
from services.controller.reconciler import WorkflowController
from services.controller.settings import ControllerSettings
from services.core.kafka import producer_config
from services.core.step_config import LocalStepConfigStore


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status


def test_metrics_count_workflow_outcomes_and_dead_letters(kafka_broker, tmp_path: Path) -> None:
    settings = ControllerSettings(bootstrap_servers=kafka_broker.bootstrap_servers, source_driver="local",
                                  store="local", store_root=str(tmp_path), wrapper_urls={"ssl-features": "http://127.0.0.1:9"})
    controller = WorkflowController(LocalStepConfigStore(tmp_path), LocalSourceDriver(settings),
                                    kafka_broker.bootstrap_servers)
    producer = Producer(producer_config(kafka_broker.bootstrap_servers))
    app = ThreadedApp(build_app(controller, kafka_dead_letter_writer(producer))).start()
    try:
        outcome = lambda name: metrics(app.url).get(  # noqa: E731
            ("eoml_controller_workflow_messages_total", frozenset({("outcome", name)})), 0.0)
        wired = lambda: metrics(app.url)[("eoml_controller_steps_wired", frozenset())]  # noqa: E731
        assert wired() == 0

        topics = [unique("wf.metrics.a"), unique("wf.metrics.b")]
        for topic in topics:
            assert post(app.url, json.dumps(workflow_message("wf-metrics", topic, namespace="local")).encode()) == 200
        assert post(app.url, b"{not a workflow message") == 200  # answered "There was a problem", refused
        assert (outcome("wired"), outcome("refused"), outcome("stopped"), wired()) == (2, 1, 0, 2)

        stop = {"workflow_status": "stopping", "workflow_name": "wf-metrics", "Topics": {"in": topics[0]},
                "ML": {"Namespace": "local"}}
        assert post(app.url, json.dumps(stop).encode()) == 200
        assert (outcome("wired"), outcome("stopped"), wired()) == (2, 1, 1)

        dead = {"ce-source": f"/apis/v1/namespaces/local/kafkasources/src#{topics[1]}", "ce-id": "partition:0/offset:7",
                "ce-knativeerrorcode": "503"}
        assert post(f"{app.url}/dead-letter", b'{"previous_component_end": "True"}', dead) == 202
        assert metrics(app.url)[("eoml_controller_dead_letter_records_total", frozenset())] == 1
    finally:
        app.stop()
        controller.driver.close()
        producer.flush(5)
