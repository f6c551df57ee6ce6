"""The Grafana dashboard and the alert rules query only series the platform exports: the ``eoml_*`` names from
services/core/metrics.py, the ``nv_*`` names of the inference server (services/inference/metrics.py, Triton's
names), and Prometheus' own ``up``/``ALERTS``. Every panel query is valid PromQL (promtool parses it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.core.metrics import ControllerMetrics, WrapperMetrics, series_names
from services.inference.metrics import COUNTER_FAMILIES, PENDING_REQUEST_FAMILY
from services.local_platform.prometheus import ALERT_RULES

DASHBOARD = ALERT_RULES.parent / "grafana-dashboard.json"
PROMETHEUS_SERIES = {"up"}
SERIES = re.compile(r"\b((?:eoml|nv)_[a-z0-9_]+|up)\b(?!\s*\()")
# Grafana's variables, as Prometheus would see them once Grafana substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


def exported() -> set[str]:
    nv = {family.name for family in COUNTER_FAMILIES} | {PENDING_REQUEST_FAMILY[0]}
    return series_names(WrapperMetrics().registry) | series_names(ControllerMetrics().registry) | nv | PROMETHEUS_SERIES


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] if panel["type"] != "row"
            for target in panel["targets"]]


def names_in(expr: str) -> set[str]:
    # Label matchers and grouping clauses name labels, not series.
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_labels = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_labels)
    return set(SERIES.findall(without_labels))


def test_every_panel_queries_series_the_platform_exports() -> None:
    known = exported()
    queries = panel_queries()
    assert queries
    for title, expr in queries:
        named = names_in(expr)
        assert named, f"panel {title!r}: no series in {expr!r}"
        assert named <= known, f"panel {title!r} queries {sorted(named - known)}, which nothing exports"


def test_dashboard_covers_wrapper_controller_and_inference_series() -> None:
    named = set().union(*(names_in(expr) for _, expr in panel_queries()))
    for required in ("eoml_steps_total", "eoml_step_stage_seconds_sum", "eoml_deliveries_total",
                     "eoml_dead_letter_records_total", "eoml_dependency_errors_total", "eoml_runs_in_flight",
                     "eoml_controller_workflow_messages_total", "nv_inference_count", "nv_inference_request_failure"):
        assert required in named, required


def test_alert_rules_query_series_the_platform_exports() -> None:
    known = exported()
    rules = [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]
    for rule in rules:
        assert names_in(rule["expr"]) <= known, (rule["alert"], names_in(rule["expr"]) - known)


def test_the_check_sees_an_unknown_series() -> None:
    assert "eoml_steps_totl" in names_in('sum(rate(eoml_steps_totl{task="x"}[5m]))') - exported()


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run 'make prometheus' (make test does)")
    rules = []
    for index, (_, expr) in enumerate(panel_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:panel_{index}", "expr": expr})
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
