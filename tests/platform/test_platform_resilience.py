"""Failure handling on the local platform: poison messages, a Wrapper that dies mid-workflow, many workflows."""

from __future__ import annotations

import json
import os
import signal

from confluent_kafka import Producer

from platform_support import collector_for, keys_under, plans, records_on, wait_for, wait_until
from services.core.kafka import producer_config, publish_json
from services.local_platform.demo import (
    controller_workflow,
    publish_workflows,
    run_workflows,
    stop_workflows,
    upload_inputs,
    wait_wired,
)
from services.local_platform.stack import create_topics
from services.local_platform.demo import s3_client
from services.local_platform.workflows import pack_patches, sample_patch_names, step_message


def _wire(state, workflows) -> None:
    create_topics(state.bootstrap_servers, [t for p in workflows for t in p.topics])
    upload_inputs(state, workflows)
    publish_workflows(state, workflows, "published")
    assert wait_wired(state, workflows) == []


def test_poison_message_ends_in_the_dead_letter_topic_and_the_next_is_processed(platform) -> None:
    state = platform.state
    (workflow,) = plans(["uc5"], patches=1, offset=8)
    _wire(state, [workflow])
    collector = collector_for(state, [workflow])
    poison = {"previous_component_end": "True", "S3_bucket_desc": {"folder": ["not", "a", "folder"]},
              "meta_information": {"poison": True}}
    try:
        producer = Producer(producer_config(state.bootstrap_servers))
        publish_json(producer, workflow.first_topic, poison)
        publish_json(producer, workflow.first_topic, step_message(workflow.input_folder, {"after": "poison"}))
        dead_letter_topic = f"{workflow.first_topic}.dlq"
        wait_for(collector, lambda: bool(records_on(collector, workflow.final_topic))
                 and bool(records_on(collector, dead_letter_topic)), 180, "the next result and the dead letter")
        finals = records_on(collector, workflow.final_topic)
        dead = records_on(collector, dead_letter_topic)
    finally:
        collector.stop()
        stop_workflows(state, [workflow])
    assert [m["meta_information"] for m in finals] == [{"after": "poison"}]
    assert dead and all(record["input_message"] == poison for record in dead)
    assert all("S3_bucket_desc" in record["reason"] or "HTTP 400" in record["reason"] for record in dead)
    folder = finals[0]["S3_bucket_desc"]["folder"]
    assert keys_under(state, workflow.bucket, folder + "/")


def test_wrapper_killed_and_restarted_mid_workflow_loses_no_input_and_duplicates_no_output(platform) -> None:
    state = platform.state
    inputs = 4
    (workflow,) = plans(["compress-decompress"], patches=1, offset=10)
    # Four inputs of one patch each, four step messages: four results expected, exactly.
    folders = []
    _wire(state, [workflow])
    client = s3_client(state)
    for n, patch in enumerate(sample_patch_names()[12: 12 + inputs]):
        folder = f"{workflow.input_folder}/part-{n}"
        client.put_object(Bucket=workflow.bucket, Key=f"{folder}/patch.tar.gz", Body=pack_patches([patch]))
        folders.append(folder)
    collector = collector_for(state, [workflow])
    decompress = platform.process("wrapper-decompress")
    try:
        # The decompress Wrapper dies (SIGKILL: no goodbye) before the first compressed result reaches it.
        _kill(decompress.pid)
        producer = Producer(producer_config(state.bootstrap_servers))
        for n, folder in enumerate(folders):
            publish_json(producer, workflow.first_topic, step_message(folder, {"part": n}))

        # Deliveries to it fail and are retried (the controller's status shows the failed attempts) ...
        def decompress_delivery_failed() -> bool:
            status = controller_workflow(state, workflow.name) or {}
            return any(s["service_name"] == "decompress" and s.get("live", {}).get("failed_attempts", 0) > 0
                       for s in status.get("steps", []))

        wait_until(decompress_delivery_failed, 180, "a failed delivery to the dead Wrapper")
        # ... until it is back.
        platform.start_wrapper("decompress")
        platform.wait_healthy(["wrapper-decompress"], timeout_s=120)
        wait_for(collector, lambda: len({json.dumps(m["meta_information"]) for m in
                                         records_on(collector, workflow.final_topic)}) >= inputs,
                 300, "every input through both steps")
        finals = records_on(collector, workflow.final_topic)
        dead = [r for step in workflow.steps for r in records_on(collector, f"{step.topic_in}.dlq")]
    finally:
        collector.stop()
        stop_workflows(state, [workflow])
    assert dead == []
    assert sorted(m["meta_information"]["part"] for m in finals) == list(range(inputs))
    # Exactly one result folder (with its manifest) per input: nothing lost, nothing written twice.
    results = keys_under(state, workflow.bucket, "result-code2image/")
    manifests = [k for k in results if k.endswith(".manifest.json")]
    assert len(manifests) == inputs
    announced = {m["S3_bucket_desc"]["folder"] for m in finals}
    assert {k[: -len(".manifest.json")] for k in manifests} == announced
    for folder in announced:
        assert len([k for k in results if k.startswith(folder + "/")]) == 1


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def test_twenty_workflows_submitted_at_once_all_complete(platform) -> None:
    state = platform.state
    workflows = [plans(["ssl-classify"], patches=1, offset=n % 42)[0] for n in range(20)]
    reports = run_workflows(state, workflows, timeout_s=900, write=lambda _line: None, read_results=False)
    failed = {r.plan.name: (r.status, r.reason) for r in reports if r.status != "succeeded"}
    assert failed == {}
    assert all(len(r.steps) == 2 and all(s.status == "SUCCESS" for s in r.steps) for r in reports)
    assert stop_workflows(state, workflows) == []


def test_a_failing_step_fails_its_workflow_with_the_reason(platform) -> None:
    # An archive with no patch in it: the Wrapper reports CRITICAL (and dead-letters the input); the run says so,
    # which is what makes ``eo-platform demo`` exit non-zero.
    state = platform.state
    (workflow,) = plans(["uc5"], patches=1, offset=20)
    workflow.patches = []
    reports = run_workflows(state, [workflow], timeout_s=300, write=lambda _line: None, read_results=False)
    stop_workflows(state, [workflow])
    (report,) = reports
    assert report.status == "failed"
    assert report.steps[0].status == "CRITICAL" and report.reason.startswith("C-factor regressor: ")
