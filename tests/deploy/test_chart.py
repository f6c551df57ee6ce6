"""The Helm chart, rendered by the real helm: what it deploys, how narrowly it is allowed to act, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deploy_test_support import REPO_ROOT, documents, env_of, find
from deploy.render import CI_VALUES, PROD_VALUES, ToolError, Tools, helm_lint, helm_template, render_all
from deploy.validate import validate_documents
from services.controller.messages import parse_workflow_message
from services.controller.settings import ControllerSettings
from services.controller.wiring import kafka_source_body
from services.core.step_config import step_config_from_message

KNATIVE = "serving.knative.dev/"
KSERVE = "serving.kserve.io/"
TASKS = {"ssl-features", "classify", "compress", "decompress", "compress-rvq", "decompress-rvq", "uc5-cfactor",
         "uc6-locust", "cloud-mask"}
# Services whose name is not their task: (task, model).
NAMED_SERVICES = {"cloud-mask": ("generic", "s2-cloud-mask"), "compress-rvq": ("compress", "Bigearth-net-rvq-compress"),
                  "decompress-rvq": ("decompress", "Bigearth-net-rvq-decompress")}
DEV_VALUES = REPO_ROOT / "deploy" / "overlays" / "dev" / "values.yaml"


def render(tools: Tools, *set_values: str, values: tuple[Path, ...] = (CI_VALUES,), namespace: str = "eoml"):
    return documents(helm_template(tools, list(values), list(set_values), namespace=namespace))


def render_error(tools: Tools, *set_values: str, values: tuple[Path, ...] = (CI_VALUES,)) -> str:
    with pytest.raises(ToolError) as error:
        helm_template(tools, list(values), list(set_values))
    return str(error.value)


@pytest.mark.parametrize("values", [CI_VALUES, PROD_VALUES, DEV_VALUES], ids=["default", "prod", "dev"])
def test_helm_lint_strict_passes(tools: Tools, values: Path) -> None:
    output = helm_lint(tools, [values])
    assert "0 chart(s) failed" in output


def test_every_variant_renders_and_validates(tools: Tools, tmp_path: Path) -> None:
    results = render_all(tools, tmp_path)
    assert [r.name for r in results] == ["default", "prod", "overlay-dev", "overlay-prod"]
    for result in results:
        assert result.ok, (result.name, result.errors, [str(p) for p in result.problems])
        assert result.manifest is not None and result.manifest.stat().st_size > 0
        assert result.documents > 10


def test_inference_service_runs_triton_from_s3_on_gpus(default_manifest: str) -> None:
    docs = documents(default_manifest)
    [isvc] = find(docs, "InferenceService", api_prefix=KSERVE)
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert model["runtime"] == "kserve-tritonserver"
    assert model["storageUri"].startswith("s3://")
    assert model["resources"]["limits"]["nvidia.com/gpu"] == model["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 2)
    assert predictor["annotations"]["prometheus.io/port"] == "8002"
    # The storage initializer finds the S3 Secret through the predictor's service account.
    [account] = [a for a in find(docs, "ServiceAccount") if a["metadata"]["name"] == predictor["serviceAccountName"]]
    [secret] = [s for s in find(docs, "Secret") if {"name": s["metadata"]["name"]} in account["secrets"]]
    annotations = secret["metadata"]["annotations"]
    assert {"serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region"} \
        <= set(annotations)
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_one_wrapper_per_task_in_each_workflow_namespace(tools: Tools) -> None:
    docs = render(tools, "controller.workflowNamespaces={uc5,uc6}")
    [isvc] = find(docs, "InferenceService", api_prefix=KSERVE)
    for namespace in ("uc5", "uc6"):
        services = find(docs, "Service", api_prefix=KNATIVE, namespace=namespace)
        assert {s["metadata"]["name"] for s in services} == TASKS
        # Each service runs under an identity of its own, also two services of one task (compress, compress-rvq).
        identities = [s["spec"]["template"]["spec"]["serviceAccountName"] for s in services]
        assert len(set(identities)) == len(identities)
        assert set(identities) <= {a["metadata"]["name"] for a in find(docs, "ServiceAccount", namespace=namespace)}
        for service in services:
            [container] = service["spec"]["template"]["spec"]["containers"]
            env = env_of(container)
            name = service["metadata"]["name"]
            if name in NAMED_SERVICES:
                assert (env["EOML_WRAPPER_TASK"], env["EOML_WRAPPER_MODEL_NAME"]) == NAMED_SERVICES[name]
            else:
                assert env["EOML_WRAPPER_TASK"] == name and "EOML_WRAPPER_MODEL_NAME" not in env
            assert env["EOML_WRAPPER_NAMESPACE"] == namespace
            assert env["EOML_WRAPPER_STORE"] == "kubernetes"
            assert env["EOML_WRAPPER_INFERENCE_URL"] == f"{isvc['metadata']['name']}-predictor.eoml.svc.cluster.local:80"
            assert env["EOML_WRAPPER_INFERENCE_PROTOCOL"] == "grpc"
            assert "torch" not in container["image"]


def test_tasks_can_be_limited_to_namespaces(prod_manifest: str) -> None:
    docs = documents(prod_manifest)
    assert "uc5-cfactor" in {s["metadata"]["name"] for s in find(docs, "Service", api_prefix=KNATIVE, namespace="uc5")}
    assert "uc5-cfactor" not in {s["metadata"]["name"]
                                 for s in find(docs, "Service", api_prefix=KNATIVE, namespace="uc6")}


def test_controller_listens_on_system_ml_and_knows_its_dead_letter_address(default_manifest: str) -> None:
    docs = documents(default_manifest)
    [source] = find(docs, "KafkaSource")
    [controller] = [s for s in find(docs, "Service", api_prefix=KNATIVE, namespace="eoml")]
    name = controller["metadata"]["name"]
    assert source["spec"]["topics"] == ["system.ML"]
    assert source["spec"]["consumerGroup"]
    assert 0 < source["spec"]["delivery"]["retry"] <= 100
    assert source["spec"]["sink"]["ref"] == {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": name}
    env = env_of(controller["spec"]["template"]["spec"]["containers"][0])
    assert env["EOML_CONTROLLER_SOURCE_DRIVER"] == env["EOML_CONTROLLER_STORE"] == "kubernetes"
    assert (env["EOML_CONTROLLER_CONTROLLER_SERVICE_NAME"], env["EOML_CONTROLLER_CONTROLLER_NAMESPACE"]) == (name, "eoml")
    assert env["EOML_CONTROLLER_WORKFLOW_NAMESPACES"] == "eoml-workflows"


def _rules(role: dict) -> set[tuple[str, str, frozenset[str]]]:
    return {(group, resource, frozenset(rule["verbs"]))
            for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}


def test_rbac_is_namespaced_and_minimal(tools: Tools) -> None:
    docs = render(tools, "controller.workflowNamespaces={uc5,uc6}")
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    manage = frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in find(docs, "Role")}
    accounts = {(a["metadata"]["namespace"], a["metadata"]["name"]) for a in find(docs, "ServiceAccount")}
    for namespace in ("uc5", "uc6"):
        controller = roles[(namespace, "eoml-eo-inference-platform-controller")]
        # ConfigMaps and Secrets by name only: no list/watch (stored steps are found through the KafkaSources).
        by_name = frozenset({"get", "create", "update", "delete"})
        assert _rules(controller) == {("sources.knative.dev", "kafkasources", manage), ("", "configmaps", by_name),
                                      ("", "secrets", by_name)}
        wrapper = roles[(namespace, "eoml-eo-inference-platform-wrapper")]
        assert _rules(wrapper) == {("", "configmaps", frozenset({"get"})), ("", "secrets", frozenset({"get"}))}
    reader = roles[("eoml", "eoml-eo-inference-platform-controller-inference-reader")]
    assert _rules(reader) == {("serving.kserve.io", "inferenceservices", frozenset({"get", "list", "watch"}))}
    assert len(roles) == 5  # nothing else, in no other namespace
    for binding in find(docs, "RoleBinding"):
        assert (binding["metadata"]["namespace"], binding["roleRef"]["name"]) in roles
        for subject in binding["subjects"]:
            assert (subject["namespace"], subject["name"]) in accounts


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def test_network_policies_select_every_workload(prod_manifest: str) -> None:
    docs = documents(prod_manifest)
    policies = find(docs, "NetworkPolicy")
    pods = [(s["metadata"]["namespace"], s["spec"]["template"]["metadata"]["labels"])
            for s in find(docs, "Service", api_prefix=KNATIVE)]
    [isvc] = find(docs, "InferenceService", api_prefix=KSERVE)
    pods.append((isvc["metadata"]["namespace"], isvc["spec"]["predictor"]["labels"]))
    for namespace, labels in pods:
        selecting = [p for p in policies
                     if p["metadata"]["namespace"] == namespace and _matches(p["spec"]["podSelector"], labels)]
        assert len(selecting) == 1, (namespace, labels)
        assert set(selecting[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    [inference_policy] = [p for p in policies if p["metadata"]["name"].endswith("-inference-server")]
    admitted = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                for rule in inference_policy["spec"]["ingress"] for peer in rule["from"]
                if "podSelector" in peer and "namespaceSelector" in peer}
    assert admitted == {"uc5", "uc6", "eoml-workflows"}


def test_workloads_carry_prometheus_annotations(default_manifest: str) -> None:
    docs = documents(default_manifest)
    for service in find(docs, "Service", api_prefix=KNATIVE):
        annotations = service["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"


def test_cpu_runtime_option(tools: Tools) -> None:
    docs = render(tools, "cpuRuntime.enabled=true", "inference.runtime=eo-inference-cpu", "inference.gpus=0")
    [runtime] = find(docs, "ServingRuntime", api_prefix=KSERVE)
    assert {f["name"] for f in runtime["spec"]["supportedModelFormats"]} >= {"onnx"}
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    assert "--model-repository=/mnt/models" in runtime["spec"]["containers"][0]["args"]
    [isvc] = find(docs, "InferenceService", api_prefix=KSERVE)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "eo-inference-cpu"
    assert "nvidia.com/gpu" not in model["resources"]["limits"]
    assert validate_documents(docs) == []


def test_existing_secret_replaces_the_rendered_one(tools: Tools) -> None:
    docs = render(tools, "s3.existingSecret=models-s3", values=())
    assert [s["metadata"]["name"] for s in find(docs, "Secret")] == ["eoml-eo-inference-platform-inference-admin-key"]
    [account] = [a for a in find(docs, "ServiceAccount") if a["metadata"]["name"].endswith("-inference")]
    assert account["secrets"] == [{"name": "models-s3"}]


@pytest.mark.parametrize(("assignment", "expected"), [
    ("bogus=1", "Additional property bogus is not allowed"),
    ("inference.gpus=two", "Invalid type"),
    ("inference.storageUri=gs://bucket/models", "Does not match pattern"),
    ("inference.deploymentMode=Serverful", "must be one of"),
    ("podSecurity.runAsUser=0", "greater than or equal to 1"),
    ("wrappers.tasks[0].task=segmentation", "must be one of"),
    ("wrappers.resources.limits=null", "limits"),
])
def test_values_schema_rejects_bad_values(tools: Tools, assignment: str, expected: str) -> None:
    assert expected in render_error(tools, assignment)


@pytest.mark.parametrize(("values", "assignments", "expected"), [
    ((), (), "S3 credentials for the model repository are missing"),
    ((CI_VALUES,), ("inference.runtime=eo-inference-cpu",), "cpuRuntime.enabled is false"),
    ((CI_VALUES,), ("cpuRuntime.enabled=true", "inference.runtime=eo-inference-cpu"), "inference.gpus must be 0"),
    ((PROD_VALUES,), ("controller.workflowNamespaces={uc5}",), "not in controller.workflowNamespaces"),
    ((CI_VALUES,), ("networkPolicy.egress.apiServerCidrs={}",), "apiServerCidrs"),
], ids=["no-credentials", "cpu-runtime-disabled", "gpus-on-cpu-runtime", "task-namespace-unknown", "egress-no-apiserver"])
def test_inconsistent_values_fail_with_a_reason(tools: Tools, values: tuple[Path, ...], assignments: tuple[str, ...],
                                                expected: str) -> None:
    assert expected in render_error(tools, *assignments, values=values)


# -- step delivery: timeouts, concurrency, scaling ------------------------------------------------------------------

def _wrappers(docs) -> list[dict]:
    return [s for s in find(docs, "Service", api_prefix=KNATIVE) if s["metadata"]["labels"].get(
        "app.kubernetes.io/component") == "wrapper"]


def _controller_env(docs) -> dict[str, str]:
    [controller] = [s for s in find(docs, "Service", api_prefix=KNATIVE)
                    if s["metadata"]["labels"].get("app.kubernetes.io/component") == "controller"]
    return env_of(controller["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize("manifest", ["default_manifest", "prod_manifest"])
def test_wrappers_take_as_many_deliveries_as_they_run_steps_and_scale_when_steps_queue(manifest: str,
                                                                                      request) -> None:
    docs = documents(request.getfixturevalue(manifest))
    for service in _wrappers(docs):
        spec = service["spec"]["template"]["spec"]
        env = env_of(spec["containers"][0])
        assert spec["containerConcurrency"] == int(env["EOML_WRAPPER_WORKERS"]) >= 1
        assert "EOML_WRAPPER_QUEUE_SIZE" not in env
        annotations = service["spec"]["template"]["metadata"]["annotations"]
        assert annotations["autoscaling.knative.dev/class"] == "kpa.autoscaling.knative.dev"
        assert annotations["autoscaling.knative.dev/metric"] == "concurrency"
        # Target = containerConcurrency x 100 %: a pod is added exactly when steps queue in front of the pods.
        assert annotations["autoscaling.knative.dev/target-utilization-percentage"] == "100"
        assert int(annotations["autoscaling.knative.dev/max-scale"]) >= 1


@pytest.mark.parametrize("manifest", ["default_manifest", "prod_manifest"])
def test_timeouts_are_consistent_from_the_wrapper_to_the_kafka_source(manifest: str, request) -> None:
    docs = documents(request.getfixturevalue(manifest))
    controller_env = _controller_env(docs)
    delivery_timeout = float(controller_env["EOML_CONTROLLER_DELIVERY_TIMEOUT_S"])
    assert controller_env["EOML_CONTROLLER_SOURCE_ORDERING"] == "unordered"
    for service in _wrappers(docs):
        spec = service["spec"]["template"]["spec"]
        env = env_of(spec["containers"][0])
        # A step may wait out an inference outage (plus one request's timeout, 300 s) and still has to work.
        outage_wait = int(env["EOML_WRAPPER_INFER_RETRY_MAX_S"]) + 300
        assert spec["timeoutSeconds"] > outage_wait
        # The dispatcher never cuts an attempt that Knative still lets run.
        assert delivery_timeout >= spec["timeoutSeconds"]


def _iso_seconds(duration: str) -> float:
    """``PT<h>H<m>M<s>S`` -> seconds (the delivery durations the chart renders)."""
    import re

    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", duration)
    assert match, duration
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


KNATIVE_DRAIN_S = 30  # queue-proxy's quiet period before SIGTERM (serving pkg/queue/sharedmain/main.go)
WRAPPER_CUT_OFF_S = 10  # services/wrapper/service.py CUT_OFF_WAIT_S


@pytest.mark.parametrize("manifest", ["default_manifest", "prod_manifest"])
def test_wrapper_shutdown_and_worker_wait_fit_the_revision_timeout(manifest: str, request) -> None:
    from services.wrapper.service import CUT_OFF_WAIT_S

    assert CUT_OFF_WAIT_S == WRAPPER_CUT_OFF_S
    docs = documents(request.getfixturevalue(manifest))
    for service in _wrappers(docs):
        spec = service["spec"]["template"]["spec"]
        env = env_of(spec["containers"][0])
        # Knative sets terminationGracePeriodSeconds = timeoutSeconds, counted from before the drain (preStop):
        # the Wrapper's shutdown timeout plus its cut-off must end before the kubelet's SIGKILL.
        grace = spec["timeoutSeconds"]
        shutdown_timeout = float(env["EOML_WRAPPER_SHUTDOWN_TIMEOUT_S"])
        assert 0 < shutdown_timeout and KNATIVE_DRAIN_S + shutdown_timeout + WRAPPER_CUT_OFF_S < grace
        assert shutdown_timeout == grace - KNATIVE_DRAIN_S - 30  # the default margin
        # An admitted delivery waits for a worker as long as queue-proxy lets it wait.
        assert float(env["EOML_WRAPPER_WORKER_WAIT_S"]) == grace
        assert "terminationGracePeriodSeconds" not in spec  # Knative's to set


@pytest.mark.parametrize("timeout_s, margin_s", [(None, None), (90, 20), (600, 45)])
def test_the_local_stack_gives_its_wrappers_the_charts_shutdown_timeout_and_worker_wait(
    tools: Tools, tmp_path: Path, timeout_s: int | None, margin_s: int | None,
) -> None:
    """One rule for both: the chart's template and the local stack's ``wrapper_env`` (through
    ``wrapper_stop_timing``) give every Wrapper the same SHUTDOWN_TIMEOUT_S and WORKER_WAIT_S for the same
    values (the stack's drain at Knative's 30 s, as in the chart)."""
    from services.local_platform.stack import LocalStack, PlatformState, StackOptions

    set_values = [f"wrappers.timeoutSeconds={timeout_s}"] if timeout_s else []
    set_values += [f"wrappers.shutdownMarginSeconds={margin_s}"] if margin_s else []
    keys = ("EOML_WRAPPER_SHUTDOWN_TIMEOUT_S", "EOML_WRAPPER_WORKER_WAIT_S")
    chart = {tuple(float(env_of(s["spec"]["template"]["spec"]["containers"][0])[key]) for key in keys)
             for s in _wrappers(render(tools, *set_values))}
    stack = LocalStack(StackOptions(root=tmp_path, wrapper_timeout_s=timeout_s, shutdown_margin_s=margin_s,
                                    drain_quiet_s=30.0))
    stack.state = PlatformState(root=str(tmp_path), started_at=0.0, bootstrap_servers="127.0.0.1:1",
                                s3_endpoint="http://127.0.0.1:1", inference_http="", inference_grpc="127.0.0.1:1",
                                controller_url="http://127.0.0.1:1", wrapper_urls={}, store_root=str(tmp_path))
    for serving in (None, stack._chart_serving()):  # without and with the queue-proxy model
        stack.state.serving = serving
        local = {tuple(float(stack.wrapper_env(task, 1)[key]) for key in keys) for task in ("classify", "compress")}
        assert local == chart, (local, chart)
    defaults = yaml.safe_load((REPO_ROOT / "charts" / "eo-inference-platform" / "values.yaml").read_text())["wrappers"]
    (shutdown_timeout, worker_wait), = chart
    assert worker_wait == (timeout_s or defaults["timeoutSeconds"])
    assert shutdown_timeout == worker_wait - 30 - (margin_s or defaults["shutdownMarginSeconds"])


def test_a_revision_timeout_too_short_for_the_drain_fails_with_a_reason(tools: Tools) -> None:
    assert "must exceed queue-proxy's 30 s drain" in render_error(tools, "wrappers.timeoutSeconds=50")
    from services.local_platform.queue_proxy import chart_serving_settings, wrapper_stop_timing

    with pytest.raises(ValueError, match="must exceed queue-proxy's 30 s drain"):  # the local stack refuses it too
        wrapper_stop_timing(chart_serving_settings(timeout_s=50))
    docs = render(tools, "wrappers.timeoutSeconds=90", "wrappers.shutdownMarginSeconds=20")
    assert {env_of(s["spec"]["template"]["spec"]["containers"][0])["EOML_WRAPPER_SHUTDOWN_TIMEOUT_S"]
            for s in _wrappers(docs)} == {"40"}


def test_the_controller_source_dead_letters_to_a_kafka_sink_not_to_the_controller(default_manifest: str) -> None:
    docs = documents(default_manifest)
    [source] = find(docs, "KafkaSource")
    [sink] = find(docs, "KafkaSink", api_prefix="eventing.knative.dev/")
    # Validated against the upstream KafkaSink CRD (deploy/crds/), like every custom kind.
    assert validate_documents(documents(yaml.safe_dump(sink), "KafkaSink")) == []
    assert sink["apiVersion"] == "eventing.knative.dev/v1alpha1"
    assert sink["spec"]["topic"] == "system.ML.dlq" and sink["spec"]["contentMode"] == "binary"
    assert sink["spec"]["bootstrapServers"] == source["spec"]["bootstrapServers"]
    assert sink["metadata"]["namespace"] == source["metadata"]["namespace"]
    dead_letter = source["spec"]["delivery"]["deadLetterSink"]
    assert dead_letter == {"ref": {"apiVersion": "eventing.knative.dev/v1alpha1", "kind": "KafkaSink",
                                   "name": sink["metadata"]["name"]}}
    assert dead_letter["ref"] != source["spec"]["sink"]["ref"]  # never the controller itself
    # The topic it writes exists when the chart creates the fixed topics.
    assert _controller_env(docs)["EOML_CONTROLLER_NOTIFY_TOPIC"] == "monitoring.notify"


@pytest.mark.parametrize("manifest", ["default_manifest", "prod_manifest"])
def test_the_controller_source_neither_skips_nor_reorders_workflow_messages(manifest: str, request) -> None:
    """Issue 17 (Why 7): a re-created controller source (its group deleted with it) must not skip what was
    published meanwhile, and a workflow's published -> stopping must be handled in that order."""
    from services.controller.event_plane.dispatcher import InitialOffset, Ordering, SourceSpec

    [source] = find(documents(request.getfixturevalue(manifest)), "KafkaSource")
    spec = source["spec"]
    values = yaml.safe_load((REPO_ROOT / "charts" / "eo-inference-platform" / "values.yaml").read_text())
    assert spec["consumerGroup"] == values["controller"]["consumerGroup"] == "eoml-controller"  # stable, fixed
    assert spec["initialOffset"] == "earliest"
    assert spec["ordering"] == "ordered"
    # The local dispatcher model reads the same spec as the cluster's (tests/controller/test_controller_down.py).
    model = SourceSpec.from_kafka_source(spec)
    assert (model.initial_offset, model.ordering) == (InitialOffset.EARLIEST, Ordering.ORDERED)
    assert (model.policy.retry, model.policy.backoff_policy, model.policy.backoff_delay_s) == (12, "exponential", 1.0)


