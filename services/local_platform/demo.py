"""Running workflows on a local stack as the DSL would, following them, and summing up what they produced.

``run_workflows``: upload the inputs, publish the workflow messages to ``system.ML``, wait until the controller
has wired every step, publish the first step messages, follow ``monitoring.notify`` (progress printed as it comes),
wait for each workflow's last message (or a CRITICAL / dead-letter record), then read the results back from S3.
``stop_workflows`` sends the ``stopping`` messages. Plain functions over a ``PlatformState``: the CLI and the
platform tests call the same code.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from services.core.kafka import consumer_config, producer_config, publish_json

from .stack import PlatformState, create_topics
from .workflows import COMPRESSION_KINDS, SAMPLE_ROOT, WorkflowPlan, input_objects, sample_labels, step_message, workflow_message

log = logging.getLogger(__name__)

PIXELS_PER_PATCH = 120 * 120
# Reflectance x 10000: the peak value of Sentinel-2 L2A digital numbers, for PSNR.
REFLECTANCE_PEAK_DN = 10000.0


@dataclass
class ReceivedRecord:
    topic: str
    value: Any
    received_at: float


@dataclass
class StepReport:
    service: str
    component_name: str
    topic_in: str
    status: str = "pending"  # pending | started | SUCCESS | CRITICAL
    started_at: float | None = None
    finished_at: float | None = None
    output_folder: str | None = None
    description: str = ""

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass
class WorkflowReport:
    plan: WorkflowPlan
    steps: list[StepReport]
    status: str = "pending"  # pending | succeeded | failed | timed out
    reason: str = ""
    submitted_at: float | None = None
    finished_at: float | None = None
    results: dict[str, Any] = field(default_factory=dict)
    dead_letters: list[Any] = field(default_factory=list)
    dead_lettered_at: float | None = None

    @property
    def seconds(self) -> float | None:
        if self.submitted_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.submitted_at


class EventCollector:
    """One consumer over ``monitoring.notify`` and every topic of the workflows; keeps what concerns them."""

    def __init__(self, bootstrap_servers: str, notify_topic: str, topics: Iterable[str], workflow_names: set[str],
                 on_notification: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.notify_topic = notify_topic
        self.topics = sorted(set(topics))
        self.workflow_names = workflow_names
        self.on_notification = on_notification
        self.notifications: list[tuple[float, dict[str, Any]]] = []
        self.records: list[ReceivedRecord] = []
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-events", daemon=True)

    def start(self, timeout_s: float = 60.0) -> "EventCollector":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the event collector did not get its partitions in time")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        from confluent_kafka import Consumer

        group = f"eoml-demo-events-{secrets.token_hex(4)}"
        consumer = Consumer(consumer_config(self.bootstrap_servers, group,
                                            **{"topic.metadata.refresh.interval.ms": 2000}))
        consumer.subscribe([self.notify_topic, *self.topics],
                           on_assign=lambda _c, partitions: self._ready.set() if partitions else None)
        try:
            while not self._stop.is_set():
                message = consumer.poll(0.25)
                if message is None or message.error():
                    continue
                now = time.monotonic()
                try:
                    value = json.loads(message.value() or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    value = (message.value() or b"").decode("utf-8", errors="replace")
                with self.changed:
                    if message.topic() == self.notify_topic:
                        if isinstance(value, dict) and value.get("workflow_name") in self.workflow_names:
                            self.notifications.append((now, value))
                            if self.on_notification:
                                self.on_notification(value)
                    else:
                        self.records.append(ReceivedRecord(str(message.topic()), value, now))
                    self.changed.notify_all()
        finally:
            consumer.close()

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 0.5))
        return True


def progress_printer(write: Callable[[str], None] = print) -> Callable[[dict[str, Any]], None]:
    last: dict[tuple[str, str], str] = {}

    def show(notification: dict[str, Any]) -> None:
        key = (notification.get("workflow_name", ""), notification.get("component_name", ""))
        text = f"{notification.get('status', '?'):<8} {key[0]} / {key[1]}: {notification.get('description', '')}"
        if last.get(key) != text:
            last[key] = text
            write(f"  {text}")

    return show


def controller_workflow(state: PlatformState, name: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{state.controller_url}/workflows/{name}", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def s3_client(state: PlatformState, access_key_id: str = "local", secret_access_key: str = "local") -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=state.s3_endpoint, region_name=state.s3_region,
                        aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                        config=Config(retries={"max_attempts": 3}, s3={"addressing_style": "path"}))


def upload_inputs(state: PlatformState, plans: Sequence[WorkflowPlan]) -> None:
    client = s3_client(state)
    for bucket in sorted({p.bucket for p in plans}):
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
    for plan in plans:
        for key, data in input_objects(plan).items():
            client.put_object(Bucket=plan.bucket, Key=key, Body=data)


def publish_workflows(state: PlatformState, plans: Sequence[WorkflowPlan], status: str,
                      credentials: tuple[str, str] = ("local", "local")) -> None:
    """What the DSL does: one message per ML step on ``system.ML``."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(state.bootstrap_servers))
    for plan in plans:
        for step in plan.steps:
            message = workflow_message(plan, step, status, state.namespace, state.s3_endpoint, *credentials,
                                       region=state.s3_region)
            publish_json(producer, state.system_topic, message)


