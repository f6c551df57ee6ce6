"""Helpers for the controller tests: aiohttp apps on loopback in a background thread, a recording HTTP receiver
(stands in for a Wrapper where the test is about delivery), workflow messages, Kafka reads."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

TEST_ACCESS_KEY_ID = "AKIATESTCONTROLLER01"
TEST_SECRET_ACCESS_KEY = "controller-test-secret-value-0123456789"


def workflow_message(workflow: str, topic_in: str, topic_out: str = "", status: str = "published",
                     service: str = "ssl-features", namespace: str = "uc1", **extra: Any) -> dict[str, Any]:
    """A DSL workflow message exactly as contracts section 1 shows it."""
    message: dict[str, Any] = {
        "workflow_name": workflow,
        "workflow_status": status,
        "Topics": {"in": topic_in, "out": topic_out or f"{topic_in}-out"},
        "ML": {"ServiceName": service, "Namespace": namespace, "component_name": f"{service} component"},
        "S3_bucket": {"aws_access_key_id": TEST_ACCESS_KEY_ID, "aws_secret_access_key": TEST_SECRET_ACCESS_KEY,
                      "s3-bucket-name": "workflow-bucket", "region_name": "us-east-1",
                      "endpoint_url": "http://127.0.0.1:9"},
    }
    message.update(extra)
    return message


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class ThreadedApp:
    """An aiohttp application served on 127.0.0.1:<free port> from a background thread's event loop."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ThreadedApp":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            runner = web.AppRunner(self.app, access_log=None)
            try:
                self.loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, "127.0.0.1", 0)
                self.loop.run_until_complete(site.start())
                self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            except BaseException as error:  # surface start-up failures in the test thread
                failure.append(error)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(runner.cleanup())
            self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "ThreadedApp":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RecordingReceiver:
    """A real HTTP receiver that records every POST and answers what ``responder`` says (default 202)."""

    responder: Callable[[ReceivedRequest, int], int] = lambda _req, _n: 202
    requests: list[ReceivedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadedApp | None = None

    def app(self) -> web.Application:
        async def receive(request: web.Request) -> web.Response:
            body = await request.read()
            received = ReceivedRequest(request.path, {k.lower(): v for k, v in request.headers.items()}, body, 0)
            with self._lock:
                received.status = self.responder(received, len(self.requests))
                self.requests.append(received)
            return web.json_response({"status": received.status}, status=received.status)

        app = web.Application()
        app.router.add_post("/{tail:.*}", receive)
        return app

    def start(self) -> "RecordingReceiver":
        self.server = ThreadedApp(self.app()).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def snapshot(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self.requests)

    def wait_for(self, predicate: Callable[[list[ReceivedRequest]], bool],
                 timeout_s: float = 60.0) -> list[ReceivedRequest]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = self.snapshot()
            if predicate(seen):
                return seen
            time.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout_s} s; received {len(self.snapshot())} request(s)")


def read_topic(bootstrap_servers: str, topic: str, count: int, timeout_s: float = 60.0) -> list[Any]:
    """``count`` records of ``topic`` from the beginning (a fresh consumer group), as confluent Messages."""
    from confluent_kafka import Consumer

    from services.controller.local_event_plane import ensure_topic
    from services.core.kafka import consumer_config

    ensure_topic(bootstrap_servers, topic)
    consumer = Consumer(consumer_config(bootstrap_servers, unique("reader"),
                                        **{"topic.metadata.refresh.interval.ms": 1000}))
    consumer.subscribe([topic])
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                records.append(message)
    finally:
        consumer.close()
    return records


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")
