"""Every state-changing entry point refuses callers without a valid sender token, and accepts the right one.

Tokens are real JWTs signed here with generated RSA keys; the issuer's discovery document and JWKS are served by a
real HTTPS server (a certificate made by the test, trusted through ``EOML_AUTH_CA_FILE``); the services verify with their real verifier (services/core/auth.py):

- controller ``POST /`` (the ``eo-controller serve`` process) and ``POST /dead-letter`` (its app in-process, with a
  recording dead-letter writer: the endpoint exists only next to a Kafka producer on Kubernetes);
- Wrapper ``POST /<config>`` and ``POST /`` (the ``eo-wrapper`` process, its S3 endpoint a recording server: a step
  that runs touches S3 at once, a refused one never does).

Attack -> expected: no Authorization / not Bearer / garbage -> 401; wrong audience, expired, wrong issuer, signed by
another key, unknown key id -> 401; valid token of another service account -> 403; the expected sender -> accepted.
The refusal's log line names the reason, never the token or the body.
"""

from __future__ import annotations

from http.client import HTTPConnection
import json
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from security_support import (
    CANARY,
    InProcessApp,
    Issuer,
    RecordingServer,
    ServiceProcess,
    bearer,
    cloudevent_headers,
    http,
    issuer_ca_file,
    new_rsa_key,
    wait_until,
)
from services.controller.http_app import build_app
from services.controller.reconciler import WorkflowController
from services.core.auth import AuthError, OidcVerifier, SharedTokenVerifier
from services.core.step_config import LocalStepConfigStore, StepConfig, StepCredentials, step_config_name
from services.local_platform.infra import free_port

NAMESPACE = "uc1"
CONTROLLER_AUDIENCE = "serving.knative.dev/service/eoml-system/eoml-controller"
WRAPPER_AUDIENCE = f"serving.knative.dev/service/{NAMESPACE}/classify"
CONTROLLER_SOURCE_SA = "system:serviceaccount:eoml-system:eoml-controller-system-ml-oidc-sources.knative.dev-kafkasource"
STEP_SOURCE_SA = f"system:serviceaccount:{NAMESPACE}:wf-a-in-1a2b3c4d-oidc-sources.knative.dev-kafkasource"
STEP_SOURCE_PATTERN = f"system:serviceaccount:{NAMESPACE}:*-oidc-sources.knative.dev-kafkasource"
OTHER_POD_SA = f"system:serviceaccount:{NAMESPACE}:default"


def refused_tokens(issuer: Issuer, audience: str, subject: str) -> dict[str, dict[str, str]]:
    """Header sets an attacker inside the cluster can produce, each with the expected status."""
    other_key = new_rsa_key()
    return {
        "no credentials": {},
        "basic auth": {"Authorization": "Basic dXNlcjpwYXNz"},
        "garbage bearer": bearer("not-a-jwt"),
        "unsigned (alg none)": bearer("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4In0."),
        "wrong audience": bearer(issuer.token(subject, "serving.knative.dev/service/other/svc")),
        "expired": bearer(issuer.token(subject, audience, expires_in_s=-120)),
        "wrong issuer": bearer(issuer.token(subject, audience, issuer="https://evil.example")),
        "bad signature": bearer(issuer.token(subject, audience, key=other_key)),
        "unknown key id": bearer(issuer.token(subject, audience, key=other_key, kid="attacker-key")),
    }


