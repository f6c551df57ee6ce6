"""Where a tiny model's request time goes in our server, and A/B runs of server variants.

Not part of ``make bench``: a developer's tool for the hot path (gRPC servicer, engine, batcher).
The load generator is the benchmark's own (``inference_bench.measure_server``: tritonclient aio,
closed loop, batch 1), so its figures compare with ``bench/inference_bench.py``.

    # A/B: rounds of (variant x protocol), variants interleaved, each server started afresh;
    # a variant is NAME=SOURCE_ROOT (a directory holding a ``services/`` package tree), or the
    # KServe peer (.venv-kserve) with --kserve NAME[=KEY=VALUE,...] (extra ORT session entries).
    .venv/bin/python bench/grpc_profile.py ab --variant base=/tmp/base --variant new=. \\
        --kserve kserve --protocol grpc http --concurrency 16 --rounds 3 --duration 4

    Each line gives req/s, p50, the mean batch size, and the CPU each server thread used per second
    of the window (CLIENT: the load generator). On a shared machine throughput follows the
    neighbours' load; server CPU per request (``srv cpu us/req``) moves much less, so compare both.

    # py-spy on the server process during the measurement window: collapsed stacks (flamegraph.pl or
    # speedscope input) and the top frames, self and inclusive
    .venv/bin/python bench/grpc_profile.py py-spy --out build/grpc-profile --protocol grpc

    # cProfile of the server's event-loop thread under the same load
    .venv/bin/python bench/grpc_profile.py cprofile --out build/grpc-profile --protocol grpc

    # What the Python client alone can do: a gRPC server that answers every ModelInfer with one
    # prebuilt response, so the figure is the load generator's ceiling on this machine
    .venv/bin/python bench/grpc_profile.py client-ceiling --concurrency 16

    # The servicer without a transport: ModelInfer called directly, C coroutines, cProfile optional
    .venv/bin/python bench/grpc_profile.py servicer --concurrency 16 --requests 20000 [--cprofile]

``py-spy`` is a development tool (``.venv/bin/pip install py-spy``), not a project dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import io
import json
import logging
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import inference_bench as bench  # noqa: E402  (the benchmark's load generator and server helpers)

from services.inference.repository import ModelRepository  # noqa: E402
from services.inference.runtime import session_config_entries  # noqa: E402

log = logging.getLogger("bench.grpc_profile")

DEFAULT_MODEL = "uc6-locust"


@dataclass
class Variant:
    name: str
    source_root: Path  # the server runs with this as its working directory: its ``services/`` wins
    # Set for the KServe peer: ORT session config entries added to the model's own (``session.*``)
    kserve_entries: dict[str, str] | None = None


@dataclass
class ServerUnderTest:
    process: subprocess.Popen
    http_url: str
    grpc_url: str
    log_path: Path
    has_statistics: bool = True  # serves Triton's /v2/models/<m>/stats (KServe does not)


def server_command(python: str, repository: Path, model: str, http_port: int, grpc_port: int,
                   metrics_port: int, wrapper: Sequence[str] = ()) -> list[str]:
    """What the benchmark runs (explicit mode, only ``model``), with ``wrapper`` before ``-m``
    (e.g. ``-m cProfile -o FILE``)."""
    return [
        python, *wrapper, "-m", "services.inference.cli",
        "--model-repository", str(repository.resolve()),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
        "--model-control-mode", "explicit", "--load-model", model,
    ]


@contextlib.contextmanager
def running_server(variant: Variant, repository: Path, model: str, log_path: Path,
                   wrapper: Sequence[str] = ()) -> Iterator[ServerUnderTest]:
    http_port, grpc_port, metrics_port = bench.free_port(), bench.free_port(), bench.free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if variant.kserve_entries is None:
            command = server_command(sys.executable, repository, model, http_port, grpc_port, metrics_port, wrapper)
        else:
            # The benchmark's KServe peer with the ORT session entries our server really uses (its
            # defaults included: ``runtime.session_config_entries``), then the variant's own.
            under_test = bench.load_model_under_test(repository, model)
            definition = ModelRepository([repository]).read_definition(model)
            entries = {**session_config_entries(definition.config), **variant.kserve_entries}
            setup = dataclasses.replace(under_test.session, config_entries=entries)
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grpc-profile-")))
            models_file = bench.kserve_models_file([dataclasses.replace(under_test, session=setup)], work)
            command = bench.kserve_command(str(PROJECT_ROOT / ".venv-kserve" / "bin" / "python"), models_file,
                                           http_port, grpc_port)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, cwd=variant.source_root, env=env, stdout=log_file,
                                       stderr=subprocess.STDOUT)
        handle = bench.ServerProcess(variant.name, process, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}",
                                     log_path)
        try:
            bench.wait_until_ready(handle, ["/v2/health/ready", f"/v2/models/{model}/ready"], 120.0)
            yield ServerUnderTest(process, handle.http_url, handle.grpc_url, log_path,
                                  has_statistics=variant.kserve_entries is None)
        finally:
            handle.stop()


def load_model(repository: Path, model: str) -> tuple[bench.ModelUnderTest, list[dict[str, np.ndarray]],
                                                       dict[str, np.ndarray]]:
    under_test = bench.load_model_under_test(repository, model)
    pool = bench.make_request_pool(under_test, 8, 0)
    session = bench.open_session(under_test)
    expected = dict(zip(under_test.output_names, session.run(None, pool[0])))
    return under_test, pool, expected


def python_thread_names(pid: int) -> dict[str, str]:
    """Native thread id -> Python thread name, from ``py-spy dump`` (empty when py-spy is missing).

    Python does not name its threads for the OS, so /proc shows them all as ``python``."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return {}
    # --nonblocking: read the stacks without pausing the server under load.
    dump = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True,
                          timeout=30)
    names: dict[str, str] = {}
    for line in dump.stdout.splitlines():
        if line.startswith("Thread ") and '"' in line:
            names[line.split()[1]] = line.split('"')[1]
    return names


