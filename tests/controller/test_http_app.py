"""The controller's HTTP shell on loopback: KafkaSource deliveries, production answers, status API, dead letters."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest

from controller_test_support import (
    TEST_SECRET_ACCESS_KEY,
    ThreadedApp,
    read_topic,
    unique,
    workflow_message,
)
from services.controller.http_app import build_app, kafka_dead_letter_writer
from services.controller.kubernetes_driver import KubernetesSourceDriver
from services.controller.reconciler import WorkflowController
from services.controller.settings import ControllerSettings
from services.core.step_config_k8s import KubernetesStepConfigStore


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    method = "POST" if body is not None else "GET"
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def served(kube_clients, fake_api) -> Iterator[tuple[str, Any]]:
    core, custom = kube_clients
    settings = ControllerSettings(bootstrap_servers="kafka:9092")
    controller = WorkflowController(KubernetesStepConfigStore(core), KubernetesSourceDriver(custom, settings),
                                    "kafka:9092")
    app = build_app(controller)
    with ThreadedApp(app) as server:
        from services.controller.http_app import READY_KEY

        server.loop.call_soon_threadsafe(app[READY_KEY].set)
        yield server.url, fake_api


def cloudevent_headers(offset: int) -> dict[str, str]:
    return {"ce-specversion": "1.0", "ce-id": f"partition:0/offset:{offset}", "ce-type": "dev.knative.kafka.event",
            "ce-source": "/apis/v1/namespaces/eoml/kafkasources/system-ml#system.ML",
            "ce-subject": f"partition:0#{offset}", "Content-Type": "application/json"}


def test_binary_cloudevent_and_raw_json_are_both_accepted(served) -> None:
    url, fake_api = served
    message = json.dumps(workflow_message("wf-http", "http.a", namespace="uc1")).encode()
    assert call(f"{url}/", message, cloudevent_headers(0)) == (200, {"msg": "Received message And valid"})
    raw = call(f"{url}/", message, {"Content-Type": "application/json"})
    assert raw == (200, {"msg": "Received message And valid"})
    assert len(fake_api.objects("kafkasources", "uc1")) == 1


def test_bad_messages_get_the_production_problem_answer_and_the_server_keeps_serving(served) -> None:
    url, fake_api = served
    for body in (b"not json", b"[]", json.dumps({"workflow_name": "x"}).encode(), b"\x00\xff"):
        assert call(f"{url}/", body, cloudevent_headers(1)) == (200, {"msg": "There was a problem ignoring"})
    assert fake_api.requests == []
    assert call(f"{url}/healthz") == (200, {"status": "alive"})
    assert call(f"{url}/readyz") == (200, {"status": "ready"})


def test_api_server_failure_answers_503_so_the_source_retries(served) -> None:
    url, fake_api = served
    fake_api.fail_next.append(("POST", 500))
    status, answer = call(f"{url}/", json.dumps(workflow_message("wf-retry", "retry.a")).encode())
    assert status == 503 and TEST_SECRET_ACCESS_KEY not in json.dumps(answer)


def test_status_api_lists_workflows_and_steps(served) -> None:
    url, _ = served
    for topic in ("status.a", "status.b"):
        call(f"{url}/", json.dumps(workflow_message("wf-status", topic, namespace="uc1")).encode())
    status, listing = call(f"{url}/workflows")
    assert status == 200 and [w["name"] for w in listing["workflows"]] == ["wf-status"]
    status, workflow = call(f"{url}/workflows/wf-status")
    assert status == 200 and workflow["state"] == "running"
    assert [(s["topic_in"], s["state"]) for s in workflow["steps"]] == [("status.a", "wired"), ("status.b", "wired")]
    assert all("live" in s for s in workflow["steps"])
    stop = {"workflow_status": "stopping", "workflow_name": "wf-status", "Topics": {"in": "status.a"},
            "ML": {"Namespace": "uc1"}}
    call(f"{url}/", json.dumps(stop).encode())
    assert call(f"{url}/workflows/wf-status")[1]["state"] == "partially-stopped"
    assert call(f"{url}/workflows/unknown")[0] == 404
    assert TEST_SECRET_ACCESS_KEY not in json.dumps(call(f"{url}/workflows")[1])


def test_dead_letter_sink_writes_the_record_to_the_step_dead_letter_topic(kafka_broker) -> None:
    from confluent_kafka import Producer

    from services.core.kafka import producer_config

    producer = Producer(producer_config(kafka_broker.bootstrap_servers))
    app = build_app(WorkflowController(None, None, ""), kafka_dead_letter_writer(producer))  # type: ignore[arg-type]
    topic = unique("dl.step")
    step = {"previous_component_end": "True", "S3_bucket_desc": {"folder": "in/", "filename": ""},
            "meta_information": {"k": 1}}
    headers = {**cloudevent_headers(5), "ce-source": f"/apis/v1/namespaces/uc1/kafkasources/s#{topic}",
               "ce-knativeerrordest": "http://ssl-features.uc1.svc.cluster.local/json-config-step-1234abcd",
               "ce-knativeerrorcode": "500",
               "ce-knativeerrordata": base64.b64encode(b"inference server down").decode()}
    with ThreadedApp(app) as server:
        status, answer = call(f"{server.url}/dead-letter", json.dumps(step).encode(), headers)
        assert (status, answer) == (202, {"dead_letter_topic": f"{topic}.dlq"})
        no_topic = {k: v for k, v in headers.items() if k != "ce-source"}
        assert call(f"{server.url}/dead-letter", b"{}", no_topic)[0] == 400
    (record,) = read_topic(kafka_broker.bootstrap_servers, f"{topic}.dlq", 1)
    value = json.loads(record.value())
    assert value["input_message"] == step
    assert value["config_name"] == "json-config-step-1234abcd" and value["task"] == "ssl-features"
    assert value["event_id"] == "partition:0/offset:5" and value["delivery"]["http_status"] == 500
    assert "inference server down" in value["reason"]
    assert dict(record.headers())["knativeerrorcode"] == b"500"


def test_a_dead_lettered_workflow_message_is_redacted_and_notified_critical(kafka_broker) -> None:
    # The controller's own source on system.ML dead-letters here too, after every retry failed.
    from confluent_kafka import Producer

    from services.controller.notifications import NullNotifier
    from services.core.kafka import producer_config

    notifier = NullNotifier()
    controller = WorkflowController(None, None, "", notifier=notifier)  # type: ignore[arg-type]
    app = build_app(controller, kafka_dead_letter_writer(Producer(producer_config(kafka_broker.bootstrap_servers))))
    system_topic = unique("system.ML")
    message = workflow_message("wf-dead", "dead.in", namespace="uc1")
    headers = {**cloudevent_headers(9), "ce-source": f"/apis/v1/namespaces/eoml/kafkasources/c#{system_topic}",
               "ce-knativeerrorcode": "503"}
    with ThreadedApp(app) as server:
        assert call(f"{server.url}/dead-letter", json.dumps(message).encode(), headers)[0] == 202
    (record,) = read_topic(kafka_broker.bootstrap_servers, f"{system_topic}.dlq", 1)
    assert TEST_SECRET_ACCESS_KEY not in record.value().decode()
    stored = json.loads(record.value())["input_message"]
    assert stored["workflow_name"] == "wf-dead" and stored["S3_bucket"]["aws_secret_access_key"] == "***"
    (notification,) = notifier.sent
    assert (notification.status, notification.workflow_name) == ("CRITICAL", "wf-dead")
    assert f"{system_topic}.dlq" in notification.description