def wait_wired(state: PlatformState, plans: Sequence[WorkflowPlan], timeout_s: float = 120.0) -> list[str]:
    """Names of the workflows whose steps are not all wired (and running) when the wait ends."""
    deadline = time.monotonic() + timeout_s
    pending = {p.name: len(p.steps) for p in plans}
    while pending and time.monotonic() < deadline:
        for name, count in list(pending.items()):
            status = controller_workflow(state, name)
            if status and status.get("state") == "running" and len(status.get("steps", [])) == count:
                if all(s.get("live", {}).get("source_ready") for s in status["steps"]):
                    del pending[name]
        if pending:
            time.sleep(0.25)
    return sorted(pending)


def _step_of(report: WorkflowReport, component: str) -> StepReport | None:
    return next((s for s in report.steps if s.component_name == component), None)


def _apply_events(reports: Sequence[WorkflowReport], collector: EventCollector) -> None:
    by_name = {r.plan.name: r for r in reports}
    for received_at, notification in collector.notifications:
        report = by_name.get(str(notification.get("workflow_name")))
        step = _step_of(report, notification.get("component_name", "")) if report else None
        if step is None:
            continue
        status = notification.get("status")
        if status == "START":
            step.status, step.started_at = "started", received_at
        elif status in ("SUCCESS", "CRITICAL"):
            step.status, step.finished_at, step.description = status, received_at, notification.get("description", "")
    for record in collector.records:
        for report in reports:
            for step_report in report.steps:
                if record.topic == f"{step_report.topic_in}.dlq" and record.value not in report.dead_letters:
                    report.dead_letters.append(record.value)
                    if report.dead_lettered_at is None:
                        report.dead_lettered_at = record.received_at
            for index, planned in enumerate(report.plan.steps):
                if record.topic == planned.topic_out and isinstance(record.value, dict):
                    folder = (record.value.get("S3_bucket_desc") or {}).get("folder")
                    report.steps[index].output_folder = folder
                    if index == len(report.steps) - 1 and report.finished_at is None:
                        report.finished_at = record.received_at


# A Wrapper writes a failed step's dead-letter record before its CRITICAL notification, and the collector reads
# monitoring.notify from the beginning: a dead letter settles a workflow only once its CRITICAL had time to arrive.
DEAD_LETTER_SETTLE_S = 5.0


def _settled(report: WorkflowReport) -> bool:
    if report.finished_at is not None and all(s.status == "SUCCESS" for s in report.steps):
        return True
    if any(s.status == "CRITICAL" for s in report.steps):
        return True
    return report.dead_lettered_at is not None and time.monotonic() - report.dead_lettered_at >= DEAD_LETTER_SETTLE_S


