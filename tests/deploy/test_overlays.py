"""The kustomize overlays (dev, prod) over the chart, built by the real kubectl (kustomize + helm, offline)."""

from __future__ import annotations

import pytest

from deploy_test_support import REPO_ROOT, documents, find
from deploy.render import Tools, kustomize_build, overlays
from deploy.validate import validate_documents

OVERLAYS = REPO_ROOT / "deploy" / "overlays"
KNATIVE = "serving.knative.dev/"
KSERVE = "serving.kserve.io/"


@pytest.fixture(scope="module")
def built(tools: Tools) -> dict[str, list]:
    return {overlay.name: documents(kustomize_build(tools, overlay), overlay.name) for overlay in overlays()}


def _images(docs: list) -> list[str]:
    images = []
    for service in find(docs, "Service", api_prefix=KNATIVE):
        images += [c["image"] for c in service["spec"]["template"]["spec"]["containers"]]
    for runtime in find(docs, "ServingRuntime", api_prefix=KSERVE):
        images += [c["image"] for c in runtime["spec"]["containers"]]
    return images


def test_both_overlays_exist_and_validate(built: dict[str, list]) -> None:
    assert set(built) == {"dev", "prod"}
    for name, docs in built.items():
        assert docs, name
        assert [str(p) for p in validate_documents(docs)] == [], name


def test_dev_runs_the_cpu_server_without_gpus(built: dict[str, list]) -> None:
    docs = built["dev"]
    [runtime] = find(docs, "ServingRuntime", api_prefix=KSERVE)
    [isvc] = find(docs, "InferenceService", api_prefix=KSERVE)
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert "nvidia.com/gpu" not in isvc["spec"]["predictor"]["model"]["resources"]["limits"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"


def test_dev_patches_and_image_overrides_apply(built: dict[str, list]) -> None:
    docs = built["dev"]
    assert _images(docs) and all(image.startswith("localhost:5000/") and image.endswith(":dev")
                                 for image in _images(docs))
    wrappers = [s for s in find(docs, "Service", api_prefix=KNATIVE)
                if s["metadata"]["labels"]["app.kubernetes.io/component"] == "wrapper"]
    assert wrappers
    for wrapper in wrappers:
        assert wrapper["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] == "1"
    assert all(d.body["metadata"]["labels"]["eoml.eo4eu.eu/environment"] == "dev" for d in docs)


def test_overlays_keep_workflow_namespaces_apart(built: dict[str, list]) -> None:
    dev_namespaces = {d.body["metadata"].get("namespace") for d in built["dev"]}
    assert dev_namespaces == {None, "eoml-dev", "eoml-dev-workflows"}  # None: the Namespace object itself
    prod_roles = {r["metadata"]["namespace"] for r in find(built["prod"], "Role")}
    assert prod_roles == {"eoml", "uc5", "uc6", "eoml-workflows"}


def test_prod_pins_images_and_scales_triton_on_cpu(built: dict[str, list]) -> None:
    docs = built["prod"]
    assert all(image.endswith(":0.1.0") for image in _images(docs))
    [isvc] = find(docs, "InferenceService", api_prefix=KSERVE)
    predictor = isvc["spec"]["predictor"]
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 70)
    assert predictor["model"]["runtime"] == "kserve-tritonserver"
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for service in find(docs, "Service", api_prefix=KNATIVE):
        if service["metadata"]["labels"]["app.kubernetes.io/component"] == "wrapper":
            assert service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/scale-down-delay"]
