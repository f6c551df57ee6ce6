"""Large JSON infer requests decoded in helper processes, so the event loop keeps answering meanwhile.

Parsing megabytes of JSON holds the GIL for a second or more (json and numpy do not release it), which would stall
``/v2/health/*`` past a probe's timeout. A request whose JSON exceeds :data:`OFFLOAD_DECODE_BYTES` is decoded by
:func:`services.inference.http_codec.decode_infer_request` in a pool of spawned, niced processes; a large plain
JSON body goes there through shared memory, written a chunk at a time as it arrives, so not even one copy of it is
made on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import shared_memory
from typing import AsyncIterable, Callable

from .http_codec import DecodedInferRequest, HttpStatusError, decode_infer_request
from .protocol import InferenceServerError, invalid

# JSON headers longer than this are decoded in a helper process.
OFFLOAD_DECODE_BYTES = 1024 * 1024
DECODER_PROCESSES = 2
DECODER_NICENESS = 10


def decode_shared_infer_request(model_name: str, model_version: str, shared_name: str, size: int) -> DecodedInferRequest:
    """:func:`decode_infer_request` of a JSON body the server wrote into shared memory (runs in a helper process)."""
    # The server creates and unlinks the block. (Attaching registers it again with the resource tracker this
    # process shares with the server: a no-op for a name the tracker already holds.)
    shared = shared_memory.SharedMemory(name=shared_name)
    try:
        body = bytes(shared.buf[:size])
    finally:
        shared.close()
    return decode_infer_request(model_name, model_version, body, None)


class JsonDecodePool:
    """The helper processes, started on the first large request and stopped with the application."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: forking a process that runs ONNX Runtime and gRPC threads is not safe. Niced: the event loop
            # (health probes, small requests) wins the CPU over a large decode.
            self._pool = ProcessPoolExecutor(
                DECODER_PROCESSES, mp_context=multiprocessing.get_context("spawn"),
                initializer=os.nice, initargs=(DECODER_NICENESS,),
            )
        return self._pool

    async def decode(self, name: str, version: str, body: bytes, header_length: str | None) -> DecodedInferRequest:
        """:func:`decode_infer_request` of a body already read."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), decode_infer_request, name, version, body, header_length)

    async def decode_stream(self, chunks: AsyncIterable[bytes], name: str, version: str, size: int,
                            on_broken_stream: Callable[[], None]) -> DecodedInferRequest:
        """A plain JSON body of exactly ``size`` bytes (its Content-Length), streamed into shared memory and
        decoded there. ``on_broken_stream`` is called when reading fails (the transport marks the body done)."""
        shared = shared_memory.SharedMemory(create=True, size=size)
        try:
            offset = 0
            try:
                async for chunk in chunks:
                    end = offset + len(chunk)
                    if end > size:
                        raise invalid(f"request body is longer than its Content-Length of {size} bytes")
                    shared.buf[offset:end] = chunk
                    offset = end
            except (InferenceServerError, asyncio.CancelledError):
                raise
            except Exception as error:  # a broken stream: answered as a body that cannot be read
                on_broken_stream()
                raise HttpStatusError(400, f"could not read the request body: {error}", close_connection=True) from None
            if offset != size:
                raise invalid(f"request body ended after {offset} of its Content-Length of {size} bytes")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor(), decode_shared_infer_request, name, version, shared.name, size
            )
        finally:
            shared.close()
            shared.unlink()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

