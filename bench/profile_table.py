"""Where a request's microseconds go in our server under perf_analyzer load (``bench_check.py --profile DIR``).

Our server runs alone, pinned to the server core (``taskset -c 1``) and loaded with only ``uc6-locust``;
perf_analyzer (gRPC by default, concurrency 16) and py-spy share the other core. While perf_analyzer holds the load:

1. ``py-spy record --gil --nonblocking --format raw`` for ``--profile-seconds``: collapsed stacks of the thread
   holding the GIL at each sample, written to ``DIR/<name>.collapsed.txt``, with the requests completed meanwhile
   (the server's own statistics) and its CPU time (``/proc``);
2. ``py-spy record --gil --native --format flamegraph`` for 10 s more: ``DIR/<name>.svg`` (C frames included);
3. ``/proc/<pid>/task/*/stat`` before and after step 1: CPU time per thread (C threads that py-spy cannot see,
   e.g. gRPC's event engine, count here only).

Each sample is put in one category by its innermost frame that matches :data:`CATEGORY_RULES`; a category's
microseconds per request = its samples / rate / requests completed in the window: GIL time. The
rest of the process's CPU time ran without the GIL (ONNX Runtime's kernels release it, gRPC's core threads never
take it).
``DIR/<name>.table.md`` gets the table, ``DIR/<name>.json`` the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

PROJECT_ROOT = Path(__file__).resolve().parents[1]

import inference_bench as bench  # noqa: E402  (bench_check put bench/ on sys.path)

PY_SPY_RATE = 250
FLAMEGRAPH_SECONDS = 10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Frame:
    function: str  # py-spy qualifies methods: "LoadedVersion.prepare_inputs"
    file: str

    @property
    def name(self) -> str:
        return self.function.rsplit(".", 1)[-1]


def parse_frame(text: str) -> Frame:
    """``function (path/file.py:line)`` as py-spy writes a frame; anything else is a bare function name."""
    if text.endswith(")") and " (" in text:
        function, _, location = text[:-1].rpartition(" (")
        return Frame(function, location.rsplit(":", 1)[0])
    return Frame(text, "")


def _in(file: str, *parts: str) -> bool:
    # py-spy writes site-packages paths from the package on ("grpc/aio/_server.py"), others in full.
    path = "/" + file
    return any(part in path for part in parts)


DECODE_FUNCTIONS = {"infer_request_from_proto", "array_from_raw", "array_from_contents", "parameters_from_proto",
                    "decode_infer_request", "_decode_input", "_decode_requested_output", "deserialize_bytes_tensor",
                    "reject_shared_memory", "pop_classification"}
ENCODE_FUNCTIONS = {"fill_infer_response", "infer_response_to_proto", "array_to_raw", "encode_infer_response",
                    "_raw_buffer", "_json_data", "stream_infer_response", "set_parameters", "build_response",
                    "serialize_bytes_tensor", "classify", "_to_bytes_array"}
VALIDATION_FUNCTIONS = {"prepare_inputs", "resolve_outputs", "_serving_version", "_record", "newest", "_checked_shape",
                        "checked_model_version"}
BATCHING_FUNCTIONS = {"execute_batch", "_ready_batch_size", "_count_up_to"}

# (category, predicate on a frame), tried innermost frame first; the first frame that matches decides.
CATEGORY_RULES: list[tuple[str, Callable[[Frame], bool]]] = [
    ("ORT call (session.run)", lambda f: _in(f.file, "/onnxruntime/") or (
        f.file.endswith("inference/runtime.py") and f.function in {"OnnxInstance.run", "OnnxInstance._run_with_ort_values"})),
    ("logging", lambda f: _in(f.file, "/logging/__init__.py", "core/logging.py")),
    ("statistics", lambda f: f.file.endswith(("inference/stats.py", "inference/metrics.py"))),
    ("decode (protobuf -> arrays)", lambda f: f.name in DECODE_FUNCTIONS),
    ("encode (arrays -> protobuf)", lambda f: f.name in ENCODE_FUNCTIONS),
    ("validation (shapes, dtypes, version)", lambda f: f.name in VALIDATION_FUNCTIONS),
    ("batching (concatenate, split)", lambda f: f.name in BATCHING_FUNCTIONS),
    ("scheduling (queue, worker hand-off)", lambda f: f.file.endswith(("inference/batching.py",
                                                                        "inference/runtime.py",
                                                                        "inference/engine.py"))),
    ("gRPC servicer + grpc.aio", lambda f: _in(f.file, "inference/grpc_server.py", "/grpc/")),
    ("HTTP handler + aiohttp", lambda f: _in(f.file, "inference/http_server.py", "/aiohttp/")),
    ("event loop (asyncio, uvloop)", lambda f: _in(f.file, "/asyncio/", "uvloop")),
    ("threading", lambda f: _in(f.file, "/threading.py", "concurrent/futures")),
]
OTHER = "other Python"
NOT_PYTHON = "CPU without the GIL (ORT kernels, gRPC core threads)"
# Table: --gil keeps the sample of the thread holding the GIL, the resource a Python server runs out of first, so a
# category's samples / rate is the GIL time it takes; --nonblocking leaves the server running at full speed, so
# samples are wall time (C code under the GIL, uvloop's or grpc's Cython, counts to its innermost Python frame).
PY_SPY_TABLE_FLAGS = ("--gil", "--nonblocking")
# Flame graph: --native shows the C frames too (uvloop, grpc's Cython, libc); it needs py-spy's blocking mode, which
# pauses the server at every sample and halves its throughput meanwhile, so it gives the picture, not the figures.
PY_SPY_FLAMEGRAPH_FLAGS = ("--gil", "--native")


def categorize(stack: Sequence[Frame]) -> str:
    for frame in reversed(stack):
        for category, matches in CATEGORY_RULES:
            if matches(frame):
                return category
    return OTHER


def read_collapsed(path: Path) -> Counter[str]:
    """py-spy's raw format: ``frame;frame;...;frame count`` per line, outermost frame first."""
    samples: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [parse_frame(text) for text in stack.split(";") if text]
        samples[categorize(frames)] += int(count)
    return samples


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_s(pid: int) -> dict[str, float]:
    per_thread: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        key = f"{name} [{task.name}]"
        per_thread[key] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return per_thread


