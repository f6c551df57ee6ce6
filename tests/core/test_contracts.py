import json

import pytest
from pydantic import ValidationError

from services.core.contracts import Notification, StepMessage, WorkflowMessage

PRODUCTION_WORKFLOW = {
    "workflow_name": "uc5-test",
    "workflow_status": "published",
    "Topics": {"in": "wf.uc5.ml-in", "out": "wf.uc5.next"},
    "ML": {"ServiceName": "cfactor", "Namespace": "uc5", "component_name": "C-factor regressor"},
    "S3_bucket": {
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": "very-secret-value",
        "s3-bucket-name": "workflow-bucket",
        "region_name": "us-east-1",
        "endpoint_url": "https://s3.example.org",
    },
}


def test_workflow_message_accepts_production_fields_and_hides_credentials():
    message = WorkflowMessage.model_validate(PRODUCTION_WORKFLOW)
    assert message.Topics.in_ == "wf.uc5.ml-in"
    assert message.S3_bucket.bucket_name == "workflow-bucket"
    assert message.S3_bucket.reveal_credentials()["aws_secret_access_key"] == "very-secret-value"
    rendered = repr(message) + str(message) + message.model_dump_json()
    assert "very-secret-value" not in rendered
    assert "AKIAEXAMPLE" not in rendered


def test_stop_message_needs_only_the_documented_fields():
    message = WorkflowMessage.model_validate(
        {"workflow_status": "stopping", "workflow_name": "w", "Topics": {"in": "t"}, "ML": {"Namespace": "ns"}}
    )
    assert message.S3_bucket is None


@pytest.mark.parametrize(
    "broken",
    [
        {k: v for k, v in PRODUCTION_WORKFLOW.items() if k != "Topics"},
        {**PRODUCTION_WORKFLOW, "Topics": {"out": "x"}},
        {**PRODUCTION_WORKFLOW, "ML": {"ServiceName": "x"}},
    ],
)
def test_workflow_message_rejects_missing_required_fields(broken):
    with pytest.raises(ValidationError):
        WorkflowMessage.model_validate(broken)


def test_step_message_round_trips_in_production_shape():
    raw = {"previous_component_end": "True", "S3_bucket_desc": {"folder": "in/a", "filename": ""},
           "meta_information": {"k": [1, 2]}}
    message = StepMessage.model_validate(raw)
    assert message.previous_component_end is True
    assert json.loads(message.model_dump_json(by_alias=True)) == raw
    assert StepMessage.model_validate({**raw, "previous_component_end": True}).previous_component_end is True
    with pytest.raises(ValidationError):
        StepMessage.model_validate({**raw, "previous_component_end": "yes"})


def test_notification_truncates_long_descriptions():
    note = Notification(component_name="c", workflow_name="w", status="INFO", description="x" * 500)
    assert len(note.description) == 300
    with pytest.raises(ValidationError):
        Notification(component_name="c", workflow_name="w", status="DONE", description="")
