"""Every non-inference endpoint of the HTTP frontend, through the real tritonclient (sync and aio)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from tritonclient.utils import InferenceServerException

from tiny_models import VERSIONED_POLICY_VERSIONS

TINY_MODELS = ("simple", "int64_identity", "string_identity", "classifier", "fixed_shape", "versioned", "slow")


def _infer_simple(client: triton_http.InferenceServerClient, batch: int = 1, model: str = "simple"):
    infer_input = triton_http.InferInput("INPUT0", [batch, 4], "FP32")
    infer_input.set_data_from_numpy(np.arange(batch * 4, dtype=np.float32).reshape(batch, 4))
    return client.infer(model, [infer_input])


def _status(error: InferenceServerException) -> int:
    return int(error.status())


def test_health_metadata_config_and_statistics(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository, "--model-control-mode", "explicit",
                            "--load-model", "simple", "--load-model", "int64_identity", "--load-model", "versioned")
    client = triton_http.InferenceServerClient(server.http_url)

    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] and metadata["version"]
    for extension in ("binary_tensor_data", "classification", "model_repository", "statistics"):
        assert extension in metadata["extensions"]

    # Model metadata: versions, platform, tensors with -1 for the batch dimension.
    simple = client.get_model_metadata("simple")
    assert simple["name"] == "simple" and simple["versions"] == ["1"]
    assert simple["platform"] == "onnxruntime_onnx"
    assert simple["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}]
    assert sorted(output["name"] for output in simple["outputs"]) == ["OUTPUT0", "OUTPUT1"]
    assert client.get_model_metadata("simple", "1")["name"] == "simple"
    versioned = client.get_model_metadata("versioned")
    assert versioned["versions"] == [str(v) for v in VERSIONED_POLICY_VERSIONS]

    # Readiness per model and version (version 2 is outside the version policy).
    assert client.is_model_ready("simple") and client.is_model_ready("simple", "1")
    assert client.is_model_ready("versioned", "3") and not client.is_model_ready("versioned", "2")
    assert not client.is_model_ready("classifier")  # in the repository, not loaded
    assert not client.is_model_ready("no_such_model")
    status, body = server.http_get("/v2/models/versioned/versions/2/ready")
    assert status == 400

    # Config as Triton renders it: numbers for 64-bit ints, enum names, presence of dynamic_batching.
    config = client.get_model_config("simple")
    assert config["name"] == "simple" and config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [4] and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and isinstance(config["instance_group"][0]["count"], int)
    assert "dynamic_batching" in config
    assert "dynamic_batching" not in client.get_model_config("int64_identity")
    versioned_config = client.get_model_config("versioned", "3")
    assert versioned_config["version_policy"]["specific"]["versions"] == list(VERSIONED_POLICY_VERSIONS)

    # Statistics move after inferences; every counter is a number.
    before = client.get_inference_statistics("simple")["model_stats"][0]
    for _ in range(3):
        _infer_simple(client)
    _infer_simple(client, batch=2)
    after = client.get_inference_statistics("simple")["model_stats"][0]
    assert after["name"] == "simple" and after["version"] == "1"
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 4
    assert after["inference_count"] - before["inference_count"] == 5  # batch rows: 1 + 1 + 1 + 2
    assert after["execution_count"] > before["execution_count"]
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["last_inference"] > 0
    for duration in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                     "cache_hit", "cache_miss"):
        assert isinstance(after["inference_stats"][duration]["count"], int)
        assert isinstance(after["inference_stats"][duration]["ns"], int)
    assert any(entry["batch_size"] >= 1 and entry["compute_infer"]["count"] >= 1 for entry in after["batch_stats"])

    every = client.get_inference_statistics()["model_stats"]
    assert {"simple", "int64_identity", "versioned"} <= {entry["name"] for entry in every}
    per_version = client.get_inference_statistics("versioned", "3")["model_stats"]
    assert [(entry["name"], entry["version"]) for entry in per_version] == [("versioned", "3")]

    # Unknown models and versions: 404 with a message naming them (statistics: 400, as Triton answers).
    for call, status in ((lambda: client.get_model_metadata("no_such_model"), 404),
                         (lambda: client.get_model_config("no_such_model"), 404),
                         (lambda: client.get_inference_statistics("no_such_model"), 400)):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert _status(caught.value) == status and "no_such_model" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("versioned", "2")
    assert _status(caught.value) == 404
    client.close()

    async def with_aio_client() -> None:
        async with triton_http_aio.InferenceServerClient(server.http_url) as aio_client:
            assert await aio_client.is_server_live() and await aio_client.is_server_ready()
            assert (await aio_client.get_server_metadata())["name"] == metadata["name"]
            assert await aio_client.is_model_ready("simple")
            assert not await aio_client.is_model_ready("classifier")
            assert (await aio_client.get_model_metadata("simple")) == simple
            assert (await aio_client.get_model_config("simple"))["input"][0]["dims"] == [4]
            stats = await aio_client.get_inference_statistics("simple")
            assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 4
            with pytest.raises(InferenceServerException) as aio_caught:
                await aio_client.get_model_metadata("no_such_model")
            assert _status(aio_caught.value) == 404

    asyncio.run(with_aio_client())


def test_repository_load_unload_and_index_in_explicit_mode(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple")
    client = triton_http.InferenceServerClient(server.http_url)

    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert set(index) == set(TINY_MODELS)
    assert index["simple"]["state"] == "READY" and index["simple"]["version"] == "1"
    assert index["classifier"].get("state") != "READY"
    status, body = server.http_get("/v2/models/classifier/ready")
    assert status == 400

    # Raw POST with {"ready": true}: only loaded models.
    ready_only = _post_json(server, "/v2/repository/index", {"ready": True})
    assert [entry["name"] for entry in ready_only] == ["simple"]

    client.load_model("classifier")
    assert client.is_model_ready("classifier")
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["classifier"]["state"] == "READY"

    # Load with a config override: max_batch_size 2 instead of 8 (Triton's JSON form of the config).
    config = client.get_model_config("simple")
    config["max_batch_size"] = 2
    config.pop("dynamic_batching", None)
    client.load_model("simple", config=json.dumps(config))
    assert client.get_model_config("simple")["max_batch_size"] == 2
    assert "dynamic_batching" not in client.get_model_config("simple")
    _infer_simple(client, batch=2)
    with pytest.raises(InferenceServerException) as caught:
        _infer_simple(client, batch=3)
    assert _status(caught.value) == 400

    # A bad override is refused with a message; the loaded model keeps serving.
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("simple", config='{"max_batch_sise": 4}')
    assert _status(caught.value) == 400 and "max_batch_sise" in caught.value.message()
    _infer_simple(client, batch=2)

    client.unload_model("simple")
    assert not client.is_model_ready("simple")
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["simple"]["state"] != "READY"
    with pytest.raises(InferenceServerException) as caught:
        _infer_simple(client)
    assert _status(caught.value) in (400, 404, 503) and "simple" in caught.value.message()

    with pytest.raises(InferenceServerException) as caught:
        client.load_model("no_such_model")
    assert _status(caught.value) == 500 and "no_such_model" in caught.value.message()  # Triton: INTERNAL

    # unload_dependents is accepted (the tiny models have no dependents).
    client.unload_model("classifier", unload_dependents=True)
    assert not client.is_model_ready("classifier")
    client.close()

    async def with_aio_client() -> None:
        async with triton_http_aio.InferenceServerClient(server.http_url) as aio_client:
            await aio_client.load_model("simple")
            assert await aio_client.is_model_ready("simple")
            assert (await aio_client.get_model_config("simple"))["max_batch_size"] == 8  # config.pbtxt again
            names = [entry["name"] for entry in await aio_client.get_model_repository_index()]
            assert set(names) == set(TINY_MODELS)
            await aio_client.unload_model("simple")
            assert not await aio_client.is_model_ready("simple")
            await aio_client.load_model("simple", config=json.dumps(config))
            assert (await aio_client.get_model_config("simple"))["max_batch_size"] == 2

    asyncio.run(with_aio_client())


def test_load_outside_explicit_mode_is_refused(tiny_repository, running_server) -> None:
    server = running_server(tiny_repository)  # default control mode: every model loaded, no load/unload
    client = triton_http.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("simple")
    assert _status(caught.value) == 503 and "explicit" in caught.value.message().lower()  # as Triton answers
    assert client.is_model_ready("simple")
    _infer_simple(client)
    client.close()


def _post_json(server, path: str, document) -> object:
    request = urllib.request.Request(
        f"http://{server.http_url}{path}", data=json.dumps(document).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())
