"""A model of Knative Serving's queue-proxy and of a pod's termination, in front of one local Wrapper process.

One ``QueueProxyPod`` = what Knative runs for one Wrapper pod: the user container (the Wrapper, a child process in
its own session) behind a queue-proxy (an asyncio reverse proxy on the port the event plane delivers to). Modelled
from upstream (knative/serving main 98e5ef9, knative/pkg 521cb33):

- ``containerConcurrency`` slots and a queue of ``10 x containerConcurrency`` in front of them: ``pkg/queue/
  breaker.go`` (``Breaker.Maybe``: a request beyond slots + queue gets 503 "pending request queue full"),
  ``pkg/queue/sharedmain/main.go`` (``queueDepth := 10 * env.ContainerConcurrency``; no breaker when CC is 0).
- The revision timeout counted from ARRIVAL, queue wait included, answered 504: ``pkg/queue/sharedmain/handlers.go``
  (the timeout handler wraps the breaker) and ``pkg/http/handler/timeout.go``. On timeout the request to the app is
  cancelled (the app sees its client go away) and the slot is released; the app's work itself is not stopped.
- The drain: ``pkg/network/handlers/drain.go`` (``Drainer``): ``Drain()`` returns after a quiet period with no NEW
  request (the timer is reset when a request arrives, not when one finishes); probes answer 503 while draining.
  Quiet period ``drainSleepDuration = 30 s`` (``main.go``); settable here so tests run in seconds.
- Pod deletion as the kubelet does it: preStop = ``GET /wait-for-drain`` (``pkg/reconciler/revision/resources/
  deploy.go``, ``handlers.go`` ``adminHandler``), then SIGTERM to the user container, SIGKILL when the grace period
  runs out; grace = ``terminationGracePeriodSeconds = timeoutSeconds`` (``deploy.go``), counted from BEFORE preStop.

Not modelled: the activator (scale from zero, its own timeout), the autoscaler, routing between several pods or
revisions (a rollout here replaces the one pod: new requests are refused, connection errors, in the gap),
``responseStartTimeoutSeconds``/``idleTimeoutSeconds``, streaming responses (the answer is buffered, which is what
the Wrapper's one-JSON answer needs), probe recognition by User-Agent (here: the paths in ``PROBE_PATHS``),
hijacked connections, and the queue-proxy container's own grace.

Run as a process: ``python -m services.local_platform.queue_proxy --port P --app-port Q
--container-concurrency N --timeout-s T [--drain-quiet-s D] [--grace-s G] -- <app argv>``. SIGUSR1 = delete the
pod as the kubelet does (drain, SIGTERM, SIGKILL at grace; the log line ``pod terminated`` reports the timings);
SIGTERM/SIGINT = a quick stop for ``eo-platform down`` (SIGTERM to the app, SIGKILL after ``--stop-timeout-s``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from pydantic import BaseModel, Field, model_validator

from services.core.logging import configure_logging

log = logging.getLogger(__name__)

CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "eo-inference-platform" / "values.yaml"
POD_TERMINATED = "pod terminated"
DRAIN_PATH = "/wait-for-drain"  # pkg/queue/constants.go RequestQueueDrainPath
PROBE_PATHS = frozenset({"/readyz", "/healthz", "/livez"})
# Knative's drainSleepDuration (pkg/queue/sharedmain/main.go); hard-coded upstream.
UPSTREAM_DRAIN_QUIET_S = 30.0
QUEUE_DEPTH_PER_SLOT = 10
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                         "transfer-encoding", "upgrade", "host", "content-length"})


class ServingSettings(BaseModel):
    """What the chart gives each Wrapper revision: ``containerConcurrency`` (= ``wrappers.workers``) and
    ``timeoutSeconds``; the pod's grace period is ``timeoutSeconds`` (deploy.go) unless set for a test."""

    container_concurrency: int = Field(ge=0)
    timeout_s: float = Field(gt=0)
    drain_quiet_s: float = Field(UPSTREAM_DRAIN_QUIET_S, ge=0)
    grace_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _grace_default(self) -> "ServingSettings":
        if self.grace_s is None:
            self.grace_s = self.timeout_s
        return self

    @property
    def queue_depth(self) -> int:
        return QUEUE_DEPTH_PER_SLOT * self.container_concurrency

    @property
    def grace_period_s(self) -> float:
        return self.grace_s if self.grace_s is not None else self.timeout_s


