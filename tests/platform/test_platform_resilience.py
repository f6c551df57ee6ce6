"""Failure handling on the local platform: poison messages, a Wrapper that dies mid-workflow (idle, and while it
processes a step: the delivery never got its 2xx, so the event plane delivers it again), many workflows."""

from __future__ import annotations

import json
import os
import signal

from confluent_kafka import Producer

from platform_support import collector_for, count_records, keys_under, plans, records_on, wait_for, wait_until
from services.core.kafka import producer_config, publish_json
from services.core.step_config import step_config_name
from services.local_platform.demo import (
    controller_workflow,
    publish_workflows,
    run_workflows,
    stop_workflows,
    upload_inputs,
    wait_wired,
)
from services.local_platform.stack import create_topics
from services.wrapper.outputs.stac import is_stac_document
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
    # Exactly one record: the Wrapper's (it answered 200 once the failure was on record, so the plane wrote none).
    assert len(dead) == 1 and dead[0]["input_message"] == poison and "S3_bucket_desc" in dead[0]["reason"]
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
    announced = {m["S3_bucket_desc"]["folder"] for m in finals}  # each a run folder's winning attempt
    assert {k[: -len(".manifest.json")] for k in manifests} == {f.rsplit("/", 1)[0] for f in announced}
    for folder in announced:  # the result file, beside the folder's STAC description
        assert len([k for k in results if k.startswith(folder + "/") and not is_stac_document(k)]) == 1
    assert len([k for k in results if not k.endswith(".json")]) == inputs  # no other attempt's objects left


def test_wrapper_killed_while_processing_is_redelivered_and_announces_each_input_once(platform) -> None:
    """SIGKILL of a Wrapper while it runs a step: that delivery never got its 2xx, so its offset is not committed and
    the event plane delivers it again to the restarted Wrapper, which writes the same run folder with the same bytes;
    every input is announced exactly once and its results exist exactly once."""
    state = platform.state
    # Enough patches that a step lasts well beyond the moment of the kill (a START seen, then SIGKILL at once).
    inputs, patches_per_input = 3, 16
    (workflow,) = plans(["ssl-classify"], patches=1, offset=30)
    features_step = workflow.steps[0]
    _wire(state, [workflow])
    client = s3_client(state)
    names = sample_patch_names()
    for n in range(inputs):
        folder = f"{workflow.input_folder}/part-{n}"
        chosen = [names[(n * patches_per_input + k) % len(names)] for k in range(patches_per_input)]
        client.put_object(Bucket=workflow.bucket, Key=f"{folder}/patches.tar.gz", Body=pack_patches(chosen))
    collector = collector_for(state, [workflow])
    wrapper = platform.process("wrapper-ssl-features")
    try:
        producer = Producer(producer_config(state.bootstrap_servers))
        for n in range(inputs):
            publish_json(producer, workflow.first_topic, step_message(f"{workflow.input_folder}/part-{n}", {"part": n}))
        wait_for(collector, lambda: any(n["status"] == "START" and n["component_name"] == features_step.component_name
                                        for _, n in collector.notifications), 120, "the first step's START")
        _kill(wrapper.pid)
        interrupted = _started_not_ended(wrapper.log, features_step.topic_in)
        assert interrupted, "the Wrapper was not killed while processing a step: nothing was tested"

        platform.start_wrapper("ssl-features")
        platform.wait_healthy(["wrapper-ssl-features"], timeout_s=120)
        wait_for(collector, lambda: {m["meta_information"]["part"] for m in records_on(collector, workflow.final_topic)}
                 == set(range(inputs)), 600, "every input through both steps")
        features_out = records_on(collector, features_step.topic_out)
        finals = records_on(collector, workflow.final_topic)
        dead = [r for step in workflow.steps for r in records_on(collector, f"{step.topic_in}.dlq")]
        feature_statuses = _statuses(collector, features_step.component_name)
    finally:
        collector.stop()
        stop_workflows(state, [workflow])

    assert dead == []
    assert "CRITICAL" not in feature_statuses
    # The interrupted delivery ran again after the restart (same event id), to its end.
    restarted = [line for line in _log_lines(platform.process("wrapper-ssl-features").log)
                 if line["msg"] == "step succeeded" and line.get("event_id") in interrupted]
    assert {line["event_id"] for line in restarted} == interrupted
    # Each input announced exactly once on each topic.
    for topic_messages in (features_out, finals):
        assert sorted(m["meta_information"]["part"] for m in topic_messages) == list(range(inputs))
    # Results exactly once: one run folder per input, its manifest listing exactly what is in it.
    for prefix, suffixes in (("result-image2feature/", {".features.json", ".features.npz"}),
                             ("result-feature2class/", {".classes.json", ".classes.csv"})):
        results = keys_under(state, workflow.bucket, prefix)
        manifests = [k for k in results if k.endswith(".manifest.json")]
        assert len(manifests) == inputs
        for manifest_key in manifests:
            folder = manifest_key[: -len(".manifest.json")]
            manifest = json.loads(client.get_object(Bucket=workflow.bucket, Key=manifest_key)["Body"].read())
            # The run folder holds the announced attempt only (a killed run's attempt is swept once announced).
            assert manifest["folder"].startswith(folder + "/a-")
            stored = sorted(k for k in results if k.startswith(folder + "/"))
            # The run folder's STAC: its Collection and one Item (one input unit), listed apart in the manifest.
            stac = [k for k in stored if k.endswith(("/collection.json", ".item.json"))]
            assert len(stac) == 2 and sorted(o["key"] for o in manifest["stac"]) == stac
            stored = [k for k in stored if k not in stac]
            assert sorted(o["key"] for o in manifest["objects"]) == stored
            names = [key.rsplit("/", 1)[1] for key in stored]
            assert {name[name.index("."):] for name in names} == suffixes and len(names) == len(suffixes)
            assert folder + ".announced.json" in results
    assert {m["S3_bucket_desc"]["folder"].rsplit("/", 1)[0] for m in features_out} == {
        k[: -len(".manifest.json")] for k in keys_under(state, workflow.bucket, "result-image2feature/")
        if k.endswith(".manifest.json")}


