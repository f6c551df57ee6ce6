"""The local platform for real: tansu, moto, the inference server on the exported repository, the controller in
local mode and one Wrapper per task, as ``make demo`` starts them. One stack per test module."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from services.local_platform.stack import LocalStack, StackOptions

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if not any(REPOSITORY.glob("*/[0-9]*/model.onnx")):
        pytest.skip("no exported models: run 'make models' (make test does)")
    # Ten retries from 0.25 s (exponential, ~4 min in all) ride out a Wrapper restart, and a delivery waiting for a
    # worker: locally no Knative queue-proxy holds requests beyond WORKERS, the Wrapper answers 503 (busy) and the
    # event plane retries, so 20 workflows at once on 2 workers need the budget. A refused event is not retried.
    options = StackOptions(root=tmp_path_factory.mktemp("local-platform"), repository=REPOSITORY,
                           delivery_retry=10, delivery_backoff_delay_s=0.25, progress_interval_s=1.0)
    stack = LocalStack(options)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