def run_workflows(state: PlatformState, plans: Sequence[WorkflowPlan], timeout_s: float = 600.0,
                  write: Callable[[str], None] = print, read_results: bool = True) -> list[WorkflowReport]:
    reports = [WorkflowReport(p, [_step_report(s) for s in p.steps]) for p in plans]
    create_topics(state.bootstrap_servers, [t for p in plans for t in p.topics])
    write(f"uploading inputs to {state.s3_endpoint} ...")
    upload_inputs(state, plans)
    collector = EventCollector(state.bootstrap_servers, state.notify_topic, [t for p in plans for t in p.topics],
                               {p.name for p in plans}, progress_printer(write)).start()
    try:
        write(f"publishing {sum(len(p.steps) for p in plans)} workflow message(s) to {state.system_topic} ...")
        publish_workflows(state, plans, "published")
        not_wired = wait_wired(state, plans)
        for report in reports:
            if report.plan.name in not_wired:
                report.status, report.reason = "failed", "the controller did not wire every step (see its log)"
        from confluent_kafka import Producer

        producer = Producer(producer_config(state.bootstrap_servers))
        for report in reports:
            if report.status == "pending":
                publish_json(producer, report.plan.first_topic,
                             step_message(report.plan.input_folder, {"demo": report.plan.kind}))
                report.submitted_at = time.monotonic()
        write("step messages sent; following monitoring.notify:")
        active = [r for r in reports if r.status == "pending"]

        def all_settled() -> bool:
            _apply_events(reports, collector)
            return all(_settled(r) for r in active)

        collector.wait(all_settled, timeout_s)
        _apply_events(reports, collector)
    finally:
        collector.stop()
    for report in reports:
        if report.status != "pending":
            continue
        critical = [s for s in report.steps if s.status == "CRITICAL"]
        if critical:
            report.status, report.reason = "failed", f"{critical[0].component_name}: {critical[0].description}"
        elif report.dead_letters:
            first = report.dead_letters[0]
            reason = first.get("reason", "") if isinstance(first, dict) else str(first)
            report.status, report.reason = "failed", f"dead-lettered: {reason}"
        elif report.finished_at is not None:
            report.status = "succeeded"
        else:
            report.status, report.reason = "timed out", f"no result within {timeout_s:.0f} s"
    if read_results:
        for report in reports:
            if report.status == "succeeded":
                try:
                    report.results = read_workflow_results(state, report)
                except Exception as error:  # noqa: BLE001 - a summary problem is reported, not fatal
                    report.results = {"error": f"{type(error).__name__}: {error}"}
    return reports


def _step_report(step: Any) -> StepReport:
    return StepReport(step.service, step.component_name, step.topic_in)


def stop_workflows(state: PlatformState, plans: Sequence[WorkflowPlan], timeout_s: float = 60.0) -> list[str]:
    """Send ``stopping`` for every step; names of workflows the controller did not report stopped in time."""
    publish_workflows(state, plans, "stopping")
    deadline = time.monotonic() + timeout_s
    pending = {p.name for p in plans}
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            status = controller_workflow(state, name)
            if status is None or status.get("state") == "stopped":
                pending.discard(name)
        if pending:
            time.sleep(0.25)
    return sorted(pending)


# -- results -------------------------------------------------------------------------------------------------


def _list_keys(client: Any, bucket: str, folder: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder.rstrip("/") + "/"):
        keys.extend(entry["Key"] for entry in page.get("Contents", []))
    return sorted(keys)


