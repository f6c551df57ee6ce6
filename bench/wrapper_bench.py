"""Wrapper benchmark: patches per second through one Wrapper, next to what the inference server alone sustains.

For ``ssl-features`` and ``compress`` (batch 16 by default; a model whose ``max_batch_size`` is smaller gets its
maximum, as the Wrapper does), in one run on one machine:

- ``server alone``: the same preprocessed patches sent by tritonclient gRPC in batches of the same size, with the
  same number of requests in flight (2) and the same request pattern as the Wrapper's, back to back: the server's
  own throughput for this model;
- ``wrapper``: one step through ``run_step`` (the code ``eo-wrapper`` runs): list + stream a tar.gz from moto S3,
  decode, preprocess by the model card, batched gRPC inference, write results and manifest, publish to tansu
  Kafka. Patches/s = patches / step wall time;
- ``server busy``: the server's compute time (sum of ``batch_stats`` ``compute_infer`` over the run, from its
  statistics endpoint) divided by the wall time, for both runs. Target: the Wrapper keeps the server >= 90 %
  busy (also shown as wrapper patches/s / server-alone patches/s).

And, separately, preprocessing alone, single-threaded: ``sentinel2_input`` (stack by the card's band order,
bilinear 20 m upsampling, standardisation, checks) over decoded sample patches. Target: >= 300 patches/s per core.
Decoding the band files (rasterio, 12 TIFFs per patch) is measured beside it, for information.

    .venv/bin/python bench/wrapper_bench.py [--patches N] [--batch-size 16] [--task ssl-features --task compress]
    .venv/bin/python bench/wrapper_bench.py --granule [--granule-patches 8300] [--granule-task ssl-features]

``--granule``: a Sentinel-2 granule's worth of tiles (8,300 by default, ~8,281 tiles of 120 x 120 in a granule) as
one tar.gz (copies of the sample patches under distinct names, written to disk, not held in memory) through one
``eo-wrapper`` process, delivered as a KafkaSource does (the answer comes when the step is announced): patches,
wall time, and the Wrapper's peak RSS (``VmHWM`` of ``/proc/<pid>/status``) with the batch size, which is what the
peak must depend on (not the input size).

Prints a table and writes ``bench/results/wrapper-<UTC stamp>.json`` (and ``wrapper-latest.json``). Client,
Wrapper and server share the machine's cores: run it on a quiet machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tritonclient.grpc as grpcclient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
# S3 is moto on plain http on loopback: the local platform's S3 endpoint policy (services/core/s3_endpoint_policy.py).
os.environ.setdefault("EOML_S3_POLICY_ALLOW_HTTP", "true")
os.environ.setdefault("EOML_S3_POLICY_ALLOW_PRIVATE", "true")

from services.core.contracts import StepMessage  # noqa: E402
from services.core.logging import configure_logging  # noqa: E402
from services.core.metrics import Stage, WrapperMetrics  # noqa: E402
from services.core.step_config import LocalStepConfigStore, StepConfig, StepCredentials, step_config_name  # noqa: E402
from services.local_platform.infra import MotoS3Server, TansuBroker, free_ports  # noqa: E402
from services.wrapper.batching import Work, batched_inference  # noqa: E402
from services.wrapper.inference_client import GRPC_CHANNEL_ARGS, ModelClient  # noqa: E402
from services.wrapper.inputs import S3Access, make_s3_client  # noqa: E402
from services.wrapper.inputs.band_files import assemble_patch  # noqa: E402
from services.wrapper.inputs.types import InputPatch  # noqa: E402
from services.wrapper.pipeline import StepRequest, StepRuntime, run_step  # noqa: E402
from services.wrapper.preprocess import sentinel2_input  # noqa: E402
from services.wrapper.settings import WrapperSettings  # noqa: E402
from services.wrapper.tasks import task_spec  # noqa: E402

RESULTS_SCHEMA = "eo-wrapper-bench/1"
SAMPLE_PATCHES = PROJECT_ROOT / "data" / "bigearthnet-sample" / "patches"
DEFAULT_TASKS = ("ssl-features", "compress")
# Enough patches that a step's fixed costs (listing, first batch read, result writes) are small against the
# inference time on a 2-core CPU (ResNet-101 ~0.05 s/patch; the block-transform compressor is far cheaper, so the
# Wrapper's own work - entropy coding - dominates there); more on faster servers.
# Enough patches that start-up (first batch read) and the final writes do not dominate the busy fraction.
DEFAULT_PATCHES = {"ssl-features": 512, "compress": 512}
TARGET_SERVER_BUSY = 0.90
TARGET_PREPROCESS_PER_CORE = 300.0
ACCESS_KEY, SECRET_KEY = "AKIABENCHWRAPPER0001", "bench-secret-key-not-real"


def sample_names() -> list[str]:
    return sorted(path.name for path in SAMPLE_PATCHES.iterdir() if path.is_dir())


def patch_name(index: int, names: Sequence[str]) -> tuple[str, str]:
    """(source sample patch, distinct name of copy ``index``)."""
    source = names[index % len(names)]
    return source, f"{source}_c{index:05d}"


def bench_archive(count: int) -> bytes:
    """A tar.gz of ``count`` BigEarthNet patch folders (copies of the sample patches under distinct names)."""
    names = sample_names()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as archive:
        for index in range(count):
            source, name = patch_name(index, names)
            for path in sorted((SAMPLE_PATCHES / source).glob(f"{source}_B*.tif")):
                band = path.name[len(source) + 1:]
                data = path.read_bytes()
                member = tarfile.TarInfo(f"{name}/{name}_{band}")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def write_bench_archive(path: Path, count: int) -> int:
    """``bench_archive`` streamed to a file (a granule's archive is ~1 GB); returns its size."""
    names = sample_names()
    bands = {source: sorted((SAMPLE_PATCHES / source).glob(f"{source}_B*.tif")) for source in names}
    with tarfile.open(path, mode="w:gz", compresslevel=1) as archive:
        for index in range(count):
            source, name = patch_name(index, names)
            for band_path in bands[source]:
                band = band_path.name[len(source) + 1:]
                data = band_path.read_bytes()
                member = tarfile.TarInfo(f"{name}/{name}_{band}")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    return path.stat().st_size


def peak_rss_bytes(pid: int) -> int:
    """``VmHWM`` (peak resident set) of a live process, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def bench_granule(task: str, server: Server, moto: MotoS3Server, broker: TansuBroker, bucket: str, patches: int,
                  batch_size: int, in_flight: int, work_dir: Path, log_dir: Path) -> dict[str, Any]:
    """One granule-size step through an ``eo-wrapper`` process; wall time and the process's peak RSS."""
    s3 = make_s3_client(S3Access(bucket_name=bucket, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                 endpoint_url=moto.endpoint_url))
    archive = work_dir / f"granule-{patches}.tar.gz"
    archive_size = write_bench_archive(archive, patches)
    s3.upload_file(str(archive), bucket, "granule/patches.tar.gz")
    archive.unlink()
    topic = f"bench.granule.{uuid.uuid4().hex[:6]}"
    config = StepConfig(
        config_name=step_config_name(topic), workflow_name="wrapper-bench-granule", topic_in=topic,
        topic_out=topic + ".out", namespace="bench", service_name=task, component_name=f"bench {task}",
        bucket=bucket, endpoint_url=moto.endpoint_url, bootstrap_servers=broker.bootstrap_servers,
    )
    store_root = work_dir / "step-configs"
    LocalStepConfigStore(store_root).put(
        "bench", config, StepCredentials(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY))
    (port,) = free_ports(1)
    env = {**os.environ, "EOML_WRAPPER_TASK": task, "EOML_WRAPPER_HTTP_HOST": "127.0.0.1",
           "EOML_WRAPPER_HTTP_PORT": str(port), "EOML_WRAPPER_INFERENCE_URL": server.grpc_url,
           "EOML_WRAPPER_STORE_ROOT": str(store_root), "EOML_WRAPPER_NAMESPACE": "bench",
           "EOML_WRAPPER_BATCH_SIZE": str(batch_size), "EOML_WRAPPER_REQUESTS_IN_FLIGHT": str(in_flight),
           "EOML_WRAPPER_NOTIFY_TOPIC": f"bench-notify-{uuid.uuid4().hex[:6]}", "EOML_WRAPPER_LOG_LEVEL": "WARNING",
           "EOML_WRAPPER_SPOOL_DIR": str(work_dir), "EOML_WRAPPER_PROGRESS_INTERVAL_S": "30"}
    with open(log_dir / f"wrapper-bench-granule-{task}.log", "ab") as log_file:
        wrapper = subprocess.Popen([sys.executable, "-m", "services.wrapper.cli"], cwd=PROJECT_ROOT, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or wrapper.poll() is not None:
                    raise RuntimeError("the Wrapper did not start") from None
                time.sleep(0.2)
        idle_rss = peak_rss_bytes(wrapper.pid)
        body = json.dumps({"previous_component_end": "True", "S3_bucket_desc": {"folder": "granule", "filename": ""},
                           "meta_information": {}}).encode()
        request = urllib.request.Request(f"{url}/{config.config_name}", data=body, method="POST", headers={
            "Content-Type": "application/json", "ce-id": "partition:0/offset:0", "ce-specversion": "1.0",
            "ce-source": f"/apis/v1/namespaces/bench/kafkasources/bench#{topic}", "ce-type": "dev.knative.kafka.event",
            "ce-time": "2026-01-01T00:00:00Z"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=24 * 3600) as response:
            answer = json.loads(response.read())
        wall_s = time.perf_counter() - started
        peak = peak_rss_bytes(wrapper.pid)
    finally:
        wrapper.send_signal(signal.SIGTERM)
        try:
            wrapper.wait(timeout=120)
        except subprocess.TimeoutExpired:
            wrapper.kill()
    if answer.get("status") != "SUCCESS":
        raise RuntimeError(f"granule step did not succeed: {answer}")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=answer["folder"].rsplit("/", 1)[0] + ".manifest.json")["Body"].read())
    return {
        "task": task, "patches": manifest["patches"], "archive_bytes": archive_size, "batch_size": batch_size,
        "requests_in_flight": in_flight, "wall_s": wall_s, "patches_per_s": manifest["patches"] / wall_s,
        "wrapper_peak_rss_bytes": peak, "wrapper_idle_rss_bytes": idle_rss,
        "result_bytes": sum(o["size"] for o in manifest["objects"]), "objects": len(manifest["objects"]),
    }


def print_granule_table(rows: list[dict[str, Any]]) -> None:
    print("\nGranule-size step (one eo-wrapper process; peak RSS = VmHWM)")
    header = f"{'task':<14} {'patches':>7} {'batch':>5} {'wall s':>8} {'patches/s':>9} {'peak RSS MiB':>12} " \
             f"{'idle RSS MiB':>12} {'results MiB':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['task']:<14} {row['patches']:>7} {row['batch_size']:>5} {row['wall_s']:>8.0f} "
              f"{row['patches_per_s']:>9.2f} {row['wrapper_peak_rss_bytes'] / 2**20:>12.0f} "
              f"{row['wrapper_idle_rss_bytes'] / 2**20:>12.0f} {row['result_bytes'] / 2**20:>11.1f}")


