import json
import logging

from services.core.logging import JsonFormatter, TextFormatter, redact


def _record(**extra):
    record = logging.LogRecord("svc", logging.INFO, __file__, 1, "step %s", ("done",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_extras_and_redact_secrets():
    record = _record(model="m", aws_secret_access_key="s3cr3t", config={"S3": {"password": "pw", "bucket": "b"}})
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "step done" and line["model"] == "m" and line["level"] == "INFO"
    assert line["aws_secret_access_key"] == "***"
    assert line["config"] == {"S3": {"password": "***", "bucket": "b"}}
    assert "s3cr3t" not in json.dumps(line) and "pw" not in json.dumps(line["config"]["S3"]["password"])


def test_text_format_redacts_too():
    text = TextFormatter().format(_record(token="abc123", topic="t"))
    assert "abc123" not in text and "topic=t" in text


def test_redact_keeps_non_secret_structure():
    assert redact([{"a": 1, "api_token": "x"}]) == [{"a": 1, "api_token": "***"}]
