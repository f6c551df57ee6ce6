"""The chart's monitoring objects (monitoring.enabled): PodMonitors that select the pods of the Wrappers, the
controller and the inference server on the ports their metrics are served on, the alert rules as a PrometheusRule,
the Grafana dashboard as a ConfigMap; all valid against the prometheus-operator CRDs in deploy/crds."""

from __future__ import annotations

import json

import yaml

from deploy_test_support import REPO_ROOT, documents, find
from deploy.render import CI_VALUES, Tools, helm_template
from deploy.validate import validate_documents

KNATIVE = "serving.knative.dev/"
MONITORING = "monitoring.coreos.com/"
FILES = REPO_ROOT / "charts" / "eo-inference-platform" / "files"


def render(tools: Tools, *set_values: str):
    return documents(helm_template(tools, [CI_VALUES], list(set_values), namespace="eoml"))


def test_monitoring_is_off_by_default(default_manifest: str) -> None:
    docs = documents(default_manifest)
    assert not [d for d in docs if str(d.body.get("apiVersion", "")).startswith(MONITORING)]


def test_pod_monitors_select_each_component_on_its_metrics_port(tools: Tools) -> None:
    docs = render(tools, "monitoring.enabled=true", "monitoring.labels.release=kube-prometheus-stack")
    assert validate_documents(docs) == []
    monitors = {m["metadata"]["labels"]["app.kubernetes.io/component"]: m
                for m in find(docs, "PodMonitor", api_prefix=MONITORING)}
    assert set(monitors) == {"wrapper", "controller", "inference-server"}
    for component, monitor in monitors.items():
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        component_label = {"action": "replace", "targetLabel": "eoml_component", "replacement": component}
        assert component_label in endpoint["relabelings"]

    # Wrappers and controller: Knative Services whose pod template labels the PodMonitor selects, on the port the
    # container listens on (the user container's own /metrics, not queue-proxy's).
    services = find(docs, "Service", api_prefix=KNATIVE)
    for component in ("wrapper", "controller"):
        monitor = monitors[component]
        chosen = [s for s in services if s["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        assert chosen
        for service in chosen:
            pod_labels = service["spec"]["template"]["metadata"]["labels"]
            assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
            assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
            [container] = service["spec"]["template"]["spec"]["containers"]
            assert monitor["spec"]["podMetricsEndpoints"][0]["portNumber"] == container["ports"][0]["containerPort"]
            assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    [isvc] = find(docs, "InferenceService")
    inference = monitors["inference-server"]["spec"]
    assert inference["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    assert inference["podMetricsEndpoints"][0]["portNumber"] == 8002


def test_alert_rules_and_dashboard_are_the_tested_files(tools: Tools) -> None:
    docs = render(tools, "monitoring.enabled=true")
    [rule] = find(docs, "PrometheusRule", api_prefix=MONITORING)
    assert rule["spec"] == yaml.safe_load((FILES / "prometheus-alerts.yaml").read_text())
    [dashboard] = [c for c in find(docs, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    shipped = json.loads((FILES / "grafana-dashboard.json").read_text())
    assert json.loads(dashboard["data"]["eoml-platform.json"]) == shipped


def test_rules_and_dashboard_can_be_left_out(tools: Tools) -> None:
    docs = render(tools, "monitoring.enabled=true", "monitoring.rules=false", "monitoring.dashboard.enabled=false")
    assert not find(docs, "PrometheusRule")
    assert not [c for c in find(docs, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]
    assert len(find(docs, "PodMonitor")) == 3


def test_go_patterns_of_the_crds_are_checked_in_python(tools: Tools) -> None:
    """PrometheusRule's partial_response_strategy pattern is ``^(?i)(abort|warn)?$`` (Go syntax): still enforced."""
    docs = render(tools, "monitoring.enabled=true")
    [rule] = [d for d in docs if d.kind == "PrometheusRule"]
    rule.body["spec"]["groups"][0]["partial_response_strategy"] = "WARN"
    assert validate_documents([rule]) == []
    rule.body["spec"]["groups"][0]["partial_response_strategy"] = "sometimes"
    assert [p.path for p in validate_documents([rule])] == ["spec.groups[0].partial_response_strategy"]
