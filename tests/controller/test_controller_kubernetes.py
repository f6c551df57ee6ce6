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
from services.controller.messages import parse_workflow_message
from services.controller.notifications import NullNotifier
from services.core.step_config import step_config_from_message, step_config_name
from services.core.step_config_k8s import KubernetesStepConfigStore, credentials_secret_name

SOURCES = "/apis/sources.knative.dev/v1beta1/namespaces/uc5/kafkasources"


def make_controller(kube_clients, notifier: NullNotifier | None = None, **settings) -> WorkflowController:
    core, custom = kube_clients
    driver = KubernetesSourceDriver(custom, ControllerSettings(bootstrap_servers="kafka:9092", **settings),
                                    sleep=lambda _s: None)
    return WorkflowController(KubernetesStepConfigStore(core), driver, "kafka:9092", notifier=notifier)


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


def test_republish_of_the_same_workflow_updates_in_place(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients)
    assert controller.handle(publish(topic_out="first.out")).action == WIRED
    created = fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))
    result = controller.handle(publish(topic_out="second.out"))
    assert result.action == WIRED
    put = fake_api.calls("PUT", "/kafkasources/")
    assert len(put) == 1 and put[0].body["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    replaced = fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]  # same source: its offsets are kept
    assert not fake_api.calls("DELETE")
    assert len(fake_api.objects("kafkasources")) == 1 and len(fake_api.objects("configmaps")) == 1


def test_the_fake_denies_a_consumer_group_change_like_the_knative_webhook(kube_clients, fake_api) -> None:
    _core, custom = kube_clients
    make_controller(kube_clients).handle(publish())
    name = kafka_source_name("uc5.Input_1")
    source = fake_api.get_object("kafkasources", "uc5", name)
    source["spec"]["consumerGroup"] = "another-group"
    with pytest.raises(Exception) as denied:
        custom.replace_namespaced_custom_object("sources.knative.dev", "v1beta1", "uc5", "kafkasources", name, source)
    assert denied.value.status == 400 and "Immutable fields changed" in denied.value.body


def test_republish_under_another_workflow_recreates_the_source_before_the_settings_change(kube_clients,
                                                                                         fake_api) -> None:
    controller = make_controller(kube_clients)
    assert controller.handle(publish(topic_out="old.out")).action == WIRED
    created = fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))
    fake_api.requests.clear()
    result = controller.handle(publish(workflow="uc5-renamed", topic_out="new.out"))
    assert (result.action, result.valid) == (WIRED, True)
    config_name = step_config_name("uc5.Input_1")
    writes = [(r.method, r.path) for r in fake_api.requests if r.method != "GET"]
    source_path = f"{SOURCES}/{kafka_source_name('uc5.Input_1')}"
    # The old source is gone before the Secret/ConfigMap carry the new settings: it never delivers into them.
    assert writes[0] == ("DELETE", source_path)
    assert writes.index(("DELETE", source_path)) < min(
        i for i, (_m, path) in enumerate(writes) if "/configmaps" in path or "/secrets" in path)
    assert writes[-1] == ("POST", SOURCES)
    recreated = fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))
    assert recreated["metadata"]["uid"] != created["metadata"]["uid"]
    assert recreated["spec"]["consumerGroup"] == consumer_group("uc5-renamed", "uc5.Input_1")
    stored = json.loads(fake_api.get_object("configmaps", "uc5", config_name)["data"]["jsonSuperviserRequest"])
    assert stored["workflow_name"] == "uc5-renamed" and stored["Topics"]["out"] == "new.out"
    assert not fake_api.calls("PUT", "/kafkasources/")  # never an update the webhook would deny


def test_wire_recreates_a_source_whose_consumer_group_differs(kube_clients, fake_api) -> None:
    # Without release_conflicting first (e.g. a source left by an earlier controller version), wire() itself
    # recreates instead of sending an update the webhook denies.
    controller = make_controller(kube_clients)
    controller.handle(publish())
    message = parse_workflow_message(publish(workflow="uc5-other"))
    config, _credentials = step_config_from_message(message, "kafka:9092")
    controller.driver.wire(config)
    assert fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))["spec"]["consumerGroup"] \
        == consumer_group("uc5-other", "uc5.Input_1")
    assert not fake_api.calls("PUT", "/kafkasources/")


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


def test_a_rejected_body_is_a_permanent_failure_answered_and_notified(kube_clients, fake_api) -> None:
    notifier = NullNotifier()
    controller = make_controller(kube_clients, notifier)
    fake_api.fail_next.append(("POST", 422))
    result = controller.handle(publish())
    assert (result.action, result.retryable) == (FAILED, False)
    # Not "valid": the DSL must not take a step that was not wired for a wired one.
    assert result.answer == {"msg": "There was a problem ignoring"}
    (notification,) = notifier.sent
    assert (notification.status, notification.workflow_name) == ("CRITICAL", "uc5-test")
    assert notification.component_name == "cfactor component" and notification.optional.namespace == "uc5"
    assert "422" in notification.description and "not applied" in notification.description