@dataclass(frozen=True)
class ServerCounts:
    """The model's statistics (Triton's ``/v2/models/<name>/stats``) at one moment."""

    inferences: int
    executions: int
    compute_infer_ns: int
    compute_input_ns: int
    compute_output_ns: int

    @classmethod
    def read(cls, http_url: str, model: str) -> "ServerCounts":
        with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as response:
            stats = json.load(response)["model_stats"][0]
        # batch_stats: one entry per batch size, durations per execution (inference_stats would count a batch's
        # time once for each request in it).
        batches = stats.get("batch_stats", [])

        def total(key: str) -> int:
            return sum(int(entry[key]["ns"]) for entry in batches)

        return cls(int(stats["inference_count"]), int(stats["execution_count"]), total("compute_infer"),
                   total("compute_input"), total("compute_output"))

    def minus(self, earlier: "ServerCounts") -> "ServerCounts":
        return ServerCounts(*(getattr(self, f) - getattr(earlier, f) for f in self.__dataclass_fields__))


def per_request_table(samples: Counter[str], rate: int, process_cpu: float, requests: float) -> list[tuple[str, float, float]]:
    """(category, microseconds per request, share of the server's CPU) rows, largest first; GIL time per category,
    then the CPU time that ran without the GIL."""
    total_samples = sum(samples.values())
    python_cpu = total_samples / rate
    rows = [(category, count / rate / requests * 1e6, count / rate / process_cpu)
            for category, count in samples.most_common()]
    unseen = max(0.0, process_cpu - python_cpu)
    rows.append((NOT_PYTHON, unseen / requests * 1e6, unseen / process_cpu))
    return rows


def render_markdown(rows: list[tuple[str, float, float]], header: dict[str, str]) -> str:
    lines = [f"{key}: {value}  " for key, value in header.items()]
    lines += ["", "| where | us / request | share of server CPU |", "|---|---:|---:|"]
    for category, micros, share in rows:
        lines.append(f"| {category} | {micros:.0f} | {share:.0%} |")
    total = sum(micros for _, micros, _ in rows)
    lines.append(f"| **total server CPU** | **{total:.0f}** | 100% |")
    return "\n".join(lines) + "\n"


