"""Issue 17 items 2 and 3 on a real Wrapper: shutdown never fails a step; capacity matches what queue-proxy admits.

Real parts: ``eo-wrapper`` processes and the Wrapper's HTTP app, our inference server (``uc5-cfactor``; frozen with
SIGSTOP to hold a step mid-way at an exact point, thawed with SIGCONT), moto S3 and tansu Kafka. The test plays
the KafkaSource (a delivery again after anything but a 2xx) and queue-proxy (a caller that hangs up at its timeout).
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from services.wrapper.admission import Admitted, Departure, Refusal, Refused, RunAdmission
from services.wrapper.inputs import S3Access
from services.wrapper.pipeline import StepRuntime
from services.wrapper.results import FAILED_SUFFIX
from services.wrapper.service import WrapperService
from test_delivery_faults import (  # noqa: F401 - fixtures: the module's inference server, the clean reference
    WrapperProcess,
    assert_complete,
    clean,
    deliver,
    headers_for,
    make_step,
    next_step_messages,
    server,
    service_app,
    wait_until,
)
from test_service_http import RunningApp
from wrapper_stack import InferenceServer, StepFixture, assert_no_secrets, list_keys, step_message


@pytest.fixture
def frozen(server: InferenceServer) -> Iterator[Callable[[], None]]:
    """Freezes the inference server (SIGSTOP) for the test; the callable thaws it (SIGCONT), as does the end."""
    assert server.process is not None
    process = server.process
    process.send_signal(signal.SIGSTOP)
    thawed = threading.Event()

    def thaw() -> None:
        if not thawed.is_set():
            thawed.set()
            process.send_signal(signal.SIGCONT)

    try:
        yield thaw
    finally:
        thaw()


def post_once(url: str, step: StepFixture, offset: int, timeout_s: float = 120) -> int | str:
    """One delivery; the HTTP status, or the error's name when the caller gave up or the connection broke."""
    request = urllib.request.Request(
        f"{url}/{step.config.config_name}", method="POST",
        data=json.dumps(step_message("in", meta={"offset": offset})).encode(),
        headers={"Content-Type": "application/json", **headers_for(step, offset)},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, OSError) as error:
        return type(error).__name__


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def started(step: StepFixture) -> bool:
    return any(n["status"] == "START" for n in step.notifications(final=False))


def assert_nothing_on_record(step: StepFixture) -> None:
    """No dead-letter record, no failed marker, no CRITICAL: the step was not failed for good."""
    assert not step.records([step.dlq_topic], timeout_s=2)
    assert not [k for k in list_keys(step.s3, step.access.bucket_name) if k.endswith(FAILED_SUFFIX)]
    assert "CRITICAL" not in [n["status"] for n in step.notifications(final=False)]


# ---- admission, on its own ------------------------------------------------------------------------------------


def test_admission_queues_for_a_worker_and_an_orphan_frees_its_worker_within_the_cap() -> None:
    admission: RunAdmission[str] = RunAdmission(workers=2, max_orphaned=1, max_waiting=2)
    gates = {key: threading.Event() for key in "abcd"}

    def work(key: str) -> Callable[[], str]:
        return lambda: (gates[key].wait(10), key)[1]

    try:
        a, b, c = (admission.admit(key, work(key)) for key in "abc")
        assert isinstance(a, Admitted) and isinstance(b, Admitted) and isinstance(c, Admitted)
        assert (a.started, b.started, c.started) == (True, True, False)  # c waits for a worker, no 503
        again = admission.admit("a", work("a"))
        assert isinstance(again, Admitted) and again.joined and again.run is a.run  # a redelivery joins
        d = admission.admit("d", work("d"))
        assert isinstance(d, Admitted) and not d.started
        assert admission.admit("e", work("e")) == Refused(Refusal.BUSY)  # more waiting than the bound (queue-proxy: 10 x CC)

        assert admission.leave(again) is Departure.STILL_WAITED_FOR
        assert admission.leave(a) is Departure.ORPHANED  # a's caller hung up (504): a runs on, c gets its worker
        assert c.started and not d.started
        assert admission.leave(b) is Departure.ORPHANED  # the orphan cap (1) is reached: d keeps waiting
        state = admission.state()
        assert (state.running, state.orphaned, state.waiting) == (3, 2, 1) and not d.started
        gates["a"].set()
        assert a.outcome.result(10) == "a"
        wait_until(lambda: d.started, 5, "d to start once an orphan ended")
        assert admission.withdraw_if_waiting(d) is False  # started: its caller keeps waiting
        for gate in gates.values():
            gate.set()
        assert [x.outcome.result(10) for x in (b, c, d)] == ["b", "c", "d"]
        assert admission.state().completed == 4
    finally:
        for gate in gates.values():
            gate.set()
        running = admission.stop("refused")
        for future in running:
            future.result(10)
        admission.close(wait=True)
    assert admission.admit("late", work("a")) == Refused(Refusal.STOPPING)


def test_stop_answers_waiting_runs_and_a_caller_may_withdraw_before_its_run_starts() -> None:
    admission: RunAdmission[str] = RunAdmission(workers=1, max_orphaned=0, max_waiting=2)
    gate = threading.Event()
    try:
        first = admission.admit("first", lambda: (gate.wait(10), "first")[1])
        second = admission.admit("second", lambda: "second")
        third = admission.admit("third", lambda: "third")
        assert isinstance(first, Admitted) and isinstance(second, Admitted) and isinstance(third, Admitted)
        assert admission.leave(first) is Departure.ORPHANED
        assert not second.started  # no orphan allowed: the orphan still holds the only worker
        assert admission.withdraw_if_waiting(second) is True  # gave up waiting (WORKER_WAIT_S): never runs
        running = admission.stop("stopping")
        assert third.outcome.result(1) == "stopping"  # still waiting at stop: answered, never run
        gate.set()
        assert [future.result(10) for future in running] == ["first"]
        assert admission.state().completed == 1
    finally:
        gate.set()
        admission.close(wait=True)


