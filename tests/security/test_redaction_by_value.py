"""Issue 18 item 5: a credential a workflow carries is removed by VALUE wherever it would appear, whatever key it sits
under, JSON held in a string included, and signed URL parameters are masked.

Each test drives one path that leaked on the second review: the step ConfigMap (through the FAKE Kubernetes API
server of tests/controller, a stub for the one thing that cannot run here) and the local store, the status API,
the controller's dead-letter record for a structured CloudEvent whose ``data`` is a string, the controller's and
the Wrapper's notifications and dead-letter records, and log lines."""

from __future__ import annotations

import base64
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from security_support import InProcessApp, http

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controller"))  # the FAKE Kubernetes API server
from fake_kubernetes import FakeKubernetesApiServer  # noqa: E402

from services.controller.http_app import build_app, knative_dead_letter_record  # noqa: E402
from services.controller.kubernetes_driver import KubernetesSourceDriver  # noqa: E402
from services.controller.notifications import NullNotifier  # noqa: E402
from services.controller.reconciler import FAILED, WIRED, WorkflowController  # noqa: E402
from services.controller.settings import ControllerSettings  # noqa: E402
from services.controller.wiring import delivery_dead_letter_record  # noqa: E402
from services.core.contracts import WorkflowMessage  # noqa: E402
from services.core.logging import JsonFormatter, TextFormatter  # noqa: E402
from services.core.step_config import LocalStepConfigStore, step_config_from_message  # noqa: E402
from services.core.step_config_k8s import KubernetesStepConfigStore  # noqa: E402
from services.wrapper.notifications import StepNotifier, dead_letter_record  # noqa: E402

# One distinct value per place a credential hides, so a failure names the path that leaked.
S3_KEY_ID = "AKIAREDACTIONTEST0001"
S3_SECRET = "s3-secret-value-7d41c0ffee"
SESSION_TOKEN = "session-token-value-5be1"
META = {
    "accessKeyId": "meta-access-key-id-0a1b2c",
    "apiKey": "meta-api-key-3d4e5f",
    "privateKey": "-----BEGIN PRIVATE KEY-----meta-pem-6a7b8c",
    "authorization": "Bearer meta-bearer-9d0e1f",
    "passphrase": "meta-passphrase-2a3b4c",
}
SIGNATURE = "f00dfacecafe0123456789abcdef"
CREDENTIAL_SCOPE = "AKIAPRESIGNED0042/20260101/eu-central-1/s3/aws4_request"
EVERY_VALUE = (S3_KEY_ID, S3_SECRET, SESSION_TOKEN, *META.values(), SIGNATURE, CREDENTIAL_SCOPE)


def leaks(text: str) -> list[str]:
    """The credential values (and their base64 forms, as a Secret would hold them) found in ``text``."""
    found = [value for value in EVERY_VALUE if value in text]
    found += [value for value in EVERY_VALUE if base64.b64encode(value.encode()).decode() in text]
    return found


def presigned(url: str) -> str:
    return (f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={CREDENTIAL_SCOPE}"
            f"&X-Amz-Signature={SIGNATURE}&X-Amz-Expires=300")


def workflow(topic: str = "redact.in", **extra: Any) -> dict[str, Any]:
    return {
        "workflow_name": "wf-redact", "workflow_status": "published", "Topics": {"in": topic, "out": "redact.out"},
        "ML": {"ServiceName": "cfactor", "Namespace": "uc5", "component_name": "cfactor step"},
        "S3_bucket": {"aws_access_key_id": S3_KEY_ID, "aws_secret_access_key": S3_SECRET,
                      "aws_session_token": SESSION_TOKEN, "s3-bucket-name": "bucket", "region_name": "us-east-1",
                      "endpoint_url": presigned("http://127.0.0.1:9/")},
        # Values under keys the old key-name rule missed, at several depths, one in a list, one in JSON text; and the
        # same values again under innocent keys.
        "meta_information": {**META, "nested": [{"auth": {"apiKey": META["apiKey"]}}],
                             "as_text": json.dumps({"passphrase": META["passphrase"]}),
                             "note": f"uploaded with {META['accessKeyId']} from {presigned('https://x.test/o')}"},
        **extra,
    }


@pytest.fixture
def fake_kubernetes() -> Any:
    with FakeKubernetesApiServer() as server:
        yield server


def kubernetes_controller(server: FakeKubernetesApiServer, notifier: NullNotifier | None = None,
                          store: Any = None) -> WorkflowController:
    from kubernetes import client

    api_client = client.ApiClient(client.Configuration(host=server.url))
    driver = KubernetesSourceDriver(client.CustomObjectsApi(api_client),
                                    ControllerSettings(bootstrap_servers="kafka:9092"), sleep=lambda _s: None)
    return WorkflowController(store or KubernetesStepConfigStore(client.CoreV1Api(api_client)), driver,
                              "kafka:9092", notifier=notifier)


