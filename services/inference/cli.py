"""``eo-inference-server``: the Triton-compatible server (HTTP, gRPC and metrics in one event loop).

    eo-inference-server --model-repository model_repository \\
        [--model-control-mode none|poll|explicit] [--load-model NAME ...] \\
        [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]

Options mirror ``tritonserver``; every option also reads ``EOML_INFERENCE_<OPTION>`` from the
environment (the command line wins). SIGTERM/SIGINT: report not-ready, stop accepting connections,
let in-flight requests finish (at most ``--exit-timeout-secs``), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Sequence

from pydantic import ValidationError

from services.core.logging import configure_logging

from .engine import EngineStartupError, InferenceEngine
from .repository import RepositoryError
from .restricted_api import parse_restrictions
from .settings import InferenceServerSettings

log = logging.getLogger("services.inference.server")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_BAD_USAGE = 2
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eo-inference-server",
        description="Triton-compatible inference server on ONNX Runtime (KServe v2 HTTP/gRPC, Prometheus metrics).",
        argument_default=argparse.SUPPRESS,  # unset options fall back to EOML_INFERENCE_* and defaults
    )
    add = parser.add_argument
    add("--model-repository", "--model-store", dest="model_repository", action="append", metavar="PATH",
        help="model repository directory (repeatable)")
    add("--model-control-mode", choices=["none", "poll", "explicit"])
    add("--load-model", dest="load_model", action="append", metavar="NAME",
        help="model to load at start in explicit mode (repeatable; '*' = all)")
    add("--repository-poll-secs", type=float, metavar="S", help="poll interval in poll mode (default 15)")
    for name in ("http", "grpc", "metrics"):
        add(f"--allow-{name}", type=_boolean, nargs="?", const=True, metavar="BOOL",
            help=f"serve {name} (default true)")
    add("--http-address", metavar="ADDR", help="default 0.0.0.0")
    add("--grpc-address", metavar="ADDR", help="default 0.0.0.0")
    add("--metrics-address", metavar="ADDR", help="default: the HTTP address")
    add("--http-port", type=int, metavar="PORT", help="default 8000")
    add("--grpc-port", type=int, metavar="PORT", help="default 8001")
    add("--metrics-port", type=int, metavar="PORT", help="default 8002")
    add("--http-max-body-size", type=int, metavar="BYTES", help="largest HTTP request body (default 64 MiB)")
    add("--grpc-max-message-size", type=int, metavar="BYTES", help="largest gRPC message (default and minimum 64 MiB)")
    add("--log-verbose", type=int, metavar="N", help="> 0 logs at DEBUG level")
    add("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"])
    add("--log-format", choices=["json", "text"])
    add("--exit-timeout-secs", type=float, metavar="S", help="how long shutdown waits for in-flight requests (30)")
    add("--exit-on-error", type=_boolean, nargs="?", const=True, metavar="BOOL",
        help="exit when a model fails to load at start (default true)")
    add("--strict-readiness", type=_boolean, nargs="?", const=True, metavar="BOOL",
        help="ready only when every model that should be loaded is (default true)")
    add("--default-max-queue-size", type=int, metavar="N",
        help="queue bound for models whose config sets none (default 0 = unbounded, as Triton)")
    add("--http-restricted-api", dest="http_restricted_api", action="append", metavar="<API>[,<API>...]:<KEY>=<VALUE>",
        help="HTTP API groups answering only requests with header KEY: VALUE (repeatable; Triton's option)")
    add("--grpc-restricted-protocol", dest="grpc_restricted_protocol", action="append",
        metavar="<API>[,<API>...]:<KEY>=<VALUE>",
        help="gRPC API groups answering only calls with metadata triton-grpc-protocol-KEY: VALUE (repeatable)")
    add("--restricted-api-key-file", dest="restricted_api_key_file", metavar="PATH",
        help="the VALUE of restricted-API specs given as <API>[,<API>...]:<KEY> (keeps it off the command line; "
             "or EOML_INFERENCE_RESTRICTED_API_KEY)")
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> InferenceServerSettings:
    """Command line over environment over defaults; exits with status 2 and a message when invalid."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if "log_level" in given:
        given["log_level"] = given["log_level"].upper()
    try:
        return InferenceServerSettings(**given)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: {problem['msg']}"
            for problem in error.errors()
        )
        parser.exit(EXIT_BAD_USAGE, f"eo-inference-server: invalid settings: {problems}\n")
        raise  # unreachable: parser.exit raises SystemExit


def _frontend_factory(module_name: str, factory_name: str) -> Callable[..., Any] | None:
    """The frontend's factory, or None when its module is not part of this installation."""
    qualified = f"services.inference.{module_name}"
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as error:
        if error.name == qualified:
            log.warning("frontend module missing: not serving it", extra={"frontend_module": qualified})
            return None
        raise
    return getattr(module, factory_name)


def _bound_port(site: Any) -> int | None:
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    return sockets[0].getsockname()[1] if sockets else None


