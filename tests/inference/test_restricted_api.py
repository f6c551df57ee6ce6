"""Triton's restricted-API options: parsing, API groups, refusals (the wire behaviour against real Triton is in
test_conformance.py)."""

from __future__ import annotations

import pytest

from services.inference.cli import parse_settings
from services.inference.restricted_api import (
    GRPC_METHOD_GROUPS,
    grpc_refusal,
    http_api_group,
    http_refusal,
    parse_restrictions,
)
from services.inference.settings import InferenceServerSettings

OPTION = "--http-restricted-api"


def test_groups_share_one_header_and_each_group_is_in_one_option_only() -> None:
    restrictions = parse_restrictions(["model-repository,statistics:admin-key=s3cret", "health:probe=yes"], OPTION)
    assert set(restrictions) == {"model-repository", "statistics", "health"}
    assert restrictions["statistics"] == restrictions["model-repository"]
    assert (restrictions["health"].key, restrictions["health"].value) == ("probe", "yes")
    assert "s3cret" not in repr(restrictions)
    with pytest.raises(ValueError, match="can not be specified in multiple config groups"):
        parse_restrictions(["model-repository:a=1", "model-repository:b=2"], OPTION)


@pytest.mark.parametrize("spec", ["health", "health:=1", ":k=v", "health:k"])
def test_malformed_options_are_refused_with_tritons_wording_and_no_secret(spec: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_restrictions([spec], OPTION)
    assert "option format is '<config name>:<setting>=<value>'" in str(caught.value)
    assert "=1" not in str(caught.value) and "k=v" not in str(caught.value)


def test_unknown_group_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown restricted api 'bogus'"):
        parse_restrictions(["bogus:k=v"], OPTION)


@pytest.mark.parametrize(
    ("method", "path", "group"),
    [
        ("GET", "/v2/health/live", "health"),
        ("GET", "/v2/models/m/ready", "health"),
        ("GET", "/v2/models/m/versions/2/ready", "health"),
        ("GET", "/v2", "metadata"),
        ("GET", "/v2/models/m", "metadata"),
        ("POST", "/v2/models/m/versions/1/infer", "inference"),
        ("GET", "/v2/models/m/config", "model-config"),
        ("GET", "/v2/models/m/stats", "statistics"),
        ("GET", "/v2/models/stats", "statistics"),
        ("POST", "/v2/repository/index", "model-repository"),
        ("POST", "/v2/repository/models/m/load", "model-repository"),
        ("GET", "/v2/systemsharedmemory/status", "shared-memory"),
        ("GET", "/v2/trace/setting", "trace"),
        ("GET", "/v2/logging", "logging"),
        ("GET", "/metrics", None),
    ],
)
def test_http_paths_map_to_tritons_api_groups(method: str, path: str, group: str | None) -> None:
    assert http_api_group(method, path) == group


def test_refusals_name_the_header_never_the_value() -> None:
    restrictions = parse_restrictions(["inference:token=abc"], OPTION)
    refusal = http_refusal(restrictions, "POST", "/v2/models/m/infer", {})
    assert refusal == "This API is restricted, expecting header 'token'"
    assert http_refusal(restrictions, "POST", "/v2/models/m/infer", {"token": "abd"}) == refusal
    assert http_refusal(restrictions, "POST", "/v2/models/m/infer", {"token": "abc"}) is None
    assert http_refusal(restrictions, "GET", "/v2/health/ready", {}) is None

    method = "/inference.GRPCInferenceService/ModelStreamInfer"
    assert grpc_refusal(restrictions, method, [("token", "abc")]) == (
        "This protocol is restricted, expecting header 'triton-grpc-protocol-token'"
    )
    assert grpc_refusal(restrictions, method, [("triton-grpc-protocol-token", b"abc")]) is None
    assert grpc_refusal(restrictions, "/inference.GRPCInferenceService/ServerLive", None) is None
    assert set(GRPC_METHOD_GROUPS.values()) <= {
        "health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics",
        "trace", "logging",
    }


def test_options_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_settings(["--model-repository", "/m", "--http-restricted-api", "model-repository:k=v",
                               "--http-restricted-api", "statistics,model-config:k2=v2",
                               "--grpc-restricted-protocol", "inference:k=v"])
    assert settings.http_restricted_api == ["model-repository:k=v", "statistics,model-config:k2=v2"]
    assert settings.grpc_restricted_protocol == ["inference:k=v"]
    monkeypatch.setenv("EOML_INFERENCE_MODEL_REPOSITORY", "/m")
    monkeypatch.setenv("EOML_INFERENCE_HTTP_RESTRICTED_API", "model-repository,statistics:k=v;health:p=q")
    monkeypatch.setenv("EOML_INFERENCE_GRPC_RESTRICTED_PROTOCOL", '["model-repository,statistics:k=v"]')
    from_env = InferenceServerSettings()
    assert from_env.http_restricted_api == ["model-repository,statistics:k=v", "health:p=q"]
    assert from_env.grpc_restricted_protocol == ["model-repository,statistics:k=v"]
    monkeypatch.setenv("EOML_INFERENCE_HTTP_RESTRICTED_API", "nonsense:k=v")
    with pytest.raises(ValueError, match="unknown restricted api"):
        InferenceServerSettings()