def chart_serving_settings(values_path: Path = CHART_VALUES, **overrides: Any) -> ServingSettings:
    """The Wrappers' serving settings as the chart renders them (``templates/wrappers.yaml``: containerConcurrency
    = ``wrappers.workers``, ``timeoutSeconds`` = ``wrappers.timeoutSeconds``), with ``overrides`` for tests."""
    wrappers = (yaml.safe_load(values_path.read_text()) or {}).get("wrappers") or {}
    chart = {"container_concurrency": int(wrappers.get("workers", 1)),
             "timeout_s": float(wrappers.get("timeoutSeconds", 300))}
    return ServingSettings(**{**chart, **{k: v for k, v in overrides.items() if v is not None}})


class QueueFull(Exception):
    """breaker.go ``ErrRequestQueueFull``: slots and queue are all taken."""


class Breaker:
    """``containerConcurrency`` slots with a bounded queue in front (breaker.go). ``capacity`` 0 = no breaker."""

    def __init__(self, capacity: int, queue_depth: int) -> None:
        self.capacity = capacity
        self.total_slots = capacity + queue_depth
        self._pending = 0
        self._slots = asyncio.Semaphore(capacity) if capacity > 0 else None
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def maybe(self):  # type: ignore[no-untyped-def]
        """Hold a slot for the body of the ``async with``; raises ``QueueFull`` at once when slots + queue are
        taken. Cancellation while queued (the timeout) leaves the queue; while holding a slot, releases it."""
        if self._slots is None:
            self.in_flight += 1
            try:
                yield
            finally:
                self.in_flight -= 1
            return
        if self._pending >= self.total_slots:
            raise QueueFull("pending request queue full")
        self._pending += 1
        try:
            async with self._slots:
                self.in_flight += 1
                try:
                    yield
                finally:
                    self.in_flight -= 1
        finally:
            self._pending -= 1


class Drainer:
    """pkg network/handlers/drain.go: ``drain()`` returns after ``quiet_s`` without a new request; every
    arrival while draining pushes the end out again (arrival, not completion)."""

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s
        self._deadline: float | None = None
        self._done: asyncio.Event | None = None

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    def request_arrived(self) -> None:
        if self._deadline is not None:
            self._deadline = time.monotonic() + self.quiet_s

    async def drain(self) -> None:
        if self._done is None:
            self._done = asyncio.Event()
            self._deadline = time.monotonic() + self.quiet_s
            asyncio.get_running_loop().create_task(self._timer())
        await self._done.wait()

    async def _timer(self) -> None:
        assert self._done is not None
        while self._deadline is not None and time.monotonic() < self._deadline:
            await asyncio.sleep(max(0.0, self._deadline - time.monotonic()))
        self._done.set()


class QueueProxy:
    """The request path of queue-proxy: drainer -> timeout (from arrival) -> breaker -> reverse proxy to the app."""

    def __init__(self, settings: ServingSettings, app_url: str) -> None:
        self.settings = settings
        self.app_url = app_url.rstrip("/")
        self.breaker = Breaker(settings.container_concurrency, settings.queue_depth)
        self.drainer = Drainer(settings.drain_quiet_s)
        self._session: ClientSession | None = None

    async def session(self) -> ClientSession:
        if self._session is None:
            # No client-side timeout: the revision timeout below is the only one, as upstream.
            self._session = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None),
                                          auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.path == DRAIN_PATH:
            await self.drainer.drain()
            return web.Response(status=200)
        if request.path in PROBE_PATHS:
            if self.drainer.draining:
                return web.Response(status=503, text="shutting down")
            return await self._forward(request, await request.read())
        self.drainer.request_arrived()
        try:
            # The timeout handler wraps the breaker: waiting for a slot counts against the revision timeout.
            return await asyncio.wait_for(self._admit_and_forward(request), self.settings.timeout_s)
        except QueueFull as error:
            return web.Response(status=503, text=str(error))
        except asyncio.TimeoutError:
            log.warning("request timeout", extra={"path": request.path, "timeout_s": self.settings.timeout_s})
            return web.Response(status=504, text="request timeout")

    async def _admit_and_forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self.breaker.maybe():
            return await self._forward(request, body)

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        session = await self.session()
        try:
            async with session.request(request.method, self.app_url + request.path_qs, headers=headers,
                                       data=body) as answer:
                payload = await answer.read()
                answer_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
                return web.Response(status=answer.status, body=payload, headers=answer_headers)
        except ClientError as error:
            # Go's ReverseProxy answers 502 when the app cannot be reached.
            return web.Response(status=502, text=f"error reverse proxying request: {type(error).__name__}")


@dataclass
class TerminationReport:
    """How one pod deletion went, in seconds from its start (the moment the grace period starts counting)."""

    drained_after_s: float
    sigterm_after_s: float
    exited_after_s: float
    killed: bool
    exit_code: int | None