def thread_cpu_seconds(pid: int, names: dict[str, str]) -> dict[str, float]:
    """CPU time (user + system) of every thread of ``pid``, by Python name or ``<os name>-<thread id>``;
    threads that ONNX Runtime or gRPC start have no Python name."""
    ticks = os.sysconf("SC_CLK_TCK")
    times: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = names.get(task.name) or (
            "MainThread" if task.name == str(pid) else f"{stat[stat.index('(') + 1 : stat.rindex(')')]}-{task.name}"
        )
        fields = stat[stat.rindex(")") + 2 :].split()
        times[name] = times.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return times


@dataclass
class ServerMeasurement:
    result: bench.Measurement
    thread_cpu_share: dict[str, float]  # CPU seconds per second of the window, by server thread; CLIENT: ours
    mean_batch_size: float  # inferences / executions in the window, from the server's statistics

    @property
    def server_cpu_us_per_request(self) -> float:
        server = sum(share for name, share in self.thread_cpu_share.items() if name != "CLIENT")
        return server / self.result.throughput_per_s * 1e6

    @property
    def loop_cpu_us_per_request(self) -> float:
        return self.thread_cpu_share.get("MainThread", 0.0) / self.result.throughput_per_s * 1e6


def model_counts(server: ServerUnderTest, model: str) -> tuple[int, int]:
    """Inferences and executions so far; (0, 0) for a server without Triton's statistics."""
    if not server.has_statistics:
        return 0, 0
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=5) as response:
        stats = json.load(response)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


@dataclass
class Snapshot:
    """What the server and this process had used at one moment of the window."""

    at: float  # perf_counter()
    server_threads_cpu_s: dict[str, float]
    client_cpu_s: float  # this process: the load generator
    inferences: int
    executions: int

    @classmethod
    def take(cls, server: ServerUnderTest, model: str, thread_names: dict[str, str]) -> "Snapshot":
        inferences, executions = model_counts(server, model)
        return cls(time.perf_counter(), thread_cpu_seconds(server.process.pid, thread_names), time.process_time(),
                   inferences, executions)


