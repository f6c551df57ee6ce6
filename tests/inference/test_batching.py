"""Dynamic batching through the engine, observed with Triton's statistics (no timing assertions).

The ``slow`` tiny model costs about the same per execution whatever the batch size, so requests
sent together queue behind a busy instance and get merged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from engine_harness import fp32_request, run, started_engine
from services.inference.batching import BatchingPolicy
from services.inference.model_config import parse_config_text
from services.inference.protocol import ErrorKind, InferenceServerError, InferInput, InferRequest
from tiny_models import SLOW_WIDTH, make_slow, make_string_identity


def distinct_inputs(count: int, rows: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rows, SLOW_WIDTH)).astype(np.float32) for _ in range(count)]


def batch_sizes(engine, model: str) -> dict[int, int]:
    statistics = engine.model_statistics(model)[0]
    return {b.batch_size: b.compute_infer.count for b in statistics.batch_stats}


def test_concurrent_requests_are_merged_up_to_max_batch_size(tmp_path: Path) -> None:
    make_slow(tmp_path, max_batch_size=8)
    inputs = distinct_inputs(40)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            responses = await asyncio.gather(*(engine.infer(fp32_request("slow", x)) for x in inputs))
            # Every request gets its own rows back, whatever batch it ran in.
            for x, response in zip(inputs, responses):
                np.testing.assert_array_equal(response.outputs[0].data, x)
                assert response.outputs[0].shape == [1, SLOW_WIDTH]
            statistics = engine.model_statistics("slow")[0]
            sizes = batch_sizes(engine, "slow")
            assert statistics.inference_count == len(inputs)
            assert statistics.execution_count < statistics.inference_count
            assert max(sizes) > 1 and max(sizes) <= 8
            assert sum(size * count for size, count in sizes.items()) == len(inputs)
            assert sum(sizes.values()) == statistics.execution_count
            assert statistics.inference_stats.success.count == len(inputs)

    run(scenario)


def test_requests_with_several_rows_count_their_rows_and_are_never_split(tmp_path: Path) -> None:
    make_slow(tmp_path, max_batch_size=8)
    inputs = distinct_inputs(12, rows=3, seed=1)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            responses = await asyncio.gather(*(engine.infer(fp32_request("slow", x)) for x in inputs))
            for x, response in zip(inputs, responses):
                np.testing.assert_array_equal(response.outputs[0].data, x)
            sizes = batch_sizes(engine, "slow")
            # Whole requests of 3 rows under a cap of 8: batches of 3 or 6 rows only.
            assert set(sizes) <= {3, 6} and 6 in sizes
            assert engine.model_statistics("slow")[0].inference_count == 36

    run(scenario)


def test_preferred_batch_size_is_formed_and_caps_the_batch(tmp_path: Path) -> None:
    # A long queue delay: without a preferred size the batcher would wait; with one it sends at once.
    make_slow(tmp_path, max_batch_size=8, preferred_batch_size=[4], max_queue_delay_microseconds=10_000_000)
    inputs = distinct_inputs(12, seed=2)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            responses = await asyncio.gather(*(engine.infer(fp32_request("slow", x)) for x in inputs))
            for x, response in zip(inputs, responses):
                np.testing.assert_array_equal(response.outputs[0].data, x)
            assert batch_sizes(engine, "slow") == {4: 3}

    run(scenario)


def test_queue_delay_sends_a_partial_batch_once_it_expires(tmp_path: Path) -> None:
    make_slow(tmp_path, max_batch_size=8, max_queue_delay_microseconds=50_000)
    inputs = distinct_inputs(3, seed=3)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            responses = await asyncio.gather(*(engine.infer(fp32_request("slow", x)) for x in inputs))
            for x, response in zip(inputs, responses):
                np.testing.assert_array_equal(response.outputs[0].data, x)
            # The three arrived together and waited for more; the delay expired and they ran as one batch.
            assert batch_sizes(engine, "slow") == {3: 1}

    run(scenario)


def test_full_queue_rejects_with_unavailable_while_the_others_complete(tmp_path: Path) -> None:
    make_slow(tmp_path, max_batch_size=8, max_queue_size=2)
    inputs = distinct_inputs(30, seed=4)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            results = await asyncio.gather(
                *(engine.infer(fp32_request("slow", x)) for x in inputs), return_exceptions=True
            )
            rejected = [r for r in results if isinstance(r, InferenceServerError)]
            completed = [(x, r) for x, r in zip(inputs, results) if not isinstance(r, BaseException)]
            assert len(rejected) + len(completed) == len(inputs)
            # The queue holds 2 and one batch can be running: most of 30 simultaneous requests are refused.
            assert len(rejected) >= len(inputs) - 2 - 8
            assert completed
            for error in rejected:
                assert error.kind is ErrorKind.UNAVAILABLE and error.kind.http_status == 503
                assert "queue" in error.message
            for x, response in completed:
                np.testing.assert_array_equal(response.outputs[0].data, x)
            statistics = engine.model_statistics("slow")[0]
            assert statistics.inference_stats.fail.count == len(rejected)
            assert engine.failure_counts("slow", "1")["REJECTED"] == len(rejected)
            assert engine.pending_request_count("slow", "1") == 0
            # The model keeps serving after the burst.
            after = await engine.infer(fp32_request("slow", inputs[0]))
            np.testing.assert_array_equal(after.outputs[0].data, inputs[0])

    run(scenario)


def test_without_dynamic_batching_each_request_runs_alone(tmp_path: Path) -> None:
    make_slow(tmp_path, dynamic_batching=False)
    inputs = distinct_inputs(8, seed=5)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            responses = await asyncio.gather(*(engine.infer(fp32_request("slow", x)) for x in inputs))
            for x, response in zip(inputs, responses):
                np.testing.assert_array_equal(response.outputs[0].data, x)
            statistics = engine.model_statistics("slow")[0]
            assert statistics.execution_count == statistics.inference_count == len(inputs)
            assert batch_sizes(engine, "slow") == {1: len(inputs)}

    run(scenario)


def test_batches_run_on_every_free_instance(tmp_path: Path) -> None:
    make_slow(tmp_path, max_batch_size=8, instance_count=2)
    inputs = distinct_inputs(16, seed=6)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            responses = await asyncio.gather(*(engine.infer(fp32_request("slow", x)) for x in inputs))
            for x, response in zip(inputs, responses):
                np.testing.assert_array_equal(response.outputs[0].data, x)
            # 16 requests at once: a full batch of 8 leaves for each instance.
            assert batch_sizes(engine, "slow") == {8: 2}
            assert [i.executions for i in engine.model_instances("slow")] == [1, 1]

    run(scenario)


def test_requests_of_different_shapes_are_not_merged(tmp_path: Path) -> None:
    make_string_identity(tmp_path)
    words = [np.array([[f"w{i}-{j}".encode() for j in range(1 + i % 3)]], dtype=np.object_) for i in range(12)]

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            requests = [
                InferRequest("string_identity", inputs=[InferInput("INPUT0", "BYTES", list(w.shape), w)]) for w in words
            ]
            responses = await asyncio.gather(*(engine.infer(r) for r in requests))
            for w, response in zip(words, responses):
                assert response.outputs[0].data.tolist() == w.tolist()
            assert engine.model_statistics("string_identity")[0].inference_count == len(words)

    run(scenario)


def test_queue_bound_comes_from_the_config_or_the_server_default() -> None:
    config = parse_config_text(
        "max_batch_size: 8 dynamic_batching { preferred_batch_size: [2, 4] max_queue_delay_microseconds: 500 }"
    )
    policy = BatchingPolicy.from_config(config, instance_count=3)
    assert policy.dynamic and policy.batch_cap == 4 and policy.preferred_batch_sizes == {2, 4}
    assert policy.max_queue_delay_s == 0.0005
    assert policy.max_queue_size == 0  # unbounded, as Triton's max_queue_size 0
    assert BatchingPolicy.from_config(config, 3, server_default_queue_size=7).max_queue_size == 7
    config.dynamic_batching.default_queue_policy.max_queue_size = 5
    assert BatchingPolicy.from_config(config, 3, server_default_queue_size=7).max_queue_size == 5
    unbatched = BatchingPolicy.from_config(parse_config_text("max_batch_size: 0 dynamic_batching { }"), 1)
    assert not unbatched.dynamic and unbatched.max_queue_size == 0


def test_after_the_queue_delay_a_batch_goes_past_the_largest_preferred_size(tmp_path: Path) -> None:
    # One request keeps the only instance busy (~20 ms) while seven more queue up; by the time it is free
    # their 1 ms delay is long over, so like Triton they leave as one batch up to max_batch_size instead
    # of preferred-size pieces of 2.
    make_slow(tmp_path, max_batch_size=8, preferred_batch_size=[2], max_queue_delay_microseconds=1000)
    inputs = distinct_inputs(8, seed=6)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            first = asyncio.ensure_future(engine.infer(fp32_request("slow", inputs[0])))
            await asyncio.sleep(0.005)
            rest = [engine.infer(fp32_request("slow", x)) for x in inputs[1:]]
            responses = await asyncio.gather(first, *rest)
            for x, response in zip(inputs, responses):
                np.testing.assert_array_equal(response.outputs[0].data, x)
            sizes = batch_sizes(engine, "slow")
            assert sum(size * count for size, count in sizes.items()) == 8
            assert max(sizes) > 2, sizes

    run(scenario)


def test_default_queue_is_unbounded_like_tritons(tmp_path: Path) -> None:
    make_slow(tmp_path, max_batch_size=8)  # no max_queue_size in the config, no server default
    inputs = distinct_inputs(300, seed=7)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            results = await asyncio.gather(*(engine.infer(fp32_request("slow", x)) for x in inputs),
                                           return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException)] == []

    run(scenario)


def test_cancelling_the_last_queued_request_lets_a_waiting_unload_finish(tmp_path: Path) -> None:
    # A minute of queue delay: the request sits in the queue, the unload waits for it to drain.
    make_slow(tmp_path, max_batch_size=8, max_queue_delay_microseconds=60_000_000)

    async def scenario() -> None:
        async with started_engine(tmp_path, model_control_mode="explicit", startup_models=["slow"]) as engine:
            queued = asyncio.ensure_future(engine.infer(fp32_request("slow", distinct_inputs(1)[0])))
            await asyncio.sleep(0.05)
            unloading = asyncio.ensure_future(engine.unload_model("slow"))
            await asyncio.sleep(0.05)
            assert not unloading.done()
            queued.cancel()
            await asyncio.wait_for(unloading, timeout=10)  # without the wake-up it would wait a minute
            assert not engine.model_ready("slow")

    run(scenario)
