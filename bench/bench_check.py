"""``make bench-check``: a regression guard on ratios that a noisy shared machine cannot fake.

Absolute throughput on a shared 2-core machine moves 1.7x within an hour; a ratio between two servers measured
back to back, on the same cores, moves far less. So this check measures only ratios:

- perf_analyzer (Triton's own client) against our server and real Triton (``.venv-triton``), both started once and
  serving the same repository, on ``uc6-locust`` (HTTP and gRPC, concurrency 1 and 16) and
  ``Bigearth-net-ssl-label`` (gRPC, concurrency 16). Each round measures every point on ours and on Triton back to
  back (ours first in even rounds, Triton first in odd ones). The servers run on one core (``taskset -c 1``),
  perf_analyzer on the other (``taskset -c 0``). Metric: ours/Triton infer/s, one ratio per round;
- the Wrapper bench (``bench/wrapper_bench.py``, 256 patches, unpinned: the Wrapper and its server share the
  cores as they do in a pod), once per Wrapper round. Metric: Wrapper patches/s / server-alone patches/s, per task.

Each metric's per-round ratios are judged against ``bench/baseline.json`` by ``bench/regression_rule.py`` (the
rule is in its docstring: a run fails when its median ratio is below every round the baseline's runs measured,
and at least 5 % below their median). Exit status: 0 pass, 1 a metric failed, 2 a measurement could not be made.

    .venv/bin/python bench/bench_check.py [--rounds 3] [--wrapper-rounds 2] [--write-baseline]

``--write-baseline`` records this run as the baseline, ``--build-baseline RESULTS_JSON...`` pools the rounds of
several earlier runs into one (better: it sees the run-to-run noise); do either only with a measured improvement
(see bench/README.md). Results: a table on stdout, ``bench/results/bench-check-<UTC stamp>.json``.

``--front-end-ceiling``: instead of the check, the same interleaved rounds on the tests' tiny ``simple`` model
(x + 1), HTTP and gRPC at concurrency 16: what each server's front end and scheduler sustain when the model costs
nothing.

``--profile DIR``: instead of the check, py-spy samples our server (pinned as above) while perf_analyzer loads it
with gRPC c16 on uc6; DIR gets the flame graph (SVG), the collapsed stacks and a per-request table of where the
server's CPU time goes (see ``bench/profile_table.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "bench"))

import inference_bench as bench  # noqa: E402
from regression_rule import Judgement, RatioSummary, Verdict, failed, judge  # noqa: E402

from services.core.logging import configure_logging  # noqa: E402
from services.local_platform.infra import free_ports  # noqa: E402

log = logging.getLogger("bench.check")

RESULTS_SCHEMA = "eo-bench-check/1"
BASELINE_SCHEMA = "eo-bench-check-baseline/1"
DEFAULT_BASELINE = PROJECT_ROOT / "bench" / "baseline.json"
UC6 = "uc6-locust"
SSL = "Bigearth-net-ssl-label"
WRAPPER_TASKS = ("ssl-features", "compress")
SERVER_CPU = "1"
CLIENT_CPU = "0"
# perf_analyzer's stability test is off (-s 1000): it takes exactly its three windows and reports their mean. The
# noise is handled by repeating interleaved rounds, not by waiting for a window that happens to agree.
PERF_STABILITY_PERCENTAGE = 1000
PERF_WINDOWS = 3


@dataclass(frozen=True)
class PerfPoint:
    model: str
    protocol: str
    concurrency: int
    window_ms: int
    # > 0: windows of at least this many requests (perf_analyzer's count_windows) instead of window_ms long; for a
    # slow model whose batches complete in bursts, a timed window can hold a single completion.
    window_requests: int = 0

    @property
    def metric(self) -> str:
        return f"{self.model} {self.protocol} c{self.concurrency} ours/triton"


PERF_POINTS = (
    PerfPoint(UC6, "http", 1, 1000),
    PerfPoint(UC6, "http", 16, 1000),
    PerfPoint(UC6, "grpc", 1, 1000),
    PerfPoint(UC6, "grpc", 16, 1000),
    # ResNet-101 on one core: ~0.1 s a request, and Triton runs 16 at a time, so windows count requests.
    PerfPoint(SSL, "grpc", 16, 3000, window_requests=32),
)


def wrapper_metric(task: str) -> str:
    return f"wrapper {task} wrapper/server-alone"


@dataclass
class PerfSample:
    server: str
    point: PerfPoint
    round: int
    infer_per_s: float = 0.0
    p50_ms: float = 0.0
    error: str = ""
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------
# Servers and perf_analyzer
# --------------------------------------------------------------------------------------------


def pinned(cpu: str, command: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command]


@contextlib.contextmanager
def both_servers(repository: Path, models: Sequence[str], triton_venv: Path, work_dir: Path,
                 timeout_s: float) -> Iterator[dict[str, bench.ServerProcess]]:
    """Ours and real Triton, each loading only ``models``, both pinned to the server core."""
    ready = ["/v2/health/ready", *(f"/v2/models/{name}/ready" for name in models)]
    ours_ports = free_ports(3)
    ours_command = [sys.executable, "-m", "services.inference.cli", "--model-repository", str(repository),
                    "--http-port", str(ours_ports[0]), "--grpc-port", str(ours_ports[1]),
                    "--metrics-port", str(ours_ports[2]), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                    "--model-control-mode", "explicit", "--log-level", "WARNING"]
    for name in models:
        ours_command += ["--load-model", name]
    triton_ports = free_ports(3)
    triton_models = [bench.load_model_under_test(repository, name) for name in models]
    triton_command, triton_env = bench.triton_server_command(triton_venv, repository, triton_models, triton_ports, work_dir)
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(bench.running_server(
            bench.OURS, pinned(SERVER_CPU, ours_command), ours_ports[0], ours_ports[1], ready,
            work_dir / "ours.log", timeout_s))
        triton = stack.enter_context(bench.running_server(
            bench.TRITON, pinned(SERVER_CPU, triton_command), triton_ports[0], triton_ports[1], ready,
            work_dir / "triton.log", timeout_s, env=triton_env))
        yield {bench.OURS: ours, bench.TRITON: triton}


def perf_analyzer_command(perf_analyzer: str, point: PerfPoint, url: str, csv_path: Path, window_ms: int) -> list[str]:
    if point.window_requests:
        window = ["--measurement-mode", "count_windows", "--measurement-request-count", str(point.window_requests)]
    else:
        window = ["--measurement-interval", str(window_ms)]
    return pinned(CLIENT_CPU, [
        perf_analyzer, "-m", point.model, "-u", url, "-i", point.protocol,
        "--concurrency-range", f"{point.concurrency}:{point.concurrency}",
        *window,
        "--stability-percentage", str(PERF_STABILITY_PERCENTAGE),
        "--max-trials", str(PERF_WINDOWS),
        "-f", str(csv_path),
    ])


def run_perf_point(perf_analyzer: str, server: bench.ServerProcess, point: PerfPoint, round_index: int,
                   work_dir: Path, window_ms: int | None = None) -> PerfSample:
    """One perf_analyzer measurement; one retry with windows twice as long if perf_analyzer gave up (it still
    checks latency agreement, and a window with a single completion has none)."""
    sample = _perf_attempt(perf_analyzer, server, point, round_index, work_dir, window_ms)
    if sample.error:
        longer = PerfPoint(point.model, point.protocol, point.concurrency, 2 * (window_ms or point.window_ms),
                           2 * point.window_requests)
        retry = _perf_attempt(perf_analyzer, server, longer, round_index, work_dir, None)
        retry.point = point
        return retry
    return sample


def _perf_attempt(perf_analyzer: str, server: bench.ServerProcess, point: PerfPoint, round_index: int,
                  work_dir: Path, window_ms: int | None) -> PerfSample:
    sample = PerfSample(server.name, point, round_index, load_average=os.getloadavg())
    url = server.grpc_url if point.protocol == "grpc" else server.http_url
    csv_path = work_dir / f"{server.name}-{point.model}-{point.protocol}-c{point.concurrency}.csv"
    csv_path.unlink(missing_ok=True)
    command = perf_analyzer_command(perf_analyzer, point, url, csv_path, window_ms or point.window_ms)
    timeout_s = 30 + 10 * PERF_WINDOWS * (window_ms or point.window_ms) / 1000 + PERF_WINDOWS * point.window_requests
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        sample.error = f"perf_analyzer did not finish within {timeout_s:.0f} s"
        return sample
    rows = bench.parse_perf_analyzer_csv(csv_path) if csv_path.exists() else []
    if completed.returncode != 0 or not rows:
        lines = (completed.stdout + completed.stderr).strip().splitlines()
        sample.error = f"perf_analyzer exited {completed.returncode}: " + " | ".join(lines[-3:])
        return sample
    sample.infer_per_s = rows[0].get("Inferences/Second", 0.0)
    sample.p50_ms = rows[0].get("p50 latency", 0.0) / 1e3
    return sample


def measure_perf_rounds(perf_analyzer: str, servers: dict[str, bench.ServerProcess], rounds: int,
                        work_dir: Path, points: Sequence[PerfPoint] = PERF_POINTS) -> list[PerfSample]:
    # Warm-up: each model's first requests pay for allocations and thread start-up on both servers.
    warm_up_points = {(p.model, p.protocol): p for p in points if p.concurrency > 1}.values()
    for server in servers.values():
        for point in warm_up_points:
            warm_up = PerfPoint(point.model, point.protocol, point.concurrency, 500, point.window_requests // 4)
            _perf_attempt(perf_analyzer, server, warm_up, -1, work_dir, None)
    samples: list[PerfSample] = []
    order = [bench.OURS, bench.TRITON]
    for round_index in range(rounds):
        names = order if round_index % 2 == 0 else order[::-1]
        for point in points:
            for name in names:
                sample = run_perf_point(perf_analyzer, servers[name], point, round_index, work_dir)
                log.info("perf point", extra={"server": name, "metric": point.metric, "round": round_index,
                                              "infer_per_s": round(sample.infer_per_s, 1), "error": sample.error})
                samples.append(sample)
    return samples


def perf_ratios(samples: Sequence[PerfSample],
                points: Sequence[PerfPoint] = PERF_POINTS) -> tuple[dict[str, list[float]], list[str]]:
    """Per metric, ours/Triton of each round where both were measured; and the errors."""
    by_key = {(s.server, s.point, s.round): s for s in samples if s.round >= 0}
    ratios: dict[str, list[float]] = {}
    errors = [f"{s.server} {s.point.metric} round {s.round}: {s.error}" for s in samples if s.error and s.round >= 0]
    rounds = sorted({s.round for s in samples if s.round >= 0})
    for point in points:
        for round_index in rounds:
            ours = by_key.get((bench.OURS, point, round_index))
            triton = by_key.get((bench.TRITON, point, round_index))
            if ours and triton and ours.infer_per_s > 0 and triton.infer_per_s > 0:
                ratios.setdefault(point.metric, []).append(ours.infer_per_s / triton.infer_per_s)
    return ratios, errors


# --------------------------------------------------------------------------------------------
# The Wrapper bench
# --------------------------------------------------------------------------------------------


def run_wrapper_rounds(repository: Path, rounds: int, patches: int, work_dir: Path) -> tuple[dict[str, list[float]], list[dict[str, Any]], list[str]]:
    ratios: dict[str, list[float]] = {}
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for round_index in range(rounds):
        results_dir = work_dir / f"wrapper-{round_index}"
        command = [sys.executable, str(PROJECT_ROOT / "bench" / "wrapper_bench.py"), "--repository", str(repository),
                   "--patches", str(patches), "--preprocess-patches", "100", "--results-dir", str(results_dir),
                   "--log-dir", str(results_dir / "logs")]
        for task in WRAPPER_TASKS:
            command += ["--task", task]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
        latest = results_dir / "wrapper-latest.json"
        if completed.returncode != 0 or not latest.exists():
            tail = " | ".join((completed.stdout + completed.stderr).strip().splitlines()[-3:])
            errors.append(f"wrapper bench round {round_index} exited {completed.returncode}: {tail}")
            continue
        report = json.loads(latest.read_text())
        for row in report["tasks"]:
            ratios.setdefault(wrapper_metric(row["task"]), []).append(row["wrapper_vs_server_alone"])
            rows.append({"round": round_index, "task": row["task"], "wrapper_patches_per_s": row["wrapper_patches_per_s"],
                         "server_alone_patches_per_s": row["server_alone_patches_per_s"],
                         "load_average_start": report["machine"]["load_average_start"]})
    return ratios, rows, errors


# --------------------------------------------------------------------------------------------
# Baseline, verdicts, table
# --------------------------------------------------------------------------------------------


def load_baseline(path: Path) -> dict[str, RatioSummary]:
    if not path.exists():
        return {}
    document = json.loads(path.read_text())
    return {metric: RatioSummary.from_json(entry) for metric, entry in document.get("metrics", {}).items()}


def judge_all(ratios: dict[str, list[float]], baseline: dict[str, RatioSummary]) -> tuple[list[Judgement], list[str]]:
    judgements = []
    unjudged = []
    for metric, rounds in ratios.items():
        if metric in baseline:
            judgements.append(judge(metric, rounds, baseline[metric]))
        else:
            unjudged.append(metric)
    return judgements, unjudged


def absolute_medians(samples: Sequence[PerfSample],
                     points: Sequence[PerfPoint] = PERF_POINTS) -> dict[str, dict[str, float]]:
    medians: dict[str, dict[str, float]] = {}
    for point in points:
        for server in (bench.OURS, bench.TRITON):
            values = [s.infer_per_s for s in samples if s.point == point and s.server == server and s.round >= 0
                      and s.infer_per_s > 0]
            if values:
                medians.setdefault(point.metric, {})[server] = statistics.median(values)
    return medians


def render_table(judgements: Sequence[Judgement], ratios: dict[str, list[float]], unjudged: Sequence[str],
                 medians: dict[str, dict[str, float]]) -> str:
    header = f"{'metric':<52} {'baseline':>8} {'median':>7} {'min-max':>11} {'noise':>6} {'floor':>6} " \
             f"{'ours/s':>7} {'triton/s':>8}  verdict"
    lines = [header, "-" * len(header)]
    by_metric = {j.metric: j for j in judgements}
    for metric, rounds in ratios.items():
        current = RatioSummary.of(rounds)
        absolute = medians.get(metric, {})
        ours = f"{absolute[bench.OURS]:>7.0f}" if bench.OURS in absolute else f"{'':>7}"
        triton = f"{absolute[bench.TRITON]:>8.0f}" if bench.TRITON in absolute else f"{'':>8}"
        spread = f"{current.minimum:.2f}-{current.maximum:.2f}"
        judgement = by_metric.get(metric)
        if judgement is None:
            lines.append(f"{metric:<52} {'-':>8} {current.median:>7.2f} {spread:>11} {'':>6} {'':>6} {ours} {triton}"
                         "  no baseline")
            continue
        lines.append(f"{metric:<52} {judgement.baseline.median:>8.2f} {current.median:>7.2f} {spread:>11} "
                     f"{judgement.noise:>6.2f} {judgement.floor:>6.2f} {ours} {triton}  {judgement.verdict.value}")
    return "\n".join(lines)


def baseline_document(ratios: dict[str, list[float]], runs: list[dict[str, Any]], note: str) -> dict[str, Any]:
    """The baseline: each metric's rounds pooled over one or more runs (``runs``: where and under what load)."""
    return {
        "schema": BASELINE_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": note,
        "runs": runs,
        "metrics": {metric: RatioSummary.of(rounds).to_json() for metric, rounds in ratios.items()},
    }