def measure(server: ServerUnderTest, protocol: str, model: bench.ModelUnderTest,
            pool: list[dict[str, np.ndarray]], expected: dict[str, np.ndarray], concurrency: int,
            warmup_s: float, duration_s: float) -> ServerMeasurement:
    """One closed-loop window, with the server's per-thread CPU and mean batch size inside it."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    snapshots: list[Snapshot] = []

    def sample_window() -> None:
        # The load generator probes and warms up first; sample well inside its measurement window.
        thread_names = python_thread_names(server.process.pid)
        time.sleep(warmup_s + 0.3)
        snapshots.append(Snapshot.take(server, model.name, thread_names))
        time.sleep(max(0.1, duration_s - 0.6))
        snapshots.append(Snapshot.take(server, model.name, thread_names))

    sampler = threading.Thread(target=sample_window, daemon=True)
    sampler.start()
    result = bench.measure_server("server", protocol, url, model, pool, expected, concurrency, warmup_s, duration_s)
    sampler.join()
    if result.error or not result.outputs_match:
        raise RuntimeError(f"measurement failed: error={result.error!r} outputs_match={result.outputs_match}")
    start, end = snapshots
    elapsed = end.at - start.at
    shares = {
        name: (seconds - start.server_threads_cpu_s.get(name, 0.0)) / elapsed
        for name, seconds in end.server_threads_cpu_s.items()
    }
    # The load generator's own CPU: on a shared machine it competes with the server for the cores.
    shares["CLIENT"] = (end.client_cpu_s - start.client_cpu_s) / elapsed
    executions = end.executions - start.executions
    return ServerMeasurement(result, shares, (end.inferences - start.inferences) / executions if executions else 0.0)


def describe(measured: ServerMeasurement) -> str:
    threads = " ".join(f"{name}={share:.2f}" for name, share in sorted(measured.thread_cpu_share.items(),
                                                                        key=lambda item: -item[1]) if share >= 0.01)
    return (f"{measured.result.throughput_per_s:8.1f} req/s  p50 {measured.result.latency_ms['p50']:7.3f} ms  "
            f"batch {measured.mean_batch_size:5.2f}  server {measured.server_cpu_us_per_request:4.0f} us/req  "
            f"cpu[{threads}]")


# --------------------------------------------------------------------------------------------
# A/B
# --------------------------------------------------------------------------------------------


@dataclass
class Samples:
    throughput: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    server_cpu_us: list[float] = field(default_factory=list)  # all server threads, per request
    loop_cpu_us: list[float] = field(default_factory=list)  # the event-loop thread, per request


def run_ab(args: argparse.Namespace) -> int:
    variants = [parse_variant(text) for text in args.variant or []]
    variants += [parse_kserve_variant(text) for text in args.kserve or []]
    if not variants:
        raise SystemExit("give at least one --variant or --kserve")
    model, pool, expected = load_model(args.repository, args.model)
    results: dict[tuple[str, str, int], Samples] = {}
    for round_index in range(args.rounds):
        # Rotate the order every round so neither variant always runs first on a warming machine.
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            with running_server(variant, args.repository, args.model, args.log_dir / f"{variant.name}.log") as server:
                for protocol in args.protocols:
                    for concurrency in args.concurrency:
                        measured = measure(server, protocol, model, pool, expected, concurrency, args.warmup,
                                           args.duration)
                        samples = results.setdefault((variant.name, protocol, concurrency), Samples())
                        samples.throughput.append(measured.result.throughput_per_s)
                        samples.p50_ms.append(measured.result.latency_ms["p50"])
                        samples.server_cpu_us.append(measured.server_cpu_us_per_request)
                        samples.loop_cpu_us.append(measured.loop_cpu_us_per_request)
                        print(f"round {round_index + 1} {variant.name:>10} {protocol:<4} C={concurrency:<3} "
                              f"{describe(measured)} load {os.getloadavg()[0]:.2f}", flush=True)
    print()
    # On a shared machine throughput moves with the neighbours' load; CPU per request much less so.
    print(f"{'variant':>14} {'proto':<5} {'C':>3}  {'req/s med':>9} {'[min':>7} {'max]':>7}  {'p50 ms med':>10} "
          f"{'[min':>6} {'max]':>6}  {'srv cpu us/req':>14} {'[min':>6} {'max]':>6}  {'loop us/req':>11} "
          f"{'[min':>6} {'max]':>6}")

    def spread(values: list[float], width: int, digits: int) -> str:
        return (f"{statistics.median(values):{width}.{digits}f} {min(values):7.{digits}f} "
                f"{max(values):7.{digits}f}")

    for (name, protocol, concurrency), samples in results.items():
        print(f"{name:>14} {protocol:<5} {concurrency:>3}  {spread(samples.throughput, 9, 0)}  "
              f"{spread(samples.p50_ms, 10, 2)}  {spread(samples.server_cpu_us, 14, 0)}  "
              f"{spread(samples.loop_cpu_us, 11, 0)}")
    return 0


def parse_kserve_variant(text: str) -> Variant:
    """``NAME`` or ``NAME=KEY=VALUE[,KEY=VALUE...]``: the KServe peer with extra session config entries."""
    name, _, entries_text = text.partition("=")
    entries: dict[str, str] = {}
    for item in filter(None, entries_text.split(",")):
        key, _, value = item.partition("=")
        entries[key] = value
    return Variant(name, PROJECT_ROOT, kserve_entries=entries)


def parse_variant(text: str) -> Variant:
    name, _, root = text.partition("=")
    if not root:
        raise SystemExit(f"--variant wants NAME=SOURCE_ROOT, got '{text}'")
    source_root = Path(root).resolve()
    if not (source_root / "services" / "inference").is_dir():
        raise SystemExit(f"{source_root} has no services/inference package")
    return Variant(name, source_root)


# --------------------------------------------------------------------------------------------
# Profilers on the server process
# --------------------------------------------------------------------------------------------


def top_self_frames(collapsed: Path, limit: int) -> list[tuple[str, float]]:
    """From py-spy's collapsed stacks: the leaf frames holding most samples (share of all samples)."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        counts[stack.split(";")[-1]] += count
    return [(frame, count / total) for frame, count in counts.most_common(limit)] if total else []


