"""The request hot path's building blocks: the queue-delay timer, the instance worker thread, the
default ORT session entries, and the queue delay as the engine applies it (no timing upper bounds)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine_harness import fp32_request, run, started_engine
from services.inference import batching
from services.inference.batching import DeadlineTimer
from services.inference.model_config import parse_config_text
from services.inference.runtime import DEFAULT_SESSION_CONFIG_ENTRIES, InstanceWorker, session_config_entries, session_options
from tiny_models import SLOW_WIDTH, make_slow

SPINNING = "session.intra_op.allow_spinning"


def loop_factories() -> list:
    factories = [pytest.param(None, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        pass
    else:
        factories.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return factories


def run_on(loop_factory, scenario):  # type: ignore[no-untyped-def]
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(scenario())


@pytest.fixture(params=["timerfd", "loop-timer"])
def timer_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the timer can work: the kernel timer (Linux) and the event loop's call_at."""
    if request.param == "timerfd" and batching._TIMERFD is None:
        pytest.skip("no timerfd on this platform")
    if request.param == "loop-timer":
        monkeypatch.setattr(batching, "_TIMERFD", None)
    return request.param


# --------------------------------------------------------------------------------------------
# DeadlineTimer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_factory", loop_factories())
def test_timer_fires_once_and_not_before_its_deadline(loop_factory, timer_kind: str) -> None:
    async def scenario() -> None:
        fired_at: list[int] = []
        done = asyncio.Event()

        def fired() -> None:
            fired_at.append(time.monotonic_ns())
            done.set()

        timer = DeadlineTimer(asyncio.get_running_loop(), fired)
        assert timer.precise == (timer_kind == "timerfd")
        deadline = time.monotonic_ns() + 3_000_000
        timer.arm(deadline)
        assert timer.deadline_ns == deadline
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.02)  # a second call would have come by now
        timer.close()
        assert len(fired_at) == 1
        assert fired_at[0] >= deadline
        assert timer.deadline_ns == 0

    run_on(loop_factory, scenario)


@pytest.mark.parametrize("loop_factory", loop_factories())
def test_timer_rearmed_later_fires_only_for_the_new_deadline(loop_factory, timer_kind: str) -> None:
    async def scenario() -> None:
        fired_at: list[int] = []
        done = asyncio.Event()

        def fired() -> None:
            fired_at.append(time.monotonic_ns())
            done.set()

        timer = DeadlineTimer(asyncio.get_running_loop(), fired)
        timer.arm(time.monotonic_ns() + 2_000_000)
        later = time.monotonic_ns() + 30_000_000
        timer.arm(later)
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.02)
        timer.close()
        assert len(fired_at) == 1 and fired_at[0] >= later

    run_on(loop_factory, scenario)


def test_closed_timer_never_calls_back_and_gives_its_descriptor_back(timer_kind: str) -> None:
    async def scenario() -> None:
        calls: list[int] = []
        descriptors_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        timer = DeadlineTimer(asyncio.get_running_loop(), lambda: calls.append(1))
        timer.arm(time.monotonic_ns() + 5_000_000)
        timer.close()
        await asyncio.sleep(0.03)
        assert calls == []
        if descriptors_before is not None:
            assert len(os.listdir("/proc/self/fd")) == descriptors_before

    run(scenario)


def test_a_deadline_already_past_fires_at_once(timer_kind: str) -> None:
    async def scenario() -> None:
        done = asyncio.Event()
        timer = DeadlineTimer(asyncio.get_running_loop(), done.set)
        timer.arm(time.monotonic_ns() - 1_000_000)
        await asyncio.wait_for(done.wait(), 5)
        timer.close()

    run(scenario)


# --------------------------------------------------------------------------------------------
# The queue delay through the engine
# --------------------------------------------------------------------------------------------


