"""The Wrapper's HTTP shell: KafkaSource deliveries in, health out. All work happens in ``WrapperService``.

- ``POST /{config_name}`` (the production sink URI, ``/json-config-<topic>...``) and ``POST /``: a CloudEvent whose
  data is a step message. Answers at once: 202 accepted (journalled in the workflow bucket; processing goes on in
  the worker pool), 202 duplicate (that event is already queued, running or journalled), 400 with a reason (not a
  step message; a CRITICAL notification and a dead-letter record follow when the step is known), 404 (no such step
  configuration: the controller may not have written it yet, and Knative retries 404), 503 (pool full, shutting
  down, store unavailable, or the journal entry could not be written: retried by the source).
- ``GET /healthz``: the process is alive. ``GET /readyz``: the startup journal sweep is done, the inference server
  answers and the model is ready.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from services.core.auth import Verifier, auth_middleware

from services.wrapper.service import BadDelivery, Delivery, WrapperService, config_name_of, parse_delivery, parse_step_message

log = logging.getLogger(__name__)

SERVICE_KEY: web.AppKey[WrapperService] = web.AppKey("wrapper_service", WrapperService)
MAX_BODY_BYTES = 1024 * 1024  # a step message is a few hundred bytes
RETRY_AFTER_S = "5"


def _json(status: int, **body: Any) -> web.Response:
    return web.json_response(body, status=status)


async def _in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


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
    try:
        message, raw = parse_step_message(delivery.body)
    except BadDelivery as error:
        log.warning("bad step message", extra={"reason": str(error), "config_name": config_name,
                                                "event_id": delivery.event_id})
        # Reported on Kafka in the background: the answer does not wait for the broker.
        asyncio.get_running_loop().run_in_executor(None, _report_bad, service, config_name, delivery, str(error))
        return _json(400, error=str(error), config_name=config_name)

    acceptance = await _in_thread(service.accept, config_name, delivery, message, raw)
    if acceptance.status == "accepted":
        log.info("step accepted", extra={"config_name": config_name, "event_id": delivery.event_id})
        return _json(202, accepted=True, config_name=config_name, event_id=delivery.event_id)
    if acceptance.status == "duplicate":
        return _json(202, accepted=True, duplicate=True, config_name=config_name, event_id=delivery.event_id)
    if acceptance.status == "not_found":
        return _json(404, error=acceptance.detail, config_name=config_name)
    if acceptance.status == "invalid":
        return _json(400, error=acceptance.detail, config_name=config_name)
    if acceptance.status in ("busy", "stopping"):
        refusal = "delivery refused: worker pool full" if acceptance.status == "busy" else "delivery refused: stopping"
        log.warning(refusal,
                    extra={"config_name": config_name, "event_id": delivery.event_id, **service.state()})
        detail = f"wrapper {acceptance.status}: retry later"
    else:
        detail = acceptance.detail
    return web.json_response({"error": detail}, status=503, headers={"Retry-After": RETRY_AFTER_S})


def _report_bad(service: WrapperService, config_name: str, delivery: Delivery, reason: str) -> None:
    try:
        service.report_bad_delivery(config_name, delivery, reason)
    except Exception:  # noqa: BLE001 - the 400 answer already went out; the log keeps the rest
        log.exception("bad delivery could not be reported", extra={"config_name": config_name})


async def healthz(request: web.Request) -> web.Response:
    return _json(200, live=True, **request.app[SERVICE_KEY].state())


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    ready, reason = await _in_thread(service.readiness)
    return _json(200 if ready else 503, ready=ready, reason=reason, model=service.runtime.model_client.model_name)


def create_http_app(service: WrapperService, verifier: Verifier | None = None) -> web.Application:
    # ``verifier``: every POST needs a valid sender token (services/core/auth.py); health stays open.
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[auth_middleware(verifier)] if verifier is not None else [])
    app[SERVICE_KEY] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/", receive)
    app.router.add_post("/{config_name}", receive)
    return app
