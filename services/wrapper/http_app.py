"""The Wrapper's HTTP shell: KafkaSource deliveries in, health out. All work happens in ``WrapperService``.

- ``POST /{config_name}`` (the production sink URI, ``/json-config-<topic>...``) and ``POST /``: a CloudEvent whose
  data is a step message. The answer comes when the step's outcome is durable (``WrapperService.deliver``):
  200 SUCCESS (results, manifest, next-step message, announced marker), 200 ``duplicate`` (announced or failed
  before), 200 CRITICAL (a permanent failure, on record: dead-letter record, CRITICAL, failed marker), 200 IGNORED;
  503 + Retry-After for what a redelivery may get past (inference unavailable past its bound, S3 or Kafka failing,
  no worker free within ``WORKER_WAIT_S``, shutting down, store unavailable); a delivery that finds every worker
  taken waits for one (queue-proxy admitted it), and a caller that hangs up leaves its run running, orphaned
  (``admission.py``); 404 no such step configuration (not written yet: retried);
  400 when the delivery names no step, or its body is no step message and the step is unknown.
- ``GET /metrics``: Prometheus metrics (``services/core/metrics.py``), open like the health endpoints.
- ``GET /healthz``: the process is alive. ``GET /readyz``: 200 while deliveries are taken (not during shutdown).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from typing import Any, Callable

from aiohttp import web

from services.core.auth import Verifier, auth_middleware
from services.core.metrics import delivery_counter, metrics_route
from services.wrapper.admission import Admitted, Refusal, Refused
from services.wrapper.service import (
    BadDelivery,
    DeliveryResult,
    WrapperService,
    config_name_of,
    parse_delivery,
    parse_step_message,
)

log = logging.getLogger(__name__)

SERVICE_KEY: web.AppKey[WrapperService] = web.AppKey("wrapper_service", WrapperService)
MAX_BODY_BYTES = 1024 * 1024  # a step message is a few hundred bytes
RETRY_AFTER_S = "5"
CALLER_CHECK_S = 0.2  # how often a waiting handler looks whether its caller is still connected


def _json(http_status: int, **body: Any) -> web.Response:
    return web.json_response(body, status=http_status)


def _retry_later(detail: str, **body: Any) -> web.Response:
    return web.json_response({"error": detail, **body}, status=503, headers={"Retry-After": RETRY_AFTER_S})


class Waited(enum.Enum):
    """How waiting for a run ended without its outcome."""

    CALLER_GONE = "caller gone"  # the caller hung up (queue-proxy's 504): the run went on without it
    NO_WORKER = "no worker"  # it never got a worker within WORKER_WAIT_S


async def receive(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    path_name = request.match_info.get("config_name", "")
    body = await request.read()
    try:
        delivery = parse_delivery(request.headers, body)
        config_name = config_name_of(delivery, path_name)
    except BadDelivery as error:
        log.warning("delivery refused", extra={"reason": str(error), "path": request.path})
        return _json(400, error=str(error))
    run_key = f"{config_name}/{delivery.run_id(config_name)}" if delivery.event_id else ""
    work: Callable[[], DeliveryResult]
    try:
        message, raw = parse_step_message(delivery.body)
    except BadDelivery as error:
        reason = str(error)
        log.warning("bad step message", extra={"reason": reason, "config_name": config_name,
                                                "event_id": delivery.event_id})
        work = lambda: service.deliver_unreadable(config_name, delivery, reason)  # noqa: E731
    else:
        work = lambda: service.deliver(config_name, delivery, message, raw)  # noqa: E731
    admission = service.submit(run_key or f"{config_name}/{id(request)}", work)
    if isinstance(admission, Refused):
        log.warning("delivery refused", extra={"config_name": config_name, "event_id": delivery.event_id,
                                               "reason": admission.reason.value,
                                               **dataclasses.asdict(service.state())})
        return _retry_later(f"wrapper {admission.reason.value}: retry later")
    try:
        waited = await await_run(request, service, admission)
    except Exception as error:  # noqa: BLE001 - a bug in the Wrapper: Kafka redelivers
        return _json(500, error=f"internal error: {type(error).__name__}")
    if waited is Waited.CALLER_GONE:
        log.info("caller gone before the outcome", extra={"config_name": config_name, "event_id": delivery.event_id})
        return _json(499, error="caller gone")  # nobody reads it
    if waited is Waited.NO_WORKER:
        log.warning("delivery refused: no worker within the wait", extra={"config_name": config_name,
                                                                         "event_id": delivery.event_id})
        return _retry_later(f"wrapper {Refusal.BUSY.value}: no worker free within WORKER_WAIT_S, retry later")
    return answer(waited, config_name, delivery.event_id)


async def await_run(request: web.Request, service: WrapperService,
                    admission: Admitted[DeliveryResult]) -> DeliveryResult | Waited:
    """The run's outcome, unless the caller hangs up first or no worker frees up within ``worker_wait_s``.

    A caller that hung up leaves the run (``RunAdmission.leave``): the run goes on, orphaned, and its worker is free
    for the next delivery queue-proxy sends. aiohttp does not cancel a handler when its client goes away, so the
    connection is looked at between waits."""
    outcome = asyncio.wrap_future(admission.outcome)
    loop = asyncio.get_running_loop()
    worker_deadline = loop.time() + service.settings.worker_wait_s
    try:
        while True:
            done, _ = await asyncio.wait({outcome}, timeout=CALLER_CHECK_S)
            if done:
                return outcome.result()
            if request.transport is None or request.transport.is_closing():
                service.admission.leave(admission)
                return Waited.CALLER_GONE
            if loop.time() >= worker_deadline and service.admission.withdraw_if_waiting(admission):
                return Waited.NO_WORKER
    except asyncio.CancelledError:  # the server is closing the connection
        service.admission.leave(admission)
        raise


def answer(result: DeliveryResult, config_name: str, event_id: str) -> web.Response:
    """The HTTP answer for a delivery's result (the mapping the module docstring states)."""
    common = {"config_name": config_name, "event_id": event_id}
    if result.status == "DUPLICATE":
        return _json(200, status=result.status, duplicate=True, earlier=result.earlier, folder=result.run_folder,
                     **common)
    if result.status in ("SUCCESS", "CRITICAL", "IGNORED"):
        return _json(200, status=result.status, folder=result.run_folder, reason=result.detail, **common)
    if result.status == "not_found":
        return _json(404, error=result.detail, **common)
    if result.status == "invalid":
        return _json(400, error=result.detail, **common)
    log.warning("delivery to be retried", extra={**common, "reason": result.detail})
    return _retry_later(result.detail or "retry later", **common)


async def healthz(request: web.Request) -> web.Response:
    return _json(200, live=True, **dataclasses.asdict(request.app[SERVICE_KEY].state()))


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    ready, reason = service.readiness()
    return _json(200 if ready else 503, ready=ready, reason=reason, model=service.runtime.model_client.model_name)


def create_http_app(service: WrapperService, verifier: Verifier | None = None) -> web.Application:
    # ``verifier``: every POST needs a valid sender token (services/core/auth.py); health stays open.
    # The delivery counter first (outermost): it counts the auth middleware's refusals too.
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[
        delivery_counter(service.metrics), *([auth_middleware(verifier)] if verifier is not None else [])])
    app[SERVICE_KEY] = service
    app.router.add_get("/metrics", metrics_route(service.metrics.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/", receive)
    app.router.add_post("/{config_name}", receive)
    return app
