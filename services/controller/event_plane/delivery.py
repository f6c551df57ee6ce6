"""One record's delivery to its sink: HTTP attempts, retries and backoff exactly as the KafkaSource's delivery spec.

Modelled on eventing-kafka-broker (EKB): ``control-plane/pkg/reconciler/source/source.go`` (defaults retry 10,
exponential, ``PT0.3S``, timeout ``PT600S`` apply only when ``spec.delivery`` is omitted; a present spec with no
``retry`` means 0 retries), ``data-plane/dispatcher/.../impl/http/WebClientCloudEventSender.java``
(``isRetryableStatusCode``: 5xx, 404, 408, 409, 429; non-HTTP failures such as timeouts and refused connections are
retried too; ``computeRetryPolicy``: exponential ``delay * 2^n`` for retry n, linear ``delay * n``, no wait at all
when the delay is 0, no cap, no ``Retry-After``; per-attempt timeout = ``delivery.timeout``, ``DEFAULT_TIMEOUT_MS``
600 s when unset). Any other 4xx goes straight to the dead-letter sink.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import urlsplit

from services.core.auth import outgoing_auth_headers

from ..wiring import DeliveryPolicy
from .cloudevents import KafkaRecord, record_cloudevent

log = logging.getLogger(__name__)

RESPONSE_EXCERPT = 300
# source.go: what a KafkaSource without ``spec.delivery`` gets.
DEFAULT_RETRY = 10
DEFAULT_BACKOFF_DELAY_S = 0.3
DEFAULT_TIMEOUT_S = 600.0
_ISO_SECONDS = re.compile(r"^PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?$")


def iso8601_duration_s(value: str) -> float:
    """``PT1H2M3.5S`` style durations (what ``backoffDelay``/``timeout`` hold) in seconds."""
    match = _ISO_SECONDS.match(value.strip().upper())
    if not match or not any(match.groups()):
        raise ValueError(f"not an ISO-8601 duration of hours/minutes/seconds: {value!r}")
    hours, minutes, seconds = (float(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def delivery_policy_from_spec(delivery: Mapping[str, Any] | None, dead_letter_suffix: str = ".dlq") -> DeliveryPolicy:
    """The retry policy a KafkaSource's ``spec.delivery`` gives its dispatcher (source.go +
    WebClientCloudEventSender.java): the defaults only when the whole ``delivery`` is absent; inside a present
    one, no ``retry`` = 0 retries, no ``backoffDelay`` = no wait, no ``timeout`` = 600 s."""
    if delivery is None:
        return DeliveryPolicy(retry=DEFAULT_RETRY, backoff_policy="exponential",
                              backoff_delay_s=DEFAULT_BACKOFF_DELAY_S, timeout_s=DEFAULT_TIMEOUT_S,
                              dead_letter_suffix=dead_letter_suffix)
    delay = delivery.get("backoffDelay")
    timeout = delivery.get("timeout")
    return DeliveryPolicy(retry=int(delivery.get("retry") or 0),
                          backoff_policy="linear" if delivery.get("backoffPolicy") == "linear" else "exponential",
                          backoff_delay_s=iso8601_duration_s(delay) if delay else 0.0,
                          timeout_s=iso8601_duration_s(timeout) if timeout else DEFAULT_TIMEOUT_S,
                          dead_letter_suffix=dead_letter_suffix)


@dataclass(frozen=True)
class DispatchTarget:
    """Where one step's records come from and go to."""

    namespace: str
    config_name: str
    workflow_name: str
    topic_in: str
    consumer_group: str
    source_name: str
    url: str
    service_name: str = ""


@dataclass
class DeliveryResult:
    delivered: bool
    attempts: int
    status: int | None = None
    error: str = ""
    stopped: bool = False  # the dispatcher was stopped while retrying: neither delivered nor dead-lettered
    event_id: str = ""


class HttpPoster(Protocol):
    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]: ...


def http_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
    """One POST on a fresh connection (status, body); connection problems raise ``OSError``/``HTTPException``."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                                                               timeout=timeout_s)
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        # The local platform's shared token (EOML_AUTH_MODE=token), as Knative's dispatcher sends its OIDC token.
        connection.request("POST", path, body=body, headers={**headers, **outgoing_auth_headers()})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def is_retryable_status(status: int) -> bool:
    """WebClientCloudEventSender.isRetryableStatusCode: server errors, 404 (the sink or its configuration is not
    there yet), 408, 409 and 429. Any other 4xx says the event itself is wrong: it is dead-lettered at once."""
    return status >= 500 or status in (404, 408, 409, 429)


def deliver_record(record: KafkaRecord, target: DispatchTarget, policy: DeliveryPolicy,
                   post: HttpPoster = http_post, stop: threading.Event | None = None,
                   on_failed_attempt: Callable[[DeliveryResult], None] | None = None) -> DeliveryResult:
    """POST one record until a 2xx, at most ``policy.attempts`` times, backing off between retryable failures."""
    event = record_cloudevent(record, target.namespace, target.source_name)
    headers = event.http_headers()
    stop = stop or threading.Event()
    result = DeliveryResult(delivered=False, attempts=0, event_id=event.id)
    for attempt in range(1, policy.attempts + 1):
        if attempt > 1 and stop.wait(policy.backoff_s(attempt - 1)):
            result.stopped = True
            return result
        if stop.is_set():
            result.stopped = True
            return result
        result.attempts = attempt
        try:
            status, answer = post(target.url, event.data, headers, policy.timeout_s)
        except (OSError, http.client.HTTPException) as error:
            result.status, result.error = None, f"{type(error).__name__}: {error}"[:RESPONSE_EXCERPT]
        else:
            result.status = status
            if 200 <= status < 300:
                result.delivered, result.error = True, ""
                return result
            result.error = f"HTTP {status}: {answer[:RESPONSE_EXCERPT].decode('utf-8', errors='replace')}"
            if not is_retryable_status(status):
                if on_failed_attempt is not None:
                    on_failed_attempt(result)
                log.warning("delivery refused, not retried", extra={
                    "config_name": target.config_name, "topic": record.topic, "partition": record.partition,
                    "offset": record.offset, "error": result.error})
                return result
        if on_failed_attempt is not None:
            on_failed_attempt(result)
        log.warning("delivery failed", extra={"config_name": target.config_name, "topic": record.topic,
                                              "partition": record.partition, "offset": record.offset,
                                              "attempt": attempt, "of": policy.attempts, "error": result.error})
    return result
