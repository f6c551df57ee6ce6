"""The local platform's processes: start them on loopback, wait until each is ready, remember them, stop them.

One stack = tansu (Kafka) + moto (S3) + the inference server on the exported repository + the controller in local
mode (it consumes ``system.ML`` and runs the local event plane) + one Wrapper per task, each behind a model of
Knative's queue-proxy (``queue_proxy.py``: containerConcurrency slots and queue, the revision timeout, the drain and
pod deletion; settings from the chart's values), as one "pod" process per Wrapper (+ with ``prometheus``, a real
Prometheus scraping them all: prometheus.py). Kafka keeps its data in memory, or (``kafka_storage="s3"``) in a
bucket of a second moto server of its own, so that the broker can be restarted (``restart_kafka``) without losing
topics, records or committed offsets. Every process is a child
in its own session, logging to ``<root>/logs/<name>.log``; ``<root>/state.json`` records PIDs, ports and endpoints,
so that another invocation (``eo-platform down``/``status``) can find and stop exactly what was started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, Field

from .inference_backends import external_grpc_address, inference_command, wait_until_ready
from .infra import free_port, free_ports, tansu_binary, wait_for_port
from .queue_proxy import CHART_VALUES, POD_TERMINATED, ServingSettings, chart_serving_settings, wrapper_stop_timing
from .security import security_env, write_platform_token

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("build/local-platform")
STATE_FILE = "state.json"
NAMESPACE = "eoml"
SYSTEM_TOPIC = "system.ML"
NOTIFY_TOPIC = "monitoring.notify"
KAFKA_STORAGE_BUCKET = "tansu"
# ``ML.ServiceName`` of each Wrapper the stack starts (DNS-1123 labels, as Knative Service names must be). What each
# runs (task, and the model when it is not the task's default) comes from the chart's ``wrappers.tasks``
# (``chart_wrapper_services``), as on Kubernetes: ``cloud-mask`` is task generic on s2-cloud-mask, ``compress-rvq``
# and ``decompress-rvq`` are tasks compress/decompress on the residual-VQ models.
DEMO_TASKS: tuple[str, ...] = (
    "ssl-features", "classify", "compress", "decompress", "compress-rvq", "decompress-rvq", "uc5-cfactor",
    "uc6-locust", "cloud-mask",
)


@dataclass(frozen=True)
class WrapperService:
    """One Wrapper deployment: its ``ML.ServiceName``, task, and model ("" = the task's default model)."""

    service: str
    task: str
    model_name: str = ""


def chart_wrapper_services(values_path: Path = CHART_VALUES) -> dict[str, WrapperService]:
    """The chart's ``wrappers.tasks`` by service name (``serviceName``, default the task), as ``wrappers.yaml``
    renders them into ``EOML_WRAPPER_TASK`` / ``EOML_WRAPPER_MODEL_NAME``."""
    wrappers = (yaml.safe_load(values_path.read_text()) or {}).get("wrappers") or {}
    services = {}
    for entry in wrappers.get("tasks") or []:
        service = WrapperService(str(entry.get("serviceName") or entry["task"]), str(entry["task"]),
                                 str(entry.get("modelName") or ""))
        services[service.service] = service
    return services


class StackError(RuntimeError):
    """A component did not start or is not ready; the message names it and points at its log."""


class ProcessRecord(BaseModel):
    name: str
    pid: int
    argv: list[str]
    log: str
    health_url: str = ""


class PlatformState(BaseModel):
    """What a running stack looks like from outside: endpoints, and the processes to stop."""

    root: str
    started_at: float
    namespace: str = NAMESPACE
    bootstrap_servers: str
    s3_endpoint: str
    s3_region: str = "us-east-1"
    inference_http: str
    inference_grpc: str
    controller_url: str
    wrapper_urls: dict[str, str]
    store_root: str
    system_topic: str = SYSTEM_TOPIC
    notify_topic: str = NOTIFY_TOPIC
    # "memory", or the s3:// URL tansu stores topics in (its own moto server: kafka_storage_endpoint).
    kafka_storage: str = "memory"
    kafka_storage_endpoint: str = ""
    # The shared token every entry point of the stack requires (0600 file; see security.py).
    auth_token_file: str = ""
    # ``--prometheus``: the local Prometheus scraping every component (prometheus.py); "" = none.
    prometheus_url: str = ""
    # Each Wrapper's own port (behind its queue-proxy model): scraped directly, as a PodMonitor scrapes the pod.
    wrapper_app_urls: dict[str, str] = Field(default_factory=dict)
    # Each Wrapper's queue-proxy model (None: Wrappers without one) and its EOML_WRAPPER_WORKERS.
    serving: ServingSettings | None = None
    wrapper_workers: int = 2
    processes: list[ProcessRecord] = Field(default_factory=list)

    def save(self) -> Path:
        path = Path(self.root) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: Path = DEFAULT_ROOT) -> "PlatformState | None":
        path = root / STATE_FILE
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text())


