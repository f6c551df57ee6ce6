"""Helpers for tests that drive ``InferenceEngine`` directly (no transport, no pytest-asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import numpy as np
import onnxruntime as ort

from services.inference.engine import InferenceEngine
from services.inference.protocol import InferInput, InferRequest, RequestedOutput

T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run one async test scenario in a fresh event loop."""
    return asyncio.run(scenario())


@contextlib.asynccontextmanager
async def started_engine(repository: Path, **options: Any) -> AsyncIterator[InferenceEngine]:
    engine = InferenceEngine([repository], **options)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def fp32_request(
    model: str, array: np.ndarray, *, version: str = "", input_name: str = "INPUT0",
    outputs: list[RequestedOutput] | None = None, request_id: str = "",
) -> InferRequest:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return InferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=[InferInput(input_name, "FP32", list(array.shape), array)],
        outputs=outputs or [],
    )


def onnxruntime_outputs(repository: Path, model: str, version: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference: the same ONNX file run by a plain ONNX Runtime session."""
    session = ort.InferenceSession(str(repository / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