def test_no_credential_value_reaches_the_configmap_the_status_api_or_the_local_store(fake_kubernetes,
                                                                                    tmp_path) -> None:
    controller = kubernetes_controller(fake_kubernetes)
    app = InProcessApp(build_app(controller))
    try:
        status, answer = http("POST", app.url + "/", json.dumps(workflow()).encode(),
                              {"Content-Type": "application/json"})
        assert status == 200 and json.loads(answer) == {"msg": "Received message And valid"}
        _, one = http("GET", app.url + "/workflows/wf-redact")
        _, every = http("GET", app.url + "/workflows")
    finally:
        app.close()
    assert leaks(one.decode()) == [] and leaks(every.decode()) == []
    assert json.loads(one)["steps"], "the status API shows the wired step"
    config_maps = fake_kubernetes.objects("configmaps", "uc5")
    assert len(config_maps) == 1 and leaks(json.dumps(config_maps)) == []
    stored = json.dumps(config_maps)
    assert "X-Amz-Signature=***" in stored and "meta_information" in stored  # redacted, not dropped wholesale
    for request in fake_kubernetes.requests:  # only the Secret's body carries credentials
        if "/secrets" not in request.path:
            assert leaks(json.dumps(request.body)) == [], request.path
    secret = fake_kubernetes.objects("secrets", "uc5")[0]
    assert base64.b64decode(secret["data"]["aws_secret_access_key"]).decode() == S3_SECRET  # still delivered

    config, credentials = step_config_from_message(WorkflowMessage.model_validate(workflow()), "kafka:9092")
    LocalStepConfigStore(tmp_path).put("uc5", config, credentials)
    assert leaks((tmp_path / "uc5" / f"{config.config_name}.json").read_text()) == []
    assert config.endpoint_url is not None and SIGNATURE not in config.endpoint_url


def structured_cloudevent(message: dict[str, Any]) -> bytes:
    """A structured-mode CloudEvent whose ``data`` is the workflow message as a JSON STRING."""
    return json.dumps({"specversion": "1.0", "id": "e-1", "source": "dsl", "type": "eo4eu.workflow",
                       "datacontenttype": "application/json", "data": json.dumps(message)}).encode()


def test_the_controllers_dead_letter_record_of_a_structured_cloudevent_with_string_data_has_no_credential() -> None:
    body = structured_cloudevent(workflow())
    echoed = base64.b64encode(f"refused: {S3_SECRET} {META['apiKey']}".encode()).decode()
    record, _headers = knative_dead_letter_record("system.ML", body, {
        "ce-id": "partition:0/offset:7", "ce-knativeerrordest": "http://eo-controller.ml.svc/",
        "ce-knativeerrorcode": "500", "ce-knativeerrordata": echoed})
    assert leaks(json.dumps(record)) == []
    replay = json.loads(record["input_message"]["data"])  # still a replayable message, credentials masked
    assert replay["workflow_name"] == "wf-redact" and replay["S3_bucket"]["aws_secret_access_key"] == "***"
    # The system consumer's path (given up after retries) writes the same record; a body cut short is not JSON.
    given_up = delivery_dead_letter_record("given up", config_name="", service_name="", workflow_name="",
                                           topic_in="system.ML", event_id="", value=body, attempts=5,
                                           http_status=None)
    truncated = delivery_dead_letter_record("given up", config_name="", service_name="", workflow_name="",
                                            topic_in="system.ML", event_id="", value=json.dumps(workflow()).encode()[:-40],
                                            attempts=5, http_status=None)
    assert leaks(json.dumps(given_up)) == [] and leaks(json.dumps(truncated)) == []


class EchoingStore:
    """A store that fails with an error quoting what it was given, as an API server's validation error can."""

    def put(self, namespace: str, config: Any, credentials: Any) -> None:
        raise RuntimeError(f"Secret rejected: extra={credentials.revealed_extra()} {json.dumps(workflow())}")

    def get(self, *_args: Any) -> Any:
        raise KeyError("none")

    def delete(self, *_args: Any) -> bool:
        return False

    def list(self, *_args: Any) -> list:
        return []


