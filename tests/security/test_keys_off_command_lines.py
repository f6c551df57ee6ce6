"""Issue 18 item 7: the restricted-API key reaches the inference server by file, never by its command line (which
``ps`` shows to every user of the machine, and the node's container runtime to its operators).

The local stack's servers (ours, and real Triton where ``make triton-install`` put it) are started with the stack's
own command (``inference_command``): the admin groups answer 403 without the header and 200 with it, and no process
on this machine carries the key in ``/proc/<pid>/cmdline``, nor the server in its environment. The chart renders the
same: value-less options, the Secret mounted as a file, no ``$(VAR)`` expansion that kubelet would put in argv."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from security_support import PROJECT_ROOT, http, wait_until

sys.path.insert(0, str(PROJECT_ROOT))  # deploy.* (the render helpers of make deploy-dry-run)

from deploy.render import PROD_VALUES, Tools, helm_template  # noqa: E402
from services.local_platform.inference_backends import DEFAULT_TRITON_VENV, inference_command  # noqa: E402
from services.local_platform.infra import free_port  # noqa: E402

ADMIN_HEADER_KEY = "eoml-admin-key"  # the chart's inference.restrictedApi.headerKey, also the local stack's
ADMIN_KEY_FILE = "inference-admin-key"  # under the stack's root, mode 0600


def every_command_line() -> dict[int, bytes]:
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                pass  # gone, or not ours to read
    return lines


def answers(url: str) -> bool:
    try:
        return http("GET", url, timeout_s=2)[0] == 200
    except OSError:
        return False


def assert_restricted_by_a_key_on_no_command_line(kind: str, tmp_path: Path) -> None:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    repository = tmp_path / "models"
    repository.mkdir()
    argv, env = inference_command(kind, sys.executable, repository, ports, tmp_path / "stack",
                                  triton_venv=PROJECT_ROOT / DEFAULT_TRITON_VENV)
    key_path = tmp_path / "stack" / ADMIN_KEY_FILE
    assert key_path.is_file(), "the local stack keeps its admin key in a file"
    key = key_path.read_text()
    assert len(key) >= 32 and (key_path.stat().st_mode & 0o077) == 0
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env or None, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{ports['http']}"
        wait_until(lambda: process.poll() is not None or answers(base + "/v2/health/live"), timeout_s=90)
        assert process.poll() is None, (tmp_path / "server.log").read_text(errors="replace")[-2000:]
        index = base + "/v2/repository/index"
        assert http("POST", index, b"{}")[0] == 403
        assert http("POST", index, b"{}", {ADMIN_HEADER_KEY: key + "x"})[0] == 403
        assert http("POST", index, b"{}", {ADMIN_HEADER_KEY: key})[0] == 200
        assert http("GET", base + "/v2/health/ready")[0] == 200  # the Wrappers' groups stay open
        own = Path(f"/proc/{process.pid}")
        assert b"restricted" in (own / "cmdline").read_bytes()  # the options are there, without their value
        carriers = [pid for pid, line in every_command_line().items() if key.encode() in line]
        assert carriers == [], f"processes with the key on their command line: {carriers}"
        assert key.encode() not in (own / "environ").read_bytes()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
    assert key not in (tmp_path / "server.log").read_text(errors="replace")


def test_our_server_in_the_local_stack_gets_its_key_from_a_file(tmp_path) -> None:
    assert_restricted_by_a_key_on_no_command_line("ours", tmp_path)


def test_real_triton_in_the_local_stack_gets_its_key_through_the_preload_library(tmp_path) -> None:
    if not (PROJECT_ROOT / DEFAULT_TRITON_VENV / ".installed").exists():
        pytest.skip("real Triton is not installed (make triton-install)")
    assert_restricted_by_a_key_on_no_command_line("triton", tmp_path)


def test_our_server_refuses_a_value_less_restriction_without_a_key(tmp_path) -> None:
    """Fail closed: ``<apis>:<key>`` with no key file or key variable is a usage error, not an open API."""
    result = subprocess.run([sys.executable, "-m", "services.inference.cli", "--model-repository", str(tmp_path),
                             "--http-restricted-api=model-repository:eoml-admin-key"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "option format" in result.stderr


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    tools = Tools()
    if not tools.helm.is_file():
        pytest.fail("missing helm: run 'make tools'")
    triton = helm_template(tools, [PROD_VALUES], [])
    ours = helm_template(tools, [PROD_VALUES], ["inference.runtime=eo-inference-cpu", "inference.gpus=0",
                                                  "cpuRuntime.enabled=true"])
    return {name: [d for d in yaml.safe_load_all(text) if d] for name, text in (("triton", triton), ("ours", ours))}


def containers_of(doc: dict) -> list[dict]:
    if doc["kind"] == "InferenceService":
        predictor = doc["spec"]["predictor"]
        return [predictor["model"], *predictor.get("initContainers", [])]
    if doc["kind"] == "ServingRuntime":
        return doc["spec"]["containers"]
    return []


@pytest.mark.parametrize("runtime", ["triton", "ours"])
def test_the_chart_puts_the_key_in_a_mounted_file_not_in_args_or_env(rendered, runtime) -> None:
    docs = rendered[runtime]
    [isvc] = [d for d in docs if d["kind"] == "InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    for doc in docs:
        for container in containers_of(doc):
            for argument in [*container.get("command", []), *container.get("args", [])]:
                assert "$(" not in argument, (doc["kind"], argument)  # kubelet would expand it into argv
                if argument.startswith(("--http-restricted-api=", "--grpc-restricted-protocol=")):
                    assert argument.split(":", 1)[1] == "eoml-admin-key", argument  # no "=<value>"
            for variable in container.get("env", []):
                assert "secretKeyRef" not in variable.get("valueFrom", {}), variable["name"]
    restricted = [a for a in model["args"] if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    assert restricted == ["--http-restricted-api=model-repository,shared-memory,trace,logging:eoml-admin-key",
                          "--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:eoml-admin-key"]
    volumes = {v["name"]: v for v in isvc["spec"]["predictor"]["volumes"]}
    [secret] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-inference-admin-key")]
    assert volumes["restricted-api-key"]["secret"]["secretName"] == secret["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in model["volumeMounts"]}
    key_file = mounts["restricted-api-key"] + "/key"
    env = {e["name"]: e.get("value") for e in model["env"]}
    if runtime == "ours":
        assert env["EOML_INFERENCE_RESTRICTED_API_KEY_FILE"] == key_file and "LD_PRELOAD" not in env
        assert "initContainers" not in isvc["spec"]["predictor"]
    else:
        assert env["EOML_RESTRICTED_API_KEY_FILE"] == key_file
        assert env["LD_PRELOAD"] == mounts["restricted-api-preload"] + "/libeoml_restricted_key.so"
        [init] = isvc["spec"]["predictor"]["initContainers"]
        assert init["command"][-1].rstrip("/") == mounts["restricted-api-preload"]
        assert volumes["restricted-api-preload"]["emptyDir"]
