"""The queue-proxy model (services/local_platform/queue_proxy.py) as a real process in front of a real HTTP app:
slots and queue (breaker.go), the timeout from arrival (timeout.go), the drain (drain.go) and pod deletion
(deploy.go: preStop, SIGTERM, SIGKILL at the grace period)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from services.local_platform.infra import free_ports
from services.local_platform.queue_proxy import POD_TERMINATED, chart_serving_settings

APP = Path(__file__).with_name("queue_proxy_app.py")


@dataclass
class Pod:
    process: subprocess.Popen
    url: str
    events_file: Path
    started: list[float] = field(default_factory=list)

    def events(self) -> list[dict]:
        if not self.events_file.exists():
            return []
        return [json.loads(line) for line in self.events_file.read_text().splitlines()]

    def report(self, timeout_s: float = 30.0) -> dict:
        out, _ = self.process.communicate(timeout=timeout_s)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return next(line for line in lines if line.get("msg") == POD_TERMINATED)


def post(url: str, sleep_s: float, n: int | str = "", timeout_s: float = 30.0) -> tuple[int, str, float]:
    started = time.monotonic()
    request = urllib.request.Request(f"{url}/work?sleep={sleep_s}&n={n}", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(), time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), time.monotonic() - started


def start_pod(tmp_path: Path, **flags: object) -> Pod:
    port, app_port = free_ports(2)
    events = tmp_path / "events.jsonl"
    env = {**os.environ, "APP_EVENTS": str(events), "APP_PORT": str(app_port),
           "IGNORE_SIGTERM": "1" if flags.pop("ignore_sigterm", False) else "0"}
    argv = [sys.executable, "-m", "services.local_platform.queue_proxy", "--port", str(port), "--app-port",
            str(app_port)]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    process = subprocess.Popen([*argv, "--", sys.executable, str(APP)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return Pod(process, url, events)
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"pod did not start: {process.communicate()[0]}")


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    yield started
    for pod in started:
        if pod.process.poll() is None:
            pod.process.send_signal(signal.SIGTERM)
            try:
                pod.process.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                pod.process.kill()
                pod.process.communicate()


def in_threads(calls: list) -> list:
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_settings_come_from_the_chart() -> None:
    import yaml

    values = yaml.safe_load(Path("charts/eo-inference-platform/values.yaml").read_text())["wrappers"]
    settings = chart_serving_settings()
    assert settings.container_concurrency == values["workers"]
    assert settings.timeout_s == values["timeoutSeconds"] == settings.grace_period_s
    assert settings.queue_depth == 10 * values["workers"] and settings.drain_quiet_s == 30
    assert chart_serving_settings(container_concurrency=1, timeout_s=5).queue_depth == 10


def test_slots_then_queue_then_503(tmp_path, pods) -> None:
    # CC 2: 2 slots + a queue of 20 = 22 admitted; the 3 beyond are refused at once, never reach the app.
    pod = start_pod(tmp_path, container_concurrency=2, timeout_s=20)
    pods.append(pod)
    results = in_threads([lambda i=i: post(pod.url, 0.4, i) for i in range(25)])
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 22 + [503] * 3
    refused = [(body, elapsed) for status, body, elapsed in results if status == 503]
    assert all("pending request queue full" in body and elapsed < 1.0 for body, elapsed in refused)
    starts = [e for e in pod.events() if e["event"] == "start"]
    assert len(starts) == 22 and max(e["active"] for e in starts) == 2


def test_timeout_counts_from_arrival_including_the_queue(tmp_path, pods) -> None:
    # CC 1, timeout 1.5 s: A holds the slot 1 s, B waits 1 s in the queue then needs 1 s more -> 504 at ~1.5 s
    # after B ARRIVED. B's run in the app is not stopped (the app only sees its client go away), but the slot is
    # released: C, sent after B's 504, starts while B's orphaned run still sleeps.
    pod = start_pod(tmp_path, container_concurrency=1, timeout_s=1.5)
    pods.append(pod)

    def b_then_c() -> tuple:
        time.sleep(0.1)
        b = post(pod.url, 1.0, "B")
        return b, post(pod.url, 0.1, "C")

    (a, (b, c)) = in_threads([lambda: post(pod.url, 1.0, "A"), b_then_c])
    assert a[0] == 200
    assert b[0] == 504 and "request timeout" in b[1] and 1.4 <= b[2] < 1.9
    assert c[0] == 200
    deadline = time.monotonic() + 5
    while not any(e["event"] == "end" and e["n"] == "B" for e in pod.events()) and time.monotonic() < deadline:
        time.sleep(0.05)
    events = pod.events()
    b_end = next(e for e in events if e["event"] == "end" and e["n"] == "B")
    c_start = next(e for e in events if e["event"] == "start" and e["n"] == "C")
    assert b_end["client_gone"] is True
    assert c_start["t"] < b_end["t"]  # the slot was freed while B still ran in the app


def test_drain_waits_for_a_quiet_period_reset_by_arrivals_then_sigterm(tmp_path, pods) -> None:
    pod = start_pod(tmp_path, container_concurrency=2, timeout_s=10, drain_quiet_s=1.0)
    pods.append(pod)
    deleted_at = time.time()
    pod.process.send_signal(signal.SIGUSR1)  # the kubelet deletes the pod: preStop /wait-for-drain
    time.sleep(0.6)
    first = post(pod.url, 0.0, "during-1")  # each arrival restarts the quiet period
    time.sleep(0.8)
    second = post(pod.url, 0.0, "during-2")
    report = pod.report()
    assert first[0] == second[0] == 200  # still served while draining
    sigterm = next(e for e in pod.events() if e["event"] == "sigterm")
    # Without the arrivals the drain would end at 1.0 s; the last arrival at ~1.4 s pushes it to ~2.4 s.
    assert 2.2 <= report["drained_after_s"] < 3.5
    assert sigterm["t"] - deleted_at >= 2.2
    assert report["killed"] is False and report["exit_code"] == 0


def test_sigkill_when_the_grace_period_runs_out(tmp_path, pods) -> None:
    # The grace period (timeoutSeconds) counts from before preStop: 2.5 s in all, 0.5 s of it drain.
    pod = start_pod(tmp_path, container_concurrency=1, timeout_s=2.5, drain_quiet_s=0.5, ignore_sigterm=True)
    pods.append(pod)
    long_run = threading.Thread(target=post, args=(pod.url, 30.0, "long"))
    long_run.start()
    time.sleep(0.3)
    pod.process.send_signal(signal.SIGUSR1)
    report = pod.report()
    long_run.join(10)
    assert 0.5 <= report["sigterm_after_s"] < 1.2
    assert report["killed"] is True and report["exit_code"] == -signal.SIGKILL
    assert 2.5 <= report["exited_after_s"] < 3.5
    events = pod.events()
    assert [e["event"] for e in events].count("sigterm") == 1
    assert not any(e["event"] == "end" and e["n"] == "long" for e in events)  # the step was cut off


def test_stack_rollout_replaces_a_wrapper_behind_its_queue_proxy(tmp_path) -> None:
    """``LocalStack.rollout_wrapper`` (``eo-platform rollout``): the old pod drains, its Wrapper gets SIGTERM, a new
    Wrapper starts behind a new queue-proxy on the same port and serves. The stack's infrastructure is not started
    here (a state with placeholder endpoints); the test app stands in for the Wrapper."""
    from services.local_platform.stack import LocalStack, PlatformState, StackOptions

    events = tmp_path / "events.jsonl"
    options = StackOptions(root=tmp_path, wrapper_command=[sys.executable, str(APP)], drain_quiet_s=0.5,
                           wrapper_timeout_s=5, extra_env={"APP_EVENTS": str(events)})
    stack = LocalStack(options)
    (port,) = free_ports(1)
    stack.state = PlatformState(root=str(tmp_path), started_at=time.time(), bootstrap_servers="127.0.0.1:1",
                                s3_endpoint="http://127.0.0.1:1", inference_http="", inference_grpc="127.0.0.1:1",
                                controller_url="http://127.0.0.1:1", wrapper_urls={"demo": f"http://127.0.0.1:{port}"},
                                store_root=str(tmp_path / "store"), serving=chart_serving_settings(
                                    container_concurrency=1, timeout_s=5, drain_quiet_s=0.5))
    (tmp_path / "logs").mkdir()
    try:
        first = stack.start_wrapper("demo")
        stack.wait_healthy(["wrapper-demo"], timeout_s=20)
        assert post(f"http://127.0.0.1:{port}", 0.0, "before")[0] == 200
        report = stack.rollout_wrapper("demo")
        second = stack.process("wrapper-demo")
        assert post(f"http://127.0.0.1:{port}", 0.0, "after")[0] == 200
    finally:
        stack.stop()
    assert second.pid != first.pid
    assert 0.5 <= report["drained_after_s"] < 1.5 and report["killed"] is False
    seen = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert seen.count("sigterm") == 2  # the old Wrapper at the rollout, the new one when the stack stops