def _die_with_parent() -> None:
    """In the app child: SIGKILL when the pod process dies, so that a crashed model leaves no orphan Wrapper."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class QueueProxyPod:
    """One pod: the app process plus its queue-proxy listening on ``host:port``."""

    def __init__(self, settings: ServingSettings, app_argv: Sequence[str], port: int, app_port: int,
                 host: str = "127.0.0.1", app_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.app_argv = list(app_argv)
        self.host, self.port, self.app_port = host, port, app_port
        self.app_env = app_env
        self.proxy = QueueProxy(settings, f"http://{host}:{app_port}")
        self.app: subprocess.Popen | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.app = subprocess.Popen(self.app_argv, env=self.app_env, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        server = web.Server(self.proxy.handle)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        log.info("queue-proxy started", extra={"port": self.port, "app_port": self.app_port, "app_pid": self.app.pid,
                                               "container_concurrency": self.settings.container_concurrency,
                                               "timeout_s": self.settings.timeout_s})

    async def _wait_app(self, until: float) -> bool:
        """True once the app exited; False at ``until`` (monotonic)."""
        assert self.app is not None
        while self.app.poll() is None:
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0.05)
        return True

    def _signal_app(self, signum: int) -> None:
        assert self.app is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.app.pid, signum)

    async def terminate(self) -> TerminationReport:
        """Delete the pod as the kubelet does: preStop ``/wait-for-drain`` (bounded by the grace period), SIGTERM
        to the app, SIGKILL when the grace period, counted from before preStop, runs out."""
        started = time.monotonic()
        grace_end = started + self.settings.grace_period_s
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.proxy.drainer.drain(), max(0.0, grace_end - time.monotonic()))
        drained = time.monotonic() - started
        self._signal_app(signal.SIGTERM)
        sigterm = time.monotonic() - started
        exited = await self._wait_app(grace_end)
        if not exited:
            self._signal_app(signal.SIGKILL)
            await self._wait_app(time.monotonic() + 10)
        assert self.app is not None
        report = TerminationReport(drained_after_s=round(drained, 3), sigterm_after_s=round(sigterm, 3),
                                   exited_after_s=round(time.monotonic() - started, 3), killed=not exited,
                                   exit_code=self.app.returncode)
        await self.close()
        return report

    async def stop(self, timeout_s: float) -> None:
        """Quick stop (no drain): SIGTERM to the app, SIGKILL after ``timeout_s``."""
        if self.app is not None and self.app.poll() is None:
            self._signal_app(signal.SIGTERM)
            if not await self._wait_app(time.monotonic() + timeout_s):
                self._signal_app(signal.SIGKILL)
                await self._wait_app(time.monotonic() + 10)
        await self.close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.proxy.close()


async def _serve(pod: QueueProxyPod, stop_timeout_s: float) -> int:
    loop = asyncio.get_running_loop()
    request: asyncio.Queue[str] = asyncio.Queue()
    loop.add_signal_handler(signal.SIGUSR1, request.put_nowait, "delete")
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request.put_nowait, "stop")
    await pod.start()
    assert pod.app is not None
    waiter = loop.create_task(request.get())
    while not waiter.done():
        await asyncio.wait({waiter}, timeout=0.2)
        if not waiter.done() and pod.app.poll() is not None:
            log.error("app exited", extra={"exit_code": pod.app.returncode})
            waiter.cancel()
            await pod.close()
            return 1
    if waiter.result() == "delete":
        report = await pod.terminate()
        log.info(POD_TERMINATED, extra=asdict(report))
    else:
        await pod.stop(stop_timeout_s)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app-port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--container-concurrency", type=int)
    parser.add_argument("--timeout-s", type=float)
    parser.add_argument("--drain-quiet-s", type=float)
    parser.add_argument("--grace-s", type=float)
    parser.add_argument("--stop-timeout-s", type=float, default=20.0)
    parser.add_argument("app", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    app_argv = args.app[1:] if args.app[:1] == ["--"] else args.app
    if not app_argv:
        parser.error("the app's command line goes after --")
    configure_logging(os.environ.get("EOML_LOG_LEVEL", "INFO"), os.environ.get("EOML_LOG_FORMAT", "json"))
    settings = chart_serving_settings(container_concurrency=args.container_concurrency, timeout_s=args.timeout_s,
                                      drain_quiet_s=args.drain_quiet_s, grace_s=args.grace_s)
    pod = QueueProxyPod(settings, app_argv, args.port, args.app_port, args.host)
    return asyncio.run(_serve(pod, args.stop_timeout_s))


if __name__ == "__main__":
    sys.exit(main())
