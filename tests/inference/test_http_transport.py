"""The HTTP app in-process on a real engine: socket options and the raw-body mode of ``start_site``.

The subprocess tests cover the server as ``eo-inference-server`` runs it; these reach what only the
process itself can see (the accepted socket's TCP_NODELAY) and ``start_site``'s own decompression.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import zlib
from pathlib import Path

import numpy as np
import tritonclient.http.aio as triton_http_aio
from aiohttp import web

from services.inference.engine import InferenceEngine
from services.inference.http_server import create_http_app, start_site
from tiny_models import build_tiny_repository

NODELAY_PATH = "/test/tcp-nodelay"
MAX_BODY_BYTES = 32 * 1024


async def _socket_nodelay(request: web.Request) -> web.Response:
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    value = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) if sock is not None else -1
    return web.json_response({"tcp_nodelay": value})


def _raw_post(port: int, requests: list[tuple[bytes, dict[str, str]]]) -> list[tuple[int, dict, bytes]]:
    """POSTs to /v2/models/simple/infer one after another on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    answers = []
    try:
        for body, headers in requests:
            connection.request("POST", "/v2/models/simple/infer", body=body, headers=headers)
            response = connection.getresponse()
            answers.append((response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()))
    finally:
        connection.close()
    return answers


def test_in_process_app_keeps_tcp_nodelay_and_inflates_bodies_itself(tmp_path: Path) -> None:
    repository = build_tiny_repository(tmp_path / "model_repository", ["simple"])

    async def scenario() -> None:
        engine = InferenceEngine([repository], model_control_mode="explicit", startup_models=["simple"])
        await engine.start()
        app = create_http_app(engine, max_body_bytes=MAX_BODY_BYTES)
        app.router.add_get(NODELAY_PATH, _socket_nodelay)
        runner = await start_site(app, "127.0.0.1", 0)
        try:
            port = runner.addresses[0][1]
            status, body = await asyncio.to_thread(_get, port, NODELAY_PATH)
            assert status == 200 and json.loads(body)["tcp_nodelay"] != 0, body

            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            async with triton_http_aio.InferenceServerClient(f"127.0.0.1:{port}") as client:
                for algorithm in ("gzip", "deflate", None):
                    infer_input = triton_http_aio.InferInput("INPUT0", [2, 4], "FP32")
                    infer_input.set_data_from_numpy(x)
                    result = await client.infer("simple", [infer_input], request_compression_algorithm=algorithm)
                    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)

            good = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4],
                                           "data": [1, 2, 3, 4]}]}).encode()
            answers = await asyncio.to_thread(_raw_post, port, [
                (b"not gzip at all", {"Content-Encoding": "gzip"}),
                (zlib.compress(good)[:-4], {"Content-Encoding": "deflate"}),
                (gzip.compress(b" " * (MAX_BODY_BYTES * 8) + good), {"Content-Encoding": "gzip"}),
                (gzip.compress(good), {"Content-Encoding": "gzip"}),
            ])
            corrupt, truncated, too_big, good_answer = answers
            assert corrupt[0] == 400 and "not valid gzip" in json.loads(corrupt[2])["error"]
            assert truncated[0] == 400 and "truncated deflate" in json.loads(truncated[2])["error"]
            assert too_big[0] == 413 and str(MAX_BODY_BYTES) in json.loads(too_big[2])["error"]
            # Same connection throughout: the bad bodies did not cost the client its connection.
            assert good_answer[0] == 200 and json.loads(good_answer[2])["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
        finally:
            await runner.cleanup()
            await engine.stop()

    asyncio.run(scenario())


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_compressed_bodies_work_under_any_runner_configuration(tmp_path: Path) -> None:
    """aiohttp's own decompression on (the default) or off without start_site: gzip and deflate both work."""
    repository = build_tiny_repository(tmp_path / "model_repository", ["simple"])
    good = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4],
                                   "data": [1, 2, 3, 4]}]}).encode()

    async def scenario() -> None:
        engine = InferenceEngine([repository], model_control_mode="explicit", startup_models=["simple"])
        await engine.start()
        try:
            for auto_decompress in (True, False):
                runner = web.AppRunner(create_http_app(engine, max_body_bytes=MAX_BODY_BYTES), access_log=None,
                                       auto_decompress=auto_decompress)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                try:
                    port = runner.addresses[0][1]
                    answers = await asyncio.to_thread(_raw_post, port, [
                        (gzip.compress(good), {"Content-Encoding": "gzip"}),
                        (zlib.compress(good), {"Content-Encoding": "deflate"}),
                        (good, {"Content-Encoding": "identity"}),
                    ])
                    for status, _, body in answers:
                        assert status == 200, (auto_decompress, body)
                        assert json.loads(body)["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
                finally:
                    await runner.cleanup()
        finally:
            await engine.stop()

    asyncio.run(scenario())