@dataclass
class StackOptions:
    """Knobs of a local stack (defaults suit ``make demo`` on a small machine)."""

    root: Path = DEFAULT_ROOT
    repository: Path = Path("model_repository")
    tasks: tuple[str, ...] = DEMO_TASKS
    # Delivery to the Wrappers: exponential backoff from this delay; enough retries to ride out a Wrapper restart.
    delivery_retry: int = 8
    delivery_backoff_delay_s: float = 0.25
    # Per attempt: the Wrapper answers when the step is durable, so an attempt lasts a whole step.
    delivery_timeout_s: float = 3600.0
    # EOML_WRAPPER_WORKERS = the queue-proxy's containerConcurrency; None: the chart's wrappers.workers.
    wrapper_workers: int | None = None
    # A queue-proxy model in front of each Wrapper (the chart's timeoutSeconds unless set; the drain's quiet period
    # is used only when a Wrapper is rolled out: ``rollout_wrapper``; ``stop`` stops Wrappers directly).
    queue_proxy: bool = True
    wrapper_timeout_s: float | None = None
    drain_quiet_s: float = 30.0
    grace_s: float | None = None
    # The chart's wrappers.shutdownMarginSeconds unless set (tests that shorten the timeout shorten it too).
    shutdown_margin_s: float | None = None
    # The Wrapper's command line (default: this Python running services.wrapper.cli).
    wrapper_command: list[str] | None = None
    # "s3": tansu stores its data in a bucket of a second moto server, so that it survives a broker restart.
    kafka_storage: Literal["memory", "s3"] = "memory"
    progress_interval_s: float = 1.0
    start_timeout_s: float = 240.0
    log_level: str = "INFO"
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)
    # The inference server: "ours" or "triton" (inference_backends.py), or an external one's gRPC address.
    inference: str = "ours"
    inference_url: str = ""
    # A real Prometheus scraping the stack (``eo-platform up --prometheus``; prometheus.py).
    prometheus: bool = False


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def _log_tail(path: str, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it is gone for every purpose here.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _same_process(record: ProcessRecord) -> bool:
    """True if ``record.pid`` still runs the command we started (PIDs are reused after a process ends)."""
    if not pid_alive(record.pid):
        return False
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (not Linux): trust the PID
    return [part.decode(errors="replace") for part in cmdline if part][: len(record.argv)] == record.argv


def stop_process(record: ProcessRecord, timeout_s: float = 30.0) -> bool:
    """SIGTERM the process (its own session: children included), SIGKILL after ``timeout_s``; False if gone already."""
    if not _same_process(record):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(record.pid):
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)
        time.sleep(0.1)
    else:
        log.warning("process did not stop in time, killing it", extra={"component": record.name, "pid": record.pid})
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(record.pid, 0)
    return True


