"""``eo-platform results <workflow>``: the announced run folders of each step (read from its output topic on a real
broker), their STAC Collection URLs, and the table summed over the Items (read from a real S3 server)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator

import boto3
import pytest
from confluent_kafka import Producer
from moto.server import ThreadedMotoServer

from services.core.kafka import producer_config
from services.local_platform.results import format_results, workflow_results
from services.wrapper.outputs.stac import Footprint, ModelFacts, RunFacts, RunObject, UnitFacts, stac_documents

CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
UTM_33N = "EPSG:32633"


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                           aws_access_key_id="local", aws_secret_access_key="local")
    finally:
        server.stop()


def _run(s3: Any, bucket: str, folder: str, units: tuple[UnitFacts, ...]) -> None:
    facts = RunFacts(run_id=folder.rsplit("/", 1)[1], task="ssl-features", bucket=bucket, run_folder=folder,
                     input_bucket=bucket, input_folder="in", created=CREATED, model=ModelFacts("m", "1", "seeded"),
                     units=units)
    for key, body in stac_documents(facts).items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def _announce(bootstrap: str, topic: str, folder: str) -> None:
    producer = Producer(producer_config(bootstrap))
    value = {"previous_component_end": "True", "S3_bucket_desc": {"folder": folder, "filename": ""},
             "meta_information": {}}
    producer.produce(topic, value=json.dumps(value).encode())
    assert producer.flush(10) == 0


def test_results_lists_each_steps_collections_with_patches_bbox_and_time_range(s3: Any, kafka_broker: Any) -> None:
    bucket, other_bucket = f"wf-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=other_bucket)  # the announcement names no bucket: the one holding the folder is found
    s3.create_bucket(Bucket=bucket)
    features, classes = "result-image2feature/in-1/r-aaaa", "result-feature2class/in-2/r-bbbb"
    grid = (10.0, 0.0, 500000.0, 0.0, -10.0, 5300000.0)
    _run(s3, bucket, features, (
        UnitFacts("a", "in/a.tar.gz", (
            Footprint("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57", UTM_33N, grid, (120, 120)),
            Footprint("S2B_MSIL2A_20180705T101029_N9999_R022_T33UUP_26_58", UTM_33N, grid, (120, 120))),
            (RunObject(f"{features}/a.features.npz", 10, "0" * 64, "application/octet-stream"),
             RunObject(f"{features}/a.features.json", 10, "0" * 64, "application/json"))),
    ))
    _run(s3, bucket, classes, (
        UnitFacts("b", "in/b", (Footprint("S2A_MSIL2A_20170613T101031_39_24"),),
                  (RunObject(f"{classes}/b.classes.json", 10, "0" * 64, "application/json"),)),
    ))
    topic_features, topic_classes = f"features-{uuid.uuid4().hex[:6]}", f"classes-{uuid.uuid4().hex[:6]}"
    _announce(kafka_broker.bootstrap_servers, topic_features, features)
    _announce(kafka_broker.bootstrap_servers, topic_features, features)  # a redelivered announcement: one run
    _announce(kafka_broker.bootstrap_servers, topic_classes, classes)
    # As the controller lists them (by topic name); shown in the order the data flows.
    workflow = {"name": "wf", "steps": [
        {"component_name": "Not run yet", "topic_in": topic_classes, "topic_out": f"none-{uuid.uuid4().hex[:6]}"},
        {"component_name": "Classifier", "topic_in": topic_features, "topic_out": topic_classes},
        {"component_name": "SSL features", "topic_in": "in", "topic_out": topic_features},
    ]}

    steps = workflow_results(workflow, kafka_broker.bootstrap_servers, s3)

    assert [step.component for step in steps] == ["SSL features", "Classifier", "Not run yet"]
    [feature_run], [class_run], [] = (step.runs for step in steps)
    assert feature_run.collection_url == f"s3://{bucket}/{features}/collection.json"
    assert (feature_run.items, feature_run.patches, feature_run.outputs) == (1, 2, 2)
    assert feature_run.bbox is not None and feature_run.bbox[0] == pytest.approx(15.0, abs=1e-7)  # zone 33 meridian
    assert (feature_run.start, feature_run.end) == ("2017-06-13T10:10:31Z", "2018-07-05T10:10:29Z")
    assert class_run.bbox is None and (class_run.start, class_run.end) == ("2017-06-13T10:10:31Z",) * 2

    table = format_results("wf", steps)
    assert f"STAC Collection  s3://{bucket}/{classes}/collection.json" in table
    assert "2017-06-13T10:10:31Z .. 2018-07-05T10:10:29Z" in table
    assert "not georeferenced" in table and "no announced run yet" in table
    print(table)