def pooled_results(paths: Sequence[Path]) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """The per-round ratios of earlier runs (their results JSON), pooled per metric, and what each run was.

    Pooling runs matters: rounds of one run agree more with each other than with a run ten minutes later (the
    neighbours' load changes between runs more than within one), and the check compares against later runs."""
    pooled: dict[str, list[float]] = {}
    runs = []
    for path in paths:
        report = json.loads(path.read_text())
        if report.get("schema") != RESULTS_SCHEMA:
            raise ValueError(f"{path} is not a bench-check result ({report.get('schema')})")
        for metric, rounds in report["ratios"].items():
            pooled.setdefault(metric, []).extend(rounds)
        runs.append({"results": path.name, "created": report["created"], "machine": report["machine"],
                     "errors": report["errors"]})
    return pooled, runs


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> int:
    started = time.monotonic()
    load_start = os.getloadavg()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-check-"))
    samples: list[PerfSample] = []
    errors: list[str] = []
    ratios: dict[str, list[float]] = {}
    if args.rounds > 0:
        with both_servers(args.repository, [UC6, SSL], args.triton_venv, work_dir, args.server_start_timeout) as servers:
            samples = measure_perf_rounds(args.perf_analyzer, servers, args.rounds, work_dir)
        ratios, errors = perf_ratios(samples)
    wrapper_rows: list[dict[str, Any]] = []
    if args.wrapper_rounds > 0:
        wrapper_ratios, wrapper_rows, wrapper_errors = run_wrapper_rounds(
            args.repository, args.wrapper_rounds, args.wrapper_patches, work_dir)
        ratios.update(wrapper_ratios)
        errors += wrapper_errors
    load = {"load_average_start": load_start, "load_average_end": os.getloadavg()}
    baseline = load_baseline(args.baseline)
    judgements, unjudged = judge_all(ratios, baseline)
    medians = absolute_medians(samples)
    elapsed_s = time.monotonic() - started

    print(f"\nbench-check: {args.rounds} interleaved perf_analyzer rounds (servers on cpu {SERVER_CPU}, "
          f"perf_analyzer on cpu {CLIENT_CPU}), {args.wrapper_rounds} Wrapper rounds of {args.wrapper_patches} patches;"
          f" baseline {bench._display_path(args.baseline)}")
    print(render_table(judgements, ratios, unjudged, medians))
    print(f"\nload average (1, 5, 15 min): start {tuple(round(v, 2) for v in load_start)}, "
          f"end {tuple(round(v, 2) for v in load['load_average_end'])}; {elapsed_s:.0f} s")
    print("rule: FAIL when this run's median ratio < floor = baseline median - noise, noise = max(baseline median - "
          "lowest baseline round, 5 % of the baseline median); the baseline pools the rounds of several runs")
    for error in errors:
        print(f"error: {error}")

    report = {
        "schema": RESULTS_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), **load},
        "elapsed_s": elapsed_s,
        "server_cpu": SERVER_CPU,
        "client_cpu": CLIENT_CPU,
        "perf_samples": [{**asdict(s), "point": asdict(s.point)} for s in samples],
        "wrapper_rows": wrapper_rows,
        "ratios": ratios,
        "judgements": [{"metric": j.metric, "verdict": j.verdict.value, "noise": j.noise, "floor": j.floor,
                        "current": j.current.to_json(), "baseline": j.baseline.to_json()} for j in judgements],
        "unjudged": list(unjudged),
        "errors": errors,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"bench-check-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {bench._display_path(path)}")
    if args.write_baseline:
        if errors:
            print("not writing a baseline from a run with errors", file=sys.stderr)
            return 2
        run = {"results": path.name, "created": report["created"], "machine": report["machine"], "errors": []}
        args.baseline.write_text(json.dumps(baseline_document(ratios, [run], args.baseline_note), indent=2) + "\n")
        print(f"baseline written: {bench._display_path(args.baseline)}")
    shutil.rmtree(work_dir, ignore_errors=True)
    if errors:
        return 2
    if failed(judgements):
        return 1
    if any(j.verdict is Verdict.IMPROVED for j in judgements):
        print("improved beyond the noise: if the change is meant to stay, rebuild the baseline from three runs of it "
              "(--build-baseline)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--triton-venv", type=Path, default=PROJECT_ROOT / ".venv-triton")
    parser.add_argument("--perf-analyzer", default=str(PROJECT_ROOT / "bench" / "perf_analyzer.sh"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved perf_analyzer rounds (0: none)")
    parser.add_argument("--wrapper-rounds", type=int, default=2, help="Wrapper bench runs (0: none)")
    parser.add_argument("--wrapper-patches", type=int, default=256)
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    parser.add_argument("--write-baseline", action="store_true", help="record this run as the baseline")
    parser.add_argument("--baseline-note", default="", help="what the baseline run was (machine load, commit)")
    parser.add_argument("--build-baseline", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="write the baseline from earlier runs' results (rounds pooled), measure nothing")
    parser.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--server-start-timeout", type=float, default=300.0)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy our server under perf_analyzer gRPC c16 on uc6 instead of the check")
    parser.add_argument("--front-end-ceiling", action="store_true",
                        help="instead of the check: ours vs Triton on the tests' tiny 'simple' model (HTTP, gRPC c16)")
    parser.add_argument("--profile-seconds", type=int, default=30)
    parser.add_argument("--profile-protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--profile-concurrency", type=int, default=16)
    return parser


# The tiny model of the tests (x + 1 on FP32[4]): the model costs next to nothing, so the ratio is the front ends'.
FRONT_END_MODEL = "simple"
FRONT_END_POINTS = (PerfPoint(FRONT_END_MODEL, "http", 16, 1000), PerfPoint(FRONT_END_MODEL, "grpc", 16, 1000))


def run_front_end_ceiling(args: argparse.Namespace) -> int:
    """Ours vs Triton on a model that costs ~nothing: what each front end (and scheduler) alone sustains."""
    sys.path.insert(0, str(PROJECT_ROOT / "tests" / "inference"))
    import tiny_models

    work_dir = Path(tempfile.mkdtemp(prefix="bench-front-ends-"))
    repository = tiny_models.build_tiny_repository(work_dir / "model_repository", [FRONT_END_MODEL])
    load_start = os.getloadavg()
    with both_servers(repository, [FRONT_END_MODEL], args.triton_venv, work_dir, args.server_start_timeout) as servers:
        samples = measure_perf_rounds(args.perf_analyzer, servers, args.rounds, work_dir, FRONT_END_POINTS)
    ratios, errors = perf_ratios(samples, FRONT_END_POINTS)
    load = {"load_average_start": load_start, "load_average_end": os.getloadavg()}
    print(f"\nfront ends alone: ours vs Triton on the tiny '{FRONT_END_MODEL}' model, {args.rounds} interleaved rounds "
          f"(servers on cpu {SERVER_CPU}, perf_analyzer on cpu {CLIENT_CPU})")
    print(render_table([], ratios, list(ratios), absolute_medians(samples, FRONT_END_POINTS)))
    print(f"\nload average (1, 5, 15 min): start {tuple(round(v, 2) for v in load_start)}, "
          f"end {tuple(round(v, 2) for v in load['load_average_end'])}")
    for error in errors:
        print(f"error: {error}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"front-ends-{stamp}.json"
    path.write_text(json.dumps({
        "schema": RESULTS_SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), **load},
        "perf_samples": [{**asdict(s), "point": asdict(s.point)} for s in samples],
        "ratios": ratios, "errors": errors,
    }, indent=2) + "\n")
    print(f"results: {bench._display_path(path)}")
    shutil.rmtree(work_dir, ignore_errors=True)
    return 2 if errors else 0


def build_baseline(args: argparse.Namespace) -> int:
    ratios, runs = pooled_results(args.build_baseline)
    args.baseline.write_text(json.dumps(baseline_document(ratios, runs, args.baseline_note), indent=2) + "\n")
    print(f"baseline written from {len(runs)} runs: {bench._display_path(args.baseline)}")
    for metric, rounds in ratios.items():
        summary = RatioSummary.of(rounds)
        print(f"  {metric:<52} median {summary.median:.2f}  {summary.minimum:.2f}-{summary.maximum:.2f}  "
              f"({len(rounds)} rounds)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("WARNING", "text")
    if args.build_baseline:
        return build_baseline(args)
    if args.front_end_ceiling:
        return run_front_end_ceiling(args)
    if args.profile is not None:
        from profile_table import run_profile

        return run_profile(args)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
