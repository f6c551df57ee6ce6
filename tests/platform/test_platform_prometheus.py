"""A real Prometheus (``eo-platform up --prometheus``) scrapes the local platform while a workflow runs; its HTTP
API then reports what ran: steps by outcome, patches, stage times, delivery codes, the controller's wired and
stopped steps, and the inference server's ``nv_inference_count`` per model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from platform_support import plans
from services.local_platform.demo import run_workflows, s3_client, stop_workflows
from services.local_platform.prometheus import api, query
from services.local_platform.stack import LocalStack, PlatformState, StackOptions

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
PATCHES = 3
TASKS = ("ssl-features", "classify")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if not any(REPOSITORY.glob("*/[0-9]*/model.onnx")):
        pytest.skip("no exported models: run 'make models' (make test does)")
    if shutil.which("prometheus") is None:
        pytest.skip("no prometheus binary: run 'make prometheus' (make test does)")
    options = StackOptions(root=tmp_path_factory.mktemp("prometheus-platform"), repository=REPOSITORY,
                           tasks=TASKS, prometheus=True, progress_interval_s=1.0)
    local = LocalStack(options)
    local.start()
    try:
        yield local
    finally:
        local.stop()


def values(state: PlatformState, promql: str, by: str) -> dict[str, float]:
    return {sample["metric"].get(by, ""): float(sample["value"][1]) for sample in query(state.prometheus_url, promql)}


def scalar(state: PlatformState, promql: str) -> float:
    result = query(state.prometheus_url, promql)
    return float(result[0]["value"][1]) if result else 0.0


def wait_for_value(state: PlatformState, promql: str, expected: float, timeout_s: float = 20.0) -> None:
    """Until a scrape has seen it (scrape interval 1 s)."""
    deadline = time.monotonic() + timeout_s
    while (seen := scalar(state, promql)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{promql} = {seen}, expected {expected}")
        time.sleep(0.5)


def test_prometheus_sees_what_a_workflow_did(stack: LocalStack) -> None:
    state = stack.state
    assert state is not None and state.prometheus_url
    (workflow,) = plans(["ssl-classify"], patches=PATCHES)
    (report,) = run_workflows(state, [workflow], timeout_s=300, write=lambda _line: None, read_results=False)
    assert report.status == "succeeded", report.reason

    client = s3_client(state)
    # The announced folder is the run's winning attempt; the manifest is beside the run folder.
    manifests = {step.service: json.loads(client.get_object(
        Bucket=workflow.bucket, Key=f"{step.output_folder.rsplit('/', 1)[0]}.manifest.json")["Body"].read())
        for step in report.steps}
    models = {task: manifest["model"]["name"] for task, manifest in manifests.items()}

    wait_for_value(state, 'sum(eoml_steps_total{outcome="succeeded"})', len(TASKS))
    seen: dict[str, object] = {}
    seen["succeeded"] = values(state, 'eoml_steps_total{outcome="succeeded"}', "task")
    assert seen["succeeded"] == dict.fromkeys(TASKS, 1.0)
    seen["other outcomes"] = values(state, 'eoml_steps_total{outcome!="succeeded"}', "task")
    assert seen["other outcomes"] == {}
    seen["started"] = values(state, "eoml_steps_started_total", "task")
    assert seen["started"] == dict.fromkeys(TASKS, 1.0)
    seen["patches"] = values(state, "eoml_patches_total", "task")
    assert seen["patches"] == {task: float(manifests[task]["patches"]) for task in TASKS}
    assert seen["patches"]["ssl-features"] == PATCHES
    seen["deliveries"] = values(state, "sum by (code) (eoml_deliveries_total)", "code")
    assert seen["deliveries"] == {"200": float(len(TASKS))}
    seen["dead letters"] = scalar(state, "sum(eoml_dead_letter_records_total) or vector(0)")
    assert seen["dead letters"] == 0
    # Every stage of the SSL step was timed once (the classifier reads a feature file: nothing to decode).
    seen["ssl stages"] = values(state, 'eoml_step_stage_seconds_count{task="ssl-features"}', "stage")
    assert seen["ssl stages"] == dict.fromkeys(
        ["download", "decode", "preprocess", "inference", "write", "announce"], 1.0)
    stage_sums = seen["ssl stage seconds"] = values(state, 'eoml_step_stage_seconds_sum{task="ssl-features"}', "stage")
    duration = scalar(state, 'eoml_step_duration_seconds_sum{task="ssl-features"}')
    assert all(seconds > 0 for seconds in stage_sums.values()) and duration > 0
    # The stages one thread runs in turn cannot take longer than the step (inference overlaps reading).
    assert sum(seconds for stage, seconds in stage_sums.items() if stage != "inference") <= duration
    seen["runs in flight"] = scalar(state, "sum(eoml_runs_in_flight)")
    assert seen["runs in flight"] == 0

    # The inference server counted one inference per patch of each step's model, and nothing else ran on it; the
    # classifier one more: the Wrapper reads its labels through the classification extension on one zero row.
    expected = {models[task]: float(manifests[task]["patches"]) for task in TASKS}
    expected[models["classify"]] += 1
    # Each target is scraped on its own clock: wait until the server's scrape is newer than the last inference.
    wait_for_value(state, "sum(nv_inference_count)", sum(expected.values()))
    seen["nv_inference_count"] = {model: count for model, count in
                                  values(state, "sum by (model) (nv_inference_count)", "model").items() if count}
    assert seen["nv_inference_count"] == expected

    seen["controller wired"] = scalar(state, 'eoml_controller_workflow_messages_total{outcome="wired"}')
    assert seen["controller wired"] == len(TASKS)
    assert scalar(state, "eoml_controller_steps_wired") == len(TASKS)
    assert stop_workflows(state, [workflow]) == []
    wait_for_value(state, 'eoml_controller_workflow_messages_total{outcome="stopped"}', len(TASKS))
    wait_for_value(state, "eoml_controller_steps_wired", 0)
    seen["controller stopped"] = float(len(TASKS))

    # Every target is up, the chart's alert rules are loaded, and none fires on a healthy run.
    seen["up"] = values(state, "up", "eoml_component")
    assert seen["up"] == {"wrapper": 1.0, "controller": 1.0, "inference-server": 1.0}
    rules = [rule["name"] for group in api(state.prometheus_url, "rules")["groups"] for rule in group["rules"]]
    assert {"EomlDeadLetters", "EomlStepsFailing", "EomlInferenceUnavailable", "EomlNoProgress"} <= set(rules)
    assert query(state.prometheus_url, 'ALERTS{alertstate="firing"}') == []
    print("\nPrometheus query results:", json.dumps(seen, indent=1, sort_keys=True))
