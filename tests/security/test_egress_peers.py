"""Issue 18 item 6: every component's egress names its peers and their ports, exactly (rendered by the real helm with
the production values). The Wrappers reach DNS only at kube-dns, the API server, the Kafka brokers, S3 and the
inference service (its pods on Triton's ports, or the cluster-local gateway when it is Serverless), nothing else in
Knative's namespaces; a 0.0.0.0/0 allowance always has the cloud metadata range and the cluster's pod and Service
ranges carved out, and the chart refuses one without those ranges."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from security_support import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT))  # deploy.* (the render helpers of make deploy-dry-run)

from deploy.render import PROD_VALUES, ToolError, Tools, helm_template  # noqa: E402

# values-prod.yaml's 0.0.0.0/0 minus cloud metadata, the pod range and the Service range.
WIDE_EXCEPT = ["169.254.0.0/16", "10.244.0.0/16", "10.96.0.0/12"]


def tcp(*ports: int) -> list[dict]:
    return [{"port": port, "protocol": "TCP"} for port in ports]


def in_namespace(namespace: str, labels: dict[str, str] | None = None) -> dict:
    peer: dict = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    if labels:
        peer["podSelector"] = {"matchLabels": labels}
    return peer


DNS = {"to": [in_namespace("kube-system", {"k8s-app": "kube-dns"})],
       "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
API_SERVER = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": WIDE_EXCEPT}}], "ports": tcp(443, 6443)}
KAFKA = {"to": [in_namespace("kafka", {"strimzi.io/cluster": "eo-kafka", "strimzi.io/kind": "Kafka"})],
         "ports": tcp(9092, 9093)}
S3 = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": WIDE_EXCEPT}}], "ports": tcp(443)}
INFERENCE_PODS = {"to": [in_namespace("eoml", {"app.kubernetes.io/component": "inference-server",
                                               "app.kubernetes.io/instance": "eoml",
                                               "app.kubernetes.io/name": "eo-inference-platform"})],
                  "ports": tcp(8080, 9000)}
KNATIVE_GATEWAY = {"to": [in_namespace("kourier-system", {"app": "3scale-kourier-gateway"})], "ports": tcp(8081, 8444)}


def egress_by_component(*set_values: str, values: tuple[Path, ...] = (PROD_VALUES,)) -> dict[tuple[str, str], list]:
    tools = Tools()
    if not tools.helm.is_file():
        pytest.fail("missing helm: run 'make tools'")
    docs = [d for d in yaml.safe_load_all(helm_template(tools, list(values), list(set_values))) if d]
    return {(d["metadata"]["labels"]["app.kubernetes.io/component"], d["metadata"]["namespace"]): d["spec"]["egress"]
            for d in docs if d["kind"] == "NetworkPolicy"}


def test_every_component_reaches_exactly_its_peers_on_their_ports() -> None:
    policies = egress_by_component()
    assert set(policies) == {("controller", "eoml"), ("inference-server", "eoml"), ("wrapper", "uc5"),
                             ("wrapper", "uc6"), ("wrapper", "eoml-workflows")}
    assert policies[("controller", "eoml")] == [DNS, API_SERVER, KAFKA]
    assert policies[("inference-server", "eoml")] == [DNS, S3]
    for namespace in ("uc5", "uc6", "eoml-workflows"):
        assert policies[("wrapper", namespace)] == [DNS, API_SERVER, KAFKA, S3, INFERENCE_PODS], namespace


def test_a_serverless_inference_service_is_reached_through_the_gateway_only() -> None:
    policies = egress_by_component("inference.deploymentMode=Serverless")
    assert policies[("wrapper", "uc5")] == [DNS, API_SERVER, KAFKA, S3, KNATIVE_GATEWAY]
    for rule in policies[("wrapper", "uc5")]:  # never a whole Knative namespace, never any port
        assert rule["ports"] and all("podSelector" in peer or "ipBlock" in peer for peer in rule["to"])


@pytest.mark.parametrize("wide", ["s3Cidrs", "apiServerCidrs"])
@pytest.mark.parametrize("missing", ["podCidrs", "serviceCidrs"])
def test_the_chart_refuses_everywhere_egress_without_the_cluster_ranges(tmp_path, wide: str, missing: str) -> None:
    narrow = {"s3Cidrs": ["52.219.0.0/16"], "apiServerCidrs": ["10.0.0.1/32"]}
    narrow[wide] = ["0.0.0.0/0"]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"egress": {**narrow, missing: []}}}))
    with pytest.raises(ToolError) as refused:
        egress_by_component(values=(PROD_VALUES, values))
    assert "0.0.0.0/0 needs networkPolicy.egress.podCidrs and serviceCidrs" in str(refused.value)
    # Narrow ranges need no carve-out: they render, without an except.
    values.write_text(yaml.safe_dump({"networkPolicy": {"egress": {
        "s3Cidrs": ["52.219.0.0/16"], "apiServerCidrs": ["10.0.0.1/32"], missing: []}}}))
    wrapper = egress_by_component(values=(PROD_VALUES, values))[("wrapper", "uc5")]
    assert wrapper[3] == {"to": [{"ipBlock": {"cidr": "52.219.0.0/16"}}], "ports": tcp(443)}


def test_an_ipv6_everywhere_allowance_is_carved_by_its_own_family(tmp_path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"egress": {
        "s3Cidrs": ["0.0.0.0/0", "::/0"], "podCidrs": ["10.244.0.0/16", "fd00:10:244::/56"],
        "serviceCidrs": ["10.96.0.0/12", "fd00:10:96::/112"], "exceptCidrs": ["169.254.0.0/16", "fe80::/10"]}}}))
    s3 = egress_by_component(values=(PROD_VALUES, values))[("inference-server", "eoml")][1]
    assert s3["to"] == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16", "10.244.0.0/16", "10.96.0.0/12"]}},
        {"ipBlock": {"cidr": "::/0", "except": ["fe80::/10", "fd00:10:244::/56", "fd00:10:96::/112"]}}]


@pytest.mark.parametrize("ranges", [["0.0.0.0/1", "128.0.0.0/1"], ["::0/0"], ["0.0.0.0/4"], ["2000::/3"]])
def test_a_wide_range_spelled_otherwise_is_refused_not_left_uncarved(tmp_path, ranges: list[str]) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"egress": {
        "s3Cidrs": ranges, "apiServerCidrs": ["10.0.0.1/32"], "podCidrs": [], "serviceCidrs": []}}}))
    with pytest.raises(ToolError) as refused:
        egress_by_component(values=(PROD_VALUES, values))
    assert "wider than a /8 (IPv4) or /16 (IPv6)" in str(refused.value)
