"""A small real HTTP app to stand behind the queue-proxy model in tests: ``POST /work?sleep=S&n=N`` sleeps S seconds
and answers 200; every start/end (with the app's concurrency, and whether the client was still there) and a
SIGTERM go to the JSON-lines file ``$APP_EVENTS`` with wall-clock times. ``IGNORE_SIGTERM=1``: SIGTERM is logged and
ignored (a step that does not stop, so the grace period's SIGKILL is what ends it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

from aiohttp import web

EVENTS = os.environ.get("APP_EVENTS", os.devnull)
state = {"active": 0}


def record(**event: object) -> None:
    with open(EVENTS, "a") as file:
        file.write(json.dumps({"t": time.time(), **event}) + "\n")


async def work(request: web.Request) -> web.Response:
    n = request.query.get("n", "")
    state["active"] += 1
    record(event="start", n=n, active=state["active"])
    try:
        await asyncio.sleep(float(request.query.get("sleep", "0")))
    finally:
        state["active"] -= 1
        gone = request.transport is None or request.transport.is_closing()
        record(event="end", n=n, client_gone=gone)
    return web.json_response({"n": n})


async def ready(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def main() -> None:
    app = web.Application()
    app.router.add_post("/work", work)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(os.environ.get("APP_PORT") or os.environ["EOML_WRAPPER_HTTP_PORT"])).start()
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def sigterm() -> None:
        record(event="sigterm")
        if os.environ.get("IGNORE_SIGTERM") != "1":
            stopped.set()

    loop.add_signal_handler(signal.SIGTERM, sigterm)
    await stopped.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
