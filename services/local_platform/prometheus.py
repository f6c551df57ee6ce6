"""A real Prometheus (Debian's ``prometheus`` package, ``make prometheus``) scraping the local platform.

``eo-platform up --prometheus`` starts it on loopback after the other processes. It scrapes, once a second, every
Wrapper's ``/metrics`` on its own port (not through its queue-proxy model, as a PodMonitor scrapes the pod: a
scrape must not take one of the Wrapper's containerConcurrency slots), the controller's, and the inference
server's metrics port, with the chart's alert rules (``charts/eo-inference-platform/files/prometheus-alerts.yaml``)
loaded. Each target carries ``eoml_component`` (wrapper, controller, inference-server), as the chart's PodMonitors
set it, so the rules and the dashboard's queries work the same here and on a cluster. Storage is
``<stack root>/prometheus`` (under build/).
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
ALERT_RULES = REPO_ROOT / "charts" / "eo-inference-platform" / "files" / "prometheus-alerts.yaml"
SCRAPE_INTERVAL = "1s"


class PrometheusNotInstalled(RuntimeError):
    """No ``prometheus`` binary on PATH."""


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusNotInstalled("no prometheus binary on PATH: run 'make prometheus' "
                                     "(apt-get install prometheus)")
    return found


def scrape_config(wrapper_urls: Mapping[str, str], controller_url: str, inference_metrics: str,
                  rule_files: list[Path] | None = None) -> dict[str, Any]:
    """The Prometheus configuration (JSON is YAML) for the stack's endpoints (``host:port`` or ``http://host:port``)."""

    def target(url: str) -> str:
        return url.split("://", 1)[-1].rstrip("/")

    jobs: list[dict[str, Any]] = [
        {"job_name": "eoml-wrapper", "static_configs": [
            {"targets": [target(url)], "labels": {"eoml_component": "wrapper", "service": service}}
            for service, url in sorted(wrapper_urls.items())]},
        {"job_name": "eoml-controller", "static_configs": [
            {"targets": [target(controller_url)], "labels": {"eoml_component": "controller"}}]},
    ]
    if inference_metrics:
        jobs.append({"job_name": "eoml-inference", "static_configs": [
            {"targets": [target(inference_metrics)], "labels": {"eoml_component": "inference-server"}}]})
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                   "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(path) for path in (rule_files if rule_files is not None else [ALERT_RULES])],
        "scrape_configs": jobs,
    }


def prometheus_argv(config_file: Path, storage: Path, port: int) -> list[str]:
    return [prometheus_binary(), f"--config.file={config_file}", f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d", "--log.level=warn"]


def write_config(root: Path, config: dict[str, Any]) -> Path:
    path = root / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))
    return path


def query(prometheus_url: str, promql: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """An instant query through Prometheus' HTTP API: the result vector (``metric`` labels, ``value``)."""
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query {promql!r} failed: {body}")
    return list(body["data"]["result"])


def api(prometheus_url: str, path: str, timeout_s: float = 5.0) -> Any:
    """``GET /api/v1/<path>`` (targets, rules, ...): its ``data``."""
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/{path}", timeout=timeout_s) as response:
        return json.load(response)["data"]
