"""``eo-controller serve`` as a process: settings from the environment, the Kubernetes client pointed at the FAKE
API server, a KafkaSource delivery in, a clean exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

from confluent_kafka.admin import AdminClient

from controller_test_support import TEST_SECRET_ACCESS_KEY, read_topic, unique, wait_until, workflow_message
from services.controller.wiring import kafka_source_name
from services.core.kafka import admin_config
from services.local_platform.infra import free_port


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _post(port: int, body: bytes) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_serve_wires_a_step_through_the_kubernetes_api(fake_api, kafka_broker, tmp_path) -> None:
    port = free_port()
    notify_topic, topic_in = unique("monitoring.notify"), unique("cli.in")
    env = {**os.environ, "EOML_CONTROLLER_HTTP_HOST": "127.0.0.1", "EOML_CONTROLLER_HTTP_PORT": str(port),
           "EOML_CONTROLLER_KUBERNETES_HOST": fake_api.url,
           "EOML_CONTROLLER_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
           "EOML_CONTROLLER_NOTIFY_TOPIC": notify_topic,
           "EOML_CONTROLLER_WORKFLOW_NAMESPACES": "uc5", "EOML_LOG_FORMAT": "json"}
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "services.controller.cli", "serve"], env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{port}/readyz") == 200, timeout_s=60)
        body = json.dumps(workflow_message("wf-cli", topic_in, service="cfactor", namespace="uc5")).encode()
        assert _post(port, body) == {"msg": "Received message And valid"}
        assert fake_api.get_object("kafkasources", "uc5", kafka_source_name(topic_in)) is not None
        # The step's dead-letter topic was created by the controller (admin call) before the source.
        assert f"{topic_in}.dlq" in AdminClient(admin_config(kafka_broker.bootstrap_servers)).list_topics(
            timeout=10).topics
        # A refused message: the "problem" answer, and a CRITICAL notification from the process.
        elsewhere = json.dumps(workflow_message("wf-cli-x", unique("x.in"), service="cfactor",
                                                namespace="not-served")).encode()
        assert _post(port, elsewhere) == {"msg": "There was a problem ignoring"}
        (record,) = read_topic(kafka_broker.bootstrap_servers, notify_topic, 1)
        notification = json.loads(record.value())
        assert (notification["status"], notification["workflow_name"]) == ("CRITICAL", "wf-cli-x")
        assert "not a workflow namespace" in notification["description"]
        assert TEST_SECRET_ACCESS_KEY not in record.value().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(30)
    log_text = log_path.read_text()
    assert returncode == 0, log_text
    assert "workflow step wired" in log_text
    assert TEST_SECRET_ACCESS_KEY not in log_text


def test_unreachable_api_server_keeps_it_alive_but_not_ready(kafka_broker, tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "EOML_CONTROLLER_HTTP_HOST": "127.0.0.1", "EOML_CONTROLLER_HTTP_PORT": str(port),
           "EOML_CONTROLLER_KUBERNETES_HOST": f"http://127.0.0.1:{free_port()}",
           "EOML_CONTROLLER_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers}
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "services.controller.cli", "serve"], env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{port}/healthz") == 200, timeout_s=60)
        wait_until(lambda: "stored steps not loaded yet" in log_path.read_text(), timeout_s=60)
        assert _status(f"http://127.0.0.1:{port}/readyz") == 503
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(30)
    assert returncode == 0, log_path.read_text()