# ---- shutdown never fails a step --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_mid_step_past_the_shutdown_timeout_redelivers_and_the_next_wrapper_writes_the_same_bytes(
    clean: dict[str, bytes], server: InferenceServer, frozen: Callable[[], None], s3_access: S3Access,
    kafka_broker: Any, tmp_path: Path,
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    wrapper = WrapperProcess(step, server.grpc_url, tmp_path / "wrapper.log")
    wrapper.env["EOML_WRAPPER_SHUTDOWN_TIMEOUT_S"] = "1"
    try:
        wrapper.start()
        thread, answer = in_background(lambda: post_once(wrapper.url, step, 5))
        # The step started and waits for the frozen inference server: mid-step when SIGTERM comes.
        wait_until(lambda: started(step), 60, "START")
        assert wrapper.process is not None
        wrapper.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping their inference" in wrapper.log_path.read_text(), 30, "the shutdown timeout")
        frozen()  # the step's next inference request now meets the stopped pool: ProcessStopping
        thread.join(60)
        code = wrapper.process.wait(timeout=60)
    finally:
        if wrapper.process is not None and wrapper.process.poll() is None:
            wrapper.process.kill()
    assert answer == [503] and code == 0
    lines = [json.loads(line) for line in wrapper.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "step interrupted: the delivery is to be retried" for line in lines)
    assert [line.get("cut_off") for line in lines if line["msg"] == "wrapper stopped"] == [1]
    assert not [line for line in lines if line["level"] in ("ERROR", "CRITICAL")]
    assert_nothing_on_record(step)
    assert not next_step_messages(step, timeout_s=2)

    # Kafka delivers it again, to the next pod: it runs the step to the end, byte-identical to a clean run.
    app = service_app(step, server.grpc_url)
    try:
        statuses, body = deliver(app.url, step, 5)
    finally:
        app.stop()
    assert statuses == [200] and body["status"] == "SUCCESS"
    assert_complete(step, body["folder"], clean)
    assert [m["S3_bucket_desc"]["folder"] for m in next_step_messages(step)] == [body["folder"]]
    assert_nothing_on_record(step)
    assert_no_secrets(wrapper.log_path.read_text())


@pytest.mark.slow
def test_a_step_still_blocked_at_the_cut_off_is_answered_503_and_never_failed(
    server: InferenceServer, frozen: Callable[[], None], s3_access: S3Access, kafka_broker: Any, tmp_path: Path,
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    service = WrapperService(StepRuntime.from_settings(step.settings(server.grpc_url, workers=1)), step.store)
    app = RunningApp(service)
    report = None
    try:
        thread, answer = in_background(lambda: post_once(app.url, step, 6))
        wait_until(lambda: started(step), 60, "START")
        # Blocked in a call to the frozen server past the timeout and the cut-off wait: left to the process exit.
        report = service.shutdown(timeout_s=0.5, cut_off_wait_s=0.5)
        thread.join(30)
        assert answer == [503] and (report.finished, report.cut_off, report.abandoned) == (0, 0, 1)
        frozen()  # the abandoned step goes on (here the process does not exit): it ends RETRY, not CRITICAL
        wait_until(lambda: service.state().running == 0, 60, "the abandoned step to end")
    finally:
        frozen()
        stop_listener(app)
        service.runtime.close()
    assert_nothing_on_record(step)
    assert not next_step_messages(step, timeout_s=2)


def stop_listener(app: RunningApp) -> None:
    """Stop the app's HTTP listener only (its service was shut down by the test)."""
    import asyncio

    assert app._runner is not None
    asyncio.run_coroutine_threadsafe(app._runner.cleanup(), app._loop).result(10)
    app._loop.call_soon_threadsafe(app._loop.stop)
    app._thread.join(10)


# ---- capacity as queue-proxy admits --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_caller_that_hangs_up_does_not_make_the_next_admitted_delivery_503(
    clean: dict[str, bytes], server: InferenceServer, frozen: Callable[[], None], s3_access: S3Access,
    kafka_broker: Any, tmp_path: Path,
) -> None:
    step = make_step(s3_access, kafka_broker, tmp_path / "store")
    # One worker (containerConcurrency 1): queue-proxy sends the next request as soon as it gave up on the first.
    app = service_app(step, server.grpc_url, workers=1)
    try:
        # queue-proxy's timeout: the caller hangs up after 1 s while the step waits for the frozen server.
        gone = post_once(app.url, step, 7, timeout_s=1)
        assert gone in ("TimeoutError", "timeout", "URLError"), gone
        wait_until(lambda: app.service.state().orphaned == 1, 10, "the run to be orphaned")
        thread, answer = in_background(lambda: post_once(app.url, step, 8))
        wait_until(lambda: app.service.state().running == 2, 10, "the next delivery to start")
        assert not answer  # admitted and running, not refused
        frozen()
        thread.join(120)
        assert answer == [200]
        wait_until(lambda: app.service.state().running == 0, 60, "the orphaned run to end")
        # The source delivers the hung-up record again: the orphan finished it, nothing runs twice.
        statuses, again = deliver(app.url, step, 7)
    finally:
        app.stop()
    assert statuses == [200] and again["duplicate"] is True
    folders = sorted(m["S3_bucket_desc"]["folder"] for m in next_step_messages(step))
    assert len(folders) == 2 and again["folder"] in folders
    for folder in folders:
        assert_complete(step, folder, clean)
    assert_nothing_on_record(step)