def band_files(source: str) -> dict[str, bytes]:
    return {
        path.name[len(source) + 1:-4]: path.read_bytes()
        for path in sorted((SAMPLE_PATCHES / source).glob(f"{source}_B*.tif"))
    }


# ---- preprocessing alone -----------------------------------------------------------------------------------------


def measure_preprocessing(card: Any, iterations: int) -> dict[str, Any]:
    """Single-threaded patches/s of decoding (rasterio) and of ``sentinel2_input``, over the sample patches."""
    names = sample_names()
    files = [band_files(name) for name in names]
    decoded: list[InputPatch] = []
    for index in range(len(names)):
        item = assemble_patch(names[index], "bench", files[index])
        assert isinstance(item, InputPatch), item
        decoded.append(item)
    decode_rounds = max(1, iterations // (len(names) * 4))
    started = time.perf_counter()
    for _ in range(decode_rounds):
        for index in range(len(names)):
            assemble_patch(names[index], "bench", files[index])
    decode_s = time.perf_counter() - started
    for patch in decoded[:8]:  # warm-up
        sentinel2_input(patch.bands, card)
    started = time.perf_counter()
    for index in range(iterations):
        sentinel2_input(decoded[index % len(decoded)].bands, card)
    preprocess_s = time.perf_counter() - started
    return {
        "threads": 1,
        "patches": iterations,
        "preprocess_patches_per_s": iterations / preprocess_s,
        "preprocess_ms_per_patch": preprocess_s / iterations * 1000,
        "decode_patches_per_s": decode_rounds * len(names) / decode_s,
        "decode_ms_per_patch": decode_s / (decode_rounds * len(names)) * 1000,
        "target_patches_per_s_per_core": TARGET_PREPROCESS_PER_CORE,
        "meets_target": iterations / preprocess_s >= TARGET_PREPROCESS_PER_CORE,
    }


# ---- inference server ------------------------------------------------------------------------------------------


class Server:
    def __init__(self, repository: Path, models: Sequence[str], log_path: Path) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        args = [
            sys.executable, "-m", "services.inference.cli", "--model-repository", str(repository),
            "--model-control-mode", "explicit", "--http-port", str(self.http_port), "--grpc-port",
            str(self.grpc_port), "--metrics-port", str(self.metrics_port), "--http-address", "127.0.0.1",
            "--grpc-address", "127.0.0.1", "--log-format", "text",
        ]
        for model in models:
            args += ["--load-model", model]
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"inference server exited ({self.process.returncode}); log: {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"inference server not ready in {timeout_s} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def compute_ns(client: grpcclient.InferenceServerClient, model: str) -> int:
    """Total ``session.run`` time of the model so far: the sum over batch sizes of the batches' compute time."""
    stats = client.get_inference_statistics(model)
    return sum(batch.compute_infer.ns for entry in stats.model_stats for batch in entry.batch_stats)


def server_alone(client: ModelClient, served: Any, inputs: np.ndarray, batch_size: int, in_flight: int,
                 stats: grpcclient.InferenceServerClient) -> tuple[float, int]:
    """(seconds, compute ns) to infer ``inputs`` in batches of ``batch_size``, ``in_flight`` requests outstanding.

    The same request pattern as the Wrapper's (``batched_inference``, same client code): a new batch goes out when
    the oldest comes back, so the server always has the next one queued. Two clients firing together instead would
    have the server merge their requests into batches of twice the size, a different workload.
    """
    works = [Work(inputs[start:start + batch_size], start) for start in range(0, len(inputs), batch_size)]
    before = compute_ns(stats, served.name)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        done = list(batched_inference(works, lambda rows: client.infer(served, rows), batch_size, in_flight, pool))
    seconds = time.perf_counter() - started
    assert len(done) == len(works)
    return seconds, compute_ns(stats, served.name) - before


# ---- one task --------------------------------------------------------------------------------------------------


def bench_task(task: str, server: Server, s3: Any, moto: MotoS3Server, broker: TansuBroker, bucket: str,
               patches: int, batch_size: int, in_flight: int) -> dict[str, Any]:
    settings = WrapperSettings(
        task=task, inference_url=server.grpc_url, batch_size=batch_size, requests_in_flight=in_flight,
        notify_topic=f"bench-notify-{uuid.uuid4().hex[:6]}", progress_interval_s=5, log_level="WARNING",
    )
    runtime = StepRuntime.from_settings(settings)
    served = runtime.model_client.resolve()
    effective_batch = runtime.batch_size(served)
    names = sample_names()
    decoded = {}
    for name in names:
        item = assemble_patch(name, "bench", band_files(name))
        assert isinstance(item, InputPatch)
        decoded[name] = sentinel2_input(item.bands, served.card)
    inputs = np.stack([decoded[patch_name(i, names)[0]] for i in range(patches)])
    stats_client = grpcclient.InferenceServerClient(server.grpc_url, channel_args=GRPC_CHANNEL_ARGS)

    # Warm-up: the first requests of a model pay for allocations.
    server_alone(runtime.model_client, served, inputs[:effective_batch], effective_batch, 1, stats_client)
    alone_s, alone_busy_ns = server_alone(runtime.model_client, served, inputs, effective_batch, in_flight, stats_client)

    topic = f"bench.{task}.{uuid.uuid4().hex[:6]}"
    config = StepConfig(
        config_name=step_config_name(topic), workflow_name="wrapper-bench", topic_in=topic, topic_out=topic + ".out",
        namespace="bench", service_name=task, component_name=f"bench {task}", bucket=bucket,
        endpoint_url=moto.endpoint_url, bootstrap_servers=broker.bootstrap_servers,
    )
    credentials = StepCredentials(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    def request(folder: str) -> StepRequest:
        message = StepMessage.model_validate(
            {"previous_component_end": "True", "S3_bucket_desc": {"folder": folder, "filename": ""}, "meta_information": {}}
        )
        return StepRequest(config.config_name, message, message.model_dump(mode="json"),
                           event_time=datetime(2026, 1, 1, tzinfo=timezone.utc))

    # A running Wrapper has its Kafka producer connected and the model card cached after its first step: warm up
    # with a small step so that the measured one shows the steady state.
    warm_up = run_step(runtime, request(f"warm-up-{task}"), config, credentials)
    if warm_up.status != "SUCCESS":
        raise RuntimeError(f"{task}: warm-up step failed: {warm_up.reason}")
    before = compute_ns(stats_client, served.name)
    cpu_before = time.process_time()
    started = time.perf_counter()
    # The Wrapper's own stage clock (what eoml_step_stage_seconds reports): exclusive seconds per stage; inference
    # is summed over concurrent requests and stages overlap across threads, so shares may add up past 100 %.
    with WrapperMetrics().step(task) as clock:
        outcome = run_step(runtime, request("bench"), config, credentials)
    wrapper_s = time.perf_counter() - started
    wrapper_cpu_s = time.process_time() - cpu_before
    wrapper_busy_ns = compute_ns(stats_client, served.name) - before
    stats_client.close()
    runtime.close()
    if outcome.status != "SUCCESS" or outcome.patches != patches:
        raise RuntimeError(f"{task}: the step did not process every patch: {outcome.status} {outcome.reason}")
    alone_pps = patches / alone_s
    wrapper_pps = patches / wrapper_s
    return {
        "task": task,
        "model": served.name,
        "model_version": served.version,
        "patches": patches,
        "batch_size_requested": batch_size,
        "batch_size": effective_batch,
        "requests_in_flight": in_flight,
        "server_alone_s": alone_s,
        "server_alone_patches_per_s": alone_pps,
        "server_alone_busy": alone_busy_ns / 1e9 / alone_s,
        "wrapper_s": wrapper_s,
        "wrapper_patches_per_s": wrapper_pps,
        "wrapper_server_busy": wrapper_busy_ns / 1e9 / wrapper_s,
        "wrapper_vs_server_alone": wrapper_pps / alone_pps,
        "target_server_busy": TARGET_SERVER_BUSY,
        "meets_target": wrapper_busy_ns / 1e9 / wrapper_s >= TARGET_SERVER_BUSY,
        "bits_per_pixel": outcome.stats.get("bits_per_pixel"),
        "stage_seconds": {name.value: clock.seconds.get(name, 0.0) for name in Stage},
        "bench_process_cpu_s": wrapper_cpu_s,
    }


def print_table(report: dict[str, Any]) -> None:
    print("\nWrapper throughput (one Wrapper, one step; server alone = tritonclient gRPC, same batches)")
    header = f"{'task':<14} {'model':<44} {'batch':>5} {'patches':>7} {'server alone p/s':>17} {'wrapper p/s':>12} " \
             f"{'wrapper/alone':>13} {'server busy':>11} {'target':>7}"
    print(header)
    print("-" * len(header))
    for row in report["tasks"]:
        print(f"{row['task']:<14} {row['model']:<44} {row['batch_size']:>5} {row['patches']:>7} "
              f"{row['server_alone_patches_per_s']:>17.2f} {row['wrapper_patches_per_s']:>12.2f} "
              f"{row['wrapper_vs_server_alone']:>13.1%} {row['wrapper_server_busy']:>11.1%} "
              f"{'ok' if row['meets_target'] else 'MISSED':>7}")
    print("\nWrapper stages (seconds of the step's stage clock, share of its wall time; bench process CPU includes "
          "the in-process moto S3 server and tansu client)")
    for row in report["tasks"]:
        stages = row.get("stage_seconds", {})
        shares = ", ".join(f"{name} {seconds:.2f} s ({seconds / row['wrapper_s']:.0%})" for name, seconds in stages.items())
        print(f"  {row['task']:<14} wall {row['wrapper_s']:.2f} s, CPU {row.get('bench_process_cpu_s', 0):.2f} s: {shares}")
    pre = report["preprocessing"]
    print(f"\nPreprocessing alone, 1 thread: {pre['preprocess_patches_per_s']:.0f} patches/s "
          f"({pre['preprocess_ms_per_patch']:.2f} ms/patch; target >= {TARGET_PREPROCESS_PER_CORE:.0f}/s per core: "
          f"{'ok' if pre['meets_target'] else 'MISSED'}); band decoding (rasterio, 12 files): "
          f"{pre['decode_patches_per_s']:.0f} patches/s ({pre['decode_ms_per_patch']:.2f} ms/patch)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--task", dest="tasks", action="append", choices=DEFAULT_TASKS)
    parser.add_argument("--patches", type=int, default=0,
                        help=f"patches per task, copies of the 42 samples (default per task: {DEFAULT_PATCHES})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--requests-in-flight", type=int, default=WrapperSettings.model_fields["requests_in_flight"].default)
    parser.add_argument("--preprocess-patches", type=int, default=3000)
    parser.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--log-dir", type=Path, default=PROJECT_ROOT / "build" / "bench")
    parser.add_argument("--server-start-timeout", type=float, default=300.0)
    parser.add_argument("--granule", action="store_true", help="only the granule-size run (peak memory)")
    parser.add_argument("--granule-patches", type=int, default=8300)
    parser.add_argument("--granule-task", dest="granule_tasks", action="append", choices=("ssl-features", "uc5-cfactor"))
    args = parser.parse_args(argv)
    if args.granule:
        return granule_main(args)
    tasks = args.tasks or list(DEFAULT_TASKS)
    configure_logging("WARNING", "text")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()

    models = [task_spec(task).default_model for task in tasks]
    server = Server(args.repository, models, args.log_dir / "wrapper-bench-server.log")
    moto = MotoS3Server().start()
    broker = TansuBroker(log_path=args.log_dir / "wrapper-bench-kafka.log").start()
    try:
        server.wait_ready(args.server_start_timeout)
        card = ModelClient(server.grpc_url, "grpc", models[0]).resolve().card
        preprocessing = measure_preprocessing(card, args.preprocess_patches)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3 = make_s3_client(S3Access(bucket_name=bucket, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                     endpoint_url=moto.endpoint_url))
        s3.create_bucket(Bucket=bucket)
        rows = []
        archive_bytes = {}
        for task in tasks:
            patches = args.patches or DEFAULT_PATCHES[task]
            archive = bench_archive(patches)
            archive_bytes[task] = len(archive)
            s3.put_object(Bucket=bucket, Key="bench/patches.tar.gz", Body=archive)
            s3.put_object(Bucket=bucket, Key=f"warm-up-{task}/patches.tar.gz", Body=bench_archive(args.batch_size))
            rows.append(bench_task(task, server, s3, moto, broker, bucket, patches, args.batch_size,
                                   args.requests_in_flight))
    finally:
        broker.stop()
        moto.stop()
        server.stop()
    report = {
        "schema": RESULTS_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "archive_bytes": archive_bytes,
        "preprocessing": preprocessing,
        "tasks": rows,
    }
    print_table(report)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"wrapper-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    shutil.copyfile(path, args.results_dir / "wrapper-latest.json")
    print(f"\nresults: {path}")
    return 0


def granule_main(args: argparse.Namespace) -> int:
    tasks = args.granule_tasks or ["ssl-features"]
    configure_logging("WARNING", "text")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    work_dir = args.log_dir / f"granule-{uuid.uuid4().hex[:6]}"
    work_dir.mkdir(parents=True)
    load_start = os.getloadavg()
    server = Server(args.repository, [task_spec(task).default_model for task in tasks],
                    args.log_dir / "wrapper-bench-server.log")
    moto = MotoS3Server().start()
    broker = TansuBroker(log_path=args.log_dir / "wrapper-bench-kafka.log").start()
    rows = []
    try:
        server.wait_ready(args.server_start_timeout)
        for task in tasks:
            bucket = f"bench-granule-{uuid.uuid4().hex[:8]}"
            make_s3_client(S3Access(bucket_name=bucket, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                    endpoint_url=moto.endpoint_url)).create_bucket(Bucket=bucket)
            rows.append(bench_granule(task, server, moto, broker, bucket, args.granule_patches, args.batch_size,
                                      args.requests_in_flight, work_dir, args.log_dir))
    finally:
        broker.stop()
        moto.stop()
        server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    report = {
        "schema": RESULTS_SCHEMA + "-granule",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "granule": rows,
    }
    print_granule_table(rows)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"wrapper-granule-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    shutil.copyfile(path, args.results_dir / "wrapper-granule-latest.json")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