class ServerProcess:
    """The running frontends around one engine, and their orderly shutdown."""

    def __init__(self, settings: InferenceServerSettings, engine: InferenceEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.http_runner: Any = None
        self.metrics_runner: Any = None
        self.grpc_server: Any = None

    async def start_frontends(self) -> None:
        from aiohttp import web

        settings = self.settings
        if settings.allow_http:
            create_http_app = _frontend_factory("http_server", "create_http_app")
            if create_http_app is not None:
                app = create_http_app(
                    self.engine, max_body_bytes=settings.http_max_body_size,
                    restrictions=parse_restrictions(settings.http_restricted_api, "--http-restricted-api",
                                                    settings.restricted_api_key_value()),
                )
                self.http_runner = await self._start_site(
                    web, app, settings.http_address, settings.http_port, "http", raw_request_bodies=True
                )
        if settings.allow_grpc:
            create_grpc_server = _frontend_factory("grpc_server", "create_grpc_server")
            if create_grpc_server is not None:
                address = f"{settings.grpc_address}:{settings.grpc_port}"
                self.grpc_server = create_grpc_server(
                    self.engine, address=address, max_message_bytes=settings.grpc_max_message_size,
                    restrictions=parse_restrictions(settings.grpc_restricted_protocol, "--grpc-restricted-protocol",
                                                    settings.restricted_api_key_value()),
                )
                await self.grpc_server.start()
                log.info("grpc frontend listening", extra={"address": address})
        if settings.allow_metrics:
            create_metrics_app = _frontend_factory("metrics", "create_metrics_app")
            if create_metrics_app is not None:
                app = create_metrics_app(self.engine)
                self.metrics_runner = await self._start_site(
                    web, app, settings.effective_metrics_address, settings.metrics_port, "metrics"
                )

    async def _start_site(
        self, web: Any, app: Any, host: str, port: int, label: str, raw_request_bodies: bool = False
    ) -> Any:
        # AppRunner + TCPSite keep aiohttp's TCP_NODELAY on accepted sockets (no 40 ms Nagle stalls).
        # Raw bodies: the HTTP frontend inflates gzip/deflate itself so a corrupt body gets a 400 on a
        # connection that stays usable (see http_server.RAW_REQUEST_BODIES).
        if raw_request_bodies:
            from .http_server import RAW_REQUEST_BODIES

            app[RAW_REQUEST_BODIES] = True
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=self.settings.exit_timeout_secs,
            auto_decompress=not raw_request_bodies,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info(f"{label} frontend listening", extra={"address": host, "port": _bound_port(site) or port})
        return runner

    async def shutdown(self) -> None:
        """Not ready first, then stop accepting and drain the frontends, then the engine."""
        self.engine.begin_shutdown()
        timeout = self.settings.exit_timeout_secs
        draining: list[Awaitable[Any]] = []
        if self.http_runner is not None:
            draining.append(self.http_runner.cleanup())
        if self.grpc_server is not None:
            draining.append(self.grpc_server.stop(grace=timeout))
        if draining:
            try:
                await asyncio.wait_for(asyncio.gather(*draining, return_exceptions=True), timeout + 1.0)
            except asyncio.TimeoutError:
                log.warning("frontends did not drain in time", extra={"exit_timeout_secs": timeout})
        try:
            await asyncio.wait_for(self.engine.stop(), max(timeout, 1.0))
        except asyncio.TimeoutError:
            log.warning("in-flight inferences did not finish in time", extra={"exit_timeout_secs": timeout})
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()


async def serve(settings: InferenceServerSettings) -> int:
    engine = InferenceEngine.from_settings(settings)
    process = ServerProcess(settings, engine)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)

    # Frontends first: liveness answers while large models load; readiness waits for them.
    await process.start_frontends()
    starting = asyncio.create_task(engine.start(), name="engine-start")
    stop_waiter = asyncio.create_task(stop_requested.wait(), name="stop-signal")
    await asyncio.wait({starting, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stop requested while models were loading")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await process.shutdown()
        return EXIT_OK
    try:
        starting.result()
    except EngineStartupError as error:
        log.error("server start failed", extra={"reason": str(error)})
        stop_waiter.cancel()
        await process.shutdown()
        return EXIT_STARTUP_FAILED
    log.info("server ready", extra={"ready": engine.is_ready()})
    await stop_waiter
    log.info("stop requested: draining")
    await process.shutdown()
    log.info("server stopped")
    return EXIT_OK


def _run(coroutine_factory: Callable[[], Awaitable[int]]) -> int:
    try:
        import uvloop  # optional: a faster event loop when installed
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine_factory())


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    log.info(
        "starting inference server",
        extra={"repositories": settings.model_repository, "mode": settings.model_control_mode,
               "http": settings.allow_http, "grpc": settings.allow_grpc, "metrics": settings.allow_metrics},
    )
    try:
        return _run(lambda: serve(settings))
    except RepositoryError as error:
        log.error("server start failed", extra={"reason": str(error)})
        return EXIT_STARTUP_FAILED
    except Exception:
        log.exception("inference server failed")
        return EXIT_STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(main())
