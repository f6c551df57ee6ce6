"""``create_grpc_server`` / ``bind_grpc_server`` in-process over the real engine and the real aio client.

These cover what the subprocess tests cannot reach: the server factory's own arguments, and a bug
inside the engine (an unexpected exception) answered as INTERNAL while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from services.inference.engine import InferenceEngine
from services.inference.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, bind_grpc_server, create_grpc_server
from services.inference.protocol import InferRequest
from tiny_models import build_tiny_repository

BUG_REQUEST_ID = "trigger-engine-bug"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EngineWithABug(InferenceEngine):
    """The real engine, except that one request id hits a bug (an exception no code path expects)."""

    async def infer(self, request: InferRequest, encode=None):  # noqa: ANN001 - the engine's signature
        if request.id == BUG_REQUEST_ID:
            raise ZeroDivisionError("simulated bug in the engine")
        return await super().infer(request, encode)


def fp32_input(array: np.ndarray) -> aioclient.InferInput:
    infer_input = aioclient.InferInput("INPUT0", list(array.shape), "FP32")
    infer_input.set_data_from_numpy(array)
    return infer_input


async def serve(
    repository: Path,
    scenario: Callable[[str], Awaitable[None]],
    *,
    engine_class: type[InferenceEngine] = InferenceEngine,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> None:
    engine = engine_class([repository])
    await engine.start()
    bound = bind_grpc_server(engine, address="127.0.0.1:0", max_message_bytes=max_message_bytes)
    await bound.server.start()
    try:
        await scenario(f"127.0.0.1:{bound.port}")
    finally:
        await bound.server.stop(grace=1.0)
        await engine.stop()


@pytest.fixture
def simple_repository(tmp_path: Path) -> Path:
    return build_tiny_repository(tmp_path / "model_repository", ["simple", "string_identity"])


def test_unexpected_engine_exception_is_internal_and_the_server_keeps_serving(simple_repository: Path) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)

    async def scenario(url: str) -> None:
        async with aioclient.InferenceServerClient(url) as client:
            with pytest.raises(InferenceServerException) as info:
                await client.infer("simple", [fp32_input(x)], request_id=BUG_REQUEST_ID)
            assert info.value.status() == "StatusCode.INTERNAL"
            assert "ZeroDivisionError" in info.value.message() and "simulated bug" in info.value.message()
            result = await client.infer("simple", [fp32_input(x)])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)

            async def requests() -> AsyncIterator[dict]:
                for request_id in ("before", BUG_REQUEST_ID, "after"):
                    yield {"model_name": "simple", "inputs": [fp32_input(x)], "request_id": request_id}

            answers = []
            async for answer in client.stream_infer(requests()):
                answers.append(answer)
                if len(answers) == 3:
                    break
            (before, no_error), (no_result, bug), (after, no_error_after) = answers
            assert no_error is None and no_error_after is None and no_result is None
            assert before.get_response().id == "before" and after.get_response().id == "after"
            assert "ZeroDivisionError" in bug.message()
            np.testing.assert_array_equal(after.as_numpy("OUTPUT0"), x + 1)

    asyncio.run(serve(simple_repository, scenario, engine_class=EngineWithABug))


def test_create_grpc_server_binds_the_given_address_and_is_not_started(simple_repository: Path) -> None:
    async def scenario() -> None:
        engine = InferenceEngine([simple_repository])
        await engine.start()
        port = free_port()
        server = create_grpc_server(engine, address=f"127.0.0.1:{port}", max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
        try:
            async with aioclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
                # Not started yet: nothing answers (the caller decides when to start).
                with pytest.raises(InferenceServerException):
                    await client.is_server_live(client_timeout=0.5)
            await server.start()
            async with aioclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
                assert await client.is_server_live() is True
                assert await client.is_model_ready("simple") is True
        finally:
            await server.stop(grace=1.0)
            await engine.stop()

    asyncio.run(scenario())


def test_message_size_limit_is_configurable(simple_repository: Path) -> None:
    """A limit above the default lets a message over 64 MiB through, in both directions."""
    payload = b"s" * (DEFAULT_MAX_MESSAGE_BYTES + 1024)
    words = np.array([[payload]], dtype=np.object_)

    async def scenario(url: str) -> None:
        async with aioclient.InferenceServerClient(url) as client:
            infer_input = aioclient.InferInput("INPUT0", [1, 1], "BYTES")
            infer_input.set_data_from_numpy(words)
            result = await client.infer("string_identity", [infer_input])
            assert result.as_numpy("OUTPUT0")[0, 0] == payload

    asyncio.run(serve(simple_repository, scenario, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES * 2))
