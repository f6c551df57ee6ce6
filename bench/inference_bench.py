"""Inference-server benchmark: our server against the in-process ceiling, NVIDIA's real Triton and the KServe ModelServer.

One closed-loop load generator (tritonclient aio, HTTP and gRPC) measures, for every model and
concurrency C, C workers that each send a batch-1 request, wait for the answer and send the next,
for a fixed duration after a warm-up, recording every latency. It runs against

- ``in-process``: ONNX Runtime in this process, C threads calling ``session.run`` back to back on one
  session built with the session options and execution providers our server derives from the
  model's ``config.pbtxt`` (the ceiling: no transport, no serialisation, no queue);
- ``ours``: ``python -m services.inference.cli`` on the same repository;
- ``kserve``: the KServe Python ModelServer (``bench/kserve_onnx_model.py`` in ``.venv-kserve``)
  hosting the same ONNX files with the same session options;
- ``triton``: NVIDIA's real Triton 2.51 (``make triton-install``) on the same repository, configs
  unchanged, ONNX Runtime through the Python-backend shim (``services/inference/triton_onnx_shim.py``).

For ours and Triton it also measures ``/v2/health/live`` latency while 4 clients send 50 MiB JSON
infer requests (rejected after parsing: the request is too large a batch), i.e. whether parsing large
requests stalls the health probes.

Servers run one at a time (never two on the machine at once), each started and stopped here. While
our server is up, Triton's ``perf_analyzer`` measures it as well, as a second opinion on the numbers
of our own client. The report (a table on stdout, JSON under ``bench/results/``, a throughput-latency
plot) compares the three against the targets in :data:`TARGETS`.

    .venv/bin/python bench/inference_bench.py --repository model_repository      # what `make bench` runs

Every step is a plain function (``measure_in_process``, ``measure_server``, ``run_perf_analyzer``,
``compare``...) so a developer can call one on a tiny model without the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio

from services.core.logging import configure_logging
from services.inference.model_config import complete_config
from services.inference.protocol import TRITON_TO_NUMPY
from services.local_platform.infra import free_port, free_ports  # noqa: F401  (free_port: bench/grpc_profile.py)
from services.inference.repository import ModelRepository
from services.inference.runtime import (
    create_session,
    cuda_usable,
    describe_tensors,
    execution_providers,
    plan_instances,
    session_config_entries,
    session_options,
)

log = logging.getLogger("bench.inference")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KSERVE_MODEL_SCRIPT = PROJECT_ROOT / "bench" / "kserve_onnx_model.py"
PLOT_SCRIPT = PROJECT_ROOT / "bench" / "plot_results.py"
RESULTS_SCHEMA = "eo-inference-bench/1"

DEFAULT_MODELS = ("Bigearth-net-ssl-label", "uc6-locust")
DEFAULT_CONCURRENCY = (1, 4, 16)
PROTOCOLS = ("http", "grpc")
IN_PROCESS = "in-process"
OURS = "ours"
KSERVE = "kserve"
TRITON = "triton"
TARGET_NAMES = (IN_PROCESS, OURS, KSERVE, TRITON)
HEALTH_PROBE_CLIENTS = 4
HEALTH_PROBE_BODY_MIB = 50

# Outputs of a server must equal the in-process outputs for the same input up to float noise: the
# thread count changes the summation order of convolutions, nothing else may differ.
OUTPUT_RTOL = 1e-3
OUTPUT_ATOL = 1e-3

# The numeric v2 datatypes (BYTES is not benchmarked), from the server's own table.
V2_TO_NUMPY: dict[str, np.dtype] = {k: v for k, v in TRITON_TO_NUMPY.items() if k != "BYTES"}


# --------------------------------------------------------------------------------------------
# What is measured: the model, its per-request inputs, the session options the server would use
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # protocol name (FP32, INT64, ...)
    shape: tuple[int, ...]  # of one batch-1 request


@dataclass(frozen=True)
class SessionSetup:
    """The ONNX Runtime session our server builds for a model's first instance, in portable form."""

    intra_op_threads: int
    inter_op_threads: int
    execution_mode: str  # "sequential" | "parallel"
    graph_optimization_level: str  # "disable" | "basic" | "extended" | "all"
    enable_cpu_mem_arena: bool
    enable_mem_pattern: bool
    config_entries: dict[str, str]
    providers: list[tuple[str, dict[str, str]]]
    instance_count: int
    max_batch_size: int
    dynamic_batching: bool


@dataclass(frozen=True)
class ModelUnderTest:
    name: str
    onnx_path: Path
    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    session: SessionSetup
    session_options: ort.SessionOptions = field(repr=False, compare=False)


_EXECUTION_MODE_NAMES = {
    ort.ExecutionMode.ORT_SEQUENTIAL: "sequential",
    ort.ExecutionMode.ORT_PARALLEL: "parallel",
}
_GRAPH_LEVEL_NAMES = {
    ort.GraphOptimizationLevel.ORT_DISABLE_ALL: "disable",
    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC: "basic",
    ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED: "extended",
    ort.GraphOptimizationLevel.ORT_ENABLE_ALL: "all",
}


