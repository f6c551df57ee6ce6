"""Triton-compatible HTTP/REST frontend (KServe v2 + Triton's extensions) over the engine: aiohttp routes.

Each handler reads the body, decodes it with :mod:`services.inference.http_codec` (large JSON in helper processes:
:mod:`services.inference.http_decode_pool`), calls one engine method and encodes the answer; errors become
``{"error": "..."}`` bodies with Triton's status codes. Nothing is logged per request at INFO.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

from aiohttp import web

from . import triton_json
from .http_codec import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    SUPPORTED_ENCODINGS,
    EncodedInferResponse,
    HttpStatusError,
    decode_infer_request,
    decompress_body,
    encode_infer_response,
    model_metadata_json,
    normalized_encoding,
    parse_index_request,
    parse_load_request,
    parse_unload_request,
    repository_index_json,
    server_metadata_json,
    starts_compressed,
)
from .http_decode_pool import OFFLOAD_DECODE_BYTES, JsonDecodePool
from .protocol import InferenceServerError, InferResponse, invalid
from .restricted_api import Restriction, http_refusal

if TYPE_CHECKING:
    from .engine import InferenceEngine

log = logging.getLogger(__name__)

# True when the server runs with aiohttp's automatic request decompression off (see start_site):
# bodies then arrive as sent and decompress_body inflates them, so a corrupt stream gets its 400
# on a connection that stays open. With aiohttp inflating (its default), the 400 closes the
# connection, because aiohttp's decoder cannot resynchronise on the rest of the stream.
RAW_REQUEST_BODIES = web.AppKey("raw_request_bodies", bool)


# --------------------------------------------------------------------------------------------
# aiohttp application
# --------------------------------------------------------------------------------------------


def json_response(document: Any, status: int = 200) -> web.Response:
    return web.Response(body=triton_json.dumps(document), status=status, content_type=JSON_CONTENT_TYPE)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=triton_json.dumps({"error": message}), status=status, content_type=JSON_CONTENT_TYPE, headers=headers
    )


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure becomes ``{"error": "<message>"}`` with Triton's status; the server keeps serving."""
    try:
        return await handler(request)
    except InferenceServerError as error:
        return error_response(error.kind.http_status, error.message)
    except HttpStatusError as error:
        response = error_response(error.status, error.message)
        if error.close_connection:
            response.force_close()
        return response
    except web.HTTPMethodNotAllowed as error:
        allowed = ", ".join(sorted(error.allowed_methods))
        return error_response(
            405, f"method {request.method} is not allowed on {request.path} (allowed: {allowed})",
            headers={"Allow": ",".join(sorted(error.allowed_methods))},
        )
    except web.HTTPNotFound:
        return error_response(404, f"no endpoint at {request.method} {request.path}")
    except web.HTTPRequestEntityTooLarge as error:
        return error_response(413, error.text or "request body too large")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, error.text or error.reason)
    except Exception as error:  # noqa: BLE001 - the server must answer and keep serving
        log.exception("unhandled error in HTTP handler", extra={"method": request.method, "path": request.path})
        return error_response(500, f"internal error: {type(error).__name__}: {error}")