def hostile_tokens(issuer: Issuer, audience: str, subject: str) -> dict[str, dict[str, str]]:
    """Tokens of the right sender whose header or lifetime is wrong: each must be 401, never a 5xx or accepted."""
    return {
        "ES256 header naming the RSA key": bearer(issuer.token(
            subject, audience, key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")),  # type: ignore[arg-type]
        "PS256 with the RS256 key": bearer(issuer.token(subject, audience, algorithm="PS256")),
        "lifetime of two days": bearer(issuer.token(subject, audience, expires_in_s=2 * 86400)),
    }


RAW_AUTHORIZATIONS = (b"Bearer \xff\xfe", b"Bearer \xc3\xa9t\xc3\xa9", b"bearer \xff")


def post_raw_authorization(url: str, path: str, authorization: bytes, headers: Mapping[str, str],
                           body: bytes) -> int:
    """POST with an Authorization header of raw bytes (http.client sends bytes values as they are)."""
    parts = urlsplit(url)
    connection = HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        connection.putrequest("POST", path)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.putheader("Authorization", authorization)
        connection.endheaders(body)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    served = Issuer()
    yield served
    served.close()


def oidc_env(issuer: Issuer, audience: str, subjects: list[str]) -> dict[str, str]:
    return {"EOML_AUTH_MODE": "oidc", "EOML_AUTH_ISSUER": issuer.url, "EOML_AUTH_AUDIENCE": audience,
            "EOML_AUTH_ALLOWED_SUBJECTS": ",".join(subjects), "EOML_AUTH_JWKS_MIN_REFRESH_S": "0",
            "EOML_AUTH_CA_FILE": issuer_ca_file()}


def workflow(topic: str, endpoint: str) -> dict[str, Any]:
    return {"workflow_name": f"wf-{topic}", "workflow_status": "published",
            "Topics": {"in": topic, "out": f"{topic}.out"},
            "ML": {"ServiceName": "classify", "Namespace": NAMESPACE, "component_name": "classifier"},
            "S3_bucket": {"aws_access_key_id": "AKIA-" + CANARY, "aws_secret_access_key": CANARY,
                          "s3-bucket-name": "bucket", "region_name": "us-east-1", "endpoint_url": endpoint}}


def step_requests(s3: RecordingServer) -> list[tuple[str, str]]:
    """What a delivered step made the Wrapper send to S3 (not the startup sweep of its acceptance journal)."""
    return [(method, path) for method, path in s3.requests
            if not (method == "GET" and "list-type=2" in path and "wrapper-journal" in path)]


# -- controller POST / ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controller(issuer: Issuer, kafka_broker, tmp_path_factory) -> Iterator[tuple[ServiceProcess, Path, str]]:
    root = tmp_path_factory.mktemp("controller")
    port = free_port()
    env = {**oidc_env(issuer, CONTROLLER_AUDIENCE, [CONTROLLER_SOURCE_SA, STEP_SOURCE_PATTERN]),
           "EOML_AUTH_ROUTE_SUBJECTS": json.dumps({"/": [CONTROLLER_SOURCE_SA]}),
           "EOML_CONTROLLER_HTTP_HOST": "127.0.0.1", "EOML_CONTROLLER_HTTP_PORT": str(port),
           "EOML_CONTROLLER_SOURCE_DRIVER": "local", "EOML_CONTROLLER_STORE": "local",
           "EOML_CONTROLLER_STORE_ROOT": str(root / "store"),
           "EOML_CONTROLLER_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
           "EOML_CONTROLLER_WRAPPER_URLS": json.dumps({"classify": "http://127.0.0.1:9"})}
    process = ServiceProcess("services.controller.cli", ["serve"], env, root / "controller.log",
                             f"http://127.0.0.1:{port}/readyz")
    yield process, root / "store", f"http://127.0.0.1:{port}"
    process.stop()


def test_controller_post_refuses_every_bad_credential_and_stores_nothing(controller, issuer) -> None:
    process, store, url = controller
    body = json.dumps(workflow("sec.refused", "http://127.0.0.1:9")).encode()
    attempts = refused_tokens(issuer, CONTROLLER_AUDIENCE, CONTROLLER_SOURCE_SA)
    attempts.update(hostile_tokens(issuer, CONTROLLER_AUDIENCE, CONTROLLER_SOURCE_SA))
    attempts["valid token, wrong sender"] = bearer(issuer.token(OTHER_POD_SA, CONTROLLER_AUDIENCE))
    # Intake is the system.ML source's alone: a step source (allowed on /dead-letter) is no sender of workflows.
    attempts["valid token, step source"] = bearer(issuer.token(STEP_SOURCE_SA, CONTROLLER_AUDIENCE))
    for name, headers in attempts.items():
        status, answer = http("POST", f"{url}/", body, {**cloudevent_headers("eoml-system", "system.ML"), **headers})
        expected = 403 if name.startswith("valid token,") else 401
        assert status == expected, (name, status, answer)
        assert CANARY not in answer.decode()
    for raw in RAW_AUTHORIZATIONS:
        assert post_raw_authorization(url, "/", raw, cloudevent_headers("eoml-system", "system.ML"), body) == 401, raw
    assert not store.exists() or not any(store.rglob("*.json"))
    log = process.log()
    assert "request refused" in log
    assert CANARY not in log
    for headers in attempts.values():
        token = headers.get("Authorization", " ").split(" ", 1)[1]
        assert not token or token not in log
    # Health, readiness and status stay open.
    assert http("GET", f"{url}/healthz")[0] == 200
    assert http("GET", f"{url}/workflows")[0] == 200


def test_controller_post_accepts_the_system_topic_source(controller, issuer) -> None:
    process, store, url = controller
    token = issuer.token(CONTROLLER_SOURCE_SA, CONTROLLER_AUDIENCE)
    body = json.dumps(workflow("sec.accepted", "http://127.0.0.1:9")).encode()
    status, answer = http("POST", f"{url}/", body, {**cloudevent_headers("eoml-system", "system.ML"), **bearer(token)})
    assert (status, json.loads(answer)) == (200, {"msg": "Received message And valid"})
    stored = store / NAMESPACE / f"{step_config_name('sec.accepted')}.json"
    assert stored.exists() and CANARY not in stored.read_text()
    assert token not in process.log()


# -- controller POST /dead-letter -------------------------------------------------------------------------------


def test_dead_letter_endpoint_needs_a_step_source_identity(issuer) -> None:
    written: list[tuple[str, bytes]] = []
    # The route's own list replaces the service's: the step source is let in on /dead-letter only.
    verifier = OidcVerifier(issuer.url, CONTROLLER_AUDIENCE, [CONTROLLER_SOURCE_SA],
                            route_subjects={"/": [CONTROLLER_SOURCE_SA],
                                            "/dead-letter": [CONTROLLER_SOURCE_SA, STEP_SOURCE_PATTERN]},
                            jwks_min_refresh_s=0, ca_file=issuer_ca_file())
    app = build_app(WorkflowController(None, None, ""),  # type: ignore[arg-type] - never reached when refused
                    lambda topic, value, _headers: written.append((topic, value)), verifier=verifier)
    served = InProcessApp(app)
    try:
        headers = {**cloudevent_headers(NAMESPACE, "wf.in"), "ce-knativeerrorcode": "500"}
        body = json.dumps({"previous_component_end": "True", "S3_bucket_desc": {"folder": "x"}}).encode()
        attempts = refused_tokens(issuer, CONTROLLER_AUDIENCE, STEP_SOURCE_SA)
        attempts.update(hostile_tokens(issuer, CONTROLLER_AUDIENCE, STEP_SOURCE_SA))
        attempts["a pod of the workflow namespace"] = bearer(issuer.token(OTHER_POD_SA, CONTROLLER_AUDIENCE))
        for name, auth in attempts.items():
            status, _ = http("POST", f"{served.url}/dead-letter", body, {**headers, **auth})
            assert status == (403 if name == "a pod of the workflow namespace" else 401), (name, status)
        assert written == []
        status, answer = http("POST", f"{served.url}/dead-letter", body,
                              {**headers, **bearer(issuer.token(STEP_SOURCE_SA, CONTROLLER_AUDIENCE))})
        assert status == 202, answer
        assert [topic for topic, _ in written] == ["wf.in.dlq"]
        # ... and not on intake.
        status, _ = http("POST", f"{served.url}/", body,
                         {**headers, **bearer(issuer.token(STEP_SOURCE_SA, CONTROLLER_AUDIENCE))})
        assert status == 403
    finally:
        served.close()


# -- Wrapper POST /<config> and POST / ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wrapper(issuer: Issuer, kafka_broker, tmp_path_factory) -> Iterator[tuple[ServiceProcess, RecordingServer, str, str]]:
    root = tmp_path_factory.mktemp("wrapper")
    s3 = RecordingServer(status=500)
    topic = "sec.wrapper.in"
    config = StepConfig(config_name=step_config_name(topic), workflow_name="wf-sec", topic_in=topic,
                        topic_out=f"{topic}.out", namespace=NAMESPACE, service_name="classify", bucket="bucket",
                        endpoint_url=s3.url, bootstrap_servers=kafka_broker.bootstrap_servers)
    LocalStepConfigStore(root / "store").put(NAMESPACE, config, StepCredentials(
        aws_access_key_id="AKIA-" + CANARY, aws_secret_access_key=CANARY))
    port = free_port()
    env = {**oidc_env(issuer, WRAPPER_AUDIENCE, [STEP_SOURCE_PATTERN]),
           "EOML_WRAPPER_TASK": "classify", "EOML_WRAPPER_HTTP_HOST": "127.0.0.1", "EOML_WRAPPER_HTTP_PORT": str(port),
           "EOML_WRAPPER_STORE": "local", "EOML_WRAPPER_STORE_ROOT": str(root / "store"),
           "EOML_WRAPPER_NAMESPACE": NAMESPACE, "EOML_WRAPPER_INFERENCE_URL": "127.0.0.1:9",
           "EOML_WRAPPER_INFER_MAX_ATTEMPTS": "1", "EOML_WRAPPER_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers}
    process = ServiceProcess("services.wrapper.cli", [], env, root / "wrapper.log", f"http://127.0.0.1:{port}/healthz")
    yield process, s3, f"http://127.0.0.1:{port}", config.config_name
    process.stop()
    s3.close()


def test_wrapper_refuses_every_bad_credential_and_runs_nothing(wrapper, issuer) -> None:
    process, s3, url, config_name = wrapper
    body = json.dumps({"previous_component_end": "True", "S3_bucket_desc": {"folder": "in", "filename": ""},
                       "meta_information": {}}).encode()
    attempts = refused_tokens(issuer, WRAPPER_AUDIENCE, STEP_SOURCE_SA)
    attempts.update(hostile_tokens(issuer, WRAPPER_AUDIENCE, STEP_SOURCE_SA))
    attempts["valid token, wrong sender"] = bearer(issuer.token(OTHER_POD_SA, WRAPPER_AUDIENCE))
    for path in (f"/{config_name}", "/"):
        for offset, (name, headers) in enumerate(attempts.items()):
            status, _ = http("POST", f"{url}{path}", body,
                             {**cloudevent_headers(NAMESPACE, "sec.wrapper.in", offset), **headers})
            assert status == (403 if name == "valid token, wrong sender" else 401), (path, name, status)
        for offset, raw in enumerate(RAW_AUTHORIZATIONS, start=100):
            status = post_raw_authorization(url, path, raw, cloudevent_headers(NAMESPACE, "sec.wrapper.in", offset),
                                            body)
            assert status == 401, (path, raw, status)
    assert step_requests(s3) == []
    log = process.log()
    assert "request refused" in log and CANARY not in log and "S3_bucket_desc" not in log


def test_wrapper_accepts_a_step_source_of_its_namespace(wrapper, issuer) -> None:
    process, s3, url, config_name = wrapper
    token = issuer.token(STEP_SOURCE_SA, WRAPPER_AUDIENCE)
    body = json.dumps({"previous_component_end": "True", "S3_bucket_desc": {"folder": "in", "filename": ""},
                       "meta_information": {}}).encode()
    status, answer = http("POST", f"{url}/{config_name}", body,
                          {**cloudevent_headers(NAMESPACE, "sec.wrapper.in", 999), **bearer(token)})
    assert status not in (401, 403), answer
    wait_until(lambda: step_requests(s3), timeout_s=30)  # the step ran: it reached its S3 endpoint
    # A token for the Wrapper of another namespace is no key to this one.
    foreign = issuer.token("system:serviceaccount:uc2:x-oidc-sources.knative.dev-kafkasource", WRAPPER_AUDIENCE)
    status, _ = http("POST", f"{url}/{config_name}", body,
                     {**cloudevent_headers(NAMESPACE, "sec.wrapper.in", 1000), **bearer(foreign)})
    assert status == 403
    assert token not in process.log() and CANARY not in process.log()


def test_verifier_follows_key_rotation_and_rate_limits_refetches(issuer) -> None:
    rotated = Issuer()
    try:
        verifier = OidcVerifier(rotated.url, WRAPPER_AUDIENCE, [STEP_SOURCE_PATTERN], jwks_min_refresh_s=3600,
                                ca_file=issuer_ca_file())
        assert verifier.verify(rotated.token(STEP_SOURCE_SA, WRAPPER_AUDIENCE)).subject == STEP_SOURCE_SA
        fetches = len(rotated.requests)
        # Tokens naming unknown keys cannot make the verifier hammer the issuer: one refetch per interval.
        for kid in ("attacker-1", "attacker-2", "attacker-3"):
            with pytest.raises(AuthError):
                verifier.verify(rotated.token(STEP_SOURCE_SA, WRAPPER_AUDIENCE, key=new_rsa_key(), kid=kid))
        assert len(rotated.requests) == fetches
        # The issuer rotates its key: once the interval allows, the new key is fetched and accepted.
        rotated.key, rotated.kid = new_rsa_key(), "test-key-2"
        verifier.jwks_min_refresh_s = 0
        assert verifier.verify(rotated.token(STEP_SOURCE_SA, WRAPPER_AUDIENCE)).subject == STEP_SOURCE_SA
        assert len(rotated.requests) == fetches + 2  # discovery document and JWKS, once
    finally:
        rotated.close()


# -- shared-token mode (the local platform) ------------------------------------------------------------------------


def test_shared_token_mode_answers_401_to_any_header_bytes() -> None:
    written: list[tuple[str, bytes]] = []
    app = build_app(WorkflowController(None, None, ""),  # type: ignore[arg-type] - never reached when refused
                    lambda topic, value, _headers: written.append((topic, value)),
                    verifier=SharedTokenVerifier("local-platform-token-" + "x" * 16))
    served = InProcessApp(app)
    try:
        headers = {**cloudevent_headers(NAMESPACE, "wf.in"), "ce-knativeerrorcode": "500"}
        for path in ("/", "/dead-letter"):
            for raw in RAW_AUTHORIZATIONS:
                assert post_raw_authorization(served.url, path, raw, headers, b"{}") == 401, (path, raw)
        assert written == []
    finally:
        served.close()
