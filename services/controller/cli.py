"""``eo-controller``: the ML Controller.

    eo-controller serve     # KafkaSource deliveries of system.ML over HTTP (Knative)
    eo-controller consume   # reads system.ML itself (no Knative); same HTTP status API

Settings come from ``EOML_CONTROLLER_*`` (see ``settings.ControllerSettings``); the options below override them.
SIGTERM/SIGINT: stop consuming, stop the local dispatchers (their offsets stay committed), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any, Sequence

from aiohttp import web
from pydantic import ValidationError

from services.core.auth import verifier_from_settings
from services.core.kafka import ensure_topics, producer_config
from services.core.logging import configure_logging
from services.core.step_config import LocalStepConfigStore, StepConfigStore

from .api_retry import ApiRetryPolicy, RetryingApi
from .consumer_positions import ConsumerPositions
from .dead_letters import DeadLetterWriter, KafkaDeadLetterWriter
from .http_app import READY_KEY, build_app
from .notifications import KafkaNotifier
from .reconciler import SourceDriver, WorkflowController
from .settings import ControllerSettings
from .system_consumer import SystemTopicConsumer, max_poll_interval_ms
from .wiring import DeliveryPolicy, dead_letter_topic

log = logging.getLogger("services.controller")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_BAD_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eo-controller", description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("mode", choices=["serve", "consume"],
                        help="serve: receive system.ML over HTTP; consume: read system.ML from Kafka")
    parser.add_argument("--http-host")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--bootstrap-servers")
    parser.add_argument("--system-topic")
    parser.add_argument("--source-driver", choices=["kubernetes", "local"])
    parser.add_argument("--store", choices=["kubernetes", "local"])
    parser.add_argument("--store-root")
    parser.add_argument("--wrapper-urls", type=json.loads, help='JSON: {"ServiceName": "http://host:port"}')
    parser.add_argument("--log-level")
    parser.add_argument("--log-format", choices=["json", "text"])
    return parser


def build_store(settings: ControllerSettings) -> StepConfigStore:
    if settings.store == "local":
        return LocalStepConfigStore(settings.store_root)
    from services.core.step_config_k8s import KubernetesStepConfigStore, kubernetes_core_api

    from .kubernetes_driver import kubernetes_custom_api

    host = settings.kubernetes_host or None  # steps found through their KafkaSources: no list on ConfigMaps
    policy = api_retry_policy(settings)
    return KubernetesStepConfigStore(RetryingApi(kubernetes_core_api(host), policy),
                                     RetryingApi(kubernetes_custom_api(host), policy))


def build_driver(settings: ControllerSettings) -> SourceDriver:
    if settings.source_driver == "local":
        from .local_event_plane import LocalSourceDriver

        return LocalSourceDriver(settings)
    from .kubernetes_driver import KubernetesSourceDriver, kubernetes_custom_api

    return KubernetesSourceDriver(RetryingApi(kubernetes_custom_api(settings.kubernetes_host or None),
                                              api_retry_policy(settings)), settings)


def api_retry_policy(settings: ControllerSettings) -> ApiRetryPolicy:
    return ApiRetryPolicy(attempts=settings.kubernetes_api_attempts, backoff_s=settings.kubernetes_api_backoff_s,
                          request_timeout_s=settings.kubernetes_api_timeout_s)


def build_controller(settings: ControllerSettings, producer: Any = None,
                     dead_letter_writer: DeadLetterWriter | None = None) -> WorkflowController:
    """The controller with its store and driver; with a Kafka ``producer``, failures are notified on
    ``monitoring.notify``, dead-letter topics are created when steps are wired, and consumer positions survive a
    source's deletion; with ``dead_letter_writer``, refused messages are kept on ``<system topic>.dlq``."""
    notifier = KafkaNotifier(settings.bootstrap_servers, settings.notify_topic, producer) if producer else None
    create_topics = ensure_topics if settings.create_dead_letter_topics else None
    positions = ConsumerPositions(settings.bootstrap_servers) if producer else None
    return WorkflowController(build_store(settings), build_driver(settings), settings.bootstrap_servers,
                              namespaces=settings.workflow_namespaces, notifier=notifier,
                              create_topics=create_topics, dead_letter_suffix=settings.dead_letter_suffix,
                              positions=positions, dead_letter_writer=dead_letter_writer,
                              system_topic=settings.system_topic)