class LocalStack:
    """Starts and stops one local platform; ``state`` says where everything is."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self.root = Path(self.options.root).resolve()
        self.state: PlatformState | None = None
        self._popen: dict[str, subprocess.Popen] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> PlatformState:
        existing = PlatformState.load(self.root)
        if existing is not None and any(_same_process(p) for p in existing.processes):
            raise StackError(f"a local platform is already running (state in {self.root / STATE_FILE}); "
                             "stop it first: eo-platform down")
        repository = Path(self.options.repository).resolve()
        if not any(repository.glob("*/[0-9]*/model.onnx")):
            raise StackError(f"no exported models under {repository}: run 'make models' first")
        # Fresh logs per stack (a restarted Wrapper appends to its own).
        shutil.rmtree(self.root / "logs", ignore_errors=True)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        # Kafka keeps its topics in memory: step configurations of an earlier stack would point at nothing.
        store_root = self.root / "step-configs"
        shutil.rmtree(store_root, ignore_errors=True)
        store_root.mkdir(parents=True, exist_ok=True)

        names = ("kafka", "s3", "http", "grpc", "metrics", "controller", "kafka_storage", "prometheus")
        chosen = free_ports(len(names) + len(self.options.tasks))
        ports = dict(zip(names, chosen))
        wrapper_ports = dict(zip(self.options.tasks, chosen[len(names):]))
        self.state = PlatformState(
            root=str(self.root), started_at=time.time(), bootstrap_servers=f"127.0.0.1:{ports['kafka']}",
            s3_endpoint=f"http://127.0.0.1:{ports['s3']}", inference_http=f"127.0.0.1:{ports['http']}",
            inference_grpc=f"127.0.0.1:{ports['grpc']}", controller_url=f"http://127.0.0.1:{ports['controller']}",
            wrapper_urls={task: f"http://127.0.0.1:{port}" for task, port in wrapper_ports.items()},
            store_root=str(store_root),
        )
        serving = self._chart_serving()
        self.state.wrapper_workers = serving.container_concurrency
        self.state.serving = serving if self.options.queue_proxy else None
        if self.options.kafka_storage == "s3":
            self.state.kafka_storage = f"s3://{KAFKA_STORAGE_BUCKET}/"
            self.state.kafka_storage_endpoint = f"http://127.0.0.1:{ports['kafka_storage']}"
        self.state.auth_token_file = str(write_platform_token(self.root))
        try:
            self._start_infrastructure(ports, repository)
            self._start_controller(ports["controller"])
            for task, port in wrapper_ports.items():
                self.start_wrapper(task, port)
            self._wait_ready()
            if self.options.prometheus:
                self._start_prometheus(ports)
            create_topics(self.state.bootstrap_servers, [SYSTEM_TOPIC, f"{SYSTEM_TOPIC}.dlq", NOTIFY_TOPIC])
        except BaseException:
            self.stop()
            raise
        self.state.save()
        return self.state

    def stop(self) -> None:
        state = self.state or PlatformState.load(self.root)
        if state is None:
            return
        # Wrappers first (they finish accepted steps), then the controller, the inference server, S3, Kafka.
        for record in reversed(state.processes):
            if stop_process(record):
                log.info("stopped", extra={"component": record.name, "pid": record.pid})
            popen = self._popen.pop(record.name, None)
            if popen is not None:
                with contextlib.suppress(Exception):
                    popen.wait(1)
        with contextlib.suppress(FileNotFoundError):
            (self.root / STATE_FILE).unlink()
        self.state = None

    def __enter__(self) -> PlatformState:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes ---------------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None,
               health_url: str = "") -> ProcessRecord:
        assert self.state is not None
        log_path = self.root / "logs" / f"{name}.log"
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "EOML_LOG_LEVEL": self.options.log_level,
                     "EOML_LOG_FORMAT": "json",
                     **(security_env(self.state.auth_token_file, self.state.s3_endpoint)
                        if self.state.auth_token_file else {}),
                     **self.options.extra_env, **(env or {})}
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=child_env,
                                     cwd=os.getcwd(), start_new_session=True)
        record = ProcessRecord(name=name, pid=popen.pid, argv=argv, log=str(log_path), health_url=health_url)
        self._popen[name] = popen
        # A restarted process keeps its place: ``stop`` goes in reverse start order (Wrappers before Kafka).
        names = [p.name for p in self.state.processes]
        if name in names:
            self.state.processes[names.index(name)] = record
        else:
            self.state.processes.append(record)
        log.info("started", extra={"component": name, "pid": popen.pid, "log": str(log_path)})
        return record

    def _start_infrastructure(self, ports: dict[str, int], repository: Path) -> None:
        python = self.options.python
        if self.options.kafka_storage == "s3":
            self._spawn("kafka-storage", [python, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                          str(ports["kafka_storage"])])
            self._wait_port("kafka-storage", ports["kafka_storage"])
            self._create_kafka_bucket()
        self.start_kafka()
        self._spawn("s3", [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])])
        self._start_inference(python, repository, ports,
            health_url=f"http://127.0.0.1:{ports['http']}/v2/health/ready")
        self._wait_port("s3", ports["s3"])

    def _kafka_argv_env(self) -> tuple[list[str], dict[str, str]]:
        assert self.state is not None
        kafka_url = f"tcp://{self.state.bootstrap_servers}"
        if self.state.kafka_storage == "memory":
            return [str(tansu_binary()), "broker", "--listener-url", kafka_url, "--advertised-listener-url",
                    kafka_url, "--storage-engine", "memory://tansu/"], {}
        # tansu's S3 engine (the object_store crate) reads the endpoint and credentials from AWS_* variables.
        env = {"AWS_ENDPOINT": self.state.kafka_storage_endpoint, "AWS_ALLOW_HTTP": "true",
               "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}
        return [str(tansu_binary()), "broker", "--listener-url", kafka_url, "--advertised-listener-url", kafka_url,
                "--storage-engine", self.state.kafka_storage], env

    def _create_kafka_bucket(self) -> None:
        import boto3

        assert self.state is not None
        client = boto3.client("s3", endpoint_url=self.state.kafka_storage_endpoint, aws_access_key_id="local",
                              aws_secret_access_key="local", region_name="us-east-1")
        client.create_bucket(Bucket=KAFKA_STORAGE_BUCKET)

    def start_kafka(self) -> ProcessRecord:
        """Start (or, after ``stop_kafka``, restart) the broker on its port; returns once it listens."""
        assert self.state is not None
        argv, env = self._kafka_argv_env()
        record = self._spawn("kafka", argv, env)
        self._wait_port("kafka", int(self.state.bootstrap_servers.rsplit(":", 1)[1]))
        return record

    def stop_kafka(self, crash: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL with ``crash``). With in-memory storage its topics are gone; with
        ``kafka_storage="s3"`` ``start_kafka`` brings them back, records and committed offsets included."""
        record = self.process("kafka")
        if crash and _same_process(record):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)
        stop_process(record)
        popen = self._popen.pop("kafka", None)
        if popen is not None:
            with contextlib.suppress(Exception):
                popen.wait(1)

    def restart_kafka(self) -> ProcessRecord:
        self.stop_kafka()
        return self.start_kafka()

    def _start_controller(self, port: int) -> None:
        assert self.state is not None
        options = self.options
        env = {
            "EOML_CONTROLLER_HTTP_HOST": "127.0.0.1", "EOML_CONTROLLER_HTTP_PORT": str(port),
            "EOML_CONTROLLER_BOOTSTRAP_SERVERS": self.state.bootstrap_servers,
            "EOML_CONTROLLER_SOURCE_DRIVER": "local", "EOML_CONTROLLER_STORE": "local",
            "EOML_CONTROLLER_STORE_ROOT": self.state.store_root,
            "EOML_CONTROLLER_WRAPPER_URLS": json.dumps(self.state.wrapper_urls),
            "EOML_CONTROLLER_SYSTEM_TOPIC": SYSTEM_TOPIC,
            "EOML_CONTROLLER_DELIVERY_RETRY": str(options.delivery_retry),
            "EOML_CONTROLLER_DELIVERY_BACKOFF_DELAY_S": str(options.delivery_backoff_delay_s),
            "EOML_CONTROLLER_DELIVERY_TIMEOUT_S": str(options.delivery_timeout_s),
            "EOML_CONTROLLER_NOTIFY_TOPIC": NOTIFY_TOPIC,
        }
        self._spawn("controller", [options.python, "-m", "services.controller.cli", "consume"], env,
                    health_url=f"http://127.0.0.1:{port}/readyz")

    def _chart_serving(self) -> ServingSettings:
        """The Wrappers' serving settings: the chart's, with this stack's options."""
        options = self.options
        return chart_serving_settings(container_concurrency=options.wrapper_workers,
                                      timeout_s=options.wrapper_timeout_s, drain_quiet_s=options.drain_quiet_s,
                                      grace_s=options.grace_s, shutdown_margin_s=options.shutdown_margin_s)

    def wrapper_env(self, task: str, port: int) -> dict[str, str]:
        """Environment of the Wrapper behind service name ``task`` (the chart's entry of that name, else the task of
        that name on its default model); SHUTDOWN_TIMEOUT_S and WORKER_WAIT_S by the chart's rule
        (``wrapper_stop_timing``)."""
        assert self.state is not None
        options = self.options
        service = chart_wrapper_services().get(task, WrapperService(task, task))
        wrapper_task, model = service.task, service.model_name
        stop_timing = wrapper_stop_timing(self.state.serving or self._chart_serving())
        return {**stop_timing.env(),
            "EOML_WRAPPER_TASK": wrapper_task, "EOML_WRAPPER_MODEL_NAME": model,
            "EOML_WRAPPER_HTTP_HOST": "127.0.0.1", "EOML_WRAPPER_HTTP_PORT": str(port),
            "EOML_WRAPPER_INFERENCE_URL": self.state.inference_grpc, "EOML_WRAPPER_INFERENCE_PROTOCOL": "grpc",
            "EOML_WRAPPER_STORE": "local", "EOML_WRAPPER_STORE_ROOT": self.state.store_root,
            "EOML_WRAPPER_NAMESPACE": self.state.namespace, "EOML_WRAPPER_NOTIFY_TOPIC": NOTIFY_TOPIC,
            "EOML_WRAPPER_WORKERS": str(self.state.wrapper_workers),
            "EOML_WRAPPER_PROGRESS_INTERVAL_S": str(options.progress_interval_s),
            "POD_NAME": f"wrapper-{task}",
        }

    def start_wrapper(self, task: str, port: int | None = None) -> ProcessRecord:
        """Start (or restart) the Wrapper of ``task`` on its port: behind its queue-proxy model (one process, the
        "pod", listening on the port; the Wrapper itself on a free port behind it), or directly without one."""
        assert self.state is not None
        if port is None:
            port = int(self.state.wrapper_urls[task].rsplit(":", 1)[1])
        wrapper_argv = self.options.wrapper_command or [self.options.python, "-m", "services.wrapper.cli"]
        health_url = f"http://127.0.0.1:{port}/readyz"
        serving = self.state.serving
        app_port = port if serving is None else free_port()
        self.state.wrapper_app_urls[task] = f"http://127.0.0.1:{app_port}"
        if serving is None:
            return self._spawn(f"wrapper-{task}", wrapper_argv, self.wrapper_env(task, port), health_url=health_url)
        argv = [self.options.python, "-m", "services.local_platform.queue_proxy", "--port", str(port),
                "--app-port", str(app_port), "--container-concurrency", str(serving.container_concurrency),
                "--timeout-s", str(serving.timeout_s), "--drain-quiet-s", str(serving.drain_quiet_s),
                "--grace-s", str(serving.grace_period_s), "--", *wrapper_argv]
        return self._spawn(f"wrapper-{task}", argv, self.wrapper_env(task, app_port), health_url=health_url)

    def rollout_wrapper(self, task: str, wait_ready: bool = True) -> dict[str, object]:
        """Replace the Wrapper of ``task`` as a Knative rollout replaces its pod: the old pod is deleted as the
        kubelet does it (preStop ``/wait-for-drain``: the quiet period, reset by every new request; then SIGTERM
        to the Wrapper; SIGKILL when the grace period, counted from before preStop, runs out), then a new Wrapper
        starts behind a new queue-proxy on the same port. Returns the old pod's termination report (seconds)."""
        assert self.state is not None and self.state.serving is not None, "rollouts need the queue-proxy model"
        record = self.process(f"wrapper-{task}")
        if _same_process(record):
            os.kill(record.pid, signal.SIGUSR1)
        deadline = time.monotonic() + self.state.serving.grace_period_s + 30
        while pid_alive(record.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(record.pid, os.WNOHANG)
            time.sleep(0.1)
        stop_process(record, timeout_s=10)  # only if it outlived its grace period by far
        popen = self._popen.pop(record.name, None)
        if popen is not None:
            with contextlib.suppress(Exception):
                popen.wait(1)
        report = _last_termination_report(record.log)
        self.start_wrapper(task)
        self.state.save()
        if wait_ready:
            self.wait_healthy([record.name])
        return report

    def _start_inference(self, python: str, repository: Path, ports: dict[str, int], health_url: str) -> None:
        """Ours or real Triton on ``ports``; with ``inference_url``, nothing is started: the stack waits for that
        server and the Wrappers call it."""
        assert self.state is not None
        if self.options.inference_url:
            self.state.inference_grpc = external_grpc_address(self.options.inference_url)
            self.state.inference_http = ""
            wait_until_ready(self.state.inference_grpc, self.options.start_timeout_s)
            return
        argv, env = inference_command(self.options.inference, python, repository, ports, self.root)
        self._spawn("inference", argv, env, health_url=health_url)

    def _start_prometheus(self, ports: dict[str, int]) -> None:
        from .prometheus import prometheus_argv, scrape_config, write_config

        assert self.state is not None
        inference_metrics = "" if self.options.inference_url else f"127.0.0.1:{ports['metrics']}"
        config = write_config(self.root, scrape_config(self.state.wrapper_app_urls, self.state.controller_url,
                                                       inference_metrics))
        storage = self.root / "prometheus"
        shutil.rmtree(storage, ignore_errors=True)  # a fresh stack: no series of an earlier one
        self.state.prometheus_url = f"http://127.0.0.1:{ports['prometheus']}"
        self._spawn("prometheus", prometheus_argv(config, storage, ports["prometheus"]),
                    health_url=f"{self.state.prometheus_url}/-/ready")
        self.wait_healthy(["prometheus"])

    def process(self, name: str) -> ProcessRecord:
        assert self.state is not None
        for record in self.state.processes:
            if record.name == name:
                return record
        raise KeyError(name)

    def _wait_port(self, name: str, port: int) -> None:
        try:
            wait_for_port("127.0.0.1", port, 60, self._popen.get(name))
        except (TimeoutError, RuntimeError) as error:
            raise StackError(f"{name} did not start: {error}\n{_log_tail(self.process(name).log)}") from None

    def wait_healthy(self, names: Iterable[str] | None = None, timeout_s: float | None = None) -> None:
        assert self.state is not None
        deadline = time.monotonic() + (timeout_s or self.options.start_timeout_s)
        pending = [p for p in self.state.processes if p.health_url and (names is None or p.name in set(names))]
        while pending:
            for record in list(pending):
                popen = self._popen.get(record.name)
                if popen is not None and popen.poll() is not None:
                    raise StackError(f"{record.name} exited with {popen.returncode}; log {record.log}:\n"
                                     f"{_log_tail(record.log)}")
                if http_status(record.health_url) == 200:
                    pending.remove(record)
            if not pending:
                return
            if time.monotonic() > deadline:
                names_left = ", ".join(p.name for p in pending)
                raise StackError(f"not ready in time: {names_left}; see {self.root / 'logs'}\n"
                                 f"{_log_tail(pending[0].log)}")
            time.sleep(0.25)

    def _wait_ready(self) -> None:
        self.wait_healthy()


def _last_termination_report(log_path: str) -> dict[str, object]:
    """The ``pod terminated`` line the queue-proxy model printed last into its log ({} if none)."""
    report: dict[str, object] = {}
    with contextlib.suppress(OSError):
        for line in Path(log_path).read_text(errors="replace").splitlines():
            if line.startswith("{") and POD_TERMINATED in line:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("msg") == POD_TERMINATED:
                        report = entry
    return report


def create_topics(bootstrap_servers: str, topics: Iterable[str], timeout_s: float = 15.0) -> None:
    """Create topics that do not exist yet (1 partition; already existing ones are fine)."""
    from services.core.kafka import ensure_topics

    try:
        ensure_topics(bootstrap_servers, list(topics), timeout_s=timeout_s)
    except RuntimeError as error:
        raise StackError(str(error)) from None