def test_controller_notifications_and_logs_carry_no_credential_of_the_message(fake_kubernetes, caplog) -> None:
    notifier = NullNotifier()
    controller = kubernetes_controller(fake_kubernetes, notifier, store=EchoingStore())
    caplog.set_level(logging.DEBUG)
    result = controller.handle(json.dumps(workflow()).encode())
    assert result.action == FAILED
    assert notifier.sent and leaks(json.dumps([n.model_dump(mode="json") for n in notifier.sent])) == []
    logging.getLogger("services.controller.test").error(
        "store said %s", f"denied for {META['passphrase']} at {presigned('https://s3.test/b/k')}",
        extra={"request": {"apiKey": META["apiKey"], "body": json.dumps({"privateKey": META["privateKey"]})}})
    for formatter in (JsonFormatter(), TextFormatter()):
        rendered = "\n".join(formatter.format(record) for record in caplog.records)
        assert leaks(rendered) == [], type(formatter).__name__


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []

    def publish(self, bootstrap_servers: str, topic: str, value: Any, key: str = "key") -> Any:
        self.published.append((topic, dict(value)))


def test_wrapper_notifications_and_dead_letter_records_carry_no_credential_of_the_step() -> None:
    _config, credentials = step_config_from_message(WorkflowMessage.model_validate(workflow()), "kafka:9092")
    secrets = tuple(credentials.secret_values())
    assert SESSION_TOKEN in secrets  # every S3_bucket credential, not only the key pair
    publisher = RecordingPublisher()
    notifier = StepNotifier(publisher, "kafka:9092", "monitoring.notify", "cfactor", "wf-redact", secrets=secrets)
    notifier.send("CRITICAL", f"S3 said: token {SESSION_TOKEN} expired for {presigned('https://s3.test/b/k')}")
    step_message = {"previous_component_end": "True", "S3_bucket_desc": {"folder": "in"},
                    "meta_information": {**META, "result_url": presigned("https://s3.test/b/out.tif")}}
    as_cloudevent = json.dumps({"specversion": "1.0", "data": json.dumps(step_message)}).encode()
    records = [dead_letter_record(f"failed with {SESSION_TOKEN}", "cfg", value, task="cfactor", secrets=secrets)
               for value in (step_message, as_cloudevent, json.dumps(step_message))]
    assert publisher.published and leaks(json.dumps(publisher.published)) == []
    assert leaks(json.dumps(records)) == []
    assert records[0]["input_message"]["S3_bucket_desc"] == {"folder": "in"}  # the rest is kept for replay


# -- the rules themselves (services/core/redaction.py) ---------------------------------------------------------------

@pytest.mark.parametrize("key", ["accessKeyId", "aws_access_key_id", "Access-Key-Id", "apiKey", "api_key", "privateKey",
                                 "authorization", "Authorization", "passphrase", "sessionToken", "client_secret",
                                 "sasl_password", "X-Amz-Security-Token", "sse_customer_key", "auth", "cookie"])
def test_credential_like_keys(key: str) -> None:
    from services.core.redaction import is_credential_key

    assert is_credential_key(key)


@pytest.mark.parametrize("key", ["workflow_name", "author", "keyboard", "bucket", "endpoint_url", "s3-bucket-name",
                                 "key", "folder", "region_name", "component_name"])
def test_ordinary_keys(key: str) -> None:
    from services.core.redaction import is_credential_key

    assert not is_credential_key(key)


@pytest.mark.parametrize("parameter", ["X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "Signature",
                                       "sig", "token", "access_token", "AWSAccessKeyId", "X-Goog-Signature"])
def test_signed_url_parameters_are_masked_and_the_rest_kept(parameter: str) -> None:
    from services.core.redaction import redact_signed_urls

    url = f"https://s3.test/b/k.tif?X-Amz-Expires=300&{parameter}=v4lu3-{parameter}&part=2#frag"
    assert redact_signed_urls(url) == f"https://s3.test/b/k.tif?X-Amz-Expires=300&{parameter}=***&part=2#frag"


def test_the_log_mask_replaces_many_values_in_one_pass_and_keeps_the_newest() -> None:
    from services.core.redaction import LogMask

    mask = LogMask(capacity=200)
    values = [f"value-{index:04d}-secret" for index in range(300)]
    mask.add(values)
    text = mask.redactor().text(f"a {values[299]} b {values[150]}{values[120]} c {values[0]}")
    assert text == f"a *** b ****** c {values[0]}"  # value 0 fell out of the bounded mask


@pytest.mark.parametrize("text, secret", [
    ("Authorization: Bearer eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl"),
    ("authorization=Basic YWxpY2U6czNjcjN0cGFzcw==", "YWxpY2U6czNjcjN0cGFzcw=="),
    ("fetch https://alice:S3cr3tPassw0rd@data.example.org/x", "S3cr3tPassw0rd"),
])
def test_authorization_values_and_url_passwords_are_masked_under_any_key(text: str, secret: str) -> None:
    from services.core import redaction

    message = {"meta_information": {"note": text}}
    assert secret not in json.dumps(redaction.redact(message))
    assert any(secret in found for found in redaction.collect_secrets(message))  # and so kept out of log lines
    assert redaction.redact({"u": "http://example.org/a@b"}) == {"u": "http://example.org/a@b"}