def _get(client: Any, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _manifest(client: Any, bucket: str, folder: str) -> dict[str, Any]:
    """The manifest of an announced folder (a run's winning attempt): beside its run folder."""
    from services.wrapper.results import manifest_key, run_folder_of

    return json.loads(_get(client, bucket, manifest_key(run_folder_of(folder))))


def read_workflow_results(state: PlatformState, report: WorkflowReport) -> dict[str, Any]:
    client = s3_client(state)
    plan = report.plan
    folders = [s.output_folder for s in report.steps]
    results: dict[str, Any] = {"folders": [f"s3://{plan.bucket}/{f}" for f in folders if f]}
    if plan.kind == "ssl-classify":
        results.update(_classification_results(client, plan, folders[0], folders[1]))
    elif plan.kind in COMPRESSION_KINDS:
        results.update(_compression_results(client, plan, folders[0], folders[1]))
    elif plan.kind in ("uc5", "uc6"):
        results.update(_raster_results(client, plan.bucket, folders[0]))
    elif plan.kind == "cloud-mask":
        results.update(_mask_results(client, plan.bucket, folders[0], Path(state.root) / "quicklooks" / plan.name))
    return results


def _mask_results(client: Any, bucket: str, folder: str | None, quicklook_dir: Path) -> dict[str, Any]:
    """Class fractions of the mask run (pooled over the patches with data, and the cloudiest patches) and the
    quicklooks, copied from S3 to ``quicklook_dir`` so they can be opened."""
    if not folder:
        return {}
    manifest = _manifest(client, bucket, folder)
    entries = [entry for unit in manifest.get("stats", {}).get("per_input", []) for entry in unit.get("patches", [])]
    pixels = sum(e["shape"][0] * e["shape"][1] * (1 - e.get("nodata_fraction", 0.0)) for e in entries)
    pooled: dict[str, float] = {}
    for entry in entries:
        weight = entry["shape"][0] * entry["shape"][1] * (1 - entry.get("nodata_fraction", 0.0))
        for name, value in entry.get("class_fractions", {}).items():
            pooled[name] = pooled.get(name, 0.0) + value * weight / pixels if pixels else 0.0
    cloudiest = sorted(entries, key=lambda e: -(1.0 - e.get("class_fractions", {}).get("clear", 1.0)))[:3]
    quicklook_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for key in manifest.get("stats", {}).get("quicklooks", []):
        path = quicklook_dir / key.rsplit("/", 1)[-1]
        path.write_bytes(_get(client, bucket, key))
        saved.append(str(path))
    return {"mask": {"patches": len(entries), "class_fractions": pooled,
                     "cloudiest": [(e["patch_id"], e.get("class_fractions", {})) for e in cloudiest],
                     "quicklooks_s3": len(manifest.get("stats", {}).get("quicklooks", [])),
                     "quicklook_dir": str(quicklook_dir) if saved else "", "quicklook_example": saved[:1]}}


def _classification_results(client: Any, plan: WorkflowPlan, features_folder: str | None,
                            classes_folder: str | None, shown: int = 3) -> dict[str, Any]:
    from services.wrapper.outputs import read_classes_csv, read_classes_json, read_features

    out: dict[str, Any] = {}
    if features_folder:
        manifest = _manifest(client, plan.bucket, features_folder)
        first = manifest["objects"][0]["key"]
        features = read_features(_get(client, plan.bucket, first))
        out["features"] = {"patches": manifest["patches"], "dimension": int(features.features.shape[1])}
    if classes_folder:
        truth = sample_labels(SAMPLE_ROOT)
        manifest = _manifest(client, plan.bucket, classes_folder)
        out["model"] = manifest.get("model", {})
        rows = []
        keys = [o["key"] for o in manifest["objects"]]
        # The classifier writes each result twice (JSON like production, and CSV): read one of each pair.
        json_stems = {k[: -len(".json")] for k in keys if k.endswith(".json")}
        chosen = [k for k in keys
                  if k.endswith(".json") or (k.endswith(".csv") and k[: -len(".csv")] not in json_stems)]
        for key in chosen:
            data = _get(client, plan.bucket, key)
            classes = read_classes_csv(data) if key.endswith(".csv") else read_classes_json(data)
            for index, patch_id in enumerate(classes.patch_ids):
                order = np.argsort(-np.nan_to_num(classes.probabilities[index], nan=-1.0))[:3]
                patch = patch_id.rstrip("/").rsplit("/", 1)[-1]
                rows.append({"patch": patch,
                             "top": [(classes.label_names[k], float(classes.probabilities[index][k])) for k in order],
                             "truth": truth.get(patch, [])})
        out["patches_classified"] = len(rows)
        out["top_labels"] = rows[:shown]
    return out


def _compression_results(client: Any, plan: WorkflowPlan, codes_folder: str | None,
                         images_folder: str | None) -> dict[str, Any]:
    from services.core import sentinel2
    from services.wrapper.outputs import read_decompressed_archive

    out: dict[str, Any] = {}
    if codes_folder:
        manifest = _manifest(client, plan.bucket, codes_folder)
        total_bytes = sum(o["size"] for o in manifest["objects"])
        patches = manifest["patches"]
        out["compressed_bytes"] = total_bytes
        out["patches"] = patches
        # Every byte of the stored files (headers and tables included) over every pixel of the 120 x 120 grid.
        out["bits_per_pixel"] = total_bytes * 8 / (patches * PIXELS_PER_PATCH) if patches else None
        out["wrapper_stats"] = manifest.get("stats", {})
        out["model"] = manifest.get("model", {})
    if images_folder:
        errors: list[float] = []
        squared_sum, values = 0.0, 0
        for key in _list_keys(client, plan.bucket, images_folder):
            if not key.endswith(".tar.gz"):
                continue
            for folder, bands in read_decompressed_archive(_get(client, plan.bucket, key)).items():
                original_folder = SAMPLE_ROOT / "patches" / folder
                if not original_folder.is_dir():
                    continue
                originals = sentinel2.read_bigearthnet_patch(original_folder, list(bands))
                for band, raster in bands.items():
                    decoded = raster.array[0].astype(np.float64)
                    reference = originals[band].astype(np.float64)
                    if decoded.shape != reference.shape:
                        continue
                    difference = decoded - reference
                    squared_sum += float(np.sum(difference ** 2))
                    values += difference.size
                    errors.append(float(np.sqrt(np.mean(difference ** 2))))
        if values:
            rmse = math.sqrt(squared_sum / values)
            out["reconstruction"] = {
                "rmse_dn": rmse,
                "psnr_db": 20 * math.log10(REFLECTANCE_PEAK_DN / rmse) if rmse > 0 else float("inf"),
                "bands_compared": len(errors),
            }
    return out


def _raster_results(client: Any, bucket: str, folder: str | None) -> dict[str, Any]:
    from services.wrapper.outputs import read_geotiff

    if not folder:
        return {}
    summary: dict[str, Any] = {"rasters": 0, "valid_cells": 0}
    valid_values: list[np.ndarray] = []
    for key in _list_keys(client, bucket, folder):
        if not key.endswith((".tif", ".tiff")):
            continue
        raster = read_geotiff(_get(client, bucket, key))
        values = raster.array.astype(np.float64).ravel()
        nodata = raster.nodata
        valid = values[np.isfinite(values) & ((values != nodata) if nodata is not None else True)]
        summary["rasters"] += 1
        summary["valid_cells"] += int(valid.size)
        summary["nodata_cells"] = summary.get("nodata_cells", 0) + int(values.size - valid.size)
        valid_values.append(valid)
    if valid_values and sum(v.size for v in valid_values):
        joined = np.concatenate(valid_values)
        summary.update(min=float(joined.min()), mean=float(joined.mean()), max=float(joined.max()))
    return summary


# -- summary -------------------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return f"{value:6.1f} s" if value is not None else "     - "


PROBE_EVALUATION = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "probe-evaluation.json"


def probe_quality_lines(weights: str, evaluation_path: Path = PROBE_EVALUATION) -> list[str]:
    """How good a trained probe's labels are, from the committed evaluation record (make train-probe) of the
    checkpoint the card names: micro-F1 on unseen scenes against the label-frequency prior."""
    if "sha256=" not in weights or not evaluation_path.is_file():
        return []
    digest = weights.split("sha256=", 1)[1]
    for record in json.loads(evaluation_path.read_text()).get("probes", {}).values():
        if record.get("sha256") != digest:
            continue
        full = record["label_efficiency_held_out"][-1]
        cv = record["cross_validation"]
        return [f"(trained {record['classes']}-class probe on {record['labelled_train_patches']} labelled patches; "
                f"on {record['held_out_patches']} patches of unseen scenes micro-F1 {full['ssl']['micro_f1']:.2f} vs "
                f"{full['prior']['micro_f1']:.2f} for the label-frequency prior and {full['random']['micro_f1']:.2f} "
                f"for the random-trunk probe;",
                f" scene-grouped CV over {cv['patches']} patches: {cv['ssl']['micro_f1']:.2f} vs prior "
                f"{cv['prior']['micro_f1']:.2f}. The sample patches below are of training scenes (the probe may have "
                "trained on them): no test.)"]
    return []


def format_summary(reports: Sequence[WorkflowReport]) -> str:
    lines = ["", "=" * 100, "Summary", "=" * 100]
    for report in reports:
        plan = report.plan
        lines.append(f"{plan.title}  [{plan.name}]  -> {report.status.upper()}  ({_seconds(report.seconds).strip()})")
        if report.reason:
            lines.append(f"    reason: {report.reason}")
        for step in report.steps:
            where = f"s3://{plan.bucket}/{step.output_folder}" if step.output_folder else "-"
            lines.append(f"    {step.component_name:<28} {step.status:<9} {_seconds(step.seconds)}  {where}")
            if step.output_folder:
                lines.append(f"    {'':<28} STAC Collection: {where}/collection.json")
        results = report.results
        if "error" in results:
            lines.append(f"    (results could not be read: {results['error']})")
        if "features" in results:
            lines.append(f"    features: {results['features']['patches']} patches x {results['features']['dimension']}")
        if "top_labels" in results:
            weights = results.get("model", {}).get("weights", "")
            lines.append(f"    top labels ({results['patches_classified']} patches classified; "
                         f"model weights: {weights}):")
            if weights.startswith("seeded-init"):
                lines.append("    (untrained seeded weights: the pipeline is real, the scores carry no meaning)")
            else:
                lines.extend(f"    {line}" for line in probe_quality_lines(weights))
            for row in results["top_labels"]:
                top = ", ".join(f"{label} {score:.2f}" for label, score in row["top"])
                lines.append(f"      {row['patch']}: {top}")
                lines.append(f"      {'':<{len(row['patch'])}}  truth: {', '.join(row['truth']) or '?'}")
        if "bits_per_pixel" in results and results["bits_per_pixel"] is not None:
            lines.append(f"    compressed: {results['patches']} patches, {results['compressed_bytes']} bytes, "
                         f"{results['bits_per_pixel']:.3f} bits per pixel (10 bands, 120 x 120 grid)")
            per_input = results.get("wrapper_stats", {}).get("per_input") or [{}]
            point = per_input[0].get("compression", {})
            weights = str(results.get("model", {}).get("weights", "?"))
            if "sha256=" in weights:  # the digest's first 12 hex digits are enough to tell checkpoints apart
                weights = weights[: weights.index("sha256=") + 19] + "..."
            version = point.get("format_version")
            if version in (1, 3):
                coding = "per-file histograms" if version == 1 else "the card's RVQ prior"
                lines.append(f"    codes: residual-VQ codebook indices (codec residual-vq/1, .codes format {version}), "
                             f"{point.get('levels')} levels, {coding}, weights {weights}")
            if "quantiser_scale" in point:
                lines.append(f"    operating point: {point.get('levels')} levels, quantiser scale "
                             f"{point.get('quantiser_scale')} (meta_information.compression), weights {weights}")
        if "reconstruction" in results:
            rec = results["reconstruction"]
            lines.append(f"    reconstruction: RMSE {rec['rmse_dn']:.1f} DN = {100 * rec['rmse_dn'] / 10000:.2f} % of "
                         f"10,000 DN, PSNR {rec['psnr_db']:.1f} dB (peak {REFLECTANCE_PEAK_DN:.0f} DN) over "
                         f"{rec['bands_compared']} patch bands")
        if "rasters" in results:
            stats = ", ".join(f"{k} {results[k]:.3f}" for k in ("min", "mean", "max") if k in results)
            lines.append(f"    {results['rasters']} raster(s), {results['valid_cells']} valid cells"
                         f" ({results.get('nodata_cells', 0)} nodata){': ' + stats if stats else ''}")
        if "mask" in results:
            mask = results["mask"]
            shares = ", ".join(f"{name} {value:.1%}" for name, value in mask["class_fractions"].items())
            lines.append(f"    mask of {mask['patches']} patches (30 m): {shares}")
            for patch, fractions in mask["cloudiest"]:
                shares = ", ".join(f"{name} {value:.1%}" for name, value in fractions.items())
                lines.append(f"      {patch}: {shares}")
            if mask["quicklook_dir"]:
                lines.append(f"    quicklooks ({mask['quicklooks_s3']} PNGs, true colour + mask overlay): "
                             f"{mask['quicklook_dir']}/")
    failed = [r for r in reports if r.status != "succeeded"]
    lines.append("=" * 100)
    lines.append(f"{len(reports) - len(failed)}/{len(reports)} workflows succeeded")
    return "\n".join(lines)