def test_the_controller_source_retries_through_a_long_controller_outage(default_manifest: str) -> None:
    [source] = find(documents(default_manifest), "KafkaSource")
    delivery = source["spec"]["delivery"]
    delay_s = _iso_seconds(delivery["backoffDelay"])
    # Knative's backoff: exponential waits delay*2^n before retry n (docs/reference: computeRetryPolicy).
    assert delivery["backoffPolicy"] == "exponential"
    waits_s = [delay_s * 2 ** n for n in range(1, delivery["retry"] + 1)]
    assert sum(waits_s) == 8190  # 12 retries from 1 s: about 2 h 16 min
    assert sum(waits_s) > 2 * 3600 > 10 * 60  # a controller down 10 minutes (or 2 hours) loses nothing
    assert delivery["retry"] <= 12  # still bounded (contracts defect 3)


def test_kafka_sink_authenticates_where_kafka_needs_it(tools: Tools, tmp_path: Path) -> None:
    values = tmp_path / "net.yaml"
    values.write_text(yaml.safe_dump({"kafka": {"net": KAFKA_NET}}))
    error = render_error(tools, values=(CI_VALUES, values))
    assert "controller.deadLetterSink.authSecretName" in error
    docs = render(tools, "controller.deadLetterSink.authSecretName=eoml-kafka-sink-auth", values=(CI_VALUES, values))
    [sink] = find(docs, "KafkaSink", api_prefix="eventing.knative.dev/")
    assert sink["spec"]["auth"] == {"secret": {"ref": {"name": "eoml-kafka-sink-auth"}}}
    assert validate_documents(docs) == []