def test_a_lone_request_waits_its_queue_delay_before_it_runs(tmp_path: Path, timer_kind: str) -> None:
    delay_us = 40_000
    make_slow(tmp_path, max_batch_size=8, max_queue_delay_microseconds=delay_us)
    x = np.random.default_rng(5).standard_normal((1, SLOW_WIDTH)).astype(np.float32)

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            for _ in range(3):
                response = await engine.infer(fp32_request("slow", x))
                np.testing.assert_array_equal(response.outputs[0].data, x)
            statistics = engine.model_statistics("slow")[0]
            # Alone in the queue and below every batch cap, each request waited for company first.
            assert statistics.inference_stats.queue.count == 3
            assert statistics.inference_stats.queue.ns >= 3 * delay_us * 1000
            assert {b.batch_size: b.compute_infer.count for b in statistics.batch_stats} == {1: 3}

    run(scenario)


def test_unloading_a_model_releases_its_queue_delay_timer(tmp_path: Path) -> None:
    if batching._TIMERFD is None or not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs timerfd and /proc")
    make_slow(tmp_path, max_batch_size=8, max_queue_delay_microseconds=1000)

    def timer_descriptors() -> int:
        count = 0
        for name in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[timerfd]"
            except OSError:
                pass
        return count

    async def scenario() -> None:
        before = timer_descriptors()
        async with started_engine(tmp_path, model_control_mode="explicit", startup_models=["slow"]) as engine:
            assert timer_descriptors() == before + 1
            await engine.unload_model("slow")
            assert timer_descriptors() == before

    run(scenario)


# --------------------------------------------------------------------------------------------
# InstanceWorker
# --------------------------------------------------------------------------------------------


def test_worker_runs_posted_items_in_order_on_its_own_thread() -> None:
    worker = InstanceWorker("instance-test_0")
    seen: list[tuple[int, str]] = []
    try:
        for index in range(50):
            worker.post(lambda i: seen.append((i, threading.current_thread().name)), index)
        assert worker.submit(lambda: "done").result(timeout=5) == "done"
    finally:
        worker.shutdown()
    assert [index for index, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"instance-test_0"}


def test_worker_submit_carries_exceptions_and_keeps_serving() -> None:
    worker = InstanceWorker("instance-test_1")
    try:
        def fail() -> None:
            raise ValueError("bad batch")

        with pytest.raises(ValueError, match="bad batch"):
            worker.submit(fail).result(timeout=5)
        worker.post(fail)  # a posted item that raises is logged; the next one still runs
        assert worker.submit(lambda: 42).result(timeout=5) == 42
    finally:
        worker.shutdown()


def test_worker_shutdown_finishes_what_was_posted_and_refuses_more() -> None:
    worker = InstanceWorker("instance-test_2")
    finished: list[int] = []
    worker.post(lambda: (time.sleep(0.05), finished.append(1)))
    worker.shutdown(wait=True)
    assert finished == [1]
    with pytest.raises(RuntimeError, match="shut down"):
        worker.post(lambda: None)


# --------------------------------------------------------------------------------------------
# ORT session defaults
# --------------------------------------------------------------------------------------------


def test_intra_op_threads_do_not_spin_unless_the_config_says_so() -> None:
    default = parse_config_text('name: "m"')
    assert DEFAULT_SESSION_CONFIG_ENTRIES[SPINNING] == "0"
    assert session_config_entries(default)[SPINNING] == "0"
    assert session_options(default, 1).get_session_config_entry(SPINNING) == "0"

    spinning = parse_config_text(
        'name: "m" parameters { key: "session.intra_op.allow_spinning" value { string_value: "1" } } '
        'parameters { key: "session.dynamic_block_base" value { string_value: "4" } }'
    )
    entries = session_config_entries(spinning)
    assert entries == {SPINNING: "1", "session.dynamic_block_base": "4"}
    options = session_options(spinning, 1)
    assert options.get_session_config_entry(SPINNING) == "1"
    assert options.get_session_config_entry("session.dynamic_block_base") == "4"
