"""The local platform as ``eo-platform up`` starts it (tansu, moto, inference server, controller, Wrappers, a shared
entry-point token), attacked from outside:

- a canary secret (access key, secret key, an extra ``aws_session_token``, a userinfo endpoint) goes through full
  workflows, a successful one and failing ones (missing input, a poison step message, a refused endpoint): it
  appears nowhere in the logs, the stored step configurations, notifications, next-step messages, dead-letter
  records or result objects;
- the entry points refuse requests without the stack's token (401) and the token file is 0600;
- property-based fuzzing (hypothesis) of workflow messages, step messages and CloudEvent headers against the running
  controller and a Wrapper, with the token: never a 5xx, never a dead process, never a stored credential.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from security_support import CANARY, bearer, cloudevent_headers, files_text, http
from services.core.kafka import producer_config, publish_json
from services.core.step_config import step_config_name
from services.local_platform.demo import EventCollector, s3_client, stop_workflows, upload_inputs, wait_wired
from services.local_platform.stack import LocalStack, PlatformState, StackOptions, create_topics
from services.local_platform.workflows import demo_workflows, sample_patch_names, step_message, workflow_message

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
CANARY_KEY_ID = "AKIA" + CANARY
FUZZ_NAMESPACE = "eoml"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if not any(REPOSITORY.glob("*/[0-9]*/model.onnx")):
        pytest.skip("no exported models: run 'make models' (make test does)")
    options = StackOptions(root=tmp_path_factory.mktemp("secure-platform"), repository=REPOSITORY,
                           tasks=("uc5-cfactor", "classify"), delivery_retry=2, delivery_backoff_delay_s=0.2,
                           progress_interval_s=1.0)
    started = LocalStack(options)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def token_headers(state: PlatformState) -> dict[str, str]:
    return bearer(Path(state.auth_token_file).read_text().strip())


def canary_message(plan, step, state: PlatformState, endpoint: str | None = None) -> dict[str, Any]:
    message = workflow_message(plan, step, "published", state.namespace, endpoint or state.s3_endpoint,
                               CANARY_KEY_ID, CANARY, region=state.s3_region)
    message["S3_bucket"]["aws_session_token"] = "session-" + CANARY
    return message


def test_entry_points_need_the_stack_token(stack: LocalStack) -> None:
    state = stack.state
    token_file = Path(state.auth_token_file)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    body = json.dumps(step_message("anything")).encode()
    config = step_config_name("never.wired")
    for url in (f"{state.controller_url}/", *(f"{u}/{config}" for u in state.wrapper_urls.values())):
        assert http("POST", url, body, {"Content-Type": "application/json"})[0] == 401
        assert http("POST", url, body, bearer("guessed-" + "x" * 40))[0] == 401
    # The right token passes: an unknown step is a 404, not a 401.
    wrapper = state.wrapper_urls["uc5-cfactor"]
    assert http("POST", f"{wrapper}/{config}", body,
                {**cloudevent_headers("eoml", "never.wired"), **token_headers(state)})[0] == 404


def test_cli_posts_with_the_stack_token(stack: LocalStack, tmp_path: Path) -> None:
    state = stack.state
    message = tmp_path / "step.json"
    message.write_text(json.dumps(step_message("in")))
    run = subprocess.run([sys.executable, "-m", "services.local_platform.cli", "--root", state.root, "post",
                          "uc5-cfactor", str(message), "--path", f"/{step_config_name('never.wired')}"],
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.startswith("404"), run.stdout + run.stderr  # past authentication: no such step


def test_canary_secret_never_leaves_the_credentials_store(stack: LocalStack) -> None:
    state = stack.state
    run_id = os.urandom(3).hex()
    (good,) = demo_workflows(run_id, f"eoml-canary-{run_id}", sample_patch_names()[:1], ["uc5"])
    create_topics(state.bootstrap_servers, good.topics)
    upload_inputs(state, [good])
    collector = EventCollector(state.bootstrap_servers, state.notify_topic, good.topics, {good.name}).start()
    producer = Producer(producer_config(state.bootstrap_servers))
    step = good.steps[0]
    try:
        publish_json(producer, state.system_topic, canary_message(good, step, state))
        # A second workflow step whose endpoint carries the secret as userinfo: refused, never stored.
        refused = canary_message(good, step, state, state.s3_endpoint.replace("http://", f"http://u:{CANARY}@"))
        refused["Topics"] = {"in": f"{step.topic_in}.userinfo", "out": f"{step.topic_out}.userinfo"}
        publish_json(producer, state.system_topic, refused)
        assert wait_wired(state, [good]) == []
        # The credentials store (0600 files; a Secret on Kubernetes) holds them, the session token included.
        credentials = [json.loads(path.read_text()) for path in Path(state.store_root).rglob("*.credentials.json")]
        assert [c["aws_secret_access_key"] for c in credentials] == [CANARY]
        assert credentials[0]["extra"] == {"aws_session_token": "session-" + CANARY}
        publish_json(producer, good.first_topic, step_message(good.input_folder, {"case": "ok"}))
        publish_json(producer, good.first_topic, step_message(f"{good.input_folder}-missing", {"case": "missing"}))
        publish_json(producer, good.first_topic, {"previous_component_end": "True",
                                                  "S3_bucket_desc": {"folder": ["poison"]}, "meta_information": {}})

        def settled() -> bool:
            finals = [r for r in collector.records if r.topic == good.final_topic]
            dead = [r for r in collector.records if r.topic == f"{good.first_topic}.dlq"]
            return len(finals) >= 1 and len(dead) >= 2

        assert collector.wait(settled, 240), "the workflow did not finish and fail as planned"
    finally:
        collector.stop()
        stop_workflows(state, [good])
    with collector.changed:
        texts = [json.dumps(value) for _, value in collector.notifications]
        texts += [json.dumps(record.value) for record in collector.records]
    assert any("CRITICAL" in text for text in texts)
    client = s3_client(state)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=good.bucket):
        for entry in page.get("Contents", []):
            if not entry["Key"].startswith(good.input_folder + "/"):
                texts.append(client.get_object(Bucket=good.bucket, Key=entry["Key"])["Body"].read().decode(
                    "utf-8", errors="replace"))
    texts += [text for _, text in files_text(Path(state.root) / "logs")]
    texts += [text for _, text in files_text(Path(state.store_root))]
    texts.append(json.dumps(http("GET", f"{state.controller_url}/workflows")[1].decode()))
    leaks = [text[:200] for text in texts if CANARY in text]
    assert leaks == []


# -- fuzzing ---------------------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                         st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
endpoints = st.one_of(st.none(), st.sampled_from([
    "http://169.254.169.254/", "file:///etc/passwd", f"http://u:{CANARY}@127.0.0.1:9", "http://2130706433/",
    "http://[fe80::1]/", "gopher://x", "", "http://", "http://127.0.0.1:notaport"]), st.text(max_size=60))
workflow_messages = st.fixed_dictionaries(
    {"workflow_name": st.one_of(st.text(max_size=30), st.integers()),
     "workflow_status": st.sampled_from(["published", "stopping", "draft", "", "PUBLISHED"]),
     "Topics": st.one_of(json_values, st.fixed_dictionaries({"in": st.text(max_size=30), "out": st.text(max_size=30)})),
     "ML": st.one_of(json_values, st.fixed_dictionaries({
         "ServiceName": st.sampled_from(["uc5-cfactor", "classify", "nope", "", "UC5"]),
         "Namespace": st.sampled_from(["eoml", "kube-system", "", "Bad_NS"])})),
     "S3_bucket": st.one_of(json_values, st.fixed_dictionaries({
         "aws_access_key_id": st.just(CANARY_KEY_ID), "aws_secret_access_key": st.just(CANARY),
         "s3-bucket-name": st.text(max_size=20), "endpoint_url": endpoints,
         "aws_session_token": st.just("session-" + CANARY), "extra": json_values}))},
    optional={"unknown": json_values})
step_messages = st.one_of(json_values, st.fixed_dictionaries(
    {"previous_component_end": st.one_of(st.sampled_from(["True", "False", "yes"]), st.booleans(), json_values),
     "S3_bucket_desc": st.one_of(json_values, st.fixed_dictionaries({"folder": json_values, "filename": json_values})),
     "meta_information": json_values}))
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
cloudevent_fuzz = st.dictionaries(
    st.sampled_from(["ce-id", "ce-source", "ce-type", "ce-specversion", "ce-subject", "ce-time", "Content-Type",
                     "ce-kafkaheadertraceparent", "ce-knativeerrorcode"]), header_text, max_size=6)
FUZZ = settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow], database=None)


def _no_credential_stored(state: PlatformState) -> None:
    for path, text in files_text(Path(state.store_root)):
        assert CANARY not in text, path


@FUZZ
@given(message=workflow_messages, headers=cloudevent_fuzz,
       content_type=st.sampled_from(["application/json", "application/cloudevents+json", "text/plain"]))
def test_fuzz_controller_with_workflow_messages(stack: LocalStack, message: dict, headers: dict,
                                                content_type: str) -> None:
    state = stack.state
    body = json.dumps({"data": message} if content_type.endswith("cloudevents+json") else message).encode()
    status, answer = http("POST", f"{state.controller_url}/", body,
                          {**headers, "Content-Type": content_type, **token_headers(state)})
    assert status < 500, answer[:300]
    assert CANARY not in answer.decode("utf-8", errors="replace")
    _no_credential_stored(state)


@FUZZ
@given(message=step_messages, headers=cloudevent_fuzz, raw=st.one_of(st.none(), st.binary(max_size=200)),
       path=st.sampled_from(["/", "/json-config-x-12345678", "/%2e%2e%2fetc", "/" + "a" * 300]))
def test_fuzz_wrapper_with_step_messages_and_cloudevent_headers(stack: LocalStack, message: Any,
                                                               headers: dict, raw: bytes | None, path: str) -> None:
    state = stack.state
    body = raw if raw is not None else json.dumps(message).encode()
    status, answer = http("POST", f"{state.wrapper_urls['uc5-cfactor']}{path}", body,
                          {**headers, **token_headers(state)})
    assert status < 500 or status == 503 and b"retry" in answer, (status, answer[:300])


def test_processes_survived_the_fuzzing(stack: LocalStack) -> None:
    state = stack.state
    assert http("GET", f"{state.controller_url}/healthz")[0] == 200
    for url in state.wrapper_urls.values():
        assert http("GET", f"{url}/healthz")[0] == 200
    _no_credential_stored(state)
    leaks = [str(path) for path, text in files_text(Path(state.root) / "logs") if CANARY in text]
    assert leaks == []