class _HttpFrontend:
    """Handlers: each decodes, calls one engine method, encodes. No request state is kept here."""

    def __init__(self, engine: InferenceEngine, max_body_bytes: int) -> None:
        self._engine = engine
        self._max_body_bytes = max_body_bytes
        self._decode_pool = JsonDecodePool()  # its processes start on the first large JSON request

    async def close(self, app: web.Application) -> None:
        self._decode_pool.close()

    async def _read_body(self, request: web.Request) -> bytes:
        # Refuse by Content-Length before reading anything; aiohttp's own limit (client_max_size)
        # covers chunked and compressed bodies while they are read.
        encoding = request.headers.get("Content-Encoding")
        declared = request.content_length
        if declared is not None and declared > self._max_body_bytes:
            raise HttpStatusError(
                413, f"request body of {declared} bytes exceeds the server's limit of {self._max_body_bytes} bytes"
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpStatusError(
                413, f"request body exceeds the server's limit of {self._max_body_bytes} bytes"
            ) from None
        except Exception as error:  # aiohttp raises its own types for bad gzip/deflate or broken chunking
            if isinstance(error, web.HTTPException):
                raise
            # The stream is broken past this point: mark the body finished so aiohttp does not try
            # to drain it after the response (it would fail again and log a traceback), and close.
            request.content.feed_eof()
            detail = f" (Content-Encoding: {encoding})" if encoding else ""
            # aiohttp wraps its parser error ("400, message: ..."); the cause carries the plain text.
            cause = error.__cause__ or error
            message = str(getattr(cause, "message", "") or error).replace("\n", " ").strip()
            raise HttpStatusError(
                400, f"could not read the request body{detail}: {message}", close_connection=True
            ) from None
        if encoding is None:
            return body
        # Refused only now: the body had to be read for the connection to stay usable.
        if normalized_encoding(encoding) not in SUPPORTED_ENCODINGS:
            raise invalid(f"unsupported Content-Encoding '{encoding}' (supported: gzip, deflate)")
        if not request.app[RAW_REQUEST_BODIES] and not starts_compressed(body, encoding):
            return body  # aiohttp already inflated it
        return decompress_body(body, encoding, self._max_body_bytes)

    # --- health and metadata ---------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._engine.is_live() else 400)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._engine.is_ready() else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(server_metadata_json(self._engine.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        return json_response(model_metadata_json(self._engine.model_metadata(name, version)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        return web.Response(status=200 if self._engine.model_ready(name, version) else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        return json_response(triton_json.model_config_to_json_dict(self._engine.model_config(name, version)))

    async def model_statistics(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        return json_response(triton_json.statistics_to_json_dict(self._engine.model_statistics(name, version)))

    # --- model repository ------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        ready_only = parse_index_request(await self._read_body(request))
        return json_response(repository_index_json(self._engine.repository_index(ready_only=ready_only)))

    async def load(self, request: web.Request) -> web.Response:
        model_name = request.match_info["model"]
        config_json = parse_load_request(model_name, await self._read_body(request))
        await self._engine.load_model(model_name, config_json)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        model_name = request.match_info["model"]
        unload_dependents = parse_unload_request(model_name, await self._read_body(request))
        await self._engine.unload_model(model_name, unload_dependents=unload_dependents)
        return web.Response(status=200)

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        header_length = request.headers.get(HEADER_LENGTH)
        declared = request.content_length
        # Parsing megabytes of JSON holds the GIL for a second or more (json and numpy do not release it),
        # which would stall /v2/health/* past a probe's timeout: a helper process decodes large JSON.
        if (header_length is None and "Content-Encoding" not in request.headers and declared is not None
                and OFFLOAD_DECODE_BYTES < declared <= self._max_body_bytes):
            # A large plain JSON body goes into shared memory a chunk at a time: not even a copy of it is
            # made on the event loop's thread.
            decoded = await self._decode_pool.decode_stream(
                request.content.iter_any(), name, version, declared, request.content.feed_eof
            )
        else:
            body = await self._read_body(request)
            if _json_bytes(body, header_length) > OFFLOAD_DECODE_BYTES:
                decoded = await self._decode_pool.decode(name, version, body, header_length)
            else:
                decoded = decode_infer_request(name, version, body, header_length)

        def encode(response: InferResponse) -> EncodedInferResponse:
            return encode_infer_response(response, decoded.request.outputs, decoded.binary_output_default)

        encoded = await self._engine.infer(decoded.request, encode)
        if encoded.header_length is None:
            return web.Response(body=encoded.body, content_type=JSON_CONTENT_TYPE)
        return web.Response(
            body=encoded.body,
            content_type=BINARY_CONTENT_TYPE,
            headers={HEADER_LENGTH: str(encoded.header_length)},
        )


def _json_bytes(body: bytes, header_length: str | None) -> int:
    """How much of ``body`` is JSON to parse (the header; all of it without the binary extension)."""
    if header_length is None:
        return len(body)
    try:
        return min(len(body), max(0, int(header_length)))
    except ValueError:
        return 0  # decode_infer_request answers the bad header at once


def _model_and_version(request: web.Request) -> tuple[str, str]:
    match_info = request.match_info
    version = match_info.get("version", "")
    if version and not version.isdigit():
        # Triton's routes take only digits as a version: anything else is no endpoint at all (404).
        raise HttpStatusError(404, f"no endpoint at {request.method} {request.path}: a model version is an integer")
    return match_info.get("model", ""), version


def restriction_middleware(restrictions: Mapping[str, Restriction]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Triton's ``--http-restricted-api``: 403 unless the request carries the group's header, before
    anything of the request is read."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        refusal = http_refusal(restrictions, request.method, request.path, request.headers)
        if refusal is not None:
            return error_response(403, refusal)
        return await handler(request)

    return middleware


def create_http_app(
    engine: InferenceEngine, *, max_body_bytes: int, restrictions: Mapping[str, Restriction] | None = None
) -> web.Application:
    """The Triton-compatible HTTP/REST application over ``engine``.

    ``max_body_bytes`` bounds every request body (413 beyond it), checked against Content-Length
    before reading and while reading chunked or compressed bodies. ``restrictions``: API group ->
    required header (:func:`services.inference.restricted_api.parse_restrictions`).
    """
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    frontend = _HttpFrontend(engine, max_body_bytes)
    middlewares = [error_middleware]
    if restrictions:
        middlewares.append(restriction_middleware(dict(restrictions)))
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[RAW_REQUEST_BODIES] = False
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    routes = [
        web.get("/v2/health/live", frontend.live),
        web.get("/v2/health/ready", frontend.ready),
        web.get("/v2", frontend.server_metadata),
        # Before the model routes: a model can be named "stats" only through /v2/models/stats/stats.
        web.get("/v2/models/stats", frontend.model_statistics),
        web.post("/v2/repository/index", frontend.repository_index),
        web.post("/v2/repository/models/{model}/load", frontend.load),
        web.post("/v2/repository/models/{model}/unload", frontend.unload),
    ]
    for prefix in (model, versioned):
        routes += [
            web.get(prefix, frontend.model_metadata),
            web.get(prefix + "/ready", frontend.model_ready),
            web.get(prefix + "/config", frontend.model_config),
            web.get(prefix + "/stats", frontend.model_statistics),
            web.post(prefix + "/infer", frontend.infer),
        ]
    app.add_routes(routes)
    app.on_cleanup.append(frontend.close)
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; returns the runner to clean up (``await runner.cleanup()``).

    No access log (one INFO line per request costs more than the tiny models' inference), and
    request bodies reach the handlers as sent (``auto_decompress=False``), so
    :func:`decompress_body` answers corrupt gzip / deflate data with a 400 and the keep-alive
    connection stays usable. aiohttp keeps TCP_NODELAY on the accepted sockets either way.
    """
    if RAW_REQUEST_BODIES in app:
        app[RAW_REQUEST_BODIES] = True
    runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
