"""The controller's HTTP shell (aiohttp): KafkaSource deliveries in, status out.

- ``POST /``: a ``system.ML`` record as a KafkaSource delivers it (binary-mode CloudEvent or raw JSON; structured
  mode accepted too). HTTP 200 with production's answers (``Received message And valid`` / ``There was a problem
  ignoring``; a message refused for good is kept on ``system.ML.dlq`` first, credentials removed); 503 only when the
  Kubernetes API, the store or that dead-letter write failed, so that the source retries (bounded).
- ``POST /dead-letter``: the dead-letter sink of the KafkaSources this controller creates and of its own source on
  ``system.ML``: the record goes to ``<topic>.dlq`` (topic read from ``ce-source``) as a JSON error record in the
  Wrapper's dead-letter shape (secret-looking keys redacted), with the CloudEvent attributes (Knative's error
  extensions included) as Kafka headers. A dead-lettered workflow message is also reported CRITICAL on
  ``monitoring.notify``.
- ``GET /workflows``, ``GET /workflows/{name}``: workflows, their steps and state.
- ``GET /metrics``: Prometheus metrics (``services/core/metrics.py``), unauthenticated like the health endpoints.
- ``GET /healthz`` (alive), ``GET /readyz`` (stored steps loaded).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from aiohttp import web

from services.core.auth import Verifier, auth_middleware
from services.core.kafka import encode_json
from services.core.metrics import metrics_route

from .dead_letters import KafkaDeadLetterWriter
from .reconciler import WorkflowController
from .wiring import dead_letter_topic, delivery_dead_letter_record, topic_from_cloudevent_source

log = logging.getLogger(__name__)

CONTROLLER_KEY = web.AppKey("controller", WorkflowController)
READY_KEY = web.AppKey("ready", asyncio.Event)
MAX_BODY_BYTES = 1024 * 1024  # a workflow message is well under 1 KiB
RETRY_ANSWER = {"msg": "Temporary problem, retry later"}

DeadLetterWriter = Callable[[str, bytes, list[tuple[str, bytes]]], None]


async def post_record(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER_KEY]
    body = await request.read()
    # The Kubernetes client is synchronous: keep the event loop free for health checks and status reads.
    result = await asyncio.to_thread(controller.handle, body, request.headers.get("Content-Type", ""),
                                     request.headers.get("ce-id", ""))
    if result.retryable:
        return web.json_response(RETRY_ANSWER, status=503)
    return web.json_response(result.answer)


def dead_letter_handler(write: DeadLetterWriter, suffix: str) -> Callable[[web.Request], Any]:
    async def post_dead_letter(request: web.Request) -> web.Response:
        controller = request.app[CONTROLLER_KEY]
        topic = topic_from_cloudevent_source(request.headers.get("ce-source", ""))
        if topic is None:
            return web.json_response({"error": "ce-source does not name a Kafka topic (...#<topic>)"}, status=400)
        body = await request.read()
        record, headers = knative_dead_letter_record(topic, body, request.headers)
        target = dead_letter_topic(topic, suffix)
        try:
            await asyncio.to_thread(write, target, encode_json(record), headers)
        except Exception as error:
            controller.metrics.kafka_errors.inc()
            log.error("dead-letter write failed", extra={"dead_letter_topic": target, "error": str(error)[:300]})
            return web.json_response({"error": "dead-letter write failed"}, status=503)
        controller.metrics.dead_letters.inc()
        log.error("record dead-lettered", extra={"dead_letter_topic": target, "event_id": record["event_id"],
                                                 "config_name": record["config_name"], "reason": record["reason"]})
        if isinstance(record["input_message"], dict) and "workflow_status" in record["input_message"]:
            await asyncio.to_thread(controller.report_given_up, body, f"written to {target}")
        return web.json_response({"dead_letter_topic": target}, status=202)

    return post_dead_letter


def knative_dead_letter_record(topic: str, body: bytes, headers: Mapping[str, str]
                               ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """A KafkaSource's dead-lettered event -> the dead-letter record (Wrapper shape) and Kafka headers.

    Knative adds ``knativeerrordest`` (the sink URL: its last path segment is the step's config name),
    ``knativeerrorcode`` (the last HTTP status) and ``knativeerrordata`` (the last answer, base64)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    destination = lowered.get("ce-knativeerrordest", "")
    code = lowered.get("ce-knativeerrorcode", "")
    data = lowered.get("ce-knativeerrordata", "")
    try:
        answer = base64.b64decode(data, validate=True).decode("utf-8", errors="replace") if data else ""
    except (binascii.Error, ValueError):
        answer = data
    path = urlsplit(destination).path.rstrip("/")
    host = urlsplit(destination).hostname or ""
    record = delivery_dead_letter_record(
        f"not delivered to the Wrapper after every retry: HTTP {code or '?'} {answer[:300]}".strip(),
        config_name=path.rsplit("/", 1)[-1] if path else "", service_name=host.split(".")[0],
        workflow_name="", topic_in=topic, event_id=lowered.get("ce-id", ""), value=body, attempts=0,
        http_status=int(code) if code.isdigit() else None)
    record["delivery"].pop("attempts")
    kafka_headers = [(name[3:], value.encode("utf-8")) for name, value in lowered.items() if name.startswith("ce-")]
    return record, kafka_headers


async def list_workflows(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER_KEY]
    return web.json_response({"workflows": await asyncio.to_thread(controller.workflows)})


async def get_workflow(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER_KEY]
    name = request.match_info["name"]
    status = await asyncio.to_thread(controller.workflow_status, name)
    if status is None:
        return web.json_response({"error": f"no workflow {name!r}"}, status=404)
    return web.json_response(status)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[READY_KEY].is_set():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "starting"}, status=503)


def build_app(controller: WorkflowController, dead_letter_writer: DeadLetterWriter | None = None,
              dead_letter_suffix: str = ".dlq", verifier: Verifier | None = None) -> web.Application:
    # ``verifier``: POST / and POST /dead-letter need a valid sender token (services/core/auth.py).
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[auth_middleware(verifier)] if verifier is not None else [])
    app[CONTROLLER_KEY] = controller
    app[READY_KEY] = asyncio.Event()
    app.router.add_post("/", post_record)
    if dead_letter_writer is not None:
        app.router.add_post("/dead-letter", dead_letter_handler(dead_letter_writer, dead_letter_suffix))
    app.router.add_get("/workflows", list_workflows)
    app.router.add_get("/workflows/{name}", get_workflow)
    app.router.add_get("/metrics", metrics_route(controller.metrics.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def kafka_dead_letter_writer(producer: Any, timeout_s: float = 30.0) -> DeadLetterWriter:
    """Writes a dead-lettered record with ``producer`` and waits (bounded) for the broker's acknowledgement."""
    return KafkaDeadLetterWriter("", timeout_s, producer)
