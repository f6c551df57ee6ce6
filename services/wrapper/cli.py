"""``eo-wrapper``: one Wrapper deployment (one task) serving KafkaSource deliveries over HTTP.

    eo-wrapper --task ssl-features --inference-url 127.0.0.1:8001 --store local --store-root step-configs

Every option also reads ``EOML_WRAPPER_<OPTION>`` from the environment (the command line wins); see
``services/wrapper/settings.py`` and the README. SIGTERM/SIGINT: refuse new deliveries (503), let running steps
finish (at most ``--shutdown-timeout-s``), then cut off the rest (503, never a failure: Kafka redelivers them and
the next pod writes the same bytes), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Sequence

from pydantic import ValidationError

from services.core.logging import configure_logging
from services.core.tracing import configure_tracing
from services.core.auth import verifier_from_settings
from services.wrapper.http_app import create_http_app
from services.wrapper.pipeline import StepRuntime
from services.wrapper.service import ShutdownReport, WrapperService, make_store
from services.wrapper.settings import TASK_NAMES, WrapperSettings

log = logging.getLogger("services.wrapper")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_USAGE = 2

# (option, type, help); each maps to the settings field of the same name.
_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("http-host", str, "listen address (default 0.0.0.0)"),
    ("http-port", int, "listen port (default 8080)"),
    ("inference-url", str, "inference server host:port (default 127.0.0.1:8001, gRPC)"),
    ("model-name", str, "served model (default: the task's; task generic: any model whose card says task generic)"),
    ("model-version", str, "model version (default: newest ready)"),
    ("batch-size", int, "rows per request (default: the model's max_batch_size)"),
    ("requests-in-flight", int, "inference requests in flight per step (default 3)"),
    ("store-root", str, "directory of the local step configuration store"),
    ("namespace", str, "namespace of the step configurations (default: the pod's)"),
    ("bootstrap-servers", str, "Kafka bootstrap servers (default: the step configuration's)"),
    ("notify-topic", str, "notification topic (default monitoring.notify)"),
    ("dlq-topic", str, "dead-letter topic (default <Topics.in>.dlq)"),
    ("workers", int, "steps processed at once, = Knative containerConcurrency (default 2); more wait for one"),
    ("worker-wait-s", float, "how long a delivery waits for a worker before 503 (default 300: timeoutSeconds)"),
    ("max-orphaned-runs", int, "runs whose caller hung up that go on outside --workers (default: --workers)"),
    ("infer-retry-max-s", float, "how long a step waits out an unavailable inference server (default 900)"),
    ("result-prefix", str, "bucket prefix of the results (default: the task's production prefix)"),
    ("shutdown-timeout-s", float, "how long shutdown waits for running steps before cutting them off (default 120)"),
    ("spool-dir", str, "where results are spooled before upload (default: the temp dir)"),
    ("quicklook-max-side", int, "longest side of a quicklook PNG in pixels (default 512)"),
    ("cloud-mask-model", str, "served model a workflow's cloud_filter measures with (default s2-cloud-mask)"),
    ("log-level", str, "DEBUG, INFO, WARNING or ERROR"),
    ("log-format", str, "json or text"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eo-wrapper",
        description="Wrapper service: step messages in, Sentinel-2 preprocessing, batched inference, results out.",
        argument_default=argparse.SUPPRESS,  # unset options fall back to EOML_WRAPPER_* and defaults
    )
    parser.add_argument("--task", choices=TASK_NAMES)
    parser.add_argument("--inference-protocol", choices=["grpc", "http"])
    parser.add_argument("--store", choices=["local", "kubernetes"])
    parser.add_argument("--quicklooks", choices=["auto", "always", "never"],
                        help="PNG quicklooks of Sentinel-2 steps (default auto: generic per-pixel models)")
    for option, kind, help_text in _OPTIONS:
        parser.add_argument(f"--{option}", type=kind, help=help_text, metavar=option.split("-")[-1].upper())
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> WrapperSettings:
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if "log_level" in given:
        given["log_level"] = given["log_level"].upper()
    try:
        return WrapperSettings(**given)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: {problem['msg']}"
            for problem in error.errors(include_input=False, include_url=False)
        )
        parser.exit(EXIT_BAD_USAGE, f"eo-wrapper: invalid settings: {problems}\n")
        raise  # unreachable: parser.exit raises SystemExit


async def serve(settings: WrapperSettings) -> ShutdownReport:
    from aiohttp import web

    service = WrapperService(StepRuntime.from_settings(settings), make_store(settings))
    runner = web.AppRunner(create_http_app(service, verifier_from_settings()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port, reuse_address=True)
    await site.start()
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else settings.http_port
    log.info("wrapper listening", extra={"task": settings.task, "address": settings.http_host, "port": port,
                                         "inference_url": settings.inference_url, "store": settings.store})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stop requested: finishing running steps")
    # New deliveries get 503 while running steps finish (or are cut off); then the listener closes.
    report = await loop.run_in_executor(None, service.shutdown, settings.shutdown_timeout_s)
    await runner.cleanup()
    log.info("wrapper stopped", extra={"finished": report.finished, "cut_off": report.cut_off,
                                       "abandoned": report.abandoned})
    return report


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    # Spans get ids (the trace context handed on names them); exported only when OTEL_* variables ask for it.
    configure_tracing(f"eoml-wrapper-{settings.task}")
    try:
        report = asyncio.run(serve(settings))
    except Exception:
        log.exception("wrapper failed")
        return EXIT_FAILED
    if report.abandoned:
        # Steps still run in worker threads that cannot be stopped from outside, and the interpreter would wait
        # for them at exit. Their deliveries were answered 503, so Kafka redelivers them and the redelivery writes
        # the same bytes into the same run folder: leave now, as the kubelet's SIGKILL would a little later.
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
