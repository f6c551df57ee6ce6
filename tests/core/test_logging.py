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


def test_no_log_call_passes_an_extra_key_that_logging_reserves():
    """``extra={"process": ...}`` raises KeyError inside logging once the record is emitted (only at some levels, so
    it hides until production): scan every literal ``extra`` dict in the project's code."""
    import ast
    from pathlib import Path

    reserved = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*root.joinpath("services").rglob("*.py"), *root.joinpath("models").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict):
                        for key in keyword.value.keys:
                            if isinstance(key, ast.Constant) and key.value in reserved:
                                offenders.append(f"{path.relative_to(root)}:{node.lineno} {key.value!r}")
    assert not offenders, f"log extras overwrite LogRecord attributes: {offenders}"
