"""The integration workflows of D3.4 3.2.3 (SSL -> classifier, compression -> decompression) plus UC5, UC6 and the
cloud mask (the ``cloud-mask`` Wrapper, task generic), end to end on the local platform with real BigEarthNet
patches; then stopping a workflow."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import pytest

from confluent_kafka import Producer

from platform_support import collector_for, keys_under, plans, records_on, wait_for
from services.core.bigearthnet import BIGEARTHNET_43_LABELS
from services.core.kafka import producer_config, publish_json
from services.local_platform.demo import controller_workflow, run_workflows, stop_workflows
from services.local_platform.workflows import step_message

PATCHES = 3


def test_sample_workflows_run_end_to_end(platform) -> None:
    state = platform.state
    workflows = plans(["ssl-classify", "compress-decompress", "uc5", "uc6", "cloud-mask"], patches=PATCHES)
    reports = run_workflows(state, workflows, timeout_s=600, write=lambda _line: None)
    by_kind = {r.plan.kind: r for r in reports}
    assert {k: r.status for k, r in by_kind.items()} == dict.fromkeys(by_kind, "succeeded"), \
        {k: r.reason for k, r in by_kind.items()}

    for report in reports:
        # Every step announced the folder it really wrote: its manifest is beside it, its files under it.
        for step in report.steps:
            assert step.status == "SUCCESS" and step.output_folder
            run_folder = step.output_folder.rsplit("/", 1)[0]  # the announced folder is the run's winning attempt
            manifest = json.loads(_object(state, report.plan.bucket, f"{run_folder}.manifest.json"))
            assert manifest["folder"] == step.output_folder
            assert keys_under(state, report.plan.bucket, step.output_folder + "/")

    ssl = by_kind["ssl-classify"].results
    assert ssl["features"] == {"patches": PATCHES, "dimension": 2048}
    assert ssl["patches_classified"] == PATCHES
    for row in ssl["top_labels"]:
        assert row["patch"] in by_kind["ssl-classify"].plan.patches
        assert all(label in BIGEARTHNET_43_LABELS and 0.0 <= score <= 1.0 for label, score in row["top"])
        assert row["truth"], "ground-truth labels of a sample patch"

    compression = by_kind["compress-decompress"].results
    assert compression["patches"] == PATCHES
    assert 0 < compression["bits_per_pixel"] < 16 * 10  # fewer bits than the raw uint16 x 10 bands
    reconstruction = compression["reconstruction"]
    assert reconstruction["bands_compared"] == PATCHES * 10
    assert math.isfinite(reconstruction["rmse_dn"]) and reconstruction["rmse_dn"] > 0

    uc5 = by_kind["uc5"].results
    assert uc5["rasters"] == PATCHES and uc5["valid_cells"] == PATCHES * 25  # 5 x 5 cells of 24 pixels per patch
    assert 0.0 <= uc5["min"] <= uc5["max"] <= 1.0

    uc6 = by_kind["uc6"].results
    assert uc6["rasters"] == 1 and uc6["valid_cells"] > 0
    assert uc6["nodata_cells"] > 0  # the sea strip of the sample is nodata, not a made-up value
    assert 0.0 <= uc6["min"] <= uc6["max"] <= 1.0

    mask = by_kind["cloud-mask"].results["mask"]
    assert mask["patches"] == PATCHES and mask["quicklooks_s3"] == PATCHES
    assert set(mask["class_fractions"]) == {"clear", "cloud", "shadow"}
    assert math.isclose(sum(mask["class_fractions"].values()), 1.0, abs_tol=1e-6)
    pictures = sorted(Path(mask["quicklook_dir"]).glob("*.quicklook.png"))
    assert len(pictures) == PATCHES and all(p.read_bytes().startswith(b"\x89PNG") for p in pictures)

    assert stop_workflows(state, workflows) == []


def test_stopping_a_workflow_removes_its_resources_and_loses_nothing(platform) -> None:
    state = platform.state
    (workflow,) = plans(["uc5"], patches=1, offset=5)
    reports = run_workflows(state, [workflow], timeout_s=300, write=lambda _line: None, read_results=False)
    assert reports[0].status == "succeeded", reports[0].reason
    store = Path(state.store_root) / state.namespace
    config_files = lambda: sorted(p.name for p in store.glob("json-config-*"))  # noqa: E731
    assert len(config_files()) == 2  # settings + credentials of the one step

    assert stop_workflows(state, [workflow]) == []
    status = controller_workflow(state, workflow.name)
    assert status is not None and status["state"] == "stopped"
    assert config_files() == []

    # A step message sent while the workflow is stopped is not lost: once it is published again, its consumer
    # group resumes where it stopped, delivering that message (and not the one already processed).
    collector = collector_for(state, [workflow])
    try:
        producer = Producer(producer_config(state.bootstrap_servers))
        publish_json(producer, workflow.first_topic, step_message(workflow.input_folder, {"sent": "while stopped"}))
        from services.local_platform.demo import publish_workflows, wait_wired

        publish_workflows(state, [workflow], "published")
        assert wait_wired(state, [workflow]) == []
        wait_for(collector, lambda: len(records_on(collector, workflow.final_topic)) >= 2, 120,
                 "the message sent while stopped")
        finals = records_on(collector, workflow.final_topic)
    finally:
        collector.stop()
        stop_workflows(state, [workflow])
    assert [m["meta_information"] for m in finals] == [{"demo": "uc5"}, {"sent": "while stopped"}]


def _object(state, bucket: str, key: str) -> bytes:
    from services.local_platform.demo import s3_client

    return s3_client(state).get_object(Bucket=bucket, Key=key)["Body"].read()


RVQ_MODELS = ("Bigearth-net-rvq-compress", "Bigearth-net-rvq-decompress")
RVQ_EXPORTED = all((Path(__file__).resolve().parents[2] / "model_repository" / m / "config.pbtxt").is_file()
                   for m in RVQ_MODELS)


def test_the_residual_vq_wrappers_serve_the_models_the_chart_names(platform) -> None:
    # Started whether or not the models are exported (a Wrapper's readiness does not wait for its model); which
    # model each serves comes from the chart's wrappers.tasks, as on Kubernetes.
    for service, model in zip(("compress-rvq", "decompress-rvq"), RVQ_MODELS):
        with urllib.request.urlopen(f"{platform.state.wrapper_urls[service]}/readyz", timeout=10) as response:
            assert json.loads(response.read())["model"] == model


@pytest.mark.skipif(not RVQ_EXPORTED, reason="Bigearth-net-rvq-compress/-decompress not in model_repository "
                                             "(make models exports them)")
def test_the_residual_vq_workflow_runs_end_to_end_on_its_own_wrappers(platform) -> None:
    state = platform.state
    (workflow,) = plans(["compress-decompress-rvq"], patches=2, offset=8)
    assert [s.service for s in workflow.steps] == ["compress-rvq", "decompress-rvq"]
    [report] = run_workflows(state, [workflow], timeout_s=600, write=lambda _line: None)
    assert report.status == "succeeded", report.reason
    results = report.results
    assert results["patches"] == 2 and results["model"]["name"] == RVQ_MODELS[0]
    compression = results["wrapper_stats"]["per_input"][0]["compression"]
    assert (compression["format_version"], compression["levels"]) == (1, 8)  # residual-VQ codes, all levels
    assert 0 < results["bits_per_pixel"] < 16 * 10
    reconstruction = results["reconstruction"]
    assert reconstruction["bands_compared"] == 2 * 10
    assert math.isfinite(reconstruction["rmse_dn"]) and reconstruction["rmse_dn"] > 0
    assert stop_workflows(state, [workflow]) == []