def top_inclusive_frames(collapsed: Path, limit: int) -> list[tuple[str, float]]:
    """Frames by inclusive share of samples (a frame counted once per stack it appears in)."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        for frame in set(stack.split(";")):
            counts[frame] += count
    return [(frame, count / total) for frame, count in counts.most_common(limit)] if total else []


def run_py_spy(args: argparse.Namespace) -> int:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    variant = parse_variant(f"server={args.source_root}")
    model, pool, expected = load_model(args.repository, args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    with running_server(variant, args.repository, args.model, args.out / "server.log") as server:
        for protocol in args.protocols:
            stem = args.out / f"py-spy-{protocol}-c{args.concurrency[0]}"
            # Sample only inside the measurement window: start after the warm-up, stop before its end
            # (the load runs one second longer than the recording).
            command = [py_spy, "record", "--pid", str(server.process.pid), "--rate", str(args.rate),
                       "--duration", str(int(args.duration)), "--format", "raw", "--output", f"{stem}.txt",
                       "--threads", *(["--native"] if args.native else ["--nonblocking"]),
                       *(["--idle"] if args.idle else [])]
            recorders: list[subprocess.Popen] = []
            starter = threading.Timer(args.warmup + 0.2, lambda: recorders.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
            starter.start()
            result = measure(server, protocol, model, pool, expected, args.concurrency[0], args.warmup,
                             args.duration + 1).result
            starter.join()
            recorder = recorders[0]
            _, recorder_errors = recorder.communicate(timeout=60)
            if recorder.returncode != 0 or not Path(f"{stem}.txt").exists():
                raise SystemExit(f"py-spy failed ({recorder.returncode}): {recorder_errors.decode(errors='replace')}")
            print(f"{protocol}: {result.throughput_per_s:.1f} req/s p50 {result.latency_ms['p50']:.3f} ms "
                  f"(sampled, so slower than unprofiled) -> {stem}.txt")
            print("  top self frames:")
            for frame, share in top_self_frames(Path(f"{stem}.txt"), args.top):
                print(f"    {share * 100:5.1f}%  {frame}")
            print("  top inclusive frames:")
            for frame, share in top_inclusive_frames(Path(f"{stem}.txt"), args.top):
                print(f"    {share * 100:5.1f}%  {frame}")
    return 0


def run_cprofile(args: argparse.Namespace) -> int:
    variant = parse_variant(f"server={args.source_root}")
    model, pool, expected = load_model(args.repository, args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    for protocol in args.protocols:
        stats_path = args.out / f"cprofile-{protocol}-c{args.concurrency[0]}.prof"
        # cProfile sees the main thread only: the event loop, where every servicer coroutine runs.
        with running_server(variant, args.repository, args.model, args.out / "server.log",
                            wrapper=["-m", "cProfile", "-o", str(stats_path)]) as server:
            result = measure(server, protocol, model, pool, expected, args.concurrency[0], args.warmup,
                             args.duration).result
        print(f"{protocol}: {result.completed} requests, {result.throughput_per_s:.1f} req/s under cProfile "
              f"-> {stats_path}")
        print_stats(stats_path, args.top, result.completed)
    return 0


def print_stats(stats_path: Path, top: int, requests: int) -> None:
    buffer = io.StringIO()
    stats = pstats.Stats(str(stats_path), stream=buffer)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    print(buffer.getvalue())
    if requests:
        print(f"(the server also handled warm-up and probe requests: per-request figures are upper bounds "
              f"when divided by the {requests} in the window)")


# --------------------------------------------------------------------------------------------
# The client's ceiling: a server that does nothing per request
# --------------------------------------------------------------------------------------------


def run_client_ceiling(args: argparse.Namespace) -> int:
    """A gRPC server in a child process answering ModelInfer with one prebuilt response."""
    model, pool, expected = load_model(args.repository, args.model)
    port = bench.free_port()
    child = subprocess.Popen([sys.executable, __file__, "_canned-server", "--port", str(port), "--repository",
                              str(args.repository), "--model", args.model, *(["--uvloop"] if args.uvloop else [])],
                             cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 30
        import grpc

        while time.monotonic() < deadline:
            try:
                grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=1)
                break
            except grpc.FutureTimeoutError:
                continue
        server = ServerUnderTest(child, "", f"127.0.0.1:{port}", Path(os.devnull), has_statistics=False)
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                measured = measure(server, "grpc", model, pool, expected, concurrency, args.warmup, args.duration)
                print(f"round {round_index + 1} canned grpc C={concurrency}: {describe(measured)} "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        child.terminate()
        child.wait(timeout=10)
    return 0


def run_canned_server(args: argparse.Namespace) -> int:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    model, pool, _ = load_model(args.repository, args.model)
    session = bench.open_session(model)
    outputs = session.run(None, pool[0])
    canned = service_pb2.ModelInferResponse(model_name=model.name, model_version="1")
    for name, array in zip(model.output_names, outputs):
        canned.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
        canned.raw_output_contents.append(array.astype(np.float32).tobytes())

    class Canned(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):  # type: ignore[override]
            return canned

    async def serve() -> None:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Canned(), server)
        server.add_insecure_port(f"127.0.0.1:{args.port}")
        await server.start()
        await server.wait_for_termination()

    with asyncio.Runner(loop_factory=_loop_factory(args.uvloop)) as runner:
        runner.run(serve())
    return 0


def _loop_factory(use_uvloop: bool):  # type: ignore[no-untyped-def]
    if not use_uvloop:
        return None
    import uvloop

    return uvloop.new_event_loop


# --------------------------------------------------------------------------------------------
# The servicer without a transport
# --------------------------------------------------------------------------------------------


def run_servicer(args: argparse.Namespace) -> int:
    """``ModelInfer`` of the servicer called directly: decode, engine, batcher, ORT, encode."""
    from tritonclient.grpc import service_pb2

    from services.inference.engine import InferenceEngine
    from services.inference.grpc_server import TritonGrpcServicer

    model, pool, _ = load_model(args.repository, args.model)
    messages = []
    for feeds in pool:
        request = service_pb2.ModelInferRequest(model_name=model.name)
        for name, array in feeds.items():
            request.inputs.add(name=name, datatype=bench._v2_datatype(array.dtype), shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
        messages.append(request)

    async def scenario() -> None:
        engine = InferenceEngine([args.repository], model_control_mode="explicit", startup_models=[model.name])
        await engine.start()
        servicer = TritonGrpcServicer(engine)
        remaining = args.requests

        async def worker(index: int) -> None:
            nonlocal remaining
            position = index
            while remaining > 0:
                remaining -= 1
                response = await servicer.ModelInfer(messages[position % len(messages)], None)
                assert response.raw_output_contents, "empty response"
                position += args.concurrency

        try:
            profiler = cProfile.Profile() if args.cprofile else None
            executions_before = sum(summary.executions for summary in engine.model_instances(model.name))
            started, loop_cpu_started, cpu_started = time.perf_counter(), time.thread_time(), time.process_time()
            if profiler:
                profiler.enable()
            await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
            if profiler:
                profiler.disable()
            elapsed = time.perf_counter() - started
            loop_cpu, cpu = time.thread_time() - loop_cpu_started, time.process_time() - cpu_started
            executions = sum(summary.executions for summary in engine.model_instances(model.name)) - executions_before
            print(f"{args.requests} requests, C={args.concurrency}: {args.requests / elapsed:.0f} req/s, "
                  f"loop thread {loop_cpu / args.requests * 1e6:.1f} us CPU per request, all threads "
                  f"{cpu / args.requests * 1e6:.1f} us, mean batch {args.requests / max(executions, 1):.2f}"
                  f"{' under cProfile' if profiler else ''}")
            if profiler:
                buffer = io.StringIO()
                pstats.Stats(profiler, stream=buffer).strip_dirs().sort_stats("tottime").print_stats(args.top)
                print(buffer.getvalue())
        finally:
            await engine.stop()

    with asyncio.Runner(loop_factory=_loop_factory(args.uvloop)) as runner:
        runner.run(scenario())
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
        sub.add_argument("--model", default=DEFAULT_MODEL)
        sub.add_argument("--concurrency", type=int, nargs="+", default=[16])
        sub.add_argument("--duration", type=float, default=4.0, help="measurement window, s")
        sub.add_argument("--warmup", type=float, default=1.0, help="warm-up before the window, s")
        sub.add_argument("--top", type=int, default=30, help="rows of profile output")

    ab = commands.add_parser("ab", help="interleaved A/B runs of server variants")
    common(ab)
    ab.add_argument("--variant", action="append", help="our server: NAME=SOURCE_ROOT (repeatable)")
    ab.add_argument("--kserve", action="append",
                    help="the KServe peer (.venv-kserve): NAME[=KEY=VALUE,...] with extra ORT session entries")
    ab.add_argument("--protocol", dest="protocols", nargs="+", choices=bench.PROTOCOLS, default=["grpc"])
    ab.add_argument("--rounds", type=int, default=3)
    ab.add_argument("--log-dir", type=Path, default=PROJECT_ROOT / "build" / "grpc-profile")

    for name in ("py-spy", "cprofile"):
        sub = commands.add_parser(name, help=f"{name} on the server process under load")
        common(sub)
        sub.add_argument("--source-root", type=Path, default=PROJECT_ROOT)
        sub.add_argument("--protocol", dest="protocols", nargs="+", choices=bench.PROTOCOLS, default=["grpc"])
        sub.add_argument("--out", type=Path, default=PROJECT_ROOT / "build" / "grpc-profile")
        if name == "py-spy":
            sub.add_argument("--rate", type=int, default=250, help="samples per second")
            sub.add_argument("--native", action="store_true", help="include native (C) frames")
            sub.add_argument("--idle", action="store_true", help="include idle threads' samples")

    ceiling = commands.add_parser("client-ceiling", help="the load generator against a do-nothing server")
    common(ceiling)
    ceiling.add_argument("--rounds", type=int, default=1)
    ceiling.add_argument("--uvloop", action="store_true", help="the canned server on uvloop")

    canned = commands.add_parser("_canned-server")
    canned.add_argument("--port", type=int, required=True)
    canned.add_argument("--repository", type=Path, required=True)
    canned.add_argument("--model", default=DEFAULT_MODEL)
    canned.add_argument("--uvloop", action="store_true")

    servicer = commands.add_parser("servicer", help="ModelInfer called directly, no transport")
    common(servicer)
    servicer.add_argument("--requests", type=int, default=20000)
    servicer.add_argument("--cprofile", action="store_true")
    servicer.add_argument("--uvloop", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if hasattr(args, "concurrency") and args.command == "servicer":
        args.concurrency = args.concurrency[0]
    handlers = {
        "ab": run_ab,
        "py-spy": run_py_spy,
        "cprofile": run_cprofile,
        "client-ceiling": run_client_ceiling,
        "_canned-server": run_canned_server,
        "servicer": run_servicer,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
