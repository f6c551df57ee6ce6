"""``eo-platform results <workflow>``: where each step's results are, as STAC Collections, and what they hold.

A step's announced runs are the next-step messages on its output topic (``S3_bucket_desc.folder`` is the run
folder); each run folder has ``collection.json`` (services/wrapper/outputs/stac.py) linking one Item per input
unit. The table sums the Items: patches, the WGS84 bounding box, the sensing datetime range, the output objects.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from services.core.kafka import consumer_config

COLLECTION_NAME = "collection.json"  # services.wrapper.outputs.stac.COLLECTION_NAME (no Wrapper import here)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One announced run folder, summed over its STAC Items."""

    bucket: str
    folder: str
    items: int = 0
    patches: int = 0
    bbox: tuple[float, float, float, float] | None = None
    start: str = ""
    end: str = ""
    outputs: int = 0
    missing: str = ""  # why there is no summary (no collection.json: a run from before STAC, or not readable)

    @property
    def collection_url(self) -> str:
        return f"s3://{self.bucket}/{self.folder}/{COLLECTION_NAME}"


@dataclass(slots=True)
class StepResults:
    component: str
    topic_out: str
    runs: list[RunSummary] = field(default_factory=list)


def announced_folders(bootstrap_servers: str, topic: str, timeout_s: float = 10.0) -> list[str]:
    """The run folders announced on ``topic`` (every record from the beginning, in order, without repeats)."""
    consumer = Consumer(consumer_config(bootstrap_servers, f"eo-platform-results-{uuid.uuid4().hex[:8]}"))
    folders: list[str] = []
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
        if topic not in metadata.topics:
            return []
        partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=timeout_s)[1] for p in partitions}
        remaining = {p for p, end in ends.items() if end > 0}
        consumer.assign(partitions)
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            record = consumer.poll(0.5)
            if record is None or record.error():
                continue
            if record.offset() + 1 >= ends[record.partition()]:
                remaining.discard(record.partition())
            folder = _folder_of(record.value())
            if folder and folder not in folders:
                folders.append(folder)
    except KafkaException as error:
        raise RuntimeError(f"cannot read topic {topic!r}: {error}") from None
    finally:
        consumer.close()
    return folders


def _folder_of(value: bytes | None) -> str:
    try:
        message = json.loads(value or b"")
        return str(message["S3_bucket_desc"]["folder"]).strip("/")
    except (ValueError, TypeError, KeyError):
        return ""


def _read_json(client: Any, bucket: str, key: str) -> dict[str, Any]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    with body:
        return json.loads(body.read())


def find_bucket(client: Any, folder: str, buckets: Iterable[str]) -> str | None:
    """The bucket holding ``<folder>/collection.json`` (the announcement names the folder, not the bucket)."""
    for bucket in buckets:
        try:
            client.head_object(Bucket=bucket, Key=f"{folder}/{COLLECTION_NAME}")
            return bucket
        except Exception:  # noqa: BLE001 - botocore's 404/403 alike: not in this bucket
            continue
    return None


def summarise_run(client: Any, bucket: str, folder: str) -> RunSummary:
    """Sum a run folder's STAC Items (read through the Collection's ``item`` links, relative to the folder)."""
    try:
        collection = _read_json(client, bucket, f"{folder}/{COLLECTION_NAME}")
    except Exception as error:  # noqa: BLE001 - reported in the table, the other runs are still shown
        return RunSummary(bucket, folder, missing=f"no readable {COLLECTION_NAME} ({type(error).__name__})")
    items = []
    for link in collection.get("links", []):
        href = str(link.get("href", ""))
        if link.get("rel") == "item" and href.startswith("./"):
            items.append(_read_json(client, bucket, f"{folder}/{href[2:]}"))
    boxes = [item["bbox"] for item in items if item.get("bbox")]
    instants = sorted(
        str(value) for item in items for name in ("datetime", "start_datetime", "end_datetime")
        if (value := item.get("properties", {}).get(name))
    )
    return RunSummary(
        bucket=bucket, folder=folder, items=len(items),
        patches=sum(len(item.get("properties", {}).get("eoml:patches", [])) for item in items),
        bbox=(min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
              max(b[3] for b in boxes)) if boxes else None,
        start=instants[0] if instants else "", end=instants[-1] if instants else "",
        outputs=sum(len(item.get("assets", {})) for item in items),
    )


def workflow_results(workflow: dict[str, Any], bootstrap_servers: str, client: Any) -> list[StepResults]:
    """Each step of a workflow (the controller's ``GET /workflows/<name>``) with its announced runs."""
    buckets = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    steps = []
    for step in in_workflow_order(workflow.get("steps", [])):
        results = StepResults(step.get("component_name") or step.get("config_name", "?"), step.get("topic_out", ""))
        for folder in announced_folders(bootstrap_servers, results.topic_out) if results.topic_out else []:
            bucket = find_bucket(client, folder, buckets)
            results.runs.append(summarise_run(client, bucket, folder) if bucket else
                                RunSummary("?", folder, missing=f"no {COLLECTION_NAME} in any bucket"))
        steps.append(results)
    return steps


def in_workflow_order(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps in the order their data flows (a step whose ``topic_in`` is another's ``topic_out`` after it); the
    controller lists them by topic name."""
    remaining, ordered = list(steps), []
    while remaining:
        produced = {s.get("topic_out") for s in remaining}
        ready = [s for s in remaining if s.get("topic_in") not in produced] or remaining[:1]  # a cycle: keep going
        ordered.extend(ready)
        remaining = [s for s in remaining if s not in ready]
    return ordered


def _bbox_text(bbox: Sequence[float] | None) -> str:
    return "not georeferenced" if bbox is None else "{:.4f},{:.4f},{:.4f},{:.4f}".format(*bbox)


def _range_text(run: RunSummary) -> str:
    if not run.start:
        return "-"
    return run.start if run.start == run.end else f"{run.start} .. {run.end}"


def format_results(workflow_name: str, steps: Sequence[StepResults]) -> str:
    lines = [f"workflow {workflow_name}"]
    for step in steps:
        lines.append(f"  step {step.component} (announces on {step.topic_out or '-'})")
        if not step.runs:
            lines.append("    no announced run yet")
        for run in step.runs:
            lines.append(f"    STAC Collection  {run.collection_url}")
            if run.missing:
                lines.append(f"      ({run.missing})")
                continue
            lines.append(f"      {'items':>5} {'patches':>7}  {'bbox (WGS84 lon/lat)':<42} {'datetime':<44} outputs")
            lines.append(f"      {run.items:>5} {run.patches:>7}  {_bbox_text(run.bbox):<42} {_range_text(run):<44} "
                         f"{run.outputs}")
    return "\n".join(lines)


__all__ = ["RunSummary", "StepResults", "announced_folders", "find_bucket", "format_results", "in_workflow_order",
           "summarise_run", "workflow_results"]
