"""Fault matrix, "Kafka broker restarted mid-workflow": tansu keeps its data in S3 (a moto server of its own, so
that it survives a restart), and is restarted while the first step of a workflow runs. The step completes, every
result is byte-identical to a clean run of the same input, and each step's next-step message exists exactly once.

Own stack (not the module fixture of the other platform tests): Kafka with persistent storage, two Wrappers only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from confluent_kafka import Consumer, Producer

from platform_support import collector_for, keys_under, plans, wait_for
from services.wrapper.outputs.stac import is_stac_document
from services.core.kafka import consumer_config, producer_config, publish_json
from services.local_platform.demo import publish_workflows, s3_client, stop_workflows, upload_inputs, wait_wired
from services.local_platform.stack import LocalStack, StackOptions, create_topics
from services.local_platform.workflows import WorkflowPlan, step_message

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
# Every sample patch: the features step runs for several seconds, and the broker goes down right after its START.
PATCHES = 42
BROKER_DOWN_S = 3.0


@pytest.fixture(scope="module")
def persistent_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if not any(REPOSITORY.glob("*/[0-9]*/model.onnx")):
        pytest.skip("no exported models: run 'make models' (make test does)")
    options = StackOptions(root=tmp_path_factory.mktemp("local-platform-broker"), repository=REPOSITORY,
                           tasks=("ssl-features", "classify"), kafka_storage="s3", delivery_retry=6,
                           delivery_backoff_delay_s=0.25, progress_interval_s=1.0)
    stack = LocalStack(options)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def all_records(bootstrap_servers: str, topic: str, idle_s: float = 5.0, timeout_s: float = 60.0) -> list[Any]:
    """Every record of ``topic`` from the beginning (a fresh group), once nothing new came for ``idle_s``."""
    consumer = Consumer(consumer_config(bootstrap_servers, f"broker-restart-reader-{time.monotonic_ns()}",
                                        **{"topic.metadata.refresh.interval.ms": 1000}))
    consumer.subscribe([topic])
    values: list[Any] = []
    deadline, last = time.monotonic() + timeout_s, time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                values.append(json.loads(message.value()))
                last = time.monotonic()
    finally:
        consumer.close()
    return values


def results(state, bucket: str, folder: str) -> dict[str, bytes]:
    """Every result file of an announced folder, by its name relative to the folder (not the STAC documents: they
    name their own run, which differs from a clean run of the same input by design)."""
    client = s3_client(state)
    return {key[len(folder) + 1:]: client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in keys_under(state, bucket, folder + "/") if not is_stac_document(key)}


def step_times(log_path: str, workflow_name: str) -> tuple[float, float]:
    """When the Wrapper started and finished (succeeded) its step of ``workflow_name``, from its JSON log."""
    from datetime import datetime

    times: dict[str, float] = {}
    for line in Path(log_path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("workflow") == workflow_name and entry.get("msg") in ("step started", "step succeeded"):
            times.setdefault(entry["msg"], datetime.fromisoformat(entry["ts"]).timestamp())
    return times.get("step started", float("inf")), times.get("step succeeded", float("-inf"))


def run(platform: LocalStack, workflow: WorkflowPlan, restart_broker: bool) -> dict[str, Any]:
    state = platform.state
    assert state is not None
    create_topics(state.bootstrap_servers, [t for t in workflow.topics])
    upload_inputs(state, [workflow])
    publish_workflows(state, [workflow], "published")
    assert wait_wired(state, [workflow]) == []
    collector = collector_for(state, [workflow])
    features = workflow.steps[0].component_name
    restarted_mid_step, stopped_at = False, 0.0
    try:
        publish_json(Producer(producer_config(state.bootstrap_servers)), workflow.first_topic,
                     step_message(workflow.input_folder, {"run": workflow.name}))
        if restart_broker:
            wait_for(collector, lambda: any(n["status"] == "START" and n["component_name"] == features
                                            for _, n in collector.notifications), 180, "the features step's START")
            platform.stop_kafka(crash=True)  # SIGKILL: no orderly shutdown
            stopped_at = time.time()
            time.sleep(BROKER_DOWN_S)
            platform.start_kafka()
        wait_for(collector, lambda: any(n["status"] == "SUCCESS" and n["component_name"] == step.component_name
                                        for _, n in collector.notifications for step in workflow.steps[1:]),
                 600, "the last step's SUCCESS")
    finally:
        collector.stop()
    # Counted from the topics themselves (a fresh reader from the beginning), not from the collector.
    messages = {step.topic_out: all_records(state.bootstrap_servers, step.topic_out) for step in workflow.steps}
    dead = {step.topic_in: all_records(state.bootstrap_servers, f"{step.topic_in}.dlq", idle_s=2)
            for step in workflow.steps}
    if restart_broker:
        started, ended = step_times(platform.process("wrapper-ssl-features").log, workflow.name)
        restarted_mid_step = started < stopped_at < ended
    outputs = {step.service: results(state, workflow.bucket, messages[step.topic_out][0]["S3_bucket_desc"]["folder"])
               for step in workflow.steps if messages[step.topic_out]}
    stop_workflows(state, [workflow])
    return {"messages": messages, "dead": dead, "outputs": outputs, "restarted_mid_step": restarted_mid_step}


def test_kafka_broker_restarted_mid_workflow(persistent_platform: LocalStack) -> None:
    clean_plan, = plans(["ssl-classify"], patches=PATCHES, offset=0)
    faulty_plan, = plans(["ssl-classify"], patches=PATCHES, offset=0)
    assert clean_plan.patches == faulty_plan.patches and clean_plan.name != faulty_plan.name

    clean = run(persistent_platform, clean_plan, restart_broker=False)
    faulty = run(persistent_platform, faulty_plan, restart_broker=True)

    assert faulty["restarted_mid_step"], "the broker went down after the features step had ended: nothing tested"
    for outcome in (clean, faulty):
        # Exactly one next-step message per step, and nothing dead-lettered.
        assert [len(values) for values in outcome["messages"].values()] == [1, 1]
        assert all(values == [] for values in outcome["dead"].values())
    for service in ("ssl-features", "classify"):
        assert faulty["outputs"][service], f"{service}: no results"
        # Same names, same bytes: the restart changed nothing in what was computed and written.
        assert faulty["outputs"][service] == clean["outputs"][service], service