def describe_graph(onnx_path: Path) -> tuple[list[Any], list[Any]]:
    """Inputs and outputs of the graph, through a cheap CPU session (no optimisation, one thread)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    return describe_tensors(session.get_inputs()), describe_tensors(session.get_outputs())


def load_model_under_test(repository: Path, name: str) -> ModelUnderTest:
    """Read a model the way our server does: its config, completed from the ONNX graph, and the
    session options and providers of its first instance (so the ceiling and the peer match it)."""
    definition = ModelRepository([repository]).read_definition(name)
    if not definition.version_paths:
        raise ValueError(f"model '{name}' has no version to serve in {repository}")
    onnx_path = definition.version_paths[max(definition.version_paths)]
    onnx_inputs, onnx_outputs = describe_graph(onnx_path)
    config = complete_config(definition.config, name, onnx_inputs, onnx_outputs, gpu_available=cuda_usable())
    placements = plan_instances(config)
    options = session_options(config, len(placements))
    setup = SessionSetup(
        intra_op_threads=options.intra_op_num_threads,
        inter_op_threads=options.inter_op_num_threads,
        execution_mode=_EXECUTION_MODE_NAMES[options.execution_mode],
        graph_optimization_level=_GRAPH_LEVEL_NAMES[options.graph_optimization_level],
        enable_cpu_mem_arena=options.enable_cpu_mem_arena,
        enable_mem_pattern=options.enable_mem_pattern,
        # The same entries our server's sessions get (incl. its defaults, e.g. no spinning): a fair peer.
        config_entries=session_config_entries(config),
        providers=execution_providers(config, placements[0]),
        instance_count=len(placements),
        max_batch_size=config.max_batch_size,
        dynamic_batching=config.HasField("dynamic_batching"),
    )
    inputs = []
    for tensor in config.input:
        dims = [int(d) for d in (tensor.dims or [])]
        if any(d < 0 for d in dims):
            raise ValueError(f"input '{tensor.name}' of '{name}' has a variable dimension {dims}: cannot pick a size")
        shape = ([1] + dims) if config.max_batch_size > 0 else dims
        datatype = next((info.datatype for info in onnx_inputs if info.name == tensor.name), None)
        if datatype is None:
            raise ValueError(f"config input '{tensor.name}' of '{name}' is not an input of {onnx_path}")
        inputs.append(TensorSpec(tensor.name, datatype, tuple(shape)))
    return ModelUnderTest(
        name=name,
        onnx_path=onnx_path,
        inputs=tuple(inputs),
        output_names=tuple(info.name for info in onnx_outputs),
        session=setup,
        session_options=options,
    )


def make_request_pool(model: ModelUnderTest, size: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``size`` distinct batch-1 requests, identical for every target (seeded). Values do not change
    the cost of these dense models; standard-normal floats look like standardised imagery."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        feeds: dict[str, np.ndarray] = {}
        for spec in model.inputs:
            if spec.datatype not in V2_TO_NUMPY:
                raise ValueError(f"input '{spec.name}' of '{model.name}' is {spec.datatype}: not benchmarked")
            dtype = V2_TO_NUMPY[spec.datatype]
            if dtype.kind == "f":
                feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
            elif dtype.kind == "b":
                feeds[spec.name] = rng.random(spec.shape) < 0.5
            else:
                feeds[spec.name] = rng.integers(0, 8, size=spec.shape).astype(dtype)
        pool.append(feeds)
    return pool


def open_session(model: ModelUnderTest) -> ort.InferenceSession:
    return create_session(model.onnx_path, model.session_options, model.session.providers)


# --------------------------------------------------------------------------------------------
# The closed loop: C workers back to back, warm-up, then a fixed measurement window
# --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    target: str  # in-process | ours | kserve
    protocol: str  # in-process | http | grpc
    model: str
    concurrency: int
    duration_s: float
    completed: int = 0
    errors: int = 0
    throughput_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    transfer: str = ""  # how tensors travelled: in-process, binary, json, raw_contents
    outputs_match: bool | None = None
    error: str = ""


class WindowRecorder:
    """Collects request timings; counts what completes inside [warm-up end, warm-up end + duration].

    Like perf_analyzer, throughput is completions in the window divided by its length, whatever
    their start time: with a closed loop every in-flight request started under the same load, and
    dropping requests that began in the warm-up would under-count slow models (a 2 s request in
    an 8 s window). Appends from several threads are safe: ``list.append`` is atomic in CPython.
    """

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        self.duration_s = duration_s
        self.measure_from = time.perf_counter() + warmup_s
        self.measure_until = self.measure_from + duration_s
        self.latencies_s: list[float] = []
        self.error_messages: list[str] = []

    def keep_going(self) -> bool:
        return time.perf_counter() < self.measure_until

    def record(self, started: float, finished: float, error: BaseException | None) -> None:
        if error is not None:
            self.error_messages.append(f"{type(error).__name__}: {error}")
        elif self.measure_from <= finished <= self.measure_until:
            self.latencies_s.append(finished - started)

    def fill(self, measurement: Measurement) -> Measurement:
        measurement.completed = len(self.latencies_s)
        measurement.errors = len(self.error_messages)
        measurement.throughput_per_s = len(self.latencies_s) / self.duration_s
        measurement.latency_ms = latency_summary_ms(self.latencies_s)
        if self.error_messages:
            measurement.error = self.error_messages[0]
        elif not self.latencies_s:
            measurement.error = "no request completed inside the measurement window (increase --duration)"
        return measurement


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    if not latencies_s:
        return {}
    values = np.asarray(latencies_s) * 1e3
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(values.mean()), 3),
        "max": round(float(values.max()), 3),
    }


def measure_in_process(
    session: ort.InferenceSession,
    model: ModelUnderTest,
    pool: Sequence[dict[str, np.ndarray]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> Measurement:
    """The ceiling: ``concurrency`` threads each calling ``session.run`` back to back, batch 1."""
    recorder = WindowRecorder(warmup_s, duration_s)

    def worker(index: int) -> None:
        position = index
        while recorder.keep_going():
            feeds = pool[position % len(pool)]
            position += concurrency
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                session.run(None, feeds)
            except Exception as exc:  # ORT raises several exception types; the bench reports them
                error = exc
            recorder.record(started, time.perf_counter(), error)

    threads = [threading.Thread(target=worker, args=(i,), name=f"in-process-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    measurement = Measurement(IN_PROCESS, IN_PROCESS, model.name, concurrency, duration_s, transfer=IN_PROCESS)
    return recorder.fill(measurement)


def _make_inputs(protocol: str, feeds: dict[str, np.ndarray], binary: bool) -> list[Any]:
    module = httpclient if protocol == "http" else grpcclient
    inputs = []
    for name, array in feeds.items():
        tensor = module.InferInput(name, list(array.shape), _v2_datatype(array.dtype))
        if protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _v2_datatype(dtype: np.dtype) -> str:
    for name, candidate in V2_TO_NUMPY.items():
        if candidate == dtype:
            return name
    raise ValueError(f"no v2 datatype for numpy {dtype}")


def _make_client(protocol: str, url: str, concurrency: int) -> Any:
    if protocol == "http":
        # One pooled connection per worker: no request waits for a free connection.
        return httpclient_aio.InferenceServerClient(url, conn_limit=max(concurrency, 1))
    return grpcclient_aio.InferenceServerClient(url)


async def probe_server_async(
    protocol: str, url: str, model: ModelUnderTest, feeds: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> tuple[str, bool]:
    """One request before measuring: which tensor encoding works, and whether the answer equals
    the in-process one. HTTP tries the binary tensor extension first, JSON if the server refuses it."""
    client = _make_client(protocol, url, 1)
    try:
        if protocol == "grpc":
            result = await client.infer(model.name, _make_inputs(protocol, feeds, binary=True))
            transfer = "raw_contents"
        else:
            try:
                result = await client.infer(model.name, _make_inputs(protocol, feeds, binary=True))
            except Exception as error:
                log.warning("binary tensors refused, falling back to JSON", extra={"url": url, "error": str(error)})
                result = await client.infer(model.name, _make_inputs(protocol, feeds, binary=False))
                transfer = "json"
            else:
                outputs = result.get_response().get("outputs", [])
                binary_out = all("binary_data_size" in (o.get("parameters") or {}) for o in outputs)
                transfer = "binary" if binary_out else "binary-in/json-out"
        matches = all(
            np.allclose(result.as_numpy(name), array, rtol=OUTPUT_RTOL, atol=OUTPUT_ATOL)
            for name, array in expected.items()
        )
        return transfer, matches
    finally:
        await client.close()


async def measure_server_async(
    target: str,
    protocol: str,
    url: str,
    model: ModelUnderTest,
    pool: Sequence[dict[str, np.ndarray]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    binary: bool = True,
) -> Measurement:
    """``concurrency`` coroutines on one client, each with one request in flight at all times."""
    client = _make_client(protocol, url, concurrency)
    # Encoded once: the client then spends its CPU on the transport, not on re-encoding tensors,
    # which matters on a 2-core machine where client and server share the cores.
    prepared = [_make_inputs(protocol, feeds, binary) for feeds in pool]
    recorder = WindowRecorder(warmup_s, duration_s)

    async def worker(index: int) -> None:
        position = index
        while recorder.keep_going():
            inputs = prepared[position % len(prepared)]
            position += concurrency
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                await client.infer(model.name, inputs)
            except Exception as exc:  # tritonclient raises its own and transport exceptions
                error = exc
            recorder.record(started, time.perf_counter(), error)

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await client.close()
    return recorder.fill(Measurement(target, protocol, model.name, concurrency, duration_s))


def measure_server(
    target: str,
    protocol: str,
    url: str,
    model: ModelUnderTest,
    pool: Sequence[dict[str, np.ndarray]],
    expected: dict[str, np.ndarray],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> Measurement:
    """Probe (encoding, correctness), then the closed loop, with the encoding the probe found."""
    try:
        transfer, matches = asyncio.run(probe_server_async(protocol, url, model, pool[0], expected))
    except Exception as error:
        return Measurement(target, protocol, model.name, concurrency, duration_s, error=f"probe failed: {error}")
    measurement = asyncio.run(
        measure_server_async(
            target, protocol, url, model, pool, concurrency, warmup_s, duration_s, binary=transfer != "json"
        )
    )
    measurement.transfer = transfer
    measurement.outputs_match = matches
    return measurement


# --------------------------------------------------------------------------------------------
# Servers: started, waited for, stopped; one at a time
# --------------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen
    http_url: str  # host:port, as tritonclient wants it
    grpc_url: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("server ignored SIGTERM, killing it", extra={"server": self.name})
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def http_status(url: str, timeout_s: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log's last lines."""


