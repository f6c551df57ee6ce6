"""The rendered chart (real helm) grants little and exposes little: RBAC verbs, one service account per Wrapper service,
default-deny egress with explicit allowances, OIDC audiences and verification settings, Triton's restricted APIs.
Also the KafkaSource the controller creates carries the sink audiences and still passes the upstream CRD schema."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from security_support import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT))  # deploy.* (the render and validation helpers of make deploy-dry-run)

from deploy.render import PROD_VALUES, Tools, helm_template  # noqa: E402
from services.controller.settings import ControllerSettings  # noqa: E402
from services.controller.wiring import kafka_source_body  # noqa: E402
from services.core.crd_schema import crd_json_schema  # noqa: E402
from services.core.step_config import StepConfig  # noqa: E402

KAFKA_SOURCE_CRD = PROJECT_ROOT / "deploy" / "crds" / "eventing-kafka-broker-v1.23.0_kafkasources.sources.knative.dev.yaml"
SOURCE_SUFFIX = "-oidc-sources.knative.dev-kafkasource"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    tools = Tools()
    if not tools.helm.is_file():
        pytest.fail("missing helm: run 'make tools'")
    rendered = helm_template(tools, [PROD_VALUES], [])
    return [d for d in yaml.safe_load_all(rendered) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_no_role_lists_or_watches_secrets_or_configmaps(docs) -> None:
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    for role in of_kind(docs, "Role"):
        for rule in role["rules"]:
            if {"secrets", "configmaps"} & set(rule["resources"]):
                assert not {"list", "watch", "patch", "*"} & set(rule["verbs"]), (role["metadata"]["name"], rule)
                if role["metadata"]["name"].endswith("-wrapper"):
                    assert rule["verbs"] == ["get"]


def test_every_wrapper_service_runs_under_its_own_service_account(docs) -> None:
    # Per service, not per task: compress and compress-rvq run the same task on different models.
    wrappers = [s for s in of_kind(docs, "Service") if s["apiVersion"].startswith("serving.knative.dev/")
                and s["metadata"]["labels"]["app.kubernetes.io/component"] == "wrapper"]
    accounts = {(a["metadata"]["namespace"], a["metadata"]["name"]) for a in of_kind(docs, "ServiceAccount")}
    used = set()
    for service in wrappers:
        namespace = service["metadata"]["namespace"]
        account = service["spec"]["template"]["spec"]["serviceAccountName"]
        assert account.endswith("-wrapper-" + service["metadata"]["name"])
        assert (namespace, account) in accounts
        used.add((namespace, account))
    assert len(used) == len(wrappers)  # no two services share an identity
    # Each is bound to the namespace's get-only Role, and only there.
    for namespace, account in used:
        bindings = [b for b in of_kind(docs, "RoleBinding")
                    if any(s["name"] == account and s["namespace"] == namespace for s in b["subjects"])]
        assert [(b["metadata"]["namespace"], b["roleRef"]["name"].endswith("-wrapper")) for b in bindings] \
            == [(namespace, True)]


def test_default_deny_egress_with_explicit_allowances(docs) -> None:
    policies = of_kind(docs, "NetworkPolicy")
    assert policies
    for policy in policies:
        component = policy["metadata"]["labels"]["app.kubernetes.io/component"]
        assert "Egress" in policy["spec"]["policyTypes"], component
        rules = policy["spec"]["egress"]
        # No rule to any destination or on any port (exact peers: tests/security/test_egress_peers.py).
        assert all(rule.get("ports") and rule.get("to") for rule in rules)
        assert any(p["port"] == 53 for p in rules[0]["ports"])  # DNS
        for rule in rules:
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and block["cidr"] == "0.0.0.0/0":
                    assert "169.254.0.0/16" in block.get("except", []), component  # cloud metadata never
        if component == "wrapper":
            selectors = [peer.get("podSelector", {}).get("matchLabels", {}) for rule in rules
                         for peer in rule.get("to", [])]
            assert any(s.get("app.kubernetes.io/component") == "inference-server" for s in selectors)


def test_services_verify_sender_identity_and_sources_send_it(docs) -> None:
    services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in of_kind(docs, "Service")
                if s["apiVersion"].startswith("serving.knative.dev/")}
    for (namespace, name), service in services.items():
        variables = env(service["spec"]["template"]["spec"]["containers"][0])
        assert variables["EOML_AUTH_MODE"] == "oidc"
        assert variables["EOML_AUTH_AUDIENCE"] == f"serving.knative.dev/service/{namespace}/{name}"
        subjects = variables["EOML_AUTH_ALLOWED_SUBJECTS"].split(",")
        assert all(s.startswith("system:serviceaccount:") and s.endswith(SOURCE_SUFFIX) for s in subjects)
        if service["metadata"]["labels"]["app.kubernetes.io/component"] == "wrapper":
            assert subjects == [f"system:serviceaccount:{namespace}:*{SOURCE_SUFFIX}"]
        else:
            # Intake only from the controller's own system.ML source (its exact account, or the release namespace's
            # sources where Knative hashes a long name); dead letters from every source.
            routes = json.loads(variables["EOML_AUTH_ROUTE_SUBJECTS"])
            assert routes["/"] in ([f"system:serviceaccount:{namespace}:{name}{SOURCE_SUFFIX}"],
                                   [f"system:serviceaccount:{namespace}:*{SOURCE_SUFFIX}"])
            assert all(not s.startswith(f"system:serviceaccount:{namespace}:") for s in subjects[1:])
            assert routes["/dead-letter"] == subjects
            assert variables["EOML_CONTROLLER_DEAD_LETTER_AUDIENCE"] == variables["EOML_AUTH_AUDIENCE"]
            assert variables["EOML_CONTROLLER_WRAPPER_AUDIENCE_TEMPLATE"] == \
                "serving.knative.dev/service/{namespace}/{service}"
            [source] = of_kind(docs, "KafkaSource")
            assert source["spec"]["sink"]["audience"] == variables["EOML_AUTH_AUDIENCE"]


def test_inference_server_restricts_model_control_with_a_secret_key(docs) -> None:
    [isvc] = of_kind(docs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    restricted = [a for a in model["args"] if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    # The value is not on the command line: the Secret is mounted as a file (tests/security/test_keys_off_command_lines).
    assert len(restricted) == 2 and all("model-repository" in a and a.endswith(":eoml-admin-key")
                                        for a in restricted)
    [key_file] = [e for e in model["env"] if e["name"] == "EOML_RESTRICTED_API_KEY_FILE"]
    assert key_file["value"].endswith("/key") and "valueFrom" not in key_file


def test_step_kafka_source_sends_tokens_and_passes_the_crd() -> None:
    from jsonschema import Draft202012Validator

    settings = ControllerSettings(wrapper_audience_template="serving.knative.dev/service/{namespace}/{service}",
                                  dead_letter_audience="serving.knative.dev/service/eoml/controller")
    config = StepConfig(config_name="json-config-a-1", workflow_name="wf", topic_in="a.in", topic_out="a.out",
                        namespace="uc5", service_name="uc5-cfactor", bucket="b")
    body = kafka_source_body(config, settings)
    assert body["spec"]["sink"]["audience"] == "serving.knative.dev/service/uc5/uc5-cfactor"
    assert body["spec"]["delivery"]["deadLetterSink"]["audience"] == settings.dead_letter_audience
    schema = crd_json_schema(KAFKA_SOURCE_CRD, "v1beta1", strict=True)
    assert list(Draft202012Validator(schema).iter_errors(body)) == []
    # Without an audience configured (OIDC off), no audience field at all.
    plain = kafka_source_body(config, ControllerSettings())
    assert "audience" not in plain["spec"]["sink"] and "audience" not in plain["spec"]["delivery"]["deadLetterSink"]
