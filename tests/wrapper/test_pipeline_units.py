"""The pipeline's plain functions, without servers: batching, retries, progress, names, deliveries, preprocessing."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from services.core import sentinel2
from services.core.model_card import ModelCard
from services.wrapper.batching import Work, batched_inference
from services.wrapper.handlers import InputUnit, unique_names
from services.wrapper.handlers.sentinel2 import plan_units
from services.wrapper.inference_client import InferenceError, InferenceUnavailable, RetryPolicy, call_with_retry
from services.wrapper.inputs.s3_listing import PatchFolderSource, S3ObjectRef, SafeGranuleSource, TarArchiveSource, plan_from_objects
from services.wrapper.notifications import ProgressReporter, StepNotifier, format_duration, scrub
from services.wrapper.preprocess import PatchInvalid, read_era5_stack, sentinel2_input
from services.wrapper.results import output_folder
from services.wrapper.service import BadDelivery, config_name_of, parse_delivery, parse_step_message
from services.core.step_config import step_config_name
from wrapper_input_data import SAMPLE_PATCHES, sample_patch_names

CARD = ModelCard(
    task="ssl-features",
    input_kind="sentinel2-l2a",
    bands=list(sentinel2.SIMCLR_BAND_ORDER),
    band_mean=[sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in sentinel2.SIMCLR_BAND_ORDER],
    band_std=[sentinel2.BIGEARTHNET_BAND_STD[b] for b in sentinel2.SIMCLR_BAND_ORDER],
    normalisation="standardise",
    resampling_20m="bilinear",
    weights="seeded-init:seed=1",
)


# ---- batching ---------------------------------------------------------------------------------------------------


def _works(row_counts: list[int]) -> list[Work[int]]:
    start = 0
    works = []
    for index, count in enumerate(row_counts):
        rows = np.arange(start, start + count, dtype=np.float32).reshape(count, 1)
        works.append(Work(rows, index))
        start += count
    return works


def test_batches_split_items_and_results_come_back_in_input_order() -> None:
    sent: list[int] = []

    def infer(rows: np.ndarray) -> np.ndarray:
        sent.append(rows.shape[0])
        return np.concatenate([rows, rows * 10], axis=1)  # a pure function of each row

    works = _works([3, 1, 5, 2])
    items: list[object] = [*works[:2], "rejected-a", *works[2:]]
    results = list(batched_inference(items, infer, batch_size=4, in_flight=2))

    assert sum(sent) == 11 and all(1 <= size <= 4 for size in sent)
    assert results[2] == "rejected-a"
    outputs = [r for r in results if not isinstance(r, str)]
    assert [work.context for work, _ in outputs] == [0, 1, 2, 3]
    for work, out in outputs:
        assert out.shape == (work.row_count, 2)
        np.testing.assert_array_equal(out[:, 1], out[:, 0] * 10)
    # Rows keep their order inside an item even when it spans batches.
    np.testing.assert_array_equal(outputs[2][1][:, 0], np.arange(4, 9))


def test_no_more_than_in_flight_requests_run_at_once() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def infer(rows: np.ndarray) -> np.ndarray:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return rows

    results = list(batched_inference(_works([1] * 40), infer, batch_size=2, in_flight=3))

    assert len(results) == 40 and 1 <= most <= 3


def test_an_inference_error_propagates_after_requests_in_flight_finished() -> None:
    calls = 0

    def infer(rows: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise InferenceError("model exploded")
        return rows

    with pytest.raises(InferenceError, match="exploded"):
        list(batched_inference(_works([1] * 10), infer, batch_size=1, in_flight=2))


def test_a_work_item_needs_rows() -> None:
    with pytest.raises(ValueError):
        Work(np.empty((0, 3), dtype=np.float32), "empty")


# ---- retries ----------------------------------------------------------------------------------------------------


def _unavailable() -> InferenceServerException:
    return InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")


def test_unavailable_is_retried_until_it_succeeds() -> None:
    delays: list[float] = []
    attempts = iter([_unavailable(), _unavailable(), "ok"])

    def call() -> str:
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    policy = RetryPolicy(max_attempts=5, max_total_s=60, initial_backoff_s=1.0, max_backoff_s=3.0)
    assert call_with_retry(call, policy, "test", sleep=delays.append) == "ok"
    assert len(delays) == 2 and 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4


def test_retries_are_bounded_in_count() -> None:
    delays: list[float] = []

    def call() -> None:
        raise _unavailable()

    policy = RetryPolicy(max_attempts=4, max_total_s=1000, initial_backoff_s=1.0, max_backoff_s=2.0)
    with pytest.raises(InferenceUnavailable, match="after 4 attempt"):
        call_with_retry(call, policy, "test", sleep=delays.append)
    assert len(delays) == 3 and max(delays) <= 2.4


def test_retries_are_bounded_in_time() -> None:
    delays: list[float] = []

    def call() -> None:
        raise _unavailable()

    # The next backoff (>= 0.8 s) would exceed the 0.5 s budget: no retry at all.
    policy = RetryPolicy(max_attempts=100, max_total_s=0.5, initial_backoff_s=1.0, max_backoff_s=1.0)
    with pytest.raises(InferenceUnavailable, match="after 1 attempt"):
        call_with_retry(call, policy, "test", sleep=delays.append)
    assert delays == []


def test_other_errors_are_not_retried() -> None:
    delays: list[float] = []

    def call() -> None:
        raise InferenceServerException("unexpected shape", status="StatusCode.INVALID_ARGUMENT")

    with pytest.raises(InferenceError, match="unexpected shape") as raised:
        call_with_retry(call, RetryPolicy(), "test", sleep=delays.append)
    assert not isinstance(raised.value, InferenceUnavailable) and delays == []


# ---- progress and notifications -----------------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def publish(self, bootstrap_servers: str, topic: str, value: dict, key: str = "key") -> None:
        self.records.append((topic, value))


def test_progress_lines_have_the_production_format() -> None:
    now = [0.0]
    recorder = _Recorder()
    notifier = StepNotifier(recorder, "kafka:9092", "notify", "Comp", "wf", "ns", "pod")
    progress = ProgressReporter(notifier, total_files=2, interval_s=10, clock=lambda: now[0])

    progress.start_file(1, 4)
    now[0] = 5.0
    progress.item_done()  # the first line goes out at once
    now[0] = 6.0
    progress.item_done()  # within the interval: none
    now[0] = 20.0
    progress.item_done()
    progress.item_done()
    progress.end_file()
    progress.start_file(2, None)
    now[0] = 40.0
    progress.item_done()
    progress.end_file()

    lines = [value["description"] for _, value in recorder.records]
    assert lines[0] == "Progress file 1/2 : 1/4 patches (12 %) - Est. remaining: 35 s"
    assert lines[1] == "Progress file 1/2 : 3/4 patches (38 %) - Est. remaining: 33 s"
    assert lines[2] == "Progress file 1/2 : 4/4 patches (50 %) - Est. remaining: 20 s"
    # A streamed file's size is unknown until it has been read.
    assert lines[3] == "Progress file 2/2 : 1/? patches (50 %) - Est. remaining: 40 s"
    assert lines[-1] == "Progress file 2/2 : 1/1 patches (100 %) - Est. remaining: 0 s"
    assert all(value["status"] == "INFO" and value["overwrite"] is True for _, value in recorder.records)


def test_durations_read_naturally() -> None:
    assert format_duration(5) == "5 s"
    assert format_duration(65) == "1 min 05 s"
    assert format_duration(3 * 3600 + 120) == "3 h 02 min"
    assert format_duration(float("inf")) == "unknown"


def test_scrub_removes_secret_values_and_secret_keys() -> None:
    value = {"reason": "bad key AKIA123 used", "S3_bucket": {"aws_secret_access_key": "s3cr3t", "x": ["s3cr3t!"]}}
    cleaned = scrub(value, ["AKIA123", "s3cr3t"])
    assert "AKIA123" not in json.dumps(cleaned) and "s3cr3t" not in json.dumps(cleaned)
    assert cleaned["S3_bucket"]["aws_secret_access_key"] == "***"


# ---- names ------------------------------------------------------------------------------------------------------


def test_output_folders_are_deterministic_and_distinct() -> None:
    first = output_folder("result-image2feature", "uploads/run 1")
    assert first == output_folder("result-image2feature", "/uploads/run 1/")
    assert first.startswith("result-image2feature/run_1-")
    assert first != output_folder("result-image2feature", "other/run 1")
    assert output_folder("result-image2feature", "uploads", "a.tar.gz") != output_folder("result-image2feature", "uploads")
    assert output_folder("result-image2feature", "").startswith("result-image2feature/root-")


def test_unit_names_that_collide_get_a_hash() -> None:
    names = unique_names(["in/a/x.tar.gz", "in/b/x.tar.gz", "in/y.tar.gz"], lambda key: key.rsplit("/", 1)[1].split(".")[0])
    assert names[2] == "y" and names[0] != names[1] and all(n.startswith("x-") for n in names[:2])


def test_units_group_patch_folders_and_keep_archives_and_products_apart() -> None:
    def obj(key: str) -> S3ObjectRef:
        return S3ObjectRef(key, 10)

    patches = [f"in/{name}/{name}_B02.tif" for name in ("p1", "p3")]
    safe = "in/S2B_X.SAFE/GRANULE/G/IMG_DATA/R10m/T_B02_10m.jp2"
    plan = plan_from_objects("in/", [obj(patches[0]), obj("in/m.tar.gz"), obj(patches[1]), obj(safe)])

    reordered, units, unit_of_source = plan_units(plan, "in")

    assert [u.key for u in units] == ["in/S2B_X.SAFE", "in/m.tar.gz", "in"]
    assert [u.name for u in units] == ["S2B_X", "m", "in"]
    assert [u.expected_items for u in units] == [None, None, 2]
    kinds = [type(source) for source in reordered.sources]
    assert kinds == [SafeGranuleSource, TarArchiveSource, PatchFolderSource, PatchFolderSource]
    assert unit_of_source["in/p1/"] is unit_of_source["in/p3/"] is units[2]


# ---- deliveries --------------------------------------------------------------------------------------------------


def test_binary_cloudevent_and_config_name_sources() -> None:
    headers = {
        "Ce-Id": "partition:3/offset:42",
        "Ce-Source": "/apis/v1/namespaces/uc5/kafkasources/wfuc5in#wf.uc5.in",
        "Ce-Type": "dev.knative.kafka.event",
        "Ce-Specversion": "1.0",
        "Ce-Time": "2026-01-02T03:04:05.678Z",
        "Ce-Kafkaheaderstepconfig": "json-config-from-header",
        "Content-Type": "application/json",
    }
    delivery = parse_delivery(headers, b"{}")
    assert delivery.event_id == "partition:3/offset:42"
    assert delivery.event_time is not None and delivery.event_time.isoformat() == "2026-01-02T03:04:05.678000+00:00"
    assert config_name_of(delivery, "json-config-from-path") == "json-config-from-path"
    assert config_name_of(delivery) == "json-config-from-header"
    without_header = parse_delivery({k: v for k, v in headers.items() if "Kafkaheader" not in k}, b"{}")
    assert config_name_of(without_header) == step_config_name("wf.uc5.in")
    with pytest.raises(BadDelivery, match="cannot tell which step"):
        config_name_of(parse_delivery({"content-type": "application/json"}, b"{}"))


def test_a_step_continues_the_events_trace_else_the_requests_own_traceparent() -> None:
    event_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    base = {"Ce-Id": "e1", "Ce-Source": "s#t", "Ce-Type": "x", "Ce-Specversion": "1.0",
            "Content-Type": "application/json", "Traceparent": request_parent, "Tracestate": "vendor=1"}
    bare = parse_delivery(base, b"{}")
    assert bare.trace_attributes() == {"traceparent": request_parent, "tracestate": "vendor=1"}
    carried = parse_delivery({**base, "Ce-Traceparent": event_parent}, b"{}")
    assert carried.trace_attributes() == {"traceparent": event_parent}
    assert parse_delivery({k: v for k, v in base.items() if not k.startswith("Trace")}, b"{}").trace_attributes() == {}


def test_structured_cloudevent_carries_the_message_in_data() -> None:
    envelope = {"id": "e1", "source": "s#t", "type": "x", "specversion": "1.0",
                "data": {"previous_component_end": "True", "S3_bucket_desc": {"folder": "in"}}}
    delivery = parse_delivery({"content-type": "application/cloudevents+json"}, json.dumps(envelope).encode())
    message, raw = parse_step_message(delivery.body)
    assert delivery.event_id == "e1" and message.S3_bucket_desc.folder == "in" and raw == envelope["data"]


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"{not json", "body is not valid JSON"),
        (b'{"previous_component_end": "True"}', "S3_bucket_desc: Field required"),
        (b'{"previous_component_end": "maybe", "S3_bucket_desc": {"folder": "x"}}', "previous_component_end: Value error"),
        (b'["a", "list"]', "message: Input should be a valid dictionary"),
    ],
)
def test_bad_bodies_get_a_reason_naming_the_fault(body: bytes, expected: str) -> None:
    with pytest.raises(BadDelivery, match=expected):
        parse_step_message(body)


# ---- preprocessing ------------------------------------------------------------------------------------------------


def _patch_bands() -> dict[str, np.ndarray]:
    return sentinel2.read_bigearthnet_patch(SAMPLE_PATCHES / sample_patch_names()[0])


def test_stack_follows_the_card_band_order_and_normalisation() -> None:
    bands = _patch_bands()
    reversed_card = CARD.model_copy(update={
        "bands": CARD.bands[::-1], "band_mean": CARD.band_mean[::-1], "band_std": CARD.band_std[::-1]
    })
    forward = sentinel2_input(bands, CARD)
    backward = sentinel2_input(bands, reversed_card)
    np.testing.assert_array_equal(forward, backward[::-1])
    b04 = CARD.bands.index("B04")
    expected = (bands["B04"].astype(np.float32) - np.float32(CARD.band_mean[b04])) / np.float32(CARD.band_std[b04])
    np.testing.assert_allclose(forward[b04], expected, rtol=1e-6)


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda b: b.pop("B8A"), "missing band B8A"),
        (lambda b: b.__setitem__("B11", np.ones((50, 50), np.uint16)), "band B11 has shape (50, 50)"),
        (lambda b: b.__setitem__("B02", np.full((120, 120), np.nan, np.float32)), "B02 has non-finite"),
        (lambda b: b.__setitem__("B03", np.zeros((120, 120), np.uint16)), "B03 holds no data"),
    ],
)
def test_invalid_patches_are_refused_with_a_reason(change, reason: str) -> None:  # type: ignore[no-untyped-def]
    bands = _patch_bands()
    change(bands)
    with pytest.raises(PatchInvalid, match=reason.replace("(", r"\(").replace(")", r"\)")):
        sentinel2_input(bands, CARD)


def test_era5_stack_inputs_are_checked() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 2, 12, 12), dtype=np.int16))
    with pytest.raises(PatchInvalid, match="dtype int16"):
        read_era5_stack(buffer.getvalue(), "a.npy")
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 4, 12, 12), dtype=np.float32))
    with pytest.raises(PatchInvalid, match=r"shape \[2, 4, 12, 12\]"):
        read_era5_stack(buffer.getvalue(), "a.npy")
    with pytest.raises(PatchInvalid, match="not a readable GeoTIFF"):
        read_era5_stack(b"not a tiff", "a.tif")
    with pytest.raises(PatchInvalid, match="neither"):
        read_era5_stack(b"", "a.nc")


def test_units_are_named_once() -> None:
    unit = InputUnit(0, "in/a.tar.gz", "a")
    assert unit.expected_items is None and unit.name == "a"


def test_batches_fill_up_while_the_server_is_busy() -> None:
    release = threading.Event()
    sent: list[int] = []

    def infer(rows: np.ndarray) -> np.ndarray:
        sent.append(rows.shape[0])
        release.wait(5)  # the server holds the first request until every item has been read
        return rows

    def items():  # type: ignore[no-untyped-def]
        yield from _works([1] * 9)
        release.set()

    results = list(batched_inference(items(), infer, batch_size=4, in_flight=3))

    # The first row goes out at once (nothing outstanding); the rest wait for full batches while it runs.
    assert len(results) == 9 and sent[0] == 1 and sent[1:3] == [4, 4] and sum(sent) == 9