async def run(settings: ControllerSettings, mode: str) -> int:
    from confluent_kafka import Producer

    # Notifications, dead-letter records (KafkaSources dead-letter to ``/dead-letter``; ``consume`` mode writes
    # ``system.ML.dlq`` itself): one producer, configured like every client (TLS/SASL from EOML_KAFKA_*).
    producer = Producer(producer_config(settings.bootstrap_servers, **{"message.timeout.ms": 30000}))
    dead_letter_writer = KafkaDeadLetterWriter(settings.bootstrap_servers, settings.dead_letter_write_timeout_s)
    controller = build_controller(settings, producer, dead_letter_writer)
    app = build_app(controller, dead_letter_writer if settings.source_driver == "kubernetes" else None,
                    settings.dead_letter_suffix, verifier_from_settings())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.http_port
    log.info("controller listening", extra={"mode": mode, "http_port": port, "driver": settings.source_driver,
                                            "store": settings.store})

    consumer: SystemTopicConsumer | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        resumed = await resume_until_done(controller, stop)
        if resumed is None:
            return EXIT_OK
        log.info("controller ready", extra={"resumed_steps": resumed})
        if mode == "consume":
            # The topic it reads (so that the subscription finds it at once) and its own dead-letter topic,
            # created explicitly (on Kubernetes the chart's KafkaTopics do it).
            own_topics = [settings.system_topic, dead_letter_topic(settings.system_topic, settings.dead_letter_suffix)]
            try:
                await asyncio.to_thread(ensure_topics, settings.bootstrap_servers, own_topics)
            except RuntimeError as error:  # the subscription finds the topic at a metadata refresh
                log.warning("topics not created", extra={"topics": own_topics, "error": str(error)})
            consumer = SystemTopicConsumer(controller, settings.bootstrap_servers, settings.system_topic,
                                           settings.consumer_group, DeliveryPolicy.from_settings(settings),
                                           dead_letter_writer=dead_letter_writer,
                                           max_poll_interval_ms=max_poll_interval_ms(settings)).start()
        app[READY_KEY].set()
        await stop.wait()
    finally:
        log.info("controller stopping")
        if consumer is not None:
            await asyncio.to_thread(consumer.stop)
        await asyncio.to_thread(controller.driver.close)
        await runner.cleanup()
        producer.flush(10)
        dead_letter_writer.producer.flush(10)
    return EXIT_OK


async def resume_until_done(controller: WorkflowController, stop: asyncio.Event,
                            retry_s: float = 5.0) -> int | None:
    """Load the stored steps; while the store is unreachable, keep trying (not ready, but alive and answering).
    None when asked to stop first."""
    while not stop.is_set():
        try:
            return await asyncio.to_thread(controller.resume)
        except Exception as error:  # noqa: BLE001 - e.g. the API server is not reachable yet
            log.error("stored steps not loaded yet, retrying", extra={"error": f"{type(error).__name__}: {error}"[:300],
                                                                      "retry_s": retry_s})
            try:
                await asyncio.wait_for(stop.wait(), retry_s)
            except asyncio.TimeoutError:
                pass
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    mode = arguments.pop("mode")
    try:
        settings = ControllerSettings(**arguments)
    except ValidationError as error:
        print(f"eo-controller: invalid settings: {error}", file=sys.stderr)
        return EXIT_BAD_USAGE
    configure_logging(settings.log_level, settings.log_format)
    if mode == "consume":
        try:
            max_poll_interval_ms(settings)
        except ValueError as error:
            print(f"eo-controller: invalid settings: {error}", file=sys.stderr)
            return EXIT_BAD_USAGE
    try:
        return asyncio.run(run(settings, mode))
    except OSError as error:
        log.error("controller failed to start", extra={"error": str(error)})
        return EXIT_STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(main())
