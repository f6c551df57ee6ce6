"""WorkflowController with the Kubernetes store and KafkaSource driver, against a FAKE API server: the calls it
makes, the bodies it sends, and what it answers."""

from __future__ import annotations

import base64
import json

import pytest

from controller_test_support import TEST_SECRET_ACCESS_KEY, workflow_message
from fake_kubernetes import schema_errors
from services.controller.kubernetes_driver import KubernetesSourceDriver
from services.controller.reconciler import FAILED, IGNORED, REJECTED, UNWIRED, WIRED, WorkflowController
from services.controller.settings import ControllerSettings
from services.controller.wiring import consumer_group, kafka_source_name
from services.core.step_config import step_config_name
from services.core.step_config_k8s import KubernetesStepConfigStore, credentials_secret_name

SOURCES = "/apis/sources.knative.dev/v1beta1/namespaces/uc5/kafkasources"


def make_controller(kube_clients, **settings) -> WorkflowController:
    core, custom = kube_clients
    driver = KubernetesSourceDriver(custom, ControllerSettings(bootstrap_servers="kafka:9092", **settings),
                                    sleep=lambda _s: None)
    return WorkflowController(KubernetesStepConfigStore(core), driver, "kafka:9092")


def publish(topic: str = "uc5.Input_1", workflow: str = "uc5-test", **extra) -> bytes:
    return json.dumps(workflow_message(workflow, topic, service="cfactor", namespace="uc5", **extra)).encode()


def test_published_creates_secret_configmap_then_kafkasource(kube_clients, fake_api, kafka_source_schema) -> None:
    controller = make_controller(kube_clients)
    result = controller.handle(publish())
    assert (result.action, result.valid, result.answer) == (WIRED, True, {"msg": "Received message And valid"})

    writes = [(r.method, r.path) for r in fake_api.requests if r.method != "GET"]
    config_name = step_config_name("uc5.Input_1")
    assert writes == [("POST", "/api/v1/namespaces/uc5/secrets"), ("POST", "/api/v1/namespaces/uc5/configmaps"),
                      ("POST", SOURCES)]
    source = fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))
    assert source is not None
    source.pop("status", None)
    for key in ("uid", "resourceVersion", "creationTimestamp"):
        source["metadata"].pop(key)
    assert schema_errors(source, kafka_source_schema) == []
    assert source["spec"]["sink"]["uri"] == f"/{config_name}"
    assert source["spec"]["consumerGroup"] == consumer_group("uc5-test", "uc5.Input_1")
    # Credentials went to the Secret and nowhere else.
    for request in fake_api.requests:
        if "/secrets" not in request.path:
            assert TEST_SECRET_ACCESS_KEY not in json.dumps(request.body)