def test_every_failure_is_notified_without_credentials(kube_clients, fake_api) -> None:
    notifier = NullNotifier()
    controller = make_controller(kube_clients, notifier)
    broken = workflow_message("wf-bad", "bad.in", service="cfactor", namespace="uc5")
    broken["ML"]["Namespace"] = "Not A Namespace"
    controller.handle(json.dumps(broken))                      # refused: invalid namespace
    controller.handle(b"{not json")                            # refused: not JSON
    fake_api.fail_next.append(("POST", 503))
    controller.handle(publish("t.retry", workflow="wf-retry"))  # temporary: the source retries
    controller.handle(publish("t.ok", workflow="wf-ok"))        # wired: nothing to notify
    controller.handle(publish().replace(b'"published"', b'"draft"'))  # ignored: nothing to notify
    assert [(n.status, n.workflow_name) for n in notifier.sent] == [
        ("CRITICAL", "wf-bad"), ("CRITICAL", ""), ("WARNING", "wf-retry")]
    assert "ML.Namespace" in notifier.sent[0].description and "not JSON" in notifier.sent[1].description
    assert "503" in notifier.sent[2].description
    for notification in notifier.sent:
        assert TEST_SECRET_ACCESS_KEY not in notification.model_dump_json()
        assert len(notification.description) <= 300


def test_stopping_needs_only_topics_and_ml(kube_clients, fake_api) -> None:
    controller = make_controller(kube_clients)
    controller.handle(publish())
    for stop in ({"workflow_status": "stopping", "workflow_name": "uc5-test", "Topics": {"in": "uc5.Input_1"},
                  "ML": {"Namespace": "uc5"}, "S3_bucket": {"s3-bucket-name": "b"}},        # partial S3_bucket
                 {"workflow_status": "stopping", "workflow_name": "uc5-test", "Topics": {"in": "uc5.Input_1"},
                  "ML": {"Namespace": "uc5", "ServiceName": ""}, "S3_bucket": None}):
        result = controller.handle(json.dumps(stop))
        assert (result.action, result.valid) == (UNWIRED, True), result.reason
    assert fake_api.objects("kafkasources") == [] and fake_api.objects("configmaps") == []


def test_step_sources_are_unordered_with_a_step_long_timeout_and_secured(kube_clients, fake_api,
                                                                         kafka_source_schema) -> None:
    net = {"sasl": {"enable": True, "user": {"secretKeyRef": {"name": "kafka-user", "key": "user"}},
                    "password": {"secretKeyRef": {"name": "kafka-user", "key": "password"}},
                    "type": {"secretKeyRef": {"name": "kafka-user", "key": "saslType"}}},
           "tls": {"enable": True, "caCert": {"secretKeyRef": {"name": "kafka-ca", "key": "ca.crt"}}}}
    controller = make_controller(kube_clients, kafka_net=json.dumps(net), delivery_timeout_s=3660)
    assert controller.handle(publish()).action == WIRED  # the fake validated the body against the CRD
    spec = fake_api.get_object("kafkasources", "uc5", kafka_source_name("uc5.Input_1"))["spec"]
    assert spec["ordering"] == "unordered"
    assert spec["delivery"]["timeout"] == "PT3660S" and spec["delivery"]["retry"] == 8
    assert spec["net"] == net


@pytest.mark.parametrize("net", [
    {"sasl": {"enable": True, "password": "hunter2-literal"}},
    {"sasl": {"password": {"secretKeyRef": {"name": "s", "key": "k"}, "value": "x"}}},
    {"tls": {"enable": "yes"}},
    {"ssl": {}},
])
def test_kafka_net_accepts_secret_references_only(net: dict) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as error:
        ControllerSettings(kafka_net=json.dumps(net))
    assert "hunter2-literal" not in str(error.value)


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


def test_dead_letter_topic_is_created_before_wiring_and_a_kafka_failure_is_retryable(kube_clients, fake_api) -> None:
    core, custom = kube_clients
    created: list[tuple[str, list[str]]] = []
    driver = KubernetesSourceDriver(custom, ControllerSettings(bootstrap_servers="kafka:9092"), sleep=lambda _s: None)
    controller = WorkflowController(KubernetesStepConfigStore(core), driver, "kafka:9092",
                                    create_topics=lambda servers, topics: created.append((servers, topics)))
    assert controller.handle(publish()).action == WIRED
    assert created == [("kafka:9092", ["uc5.Input_1.dlq"])]

    def kafka_down(_servers: str, _topics: list[str]) -> None:
        raise RuntimeError("topic 'x.dlq' not created: broker transport failure")

    notifier = NullNotifier()
    failing = WorkflowController(KubernetesStepConfigStore(core), driver, "kafka:9092", notifier=notifier,
                                 create_topics=kafka_down)
    fake_api.requests.clear()
    result = failing.handle(publish("uc5.other", workflow="wf-kafka-down"))
    assert (result.action, result.retryable) == (FAILED, True)  # answered 503: the source redelivers
    assert fake_api.requests == []  # nothing wired without its dead-letter topic
    assert [n.status for n in notifier.sent] == ["WARNING"] and "dead-letter topic" in notifier.sent[0].description
