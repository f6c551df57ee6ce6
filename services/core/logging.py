"""Structured logging on the standard library: one JSON object per line, secrets redacted.

Use ``log.info("model loaded", extra={"model": name, "version": v})``: every ``extra`` field
becomes a top-level key of the JSON line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from .redaction import LOG_MASK, REDACTED, is_credential_key

__all__ = ["REDACTED", "JsonFormatter", "TextFormatter", "configure_logging", "redact"]

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)


def redact(value: Any) -> Any:
    """A copy of ``value`` for a log line: credential-like keys, the credential values this process has read
    (``services.core.redaction.LOG_MASK``) and signed URL parameters masked."""
    return LOG_MASK.redactor().redact(value)


def _extra(key: str, value: Any) -> Any:
    return REDACTED if is_credential_key(key) else redact(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = _extra(key, value)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {k: _extra(k, v) for k, v in record.__dict__.items()
                  if k not in _STANDARD_ATTRS and not k.startswith("_")}
        line = f"{record.levelname:<7} {record.name}: {redact(record.getMessage())}"
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Configure the root logger once per process (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