def test_republish_updates_instead_of_failing(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients)
    assert controller.handle(publish(topic_out="first.out")).action == WIRED
    created = fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))
    result = controller.handle(publish(workflow="uc5-renamed"))
    assert result.action == WIRED
    put = fake_api.calls("PUT", "/kafkasources/")
    assert len(put) == 1 and put[0].body["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    replaced = fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    assert replaced["spec"]["consumerGroup"] == consumer_group("uc5-renamed", "uc5.Input_1")
    assert len(fake_api.objects("kafkasources")) == 1 and len(fake_api.objects("configmaps")) == 1


def test_stopping_deletes_source_then_configuration(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients)
    controller.handle(publish())
    stop = {"workflow_status": "stopping", "workflow_name": "uc5-test", "Topics": {"in": "uc5.Input_1"},
            "ML": {"Namespace": "uc5"}}
    fake_api.requests.clear()
    result = controller.handle(json.dumps(stop))
    assert (result.action, result.valid) == (UNWIRED, True)
    config_name = step_config_name("uc5.Input_1")
    assert [(r.method, r.path) for r in fake_api.requests] == [
        ("DELETE", f"{SOURCES}/{kafka_source_name('uc5.Input_1')}"),
        ("DELETE", f"/api/v1/namespaces/uc5/configmaps/{config_name}"),
        ("DELETE", f"/api/v1/namespaces/uc5/secrets/{credentials_secret_name(config_name)}"),
    ]
    assert fake_api.objects("kafkasources") == [] and fake_api.objects("configmaps") == []
    assert fake_api.objects("secrets") == []
    # Stopping again (nothing left) is fine.
    assert controller.handle(json.dumps(stop)).action == UNWIRED
    assert controller.workflow_status("uc5-test")["state"] == "stopped"


@pytest.mark.parametrize("status", ["compiling", "draft", "completed", "something-new"])
def test_other_statuses_touch_nothing(kube_clients, fake_api, status: str) -> None:
    controller = make_controller(kube_clients)
    result = controller.handle(publish().replace(b'"published"', f'"{status}"'.encode()))
    assert (result.action, result.valid) == (IGNORED, True)
    assert fake_api.requests == []


def test_malformed_message_is_answered_and_touches_nothing(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients)
    for body in (b"", b"{oops", b'{"workflow_status": "published"}', b"null"):
        result = controller.handle(body)
        assert (result.action, result.answer) == (REJECTED, {"msg": "There was a problem ignoring"})
    assert fake_api.requests == []
    # ... and the controller still works afterwards.
    assert controller.handle(publish()).action == WIRED


def test_api_server_errors_are_retryable_and_recorded(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients)
    fake_api.fail_next.append(("POST", 503))
    result = controller.handle(publish())
    assert (result.action, result.retryable, result.valid) == (FAILED, True, True)
    assert TEST_SECRET_ACCESS_KEY not in result.reason
    status = controller.workflow_status("uc5-test", live=False)
    assert status["state"] == "failed" and "503" in status["steps"][0]["error"]
    # The retry (what the KafkaSource does on 503) succeeds and the status recovers.
    assert controller.handle(publish()).action == WIRED
    assert controller.workflow_status("uc5-test", live=False)["state"] == "running"


def test_a_rejected_body_is_a_permanent_failure(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients)
    fake_api.fail_next.append(("POST", 422))
    result = controller.handle(publish())
    assert (result.action, result.retryable) == (FAILED, False)


def test_status_lists_workflows_steps_and_live_source_state(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients)
    controller.handle(publish("wf1.a", workflow="wf1"))
    controller.handle(publish("wf1.b", workflow="wf1"))
    controller.handle(publish("wf2.a", workflow="wf2"))
    source = fake_api.get_object("kafkasources", "uc5", kafka_source_name("wf1.a"))
    source["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    fake_api.seed("apis/sources.knative.dev/v1beta1", "kafkasources", source)

    names = [w["name"] for w in controller.workflows()]
    assert names == ["wf1", "wf2"]
    wf1 = controller.workflow_status("wf1")
    assert wf1["state"] == "running"
    assert [s["topic_in"] for s in wf1["steps"]] == ["wf1.a", "wf1.b"]
    live = {s["topic_in"]: s["live"] for s in wf1["steps"]}
    assert live["wf1.a"]["source_ready"] is True
    assert live["wf1.b"]["source_ready"] is False
    assert controller.workflow_status("nope") is None


def test_restart_rebuilds_the_status_from_the_store(kube_clients, fake_api) -> None:
    make_controller(kube_clients).handle(publish("wf1.a", workflow="wf1"))
    restarted = make_controller(kube_clients)
    assert restarted.resume() == 1
    assert restarted.workflow_status("wf1", live=False)["steps"][0]["state"] == "wired"


def test_waits_for_the_inference_service_before_wiring(kube_clients, fake_api) -> None:
    isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": "triton", "namespace": "eoml"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    fake_api.seed("apis/serving.kserve.io/v1beta1", "inferenceservices", isvc)
    controller = make_controller(kube_clients, inference_service="eoml/triton", inference_service_wait_s=5)
    assert controller.handle(publish()).action == WIRED
    assert fake_api.calls("GET", "/inferenceservices/triton")
    assert controller.workflow_status("uc5-test", live=False)["steps"][0]["source"]["model_ready"] is True


def test_a_model_never_ready_still_wires_after_the_bounded_wait(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients, inference_service="eoml/missing", inference_service_wait_s=0.2)
    assert controller.handle(publish()).action == WIRED
    assert controller.workflow_status("uc5-test", live=False)["steps"][0]["source"]["model_ready"] is False
    assert fake_api.objects("kafkasources")


def test_workflow_namespaces_limit_what_is_touched_and_listed(kube_clients, fake_api) -> None:
    core, custom = kube_clients
    settings = ControllerSettings(bootstrap_servers="kafka:9092", workflow_namespaces="uc5, uc6")
    assert settings.workflow_namespaces == ["uc5", "uc6"]
    controller = WorkflowController(KubernetesStepConfigStore(core, custom),
                                    KubernetesSourceDriver(custom, settings), "kafka:9092",
                                    namespaces=settings.workflow_namespaces)
    assert controller.handle(publish()).action == WIRED  # uc5
    elsewhere = json.dumps(workflow_message("wf-x", "x.in", service="cfactor", namespace="other")).encode()
    result = controller.handle(elsewhere)
    assert (result.action, result.valid) == (REJECTED, False) and "not a workflow namespace" in result.reason
    assert fake_api.objects("configmaps", "other") == []
    # Stored steps are found per namespace (what a namespaced Role allows), never cluster-wide, through the
    # KafkaSources; ConfigMaps are read by name (the controller's Role has no list on ConfigMaps and Secrets).
    fake_api.requests.clear()
    assert controller.resume() == 1
    assert [r.path for r in fake_api.calls("GET", "/configmaps")] == [
        f"/api/v1/namespaces/uc5/configmaps/{fake_api.objects('configmaps', 'uc5')[0]['metadata']['name']}"]
    listed = [r.path for r in fake_api.calls("GET", "/kafkasources")]
    assert listed == ["/apis/sources.knative.dev/v1beta1/namespaces/uc5/kafkasources",
                      "/apis/sources.knative.dev/v1beta1/namespaces/uc6/kafkasources"]


def test_credentials_never_reach_the_logs(kube_clients, fake_api, caplog) -> None:
    import logging

    from services.core.logging import JsonFormatter

    controller = make_controller(kube_clients)
    caplog.set_level(logging.DEBUG)
    broken = workflow_message("wf-log", "log.in", service="cfactor", namespace="uc5")
    broken["ML"]["Namespace"] = "Not A Namespace"
    controller.handle(json.dumps(broken))                     # rejected
    controller.handle(publish("log.ok", workflow="wf-log"))   # wired
    fake_api.fail_next.append(("POST", 500))
    controller.handle(publish("log.fail", workflow="wf-log"))  # failed, retryable
    formatter = JsonFormatter()
    rendered = "\n".join(formatter.format(record) for record in caplog.records)
    assert "rejected" in rendered and "wired" in rendered and "not applied" in rendered
    assert TEST_SECRET_ACCESS_KEY not in rendered
    assert base64.b64encode(TEST_SECRET_ACCESS_KEY.encode()).decode() not in rendered  # nor the Secret's encoding
