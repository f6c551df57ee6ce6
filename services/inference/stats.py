"""Per-model-version statistics with Triton's meaning, served as its ``ModelStatistics`` proto.

- ``inference_count``: inferences performed, counting every batch row of a request;
  ``execution_count``: model executions (one per batch the scheduler formed).
- ``inference_stats``: per request. ``success``/``fail``: count and total end-to-end duration in the
  engine; ``queue``: time waiting for an instance; ``compute_input/infer/output``: the durations of the
  batch the request ran in (input concatenation, ``session.run``, output split).
- ``batch_stats``: per batch size, per execution, the same three compute durations.

Counters only grow (they survive a model reload), so Prometheus sees no resets. All updates
happen on the event-loop thread: no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2

# Failure reasons as Triton labels ``nv_inference_request_failure{reason=...}``.
FAILURE_REJECTED = "REJECTED"  # queue full
FAILURE_CANCELED = "CANCELED"  # the client went away
FAILURE_BACKEND = "BACKEND"  # ONNX Runtime failed
FAILURE_OTHER = "OTHER"  # invalid request and the rest
FAILURE_REASONS = (FAILURE_REJECTED, FAILURE_CANCELED, FAILURE_BACKEND, FAILURE_OTHER)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_proto(self) -> service_pb2.StatisticDuration:
        return service_pb2.StatisticDuration(count=self.count, ns=self.ns)


@dataclass(slots=True)
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class RequestTimings:
    """How long one request spent where (nanoseconds) and the size of the batch it ran in."""

    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    batch_size: int = 0


@dataclass(slots=True)
class VersionStatistics:
    model_name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))

    def record_success(self, rows: int, duration_ns: int, timings: RequestTimings) -> None:
        self.success.add(duration_ns)
        self.queue.add(timings.queue_ns)
        self.compute_input.add(timings.compute_input_ns)
        self.compute_infer.add(timings.compute_infer_ns)
        self.compute_output.add(timings.compute_output_ns)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, duration_ns: int, reason: str = FAILURE_OTHER) -> None:
        self.fail.add(duration_ns)
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        durations = self.batches.get(batch_size)
        if durations is None:
            durations = self.batches[batch_size] = BatchDurations()
        durations.compute_input.add(input_ns)
        durations.compute_infer.add(infer_ns)
        durations.compute_output.add(output_ns)

    def to_proto(self) -> service_pb2.ModelStatistics:
        return service_pb2.ModelStatistics(
            name=self.model_name,
            version=self.version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=service_pb2.InferStatistics(
                success=self.success.to_proto(),
                fail=self.fail.to_proto(),
                queue=self.queue.to_proto(),
                compute_input=self.compute_input.to_proto(),
                compute_infer=self.compute_infer.to_proto(),
                compute_output=self.compute_output.to_proto(),
                cache_hit=service_pb2.StatisticDuration(),
                cache_miss=service_pb2.StatisticDuration(),
            ),
            batch_stats=[
                service_pb2.InferBatchStatistics(
                    batch_size=size,
                    compute_input=durations.compute_input.to_proto(),
                    compute_infer=durations.compute_infer.to_proto(),
                    compute_output=durations.compute_output.to_proto(),
                )
                for size, durations in sorted(self.batches.items())
            ],
        )