# -- Kafka security ---------------------------------------------------------------------------------------------------

KAFKA_NET = {
    "sasl": {"enable": True, "user": {"secretKeyRef": {"name": "eoml-kafka", "key": "user"}},
             "password": {"secretKeyRef": {"name": "eoml-kafka", "key": "password"}},
             "type": {"secretKeyRef": {"name": "eoml-kafka", "key": "saslType"}}},
    "tls": {"enable": True, "caCert": {"secretKeyRef": {"name": "eo-kafka-cluster-ca-cert", "key": "ca.crt"}}},
}


def test_kafka_net_reaches_every_source_and_every_pod_as_secret_references(tools: Tools, tmp_path: Path) -> None:
    values = tmp_path / "net.yaml"
    values.write_text(yaml.safe_dump({"kafka": {"net": KAFKA_NET},
                                      "controller": {"deadLetterSink": {"authSecretName": "eoml-kafka-sink-auth"}}}))
    docs = render(tools, "controller.workflowNamespaces={uc5}", values=(CI_VALUES, values))
    assert validate_documents(docs) == []
    [source] = find(docs, "KafkaSource")
    assert source["spec"]["net"] == KAFKA_NET  # the controller's own source
    controller_env = _controller_env(docs)
    assert json.loads(controller_env["EOML_CONTROLLER_KAFKA_NET"]) == KAFKA_NET
    # Every step KafkaSource the controller creates with these settings carries the same references.
    settings = ControllerSettings(**{k.removeprefix("EOML_CONTROLLER_").lower(): v for k, v in controller_env.items()
                                     if k.startswith("EOML_CONTROLLER_")})
    message = parse_workflow_message({
        "workflow_name": "wf", "workflow_status": "published", "Topics": {"in": "a.in", "out": "a.out"},
        "ML": {"ServiceName": "ssl-features", "Namespace": "uc5"},
        "S3_bucket": {"aws_access_key_id": "k", "aws_secret_access_key": "s", "s3-bucket-name": "b"}})
    step_source = kafka_source_body(step_config_from_message(message, "kafka:9093")[0], settings)
    assert step_source["spec"]["net"] == KAFKA_NET
    assert validate_documents(documents(yaml.safe_dump(step_source), "step KafkaSource")) == []
    # The controller and every Wrapper: EOML_KAFKA_* from the same Secrets, the CA mounted from its Secret.
    pods = [s["spec"]["template"]["spec"] for s in find(docs, "Service", api_prefix=KNATIVE)]
    assert len(pods) == 1 + len(TASKS)
    for pod in pods:
        [container] = pod["containers"]
        env = {item["name"]: item for item in container["env"]}
        assert env["EOML_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
        for name, key in (("SASL_USERNAME", "user"), ("SASL_PASSWORD", "password"), ("SASL_MECHANISM", "saslType")):
            assert env[f"EOML_KAFKA_{name}"] == {"name": f"EOML_KAFKA_{name}", "valueFrom": {
                "secretKeyRef": {"name": "eoml-kafka", "key": key}}}
        ca_path = env["EOML_KAFKA_SSL_CA_LOCATION"]["value"]
        [mount] = [m for m in container["volumeMounts"] if ca_path.startswith(m["mountPath"] + "/")]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"] == {"secretName": "eo-kafka-cluster-ca-cert",
                                    "items": [{"key": "ca.crt", "path": ca_path.rsplit("/", 1)[1]}]}


def test_plaintext_kafka_adds_no_security_settings(default_manifest: str) -> None:
    for service in find(documents(default_manifest), "Service", api_prefix=KNATIVE):
        names = {item["name"] for item in service["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert not {n for n in names if n.startswith("EOML_KAFKA_")}
        assert "EOML_CONTROLLER_KAFKA_NET" not in names


def test_kafka_net_refuses_values_where_secret_references_belong(tools: Tools) -> None:
    assert "kafka.net.sasl.password" in render_error(tools, "kafka.net.sasl.password=hunter2")


def test_strimzi_topics_for_the_fixed_topics_validate_against_the_crd(tools: Tools) -> None:
    docs = render(tools, "kafka.topics.create=true", "kafka.topics.namespace=kafka")
    topics = find(docs, "KafkaTopic")
    assert {t["spec"]["topicName"]: t["spec"]["partitions"] for t in topics} == {
        "system.ML": 1, "monitoring.notify": 3, "system.ML.dlq": 1}
    for topic in topics:
        assert topic["metadata"]["namespace"] == "kafka"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "eo-kafka"
    assert validate_documents(docs) == []
    assert find(render(tools), "KafkaTopic") == []  # off by default
