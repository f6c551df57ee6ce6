"""Reading system.ML records: what is accepted, what is rejected and why, and the production answers."""

from __future__ import annotations

import json

import pytest

from controller_test_support import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, workflow_message
from services.controller.messages import ANSWER_INVALID, ANSWER_VALID, MessageRejected, parse_workflow_message


def test_production_answers_are_exact() -> None:
    assert ANSWER_VALID == {"msg": "Received message And valid"}
    assert ANSWER_INVALID == {"msg": "There was a problem ignoring"}


def test_raw_json_bytes_and_mapping_parse_alike() -> None:
    message = workflow_message("wf", "topic.in_1")
    from_bytes = parse_workflow_message(json.dumps(message).encode())
    from_mapping = parse_workflow_message(message)
    assert from_bytes == from_mapping
    assert from_bytes.Topics.in_ == "topic.in_1"
    assert from_bytes.S3_bucket is not None and from_bytes.S3_bucket.bucket_name == "workflow-bucket"


def test_structured_cloudevent_data_is_the_message() -> None:
    message = workflow_message("wf", "t1")
    event = {"specversion": "1.0", "id": "x", "source": "/s", "type": "t", "data": message}
    parsed = parse_workflow_message(json.dumps(event), content_type="application/cloudevents+json; charset=utf-8")
    assert parsed.workflow_name == "wf"


def test_stop_message_needs_only_the_documented_fields() -> None:
    stop = {"workflow_status": "stopping", "workflow_name": "wf", "Topics": {"in": "t1"}, "ML": {"Namespace": "uc1"}}
    assert parse_workflow_message(stop).workflow_status == "stopping"


@pytest.mark.parametrize("body, fragment", [
    (b"", "empty body"),
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"workflow_status": "published"}).encode(), "workflow_name: Field required"),
])
def test_malformed_records_are_rejected_with_a_reason(body: bytes, fragment: str) -> None:
    with pytest.raises(MessageRejected) as rejected:
        parse_workflow_message(body)
    assert fragment in rejected.value.reason


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.pop("S3_bucket"), "needs S3_bucket"),
    (lambda m: m["ML"].update(ServiceName=""), "needs ML.ServiceName"),
    (lambda m: m["ML"].update(ServiceName="Bad_Service"), "ML.ServiceName is not"),
    (lambda m: m["ML"].update(Namespace="UC 1"), "ML.Namespace is not"),
    (lambda m: m["Topics"].update({"in": "has space"}), "Topics.in is not a legal Kafka topic"),
    (lambda m: m["Topics"].update({"in": ""}), "Topics.in"),
    (lambda m: m["S3_bucket"].pop("s3-bucket-name"), "S3_bucket.s3-bucket-name"),
])
def test_published_messages_that_cannot_be_wired_are_rejected(change, fragment: str) -> None:
    message = workflow_message("wf", "t1")
    change(message)
    with pytest.raises(MessageRejected) as rejected:
        parse_workflow_message(message)
    assert fragment in rejected.value.reason


def test_rejection_reasons_never_quote_credentials() -> None:
    message = workflow_message("wf", "t1")
    message["S3_bucket"]["aws_access_key_id"] = 12345  # wrong type: pydantic would normally echo the input
    message["S3_bucket"]["aws_secret_access_key"] = {"nested": TEST_SECRET_ACCESS_KEY}
    with pytest.raises(MessageRejected) as rejected:
        parse_workflow_message(message)
    assert "aws_secret_access_key" in rejected.value.reason
    assert TEST_SECRET_ACCESS_KEY not in rejected.value.reason and TEST_ACCESS_KEY_ID not in rejected.value.reason


def test_other_statuses_need_no_topic_checks() -> None:
    message = workflow_message("wf", "not a topic", status="draft")
    assert parse_workflow_message(message).workflow_status == "draft"