def _log_lines(path: str) -> list[dict]:
    lines = []
    for line in open(path, encoding="utf-8", errors="replace"):
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut off by SIGKILL
    return lines


def _started_not_ended(log_path: str, topic_in: str) -> set[str]:
    """Event ids of the steps the Wrapper started and did not end (before it was killed)."""
    name = step_config_name(topic_in)
    started, ended = set(), set()
    for line in _log_lines(log_path):
        if line.get("config_name") == name:
            if line["msg"] == "step started":
                started.add(line["event_id"])
            elif line["msg"] in ("step succeeded", "step failed"):
                ended.add(line["event_id"])
    return started - ended


def _statuses(collector, component_name: str) -> list[str]:
    with collector.changed:
        return [n["status"] for _, n in collector.notifications if n.get("component_name") == component_name]


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
    # Ten inputs, each in two workflows: twins must produce byte-identical results, however the load falls.
    workflows = [plans(["ssl-classify"], patches=1, offset=n % 10)[0] for n in range(20)]
    reports = run_workflows(state, workflows, timeout_s=900, write=lambda _line: None, read_results=False)
    next_step_messages = count_records(state.bootstrap_servers,
                                       [step.topic_out for plan in workflows for step in plan.steps])
    failed = {r.plan.name: (r.status, r.reason) for r in reports if r.status != "succeeded"}
    assert failed == {}
    assert all(len(r.steps) == 2 and all(s.status == "SUCCESS" for s in r.steps) for r in reports)
    assert set(next_step_messages.values()) == {1}  # one next-step message per step and workflow
    client = s3_client(state)

    def results(report, index: int) -> dict[str, bytes]:
        folder = report.steps[index].output_folder
        # The result files; the STAC documents beside them name their own run, so twins differ there by design.
        return {key[len(folder):]: client.get_object(Bucket=report.plan.bucket, Key=key)["Body"].read()
                for key in keys_under(state, report.plan.bucket, folder + "/") if not is_stac_document(key)}

    by_name = {r.plan.name: r for r in reports}
    for n in range(10):
        first, twin = by_name[workflows[n].name], by_name[workflows[n + 10].name]
        for index in (0, 1):
            assert results(first, index) == results(twin, index) != {}
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