def run_profile(args: argparse.Namespace) -> int:
    from bench_check import SERVER_CPU, CLIENT_CPU, UC6, PerfPoint, pinned, run_perf_point

    out: Path = args.profile
    out.mkdir(parents=True, exist_ok=True)
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    protocol = args.profile_protocol
    name = f"ours-{UC6}-{protocol}-c{args.profile_concurrency}"
    work_dir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    ports = bench.free_ports(3)
    command = [sys.executable, "-m", "services.inference.cli", "--model-repository", str(args.repository),
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--model-control-mode", "explicit",
               "--log-level", "WARNING", "--load-model", UC6]
    ready = ["/v2/health/ready", f"/v2/models/{UC6}/ready"]
    seconds = args.profile_seconds
    load_start = os.getloadavg()
    with bench.running_server(bench.OURS, pinned(SERVER_CPU, command), ports[0], ports[1], ready,
                              work_dir / "ours.log", args.server_start_timeout) as server:
        pid = server.process.pid
        warm = PerfPoint(UC6, protocol, args.profile_concurrency, 500)
        run_perf_point(args.perf_analyzer, server, warm, -1, work_dir)
        # One perf_analyzer run whose three windows outlast both recordings.
        window_ms = int((seconds + FLAMEGRAPH_SECONDS + 8) * 1000 / 3)
        point = PerfPoint(UC6, protocol, args.profile_concurrency, window_ms)
        result: dict[str, object] = {}
        loader = threading.Thread(target=lambda: result.update(sample=run_perf_point(
            args.perf_analyzer, server, point, 0, work_dir)))
        loader.start()
        time.sleep(3)
        collapsed = out / f"{name}.collapsed.txt"
        cpu_before, threads_before = process_cpu_s(pid), thread_cpu_s(pid)
        counts_before = ServerCounts.read(server.http_url, UC6)
        window_started = time.monotonic()
        subprocess.run(pinned(CLIENT_CPU, [py_spy, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE),
                                           "--duration", str(seconds), *PY_SPY_TABLE_FLAGS, "--format", "raw",
                                           "--output", str(collapsed)]), check=True, capture_output=True)
        cpu_after, threads_after = process_cpu_s(pid), thread_cpu_s(pid)
        counts = ServerCounts.read(server.http_url, UC6).minus(counts_before)
        window_s = time.monotonic() - window_started
        subprocess.run(pinned(CLIENT_CPU, [py_spy, "record", "--pid", str(pid), "--rate", "100",
                                           "--duration", str(FLAMEGRAPH_SECONDS), *PY_SPY_FLAMEGRAPH_FLAGS,
                                           "--format", "flamegraph", "--output", str(out / f"{name}.svg")]),
                       check=True, capture_output=True)
        loader.join()
    sample = result["sample"]
    if sample.error:  # type: ignore[attr-defined]
        print(f"perf_analyzer failed: {sample.error}", file=sys.stderr)  # type: ignore[attr-defined]
        return 2
    infer_per_s = sample.infer_per_s  # type: ignore[attr-defined]
    requests = counts.inferences
    process_cpu = cpu_after - cpu_before
    samples = read_collapsed(collapsed)
    rows = per_request_table(samples, PY_SPY_RATE, process_cpu, requests)
    threads = sorted(((key, threads_after[key] - threads_before.get(key, 0.0)) for key in threads_after),
                     key=lambda item: -item[1])
    header = {
        "load": f"perf_analyzer {protocol} c{args.profile_concurrency} on {UC6}, server on cpu {SERVER_CPU}, "
                f"perf_analyzer + py-spy on cpu {CLIENT_CPU}",
        "throughput while profiled": f"{infer_per_s:.0f} infer/s over the whole run (py-spy {' '.join(PY_SPY_TABLE_FLAGS)} "
                                     f"at {PY_SPY_RATE} Hz, then {' '.join(PY_SPY_FLAMEGRAPH_FLAGS)})",
        "window": f"{window_s:.1f} s, {requests} requests ({requests / window_s:.0f}/s) in {counts.executions} "
                  f"executions (mean batch {requests / max(1, counts.executions):.1f})",
        "server CPU in the window": f"{process_cpu:.1f} s = {process_cpu / requests * 1e6:.0f} us per request",
        "ORT session.run per request (server statistics, wall)": f"{counts.compute_infer_ns / requests / 1e3:.0f} us "
            f"(input {counts.compute_input_ns / requests / 1e3:.0f} us, output "
            f"{counts.compute_output_ns / requests / 1e3:.0f} us)",
        "load average at start": str(tuple(round(v, 2) for v in load_start)),
    }
    table = render_markdown(rows, header)
    table += "\nServer threads, CPU seconds in the window:\n\n" + "\n".join(
        f"- {key}: {cpu:.2f} s" for key, cpu in threads if cpu >= 0.05) + "\n"
    (out / f"{name}.table.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps({
        "infer_per_s": infer_per_s, "window_s": window_s, "process_cpu_s": process_cpu, "requests": requests,
        "server_counts": counts.__dict__,
        "samples": dict(samples), "rate": PY_SPY_RATE, "rows": rows, "threads": dict(threads),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
    }, indent=2) + "\n")
    print(table)
    print(f"profile: {out}/{name}.{{collapsed.txt,svg,table.md,json}}")
    return 0