def wait_until_ready(server: ServerProcess, ready_paths: Sequence[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(ready_paths)
    while pending:
        if server.process.poll() is not None:
            raise ServerStartError(
                f"{server.name} exited with status {server.process.returncode} before it was ready\n"
                f"{server.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise ServerStartError(f"{server.name} not ready within {timeout_s} s (waiting for {pending[0]})\n{server.log_tail()}")
        try:
            if http_status(f"http://{server.http_url}{pending[0]}") == 200:
                pending.pop(0)
                continue
        except OSError:
            pass
        time.sleep(0.2)


@contextlib.contextmanager
def running_server(
    name: str, command: list[str], http_port: int, grpc_port: int, ready_paths: Sequence[str], log_path: Path,
    timeout_s: float, env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    try:
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    except OSError as error:  # e.g. .venv-kserve missing
        raise ServerStartError(f"cannot start {name} ({command[0]}): {error}") from None
    server = ServerProcess(name, process, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_path)
    log.info("server starting", extra={"server": name, "pid": process.pid, "log": str(log_path)})
    started = time.monotonic()
    try:
        wait_until_ready(server, ready_paths, timeout_s)
        log.info("server ready", extra={"server": name, "startup_s": round(time.monotonic() - started, 1)})
        yield server
    finally:
        status = server.stop()
        log.info("server stopped", extra={"server": name, "exit_status": status})


def ready_paths_for(models: Sequence[ModelUnderTest]) -> list[str]:
    return ["/v2/health/ready", *(f"/v2/models/{model.name}/ready" for model in models)]


def our_server_command(
    python: str, repository: Path, models: Sequence[ModelUnderTest], http_port: int, grpc_port: int, metrics_port: int
) -> list[str]:
    # Explicit mode loads only the models under test: the others would take memory and start-up time.
    command = [
        python, "-m", "services.inference.cli",
        "--model-repository", str(repository),
        "--http-port", str(http_port),
        "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port),
        "--http-address", "127.0.0.1",
        "--grpc-address", "127.0.0.1",
        "--model-control-mode", "explicit",
    ]
    for model in models:
        command += ["--load-model", model.name]
    return command


def triton_server_command(
    triton_venv: Path, repository: Path, models: Sequence[ModelUnderTest], ports: Sequence[int], work_dir: Path
) -> tuple[list[str], dict[str, str]]:
    """Real Triton's command line and environment, loading only the models under test (as ours does)."""
    from services.inference.real_triton import (
        TritonInstallation,
        prepare_backend_directory,
        triton_command,
        triton_environment,
    )

    installation = TritonInstallation.from_venv(triton_venv)
    backends = prepare_backend_directory(installation, work_dir / "triton-backends")
    extra = ["--model-control-mode=explicit", *(f"--load-model={model.name}" for model in models)]
    command = triton_command(installation, repository, backends, http_port=ports[0], grpc_port=ports[1],
                             metrics_port=ports[2], address="127.0.0.1", extra_args=extra)
    return command, triton_environment(installation)


def large_json_body(model: ModelUnderTest, mebibytes: int) -> bytes:
    """An infer request of about ``mebibytes`` MiB of JSON for ``model``'s first input: far more rows than
    max_batch_size, so a server parses all of it and then refuses it (400) without running the model."""
    spec = model.inputs[0]
    row_shape = list(spec.shape[1:])  # spec.shape is a batch-1 request's
    row_json = ("0.123456," * int(np.prod(row_shape))).encode()
    rows = max(1, mebibytes * 1024 * 1024 // len(row_json))
    data = (row_json * rows)[:-1]
    header = json.dumps({"inputs": [{"name": spec.name, "datatype": spec.datatype,
                                     "shape": [rows, *row_shape], "data": []}]}).encode()
    prefix, _, suffix = header.rpartition(b"[]")
    return prefix + b"[" + data + b"]" + suffix


def measure_health_under_large_json(
    http_url: str, model: ModelUnderTest, clients: int, mebibytes: int, duration_s: float
) -> dict[str, Any]:
    """``/v2/health/live`` latency (one probe every 10 ms) while ``clients`` threads send large JSON requests."""
    import http.client

    body = large_json_body(model, mebibytes)
    host, port = http_url.rsplit(":", 1)
    stop = threading.Event()
    statuses: list[int] = []

    def sender() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        while not stop.is_set():
            try:
                connection.request("POST", f"/v2/models/{model.name}/infer", body,
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=120)
        connection.close()

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    latencies: list[float] = []
    failures = 0
    probe = http.client.HTTPConnection(host, int(port), timeout=30)
    time.sleep(1.0)  # the senders' first bodies are on their way
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            probe.request("GET", "/v2/health/live")
            response = probe.getresponse()
            response.read()
            if response.status != 200:
                failures += 1
        except (OSError, http.client.HTTPException):
            failures += 1
            probe.close()
            probe = http.client.HTTPConnection(host, int(port), timeout=30)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    probe.close()
    return {
        "clients": clients, "body_mib": round(len(body) / 2**20, 1), "probes": len(latencies),
        "probe_failures": failures, "large_requests_answered": len(statuses),
        "large_request_statuses": sorted(set(statuses)), "latency_ms": latency_summary_ms(latencies),
    }


def kserve_models_file(models: Sequence[ModelUnderTest], directory: Path) -> Path:
    """What the KServe process needs per model: the ONNX file and our server's session setup."""
    entries = [
        {
            "name": model.name,
            "onnx_path": str(model.onnx_path),
            "session": {
                "intra_op_threads": model.session.intra_op_threads,
                "inter_op_threads": model.session.inter_op_threads,
                "execution_mode": model.session.execution_mode,
                "graph_optimization_level": model.session.graph_optimization_level,
                "enable_cpu_mem_arena": model.session.enable_cpu_mem_arena,
                "enable_mem_pattern": model.session.enable_mem_pattern,
                "config_entries": model.session.config_entries,
                "providers": [[name, options] for name, options in model.session.providers],
            },
        }
        for model in models
    ]
    path = directory / "kserve-models.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


def kserve_command(kserve_python: str, models_file: Path, http_port: int, grpc_port: int) -> list[str]:
    return [
        kserve_python, str(KSERVE_MODEL_SCRIPT),
        "--models-file", str(models_file),
        "--http_port", str(http_port),
        "--grpc_port", str(grpc_port),
        # One line per request with its timings: off, as our server writes none either.
        "--enable_latency_logging", "false",
    ]


# --------------------------------------------------------------------------------------------
# perf_analyzer against our server
# --------------------------------------------------------------------------------------------


@dataclass
class PerfAnalyzerResult:
    model: str
    protocol: str
    concurrency: int
    throughput_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    server_us: dict[str, float] = field(default_factory=dict)  # server-side statistics, per request
    measurement_interval_ms: int = 0
    stability_percentage: int = 0
    attempts: int = 0
    command: str = ""
    error: str = ""


PERF_LATENCY_COLUMNS = {"p50": "p50 latency", "p90": "p90 latency", "p95": "p95 latency", "p99": "p99 latency"}
PERF_SERVER_COLUMNS = {
    "queue": "Server Queue",
    "compute_input": "Server Compute Input",
    "compute_infer": "Server Compute Infer",
    "compute_output": "Server Compute Output",
}


def parse_perf_analyzer_csv(path: Path) -> list[dict[str, float]]:
    """perf_analyzer's ``-f`` CSV: one row per concurrency, times in microseconds."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, float] = {}
            for key, value in row.items():
                if key is None:
                    continue
                try:
                    parsed[key.strip()] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(parsed)
    return rows


def measurement_interval_ms(p50_latency_ms: float | None) -> int:
    """A window long enough for several requests to complete even at the highest latency."""
    if not p50_latency_ms:
        return 2000
    return int(min(20000, max(1000, 4 * p50_latency_ms)))


PERF_STABILITY_PERCENTAGE = 25
PERF_MAX_TRIALS = 6
UNSTABLE_MARKER = "Failed to obtain stable measurement"


def run_perf_analyzer(
    perf_analyzer: str,
    model: str,
    protocol: str,
    url: str,
    concurrency: int,
    interval_ms: int,
    work_dir: Path,
    timeout_s: float = 240.0,
) -> PerfAnalyzerResult:
    """One point; when the windows do not agree within 25 % (a busy 2-core machine), one more try
    with windows twice as long and 50 % tolerance, so the run still yields a figure, marked as such."""
    result = _perf_analyzer_attempt(
        perf_analyzer, model, protocol, url, concurrency, interval_ms, PERF_STABILITY_PERCENTAGE, work_dir, timeout_s
    )
    if UNSTABLE_MARKER in result.error:
        retry = _perf_analyzer_attempt(
            perf_analyzer, model, protocol, url, concurrency, 2 * interval_ms, 2 * PERF_STABILITY_PERCENTAGE,
            work_dir, timeout_s,
        )
        retry.attempts = 2
        return retry
    return result


def _perf_analyzer_attempt(
    perf_analyzer: str,
    model: str,
    protocol: str,
    url: str,
    concurrency: int,
    interval_ms: int,
    stability_percentage: int,
    work_dir: Path,
    timeout_s: float,
) -> PerfAnalyzerResult:
    csv_path = work_dir / f"perf-{model}-{protocol}-c{concurrency}.csv"
    csv_path.unlink(missing_ok=True)
    command = [
        perf_analyzer, "-m", model, "-u", url, "-i", protocol,
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-interval", str(interval_ms),
        "--stability-percentage", str(stability_percentage),
        "--max-trials", str(PERF_MAX_TRIALS),
        "-f", str(csv_path),
    ]
    result = PerfAnalyzerResult(
        model, protocol, concurrency, measurement_interval_ms=interval_ms,
        stability_percentage=stability_percentage, attempts=1, command=" ".join(command),
    )
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        result.error = f"perf_analyzer did not finish within {timeout_s} s"
        return result
    if completed.returncode != 0 or not csv_path.exists():
        lines = (completed.stdout + completed.stderr).strip().splitlines()
        reasons = [line.strip() for line in lines if "rror" in line or "Failed" in line] or lines[-3:]
        result.error = f"perf_analyzer exited {completed.returncode}: " + " | ".join(reasons)
        return result
    rows = parse_perf_analyzer_csv(csv_path)
    if not rows:
        result.error = "perf_analyzer wrote an empty CSV"
        return result
    row = rows[0]
    result.throughput_per_s = row.get("Inferences/Second", 0.0)
    result.latency_ms = {key: round(row[col] / 1e3, 3) for key, col in PERF_LATENCY_COLUMNS.items() if col in row}
    result.server_us = {key: row[col] for key, col in PERF_SERVER_COLUMNS.items() if col in row}
    return result


# --------------------------------------------------------------------------------------------
# Comparisons and report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    metric: str
    model: str | None  # None: every model
    comparison: str  # ">=" or "<"
    threshold: float
    meaning: str


TARGETS = (
    Target("saturation_vs_in_process", "Bigearth-net-ssl-label", ">=", 0.95,
           "our best throughput / in-process best throughput"),
    Target("vs_triton_at_max_concurrency", "uc6-locust", ">=", 1.0,
           "our throughput / real Triton's throughput at the highest concurrency"),
    Target("vs_kserve_at_max_concurrency", None, ">=", 2.0,
           "our throughput / KServe throughput at the highest concurrency"),
    Target("added_p50_ms_at_min_concurrency", "uc6-locust", "<", 2.0,
           "our p50 - in-process p50 at the lowest concurrency, ms"),
)


def _index(measurements: Sequence[Measurement]) -> dict[tuple[str, str, str, int], Measurement]:
    return {
        (m.target, m.protocol, m.model, m.concurrency): m
        for m in measurements
        if not m.error or m.completed > 0
    }


def compare(measurements: Sequence[Measurement], models: Sequence[str], protocols: Sequence[str],
            concurrency: Sequence[int]) -> list[dict[str, Any]]:
    """The ratios the targets are stated in, per model and protocol (None where a side is missing)."""
    by_key = _index(measurements)
    low, high = min(concurrency), max(concurrency)
    rows = []
    for model in models:
        in_process = [by_key[k] for k in by_key if k[0] == IN_PROCESS and k[2] == model]
        best_in_process = max((m.throughput_per_s for m in in_process), default=0.0)
        for protocol in protocols:
            ours = [by_key[k] for k in by_key if k[0] == OURS and k[1] == protocol and k[2] == model]
            best_ours = max((m.throughput_per_s for m in ours), default=0.0)
            ours_high = by_key.get((OURS, protocol, model, high))
            kserve_high = by_key.get((KSERVE, protocol, model, high))
            triton_high = by_key.get((TRITON, protocol, model, high))
            ours_low = by_key.get((OURS, protocol, model, low))
            in_process_low = by_key.get((IN_PROCESS, IN_PROCESS, model, low))
            values = {
                "saturation_vs_in_process": (best_ours / best_in_process) if best_ours and best_in_process else None,
                "vs_kserve_at_max_concurrency": (
                    ours_high.throughput_per_s / kserve_high.throughput_per_s
                    if ours_high and kserve_high and kserve_high.throughput_per_s
                    else None
                ),
                "vs_triton_at_max_concurrency": (
                    ours_high.throughput_per_s / triton_high.throughput_per_s
                    if ours_high and triton_high and triton_high.throughput_per_s
                    else None
                ),
                "added_p50_ms_at_min_concurrency": (
                    ours_low.latency_ms["p50"] - in_process_low.latency_ms["p50"]
                    if ours_low and in_process_low and ours_low.latency_ms and in_process_low.latency_ms
                    else None
                ),
            }
            for metric, value in values.items():
                target = next(
                    (t for t in TARGETS if t.metric == metric and (t.model is None or t.model == model)), None
                )
                met = None
                if target is not None and value is not None:
                    met = value >= target.threshold if target.comparison == ">=" else value < target.threshold
                rows.append({
                    "model": model,
                    "protocol": protocol,
                    "metric": metric,
                    "value": None if value is None else round(value, 3),
                    "target": None if target is None else f"{target.comparison} {target.threshold}",
                    "met": met,
                })
    return rows


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_report(report: dict[str, Any]) -> str:
    parts = []
    measurement_rows = []
    for m in sorted(report["measurements"], key=lambda m: (m["model"], TARGET_NAMES.index(m["target"]),
                                                            m["protocol"], m["concurrency"])):
        lat = m["latency_ms"]
        measurement_rows.append([
            m["model"], m["target"], m["protocol"], m["concurrency"], f"{m['throughput_per_s']:.2f}",
            lat.get("p50"), lat.get("p99"), m["completed"], m["errors"], m["transfer"],
            {True: "yes", False: "NO", None: "-"}[m["outputs_match"]], m["error"][:60] or "",
        ])
    parts.append(format_table(
        ["model", "target", "protocol", "conc", "infer/s", "p50 ms", "p99 ms", "n", "errors", "transfer",
         "outputs=", "error"],
        measurement_rows,
    ))
    if report["perf_analyzer"]:
        perf_rows = [
            [p["model"], p["protocol"], p["concurrency"], f"{p['throughput_per_s']:.2f}", p["latency_ms"].get("p50"),
             p["latency_ms"].get("p99"), p["server_us"].get("queue"), p["server_us"].get("compute_infer"),
             p["error"][:60]]
            for p in report["perf_analyzer"]
        ]
        parts.append("perf_analyzer against our server (server-side times per request, us):\n" + format_table(
            ["model", "protocol", "conc", "infer/s", "p50 ms", "p99 ms", "queue us", "infer us", "error"], perf_rows
        ))
    comparison_rows = [
        [c["model"], c["protocol"], c["metric"], c["value"], c["target"] or "",
         {True: "met", False: "NOT MET", None: ""}[c["met"]]]
        for c in report["comparisons"]
    ]
    parts.append(format_table(["model", "protocol", "metric", "value", "target", ""], comparison_rows))
    health = report.get("health_under_large_json", {})
    if health:
        health_rows = [
            [target, h.get("clients"), h.get("body_mib"), h.get("probes"), h["latency_ms"].get("p50"),
             h["latency_ms"].get("p99"), h["latency_ms"].get("max"), h.get("large_requests_answered"),
             h.get("probe_failures"), h.get("error", "")[:60]]
            for target, h in health.items()
        ]
        parts.append(f"/v2/health/live while {HEALTH_PROBE_CLIENTS} clients send {HEALTH_PROBE_BODY_MIB} MiB JSON "
                     "requests (target p99 < 50 ms):\n" + format_table(
                         ["server", "clients", "MiB", "probes", "p50 ms", "p99 ms", "max ms", "large answered",
                          "probe failures", "error"], health_rows))
    for target, error in report.get("server_errors", {}).items():
        parts.append(f"{target} did not start; its points are missing:\n{error}")
    return "\n\n".join(parts)


def package_version(name: str, python: str | None = None) -> str:
    if python is None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return ""
    try:
        completed = subprocess.run(
            [python, "-c", f"import importlib.metadata as m; print(m.version('{name}'))"],
            capture_output=True, text=True, timeout=60,
        )
        return completed.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def write_results(report: dict[str, Any], results_dir: Path, stamp: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"inference-{stamp}.json"
    text = json.dumps(report, indent=2, default=str) + "\n"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(text)
    temporary.replace(path)
    shutil.copyfile(path, results_dir / "latest.json")
    return path


def plot(plot_python: str, results_path: Path, png_path: Path) -> bool:
    """The plot runs in the bench venv (matplotlib is no dependency of the project)."""
    if not plot_python or not Path(plot_python).exists():
        log.warning("no plot: the bench venv's python is missing", extra={"python": plot_python})
        return False
    completed = subprocess.run(
        [plot_python, str(PLOT_SCRIPT), str(results_path), str(png_path)], capture_output=True, text=True
    )
    if completed.returncode != 0:
        log.warning("plot failed", extra={"stderr": completed.stderr[-2000:]})
        return False
    return True


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    repository: Path
    models: list[str]
    concurrency: list[int]
    protocols: list[str]
    targets: list[str]
    duration_s: float
    warmup_s: float
    pool_size: int
    seed: int
    kserve_python: str
    triton_venv: Path
    health_probe_s: float
    perf_analyzer: str
    plot_python: str
    results_dir: Path
    log_dir: Path
    server_start_timeout_s: float


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    started_at = datetime.now(timezone.utc)
    # The machine may be shared: the load average says how quiet it was, to judge the numbers by.
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    models = [load_model_under_test(config.repository, name) for name in config.models]
    pools = {model.name: make_request_pool(model, config.pool_size, config.seed) for model in models}
    measurements: list[Measurement] = []
    perf_results: list[PerfAnalyzerResult] = []
    server_errors: dict[str, str] = {}  # a server that did not start: the others are still measured
    health: dict[str, dict[str, Any]] = {}

    # Reference outputs (and the ceiling) from one in-process session per model, freed before any server starts.
    expected: dict[str, dict[str, np.ndarray]] = {}
    for model in models:
        session = open_session(model)
        first = session.run(None, pools[model.name][0])
        expected[model.name] = dict(zip(model.output_names, first))
        if IN_PROCESS in config.targets:
            for concurrency in config.concurrency:
                measurement = measure_in_process(
                    session, model, pools[model.name], concurrency, config.warmup_s, config.duration_s
                )
                _log_measurement(measurement)
                measurements.append(measurement)
        del session

    def measure_target(target: str, server: ServerProcess) -> None:
        for model in models:
            for protocol in config.protocols:
                url = server.http_url if protocol == "http" else server.grpc_url
                for concurrency in config.concurrency:
                    measurement = measure_server(
                        target, protocol, url, model, pools[model.name], expected[model.name],
                        concurrency, config.warmup_s, config.duration_s,
                    )
                    _log_measurement(measurement)
                    measurements.append(measurement)

    def measure_perf_analyzer(server: ServerProcess, work_dir: Path) -> None:
        by_key = _index(measurements)
        for model in models:
            for protocol in config.protocols:
                url = server.http_url if protocol == "http" else server.grpc_url
                for concurrency in config.concurrency:
                    ours = by_key.get((OURS, protocol, model.name, concurrency))
                    p50 = ours.latency_ms.get("p50") if ours else None
                    result = run_perf_analyzer(
                        config.perf_analyzer, model.name, protocol, url, concurrency,
                        measurement_interval_ms(p50), work_dir,
                    )
                    log.info("perf_analyzer", extra=asdict(result))
                    perf_results.append(result)

    def measure_health(target: str, server: ServerProcess) -> None:
        if config.health_probe_s <= 0:
            return
        try:
            health[target] = measure_health_under_large_json(
                server.http_url, models[-1], HEALTH_PROBE_CLIENTS, HEALTH_PROBE_BODY_MIB, config.health_probe_s
            )
        except Exception as error:  # noqa: BLE001 - the other figures are still worth reporting
            health[target] = {"error": str(error), "latency_ms": {}}
        log.info("health under large JSON", extra={"target": target, **health[target]})

    with tempfile.TemporaryDirectory(prefix="eo-bench-") as work:
        work_dir = Path(work)
        if OURS in config.targets:
            http_port, grpc_port, metrics_port = free_ports(3)
            command = our_server_command(
                sys.executable, config.repository, models, http_port, grpc_port, metrics_port
            )
            try:
                with running_server(OURS, command, http_port, grpc_port, ready_paths_for(models),
                                    config.log_dir / "ours.log", config.server_start_timeout_s) as server:
                    measure_target(OURS, server)
                    measure_health(OURS, server)
                    if config.perf_analyzer:
                        measure_perf_analyzer(server, work_dir)
            except ServerStartError as error:
                log.error("server did not start", extra={"server": OURS, "error": str(error)})
                server_errors[OURS] = str(error)
        if KSERVE in config.targets:
            http_port, grpc_port = free_ports(2)
            models_file = kserve_models_file(models, work_dir)
            command = kserve_command(config.kserve_python, models_file, http_port, grpc_port)
            try:
                with running_server(KSERVE, command, http_port, grpc_port, ready_paths_for(models),
                                    config.log_dir / "kserve.log", config.server_start_timeout_s) as server:
                    measure_target(KSERVE, server)
            except ServerStartError as error:
                log.error("server did not start", extra={"server": KSERVE, "error": str(error)})
                server_errors[KSERVE] = str(error)
        if TRITON in config.targets:
            ports = free_ports(3)
            try:
                command, env = triton_server_command(config.triton_venv, config.repository, models, ports, work_dir)
                with running_server(TRITON, command, ports[0], ports[1], ready_paths_for(models),
                                    config.log_dir / "triton.log", config.server_start_timeout_s, env) as server:
                    measure_target(TRITON, server)
                    measure_health(TRITON, server)
            except Exception as error:  # noqa: BLE001 - not installed (make triton-install) or did not start
                log.error("server did not start", extra={"server": TRITON, "error": str(error)})
                server_errors[TRITON] = str(error)

    finished_at = datetime.now(timezone.utc)
    return {
        "schema": RESULTS_SCHEMA,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": finished_at.isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1_5_15_at_start": load_at_start,
            "loadavg_1_5_15_at_end": [round(value, 2) for value in os.getloadavg()],
        },
        "versions": {
            "onnxruntime": ort.__version__,
            "tritonclient": package_version("tritonclient"),
            "kserve": package_version("kserve", config.kserve_python) if KSERVE in config.targets else "",
            "nvidia-pytriton": (package_version("nvidia-pytriton", str(config.triton_venv / "bin" / "python"))
                                if TRITON in config.targets else ""),
            "perf_analyzer_tritonclient": _perf_analyzer_version(config.perf_analyzer),
        },
        "settings": {
            "duration_s": config.duration_s,
            "warmup_s": config.warmup_s,
            "concurrency": config.concurrency,
            "protocols": config.protocols,
            "targets": config.targets,
            "request_pool": config.pool_size,
            "seed": config.seed,
            "batch_size": 1,
            "client": "tritonclient aio (http.aio, grpc.aio), one client per measurement, closed loop",
            "latency_percentiles": "numpy linear interpolation over every request completed in the window",
        },
        "models": {
            model.name: {
                "onnx": _display_path(model.onnx_path),
                "inputs": [asdict(spec) for spec in model.inputs],
                "outputs": list(model.output_names),
                "session": asdict(model.session),
            }
            for model in models
        },
        "server_errors": server_errors,
        "health_under_large_json": health,
        "measurements": [asdict(m) for m in measurements],
        "perf_analyzer": [asdict(p) for p in perf_results],
        "comparisons": compare(measurements, config.models, config.protocols, config.concurrency),
        "targets": [asdict(t) for t in TARGETS],
    }


def _perf_analyzer_version(perf_analyzer: str) -> str:
    if not perf_analyzer:
        return ""
    venv_python = PROJECT_ROOT / ".venv-perf" / "bin" / "python"
    return package_version("tritonclient", str(venv_python)) if venv_python.exists() else ""


def _log_measurement(measurement: Measurement) -> None:
    log.info(
        "measured",
        extra={
            "target": measurement.target,
            "protocol": measurement.protocol,
            "model": measurement.model,
            "concurrency": measurement.concurrency,
            "throughput_per_s": round(measurement.throughput_per_s, 2),
            "p50_ms": measurement.latency_ms.get("p50"),
            "p99_ms": measurement.latency_ms.get("p99"),
            "errors": measurement.errors,
            "error": measurement.error,
        },
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--model", dest="models", action="append", help=f"repeatable; default {list(DEFAULT_MODELS)}")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY))
    parser.add_argument("--protocol", dest="protocols", choices=PROTOCOLS, nargs="+", default=list(PROTOCOLS))
    parser.add_argument("--target", dest="targets", choices=TARGET_NAMES, nargs="+", default=list(TARGET_NAMES))
    parser.add_argument("--duration", type=float, default=8.0, help="measurement window per point, s")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up before each window, s")
    parser.add_argument("--pool-size", type=int, default=8, help="distinct requests cycled through")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kserve-python", default=str(PROJECT_ROOT / ".venv-kserve" / "bin" / "python"))
    parser.add_argument("--triton-venv", type=Path, default=PROJECT_ROOT / ".venv-triton",
                        help="virtual environment of make triton-install")
    parser.add_argument("--health-probe", type=float, default=15.0,
                        help="seconds of /v2/health/live probing under large JSON requests (0 = skip)")
    parser.add_argument("--perf-analyzer", default=str(PROJECT_ROOT / "bench" / "perf_analyzer.sh"),
                        help="wrapper script; empty string to skip perf_analyzer")
    parser.add_argument("--plot-python", default=str(PROJECT_ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--log-dir", type=Path, default=PROJECT_ROOT / "build" / "bench",
                        help="server logs of the last run")
    parser.add_argument("--server-start-timeout", type=float, default=300.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("INFO", "text")
    if any(c < 1 for c in args.concurrency):
        raise SystemExit("--concurrency values must be >= 1")
    config = BenchConfig(
        repository=args.repository.resolve(),
        models=args.models or list(DEFAULT_MODELS),
        concurrency=sorted(set(args.concurrency)),
        protocols=args.protocols,
        targets=args.targets,
        duration_s=args.duration,
        warmup_s=args.warmup,
        pool_size=args.pool_size,
        seed=args.seed,
        kserve_python=args.kserve_python,
        triton_venv=args.triton_venv,
        health_probe_s=args.health_probe,
        perf_analyzer=args.perf_analyzer,
        plot_python=args.plot_python,
        results_dir=args.results_dir,
        log_dir=args.log_dir,
        server_start_timeout_s=args.server_start_timeout,
    )
    points = len(config.models) * len(config.concurrency) * (
        (IN_PROCESS in config.targets) + len(config.protocols) * sum(
            target in config.targets for target in (OURS, KSERVE, TRITON))
    )
    log.info("benchmark starting", extra={
        "points": points, "estimated_load_s": round(points * (config.duration_s + config.warmup_s)),
        "models": config.models, "targets": config.targets,
    })
    report = run_benchmark(config)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    results_path = write_results(report, config.results_dir, stamp)
    print(render_report(report))
    png_path = config.results_dir / "throughput-latency.png"
    plotted = plot(config.plot_python, results_path, png_path)
    print(f"\nresults: {results_path} (and {config.results_dir / 'latest.json'})"
          + (f"\nplot:    {png_path}" if plotted else ""))
    failed = [m for m in report["measurements"] if m["completed"] == 0]
    return 1 if failed or report["server_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
