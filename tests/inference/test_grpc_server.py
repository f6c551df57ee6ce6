"""The gRPC frontend end to end: the real server process, the real ``tritonclient.grpc`` and ``.aio``.

Expected outputs come from ONNX Runtime run in-process on the same ONNX files the server loads.
"""

from __future__ import annotations

import asyncio
import json
import queue
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.inference.engine import SERVER_EXTENSIONS, SERVER_NAME
from tiny_models import CLASSIFIER_LABELS, SLOW_WIDTH

STREAM_RESPONSE_TIMEOUT_S = 30.0
RNG = np.random.default_rng(20240521)


# ---- helpers -----------------------------------------------------------------------------------


def onnx_outputs(repository: Path, model: str, version: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What ONNX Runtime computes in-process for the model file the server serves."""
    session = ort.InferenceSession(
        str(repository / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def make_input(module: Any, name: str, array: np.ndarray, datatype: str) -> Any:
    infer_input = module.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def fp32_input(array: np.ndarray, name: str = "INPUT0", module: Any = grpcclient) -> Any:
    return make_input(module, name, array.astype(np.float32), "FP32")


def rpc_error(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


async def aio_rpc_error(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        await call()
    return info.value


def assert_status(error: InferenceServerException, code: str, *fragments: str) -> None:
    assert error.status() == f"StatusCode.{code}", (error.status(), error.message())
    for fragment in fragments:
        assert fragment in error.message(), (fragment, error.message())


def assert_simple_works(client: grpcclient.InferenceServerClient) -> None:
    """The server still serves a plain request correctly (used after every rejected one)."""
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    result = client.infer("simple", [fp32_input(x)])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), x + 1, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), x * 2, rtol=1e-6)


def parse_classification(entries: np.ndarray) -> list[tuple[float, int, str]]:
    parsed = []
    for entry in entries:
        score, index, label = entry.decode().split(":")
        parsed.append((float(score), int(index), label))
    return parsed


# ---- health, metadata, configuration, repository index, unimplemented RPCs ---------------------


def test_health_metadata_config_and_index(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_live() is True
        assert client.is_server_ready() is True

        server_metadata = client.get_server_metadata()
        assert server_metadata.name == SERVER_NAME
        assert server_metadata.version
        assert list(server_metadata.extensions) == list(SERVER_EXTENSIONS)

        assert client.is_model_ready("simple") is True
        assert client.is_model_ready("no_such_model") is False
        assert client.is_model_ready("versioned", "1") is True
        assert client.is_model_ready("versioned", "2") is False  # not in the version policy
        assert client.is_model_ready("versioned", "3") is True

        metadata = client.get_model_metadata("simple")
        assert metadata.name == "simple"
        assert list(metadata.versions) == ["1"]
        assert metadata.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("INPUT0", "FP32", [-1, 4])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("OUTPUT0", "FP32", [-1, 4]),
            ("OUTPUT1", "FP32", [-1, 4]),
        ]
        fixed = client.get_model_metadata("fixed_shape")
        assert [list(t.shape) for t in fixed.inputs] == [[2, 3]]
        assert sorted(client.get_model_metadata("versioned").versions) == ["1", "3"]
        assert_status(rpc_error(lambda: client.get_model_metadata("no_such_model")), "NOT_FOUND", "no_such_model")

        config = client.get_model_config("simple").config
        assert config.name == "simple"
        assert config.max_batch_size == 8
        assert [i.name for i in config.input] == ["INPUT0"]
        assert [o.name for o in config.output] == ["OUTPUT0", "OUTPUT1"]
        assert config.HasField("dynamic_batching")
        as_json = client.get_model_config("classifier", as_json=True)
        assert as_json["config"]["output"][0]["label_filename"] == "labels.txt"
        assert_status(rpc_error(lambda: client.get_model_config("no_such_model")), "NOT_FOUND", "no_such_model")

        index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
        expected_models = ["simple", "int64_identity", "string_identity", "classifier", "fixed_shape", "slow"]
        assert all(index[(name, "1")] == "READY" for name in expected_models), index
        assert index[("versioned", "1")] == index[("versioned", "3")] == "READY"
        assert ("versioned", "2") not in index

        # Unimplemented Triton RPCs answer honestly: no shared-memory region exists, nothing can be registered.
        assert len(client.get_system_shared_memory_status().regions) == 0
        assert len(client.get_cuda_shared_memory_status().regions) == 0
        assert_status(rpc_error(lambda: client.get_system_shared_memory_status("region")), "NOT_FOUND", "region")
        assert_status(
            rpc_error(lambda: client.register_system_shared_memory("region", "/key", 64)),
            "UNIMPLEMENTED",
            "shared memory",
        )
        assert_status(rpc_error(lambda: client.unregister_system_shared_memory()), "UNIMPLEMENTED")
        assert_status(rpc_error(lambda: client.register_cuda_shared_memory("region", b"", 0, 64)), "UNIMPLEMENTED")
        assert_status(rpc_error(lambda: client.unregister_cuda_shared_memory()), "UNIMPLEMENTED")
        assert_status(rpc_error(lambda: client.get_trace_settings()), "UNIMPLEMENTED", "trac")
        assert_status(rpc_error(lambda: client.update_log_settings({"log_verbose_level": 1})), "UNIMPLEMENTED", "log")
        assert_simple_works(client)

    async def with_aio() -> None:
        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            assert await client.is_server_live() is True
            assert await client.is_server_ready() is True
            assert (await client.get_server_metadata()).name == SERVER_NAME
            assert await client.is_model_ready("simple") is True
            assert await client.is_model_ready("no_such_model") is False
            metadata = await client.get_model_metadata("simple")
            assert [t.name for t in metadata.inputs] == ["INPUT0"]
            assert (await client.get_model_config("simple")).config.max_batch_size == 8
            names = {m.name for m in (await client.get_model_repository_index()).models}
            assert "simple" in names
            error = await aio_rpc_error(lambda: client.get_model_metadata("no_such_model"))
            assert_status(error, "NOT_FOUND", "no_such_model")
            assert_status(await aio_rpc_error(lambda: client.get_log_settings()), "UNIMPLEMENTED")

    asyncio.run(with_aio())


# ---- inference ---------------------------------------------------------------------------------


def test_infer_outputs_equal_onnxruntime(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    codes = RNG.integers(-(2**40), 2**40, size=(2, 4), dtype=np.int64)
    matrix = RNG.standard_normal((2, 3)).astype(np.float32)
    words = np.array([["tile", "", "sentinel-2"]], dtype=np.object_)

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer("simple", [fp32_input(x)], request_id="req-1")
        expected = onnx_outputs(tiny_repository, "simple", 1, {"INPUT0": x})
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == ("simple", "1", "req-1")
        assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
        # Like Triton: every output's data travels in raw_output_contents, never in typed contents.
        assert len(response.raw_output_contents) == 2
        assert all(not o.HasField("contents") for o in response.outputs)
        for name in ("OUTPUT0", "OUTPUT1"):
            assert result.get_output(name).datatype == "FP32"
            assert list(result.get_output(name).shape) == [3, 4]
            np.testing.assert_array_equal(result.as_numpy(name), expected[name])

        only_second = client.infer("simple", [fp32_input(x)], outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
        assert [o.name for o in only_second.get_response().outputs] == ["OUTPUT1"]
        np.testing.assert_array_equal(only_second.as_numpy("OUTPUT1"), expected["OUTPUT1"])

        result = client.infer("int64_identity", [make_input(grpcclient, "INPUT0", codes, "INT64")])
        np.testing.assert_array_equal(
            result.as_numpy("OUTPUT0"), onnx_outputs(tiny_repository, "int64_identity", 1, {"INPUT0": codes})["OUTPUT0"]
        )
        assert result.as_numpy("OUTPUT0").dtype == np.int64

        result = client.infer("fixed_shape", [fp32_input(matrix)])
        np.testing.assert_array_equal(
            result.as_numpy("OUTPUT0"), onnx_outputs(tiny_repository, "fixed_shape", 1, {"INPUT0": matrix})["OUTPUT0"]
        )

        result = client.infer("string_identity", [make_input(grpcclient, "INPUT0", words, "BYTES")])
        expected_words = onnx_outputs(tiny_repository, "string_identity", 1, {"INPUT0": words.astype(str)})["OUTPUT0"]
        assert [w.decode() for w in result.as_numpy("OUTPUT0").reshape(-1)] == list(expected_words.reshape(-1))

        for version in ("1", "3"):
            result = client.infer("versioned", [fp32_input(x)], model_version=version)
            assert result.get_response().model_version == version
            np.testing.assert_array_equal(
                result.as_numpy("OUTPUT0"),
                onnx_outputs(tiny_repository, "versioned", int(version), {"INPUT0": x})["OUTPUT0"],
            )
        latest = client.infer("versioned", [fp32_input(x)])
        assert latest.get_response().model_version == "3"  # "" means the highest ready version

    async def with_aio() -> None:
        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            result = await client.infer("simple", [fp32_input(x, module=aioclient)], request_id="aio-1")
            assert result.get_response().id == "aio-1"
            expected = onnx_outputs(tiny_repository, "simple", 1, {"INPUT0": x})
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected["OUTPUT0"])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected["OUTPUT1"])
            # Concurrent requests on one channel each get their own answer.
            batches = [RNG.standard_normal((1, 4)).astype(np.float32) for _ in range(8)]
            results = await asyncio.gather(
                *(
                    client.infer("simple", [fp32_input(b, module=aioclient)], request_id=str(i))
                    for i, b in enumerate(batches)
                )
            )
            for i, (batch, result) in enumerate(zip(batches, results)):
                assert result.get_response().id == str(i)
                np.testing.assert_allclose(result.as_numpy("OUTPUT0"), batch + 1, rtol=1e-6)

    asyncio.run(with_aio())


def test_typed_contents_and_raw_contents_give_the_same_answer(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = service_pb2.ModelInferRequest(model_name="simple", id="typed")
        tensor = typed.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 4])
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
        typed_response = stub.ModelInfer(typed)

        raw = service_pb2.ModelInferRequest(model_name="simple", id="raw")
        raw.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 4])
        raw.raw_input_contents.append(x.tobytes())
        raw_response = stub.ModelInfer(raw)

        codes = service_pb2.ModelInferRequest(model_name="int64_identity")
        codes.inputs.add(name="INPUT0", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend(
            [5, -6, 2**62, 0]
        )
        codes_response = stub.ModelInfer(codes)

    assert typed_response.id == "typed" and raw_response.id == "raw"
    for response in (typed_response, raw_response):
        result = grpcclient.InferResult(response)
        np.testing.assert_array_equal(
            result.as_numpy("OUTPUT0"), onnx_outputs(tiny_repository, "simple", 1, {"INPUT0": x})["OUTPUT0"]
        )
        assert len(response.raw_output_contents) == len(response.outputs) == 2
    assert grpcclient.InferResult(codes_response).as_numpy("OUTPUT0").tolist() == [[5, -6, 2**62, 0]]


def test_classification_extension(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)
    logits = np.array([[0.5, -2.0, 3.0, 1.0, -0.5], [-1.0, 2.0, 0.0, -3.0, 1.5]], dtype=np.float32)
    probabilities = onnx_outputs(tiny_repository, "classifier", 1, {"INPUT0": logits})["PROBABILITY"]

    def check(result: Any, class_count: int) -> None:
        output = result.get_output("PROBABILITY")
        assert output.datatype == "BYTES"
        assert list(output.shape) == [2, class_count]
        entries = result.as_numpy("PROBABILITY")
        for row, row_entries in enumerate(entries):
            parsed = parse_classification(row_entries)
            expected_order = np.argsort(-probabilities[row], kind="stable")[:class_count]
            assert [index for _, index, _ in parsed] == expected_order.tolist()
            assert [label for _, _, label in parsed] == [CLASSIFIER_LABELS[i] for i in expected_order]
            # Triton prints scores with 6 decimals.
            np.testing.assert_allclose([s for s, _, _ in parsed], probabilities[row][expected_order], rtol=0, atol=1e-6)

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer(
            "classifier", [fp32_input(logits)], outputs=[grpcclient.InferRequestedOutput("PROBABILITY", class_count=3)]
        )
        check(result, 3)

    async def with_aio() -> None:
        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            result = await client.infer(
                "classifier",
                [fp32_input(logits, module=aioclient)],
                outputs=[aioclient.InferRequestedOutput("PROBABILITY", class_count=5)],
            )
            check(result, 5)

    asyncio.run(with_aio())


# ---- streaming ---------------------------------------------------------------------------------

# A slow request first, then fast ones: a server that wrote responses as they finish would answer
# the fast ones first. Triton keeps request order on a stream for non-decoupled models.
STREAM_PLAN = ["slow", "simple", "simple", "bad", "simple", "slow", "simple", "simple"]


def stream_request(kind: str, index: int, module: Any) -> dict[str, Any]:
    request_id = f"{kind}-{index}"
    if kind == "slow":
        data = RNG.standard_normal((1, SLOW_WIDTH)).astype(np.float32)
        return {
            "model_name": "slow",
            "inputs": [fp32_input(data, module=module)],
            "request_id": request_id,
            "data": data,
        }
    data = RNG.standard_normal((1, 4)).astype(np.float32)
    if kind == "bad":  # 5 values where the model takes 4: rejected, and the stream must go on
        wrong = RNG.standard_normal((1, 5)).astype(np.float32)
        return {
            "model_name": "simple",
            "inputs": [fp32_input(wrong, module=module)],
            "request_id": request_id,
            "data": wrong,
        }
    return {"model_name": "simple", "inputs": [fp32_input(data, module=module)], "request_id": request_id, "data": data}


def check_stream_answers(requests: list[dict[str, Any]], answers: list[tuple[Any, Any]]) -> None:
    assert len(answers) == len(requests)
    for request, (result, error) in zip(requests, answers):
        if request["request_id"].startswith("bad"):
            assert result is None
            assert error is not None and "INPUT0" in error.message(), error
            continue
        assert error is None, error
        assert result.get_response().id == request["request_id"]
        if request["model_name"] == "slow":
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), request["data"])
        else:
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), request["data"] + 1, rtol=1e-6)


def test_stream_sync_client_keeps_order_and_survives_errors(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)
    requests = [stream_request(kind, i, grpcclient) for i, kind in enumerate(STREAM_PLAN)]
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for request in requests:
            client.async_stream_infer(request["model_name"], request["inputs"], request_id=request["request_id"])
        received = [answers.get(timeout=STREAM_RESPONSE_TIMEOUT_S) for _ in requests]
        # The stream is still usable after the error: one more request on it.
        last = stream_request("simple", 99, grpcclient)
        client.async_stream_infer(last["model_name"], last["inputs"], request_id=last["request_id"])
        received.append(answers.get(timeout=STREAM_RESPONSE_TIMEOUT_S))
        client.stop_stream()
        assert_simple_works(client)
    check_stream_answers([*requests, last], received)


def test_stream_aio_client_keeps_order_and_survives_errors(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)
    requests = [stream_request(kind, i, aioclient) for i, kind in enumerate(STREAM_PLAN)]

    async def run() -> list[tuple[Any, Any]]:
        async def request_iterator():
            for request in requests:
                yield {k: v for k, v in request.items() if k != "data"}

        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            answers = []
            async for answer in client.stream_infer(request_iterator()):
                answers.append(answer)
                if len(answers) == len(requests):
                    break
            return answers

    check_stream_answers(requests, asyncio.run(asyncio.wait_for(run(), STREAM_RESPONSE_TIMEOUT_S)))


def test_stream_error_response_carries_the_request_id(tiny_repository: Path, running_server) -> None:
    """tritonclient hides it, but Triton puts the failed request's id in the stream response."""
    server = running_server(tiny_repository)
    good = service_pb2.ModelInferRequest(model_name="simple", id="good")
    good.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    good.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    unknown = service_pb2.ModelInferRequest(model_name="no_such_model", id="lost")
    unknown.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    unknown.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = list(stub.ModelStreamInfer(iter([unknown, good])))
    assert [r.infer_response.id for r in responses] == ["lost", "good"]
    assert "no_such_model" in responses[0].error_message
    assert responses[1].error_message == ""
    np.testing.assert_array_equal(
        grpcclient.InferResult(responses[1].infer_response).as_numpy("OUTPUT0"), np.full((1, 4), 2.0)
    )


# ---- model repository (explicit control mode) and statistics -----------------------------------


def simple_config_json(max_batch_size: int) -> str:
    return json.dumps(
        {
            "name": "simple",
            "backend": "onnxruntime",
            "max_batch_size": max_batch_size,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [
                {"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]},
                {"name": "OUTPUT1", "data_type": "TYPE_FP32", "dims": [4]},
            ],
        }
    )


def test_load_unload_and_index_in_explicit_mode(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "int64_identity")
    x3 = RNG.standard_normal((3, 4)).astype(np.float32)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["int64_identity"].state == "READY"
        assert index["simple"].state != "READY"
        assert client.is_model_ready("simple") is False
        error = rpc_error(lambda: client.infer("simple", [fp32_input(x3)]))
        assert error.status() in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE") and "simple" in error.message()

        # A config override replaces config.pbtxt for this load.
        client.load_model("simple", config=simple_config_json(max_batch_size=2))
        assert client.is_model_ready("simple") is True
        assert client.get_model_config("simple").config.max_batch_size == 2
        assert_status(rpc_error(lambda: client.infer("simple", [fp32_input(x3)])), "INVALID_ARGUMENT", "simple")
        np.testing.assert_allclose(
            client.infer("simple", [fp32_input(x3[:2])]).as_numpy("OUTPUT0"), x3[:2] + 1, rtol=1e-6
        )

        client.unload_model("simple")
        assert client.is_model_ready("simple") is False
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["simple"].state == "UNAVAILABLE"
        assert index["int64_identity"].state == "READY"
        assert_status(rpc_error(lambda: client.infer("simple", [fp32_input(x3)])), "NOT_FOUND", "simple")

        # Loaded again without an override: the repository's config.pbtxt applies.
        client.load_model("simple")
        assert client.get_model_config("simple").config.max_batch_size == 8
        np.testing.assert_allclose(client.infer("simple", [fp32_input(x3)]).as_numpy("OUTPUT0"), x3 + 1, rtol=1e-6)
        states = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
        assert states[("simple", "1")] == "READY"

        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            ready_only = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True)).models
            assert {(m.name, m.version, m.state) for m in ready_only} == {
                ("int64_identity", "1", "READY"),
                ("simple", "1", "READY"),
            }
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name="other"))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "repository_name" in info.value.details()

        error = rpc_error(lambda: client.load_model("no_such_model"))
        assert error.status() != "StatusCode.OK" and "no_such_model" in error.message()
        error = rpc_error(lambda: client.load_model("simple", config="{not json"))
        assert_status(error, "INVALID_ARGUMENT", "simple")
        error = rpc_error(
            lambda: client.load_model("simple", config=simple_config_json(2), files={"file:1/model.onnx": b"x"})
        )
        assert_status(error, "UNIMPLEMENTED", "file:1/model.onnx")
        assert client.is_model_ready("int64_identity") is True

    async def with_aio() -> None:
        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            await client.load_model("classifier")
            assert await client.is_model_ready("classifier") is True
            states = {m.name: m.state for m in (await client.get_model_repository_index()).models}
            assert states["classifier"] == "READY"
            await client.unload_model("classifier")
            assert await client.is_model_ready("classifier") is False

    asyncio.run(with_aio())


def test_load_without_override_undoes_a_previous_override(tiny_repository: Path, running_server) -> None:
    """Triton marks an overridden model modified, so a plain load goes back to config.pbtxt."""
    server = running_server(tiny_repository, "--model-control-mode", "explicit", "--load-model", "simple")
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.load_model("simple", config=simple_config_json(max_batch_size=2))
        assert client.get_model_config("simple").config.max_batch_size == 2
        client.load_model("simple")
        assert client.get_model_config("simple").config.max_batch_size == 8


def test_statistics_counts_move(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)

    def simple_stats(client: grpcclient.InferenceServerClient) -> service_pb2.ModelStatistics:
        stats = client.get_inference_statistics("simple").model_stats
        assert [(s.name, s.version) for s in stats] == [("simple", "1")]
        return stats[0]

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        before = simple_stats(client)
        for _ in range(3):
            client.infer("simple", [fp32_input(np.zeros((2, 4), np.float32))])
        rpc_error(lambda: client.infer("simple", [fp32_input(np.zeros((1, 5), np.float32))]))
        after = simple_stats(client)
        assert after.inference_count - before.inference_count == 6  # counted per batch element, as Triton does
        assert after.inference_stats.success.count - before.inference_stats.success.count == 3
        assert after.execution_count > before.execution_count
        assert after.last_inference > 0
        everything = {s.name for s in client.get_inference_statistics().model_stats}
        assert {"simple", "classifier", "fixed_shape"} <= everything
        error = rpc_error(lambda: client.get_inference_statistics("no_such_model"))
        assert "no_such_model" in error.message()

    async def with_aio() -> None:
        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            await client.infer("simple", [fp32_input(np.zeros((1, 4), np.float32), module=aioclient)])
            stats = (await client.get_inference_statistics("simple")).model_stats[0]
            assert stats.inference_count == after.inference_count + 1

    asyncio.run(with_aio())


# ---- bad input: the right code, a message naming the problem, and the server keeps serving ----


def raw_request(
    model: str, inputs: list[tuple[str, str, list[int], bytes]], **fields: Any
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, **fields)
    for name, datatype, shape, raw in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)
    good = np.ones((1, 4), np.float32)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        cases: list[tuple[str, Callable[[], Any], str, tuple[str, ...]]] = [
            (
                "unknown model",
                lambda: client.infer("no_such_model", [fp32_input(good)]),
                "NOT_FOUND",
                ("no_such_model",),
            ),
            (
                "unknown version",
                lambda: client.infer("simple", [fp32_input(good)], model_version="7"),
                "NOT_FOUND",
                ("7",),
            ),
            (
                "version outside the policy",
                lambda: client.infer("versioned", [fp32_input(good)], model_version="2"),
                "NOT_FOUND",
                ("2",),
            ),
            (
                "wrong datatype",
                lambda: client.infer("simple", [make_input(grpcclient, "INPUT0", good.astype(np.int32), "INT32")]),
                "INVALID_ARGUMENT",
                ("INPUT0", "INT32", "FP32"),
            ),
            (
                "wrong shape",
                lambda: client.infer("simple", [fp32_input(np.ones((1, 5), np.float32))]),
                "INVALID_ARGUMENT",
                ("INPUT0", "5"),
            ),
            (
                "batch over max_batch_size",
                lambda: client.infer("simple", [fp32_input(np.ones((9, 4), np.float32))]),
                "INVALID_ARGUMENT",
                ("9", "8"),
            ),
            ("missing input", lambda: client.infer("simple", []), "INVALID_ARGUMENT", ("INPUT0",)),
            (
                "unknown input",
                lambda: client.infer("simple", [fp32_input(good), fp32_input(good, name="EXTRA")]),
                "INVALID_ARGUMENT",
                ("EXTRA",),
            ),
            (
                "unknown output",
                lambda: client.infer("simple", [fp32_input(good)], outputs=[grpcclient.InferRequestedOutput("NOPE")]),
                "INVALID_ARGUMENT",
                ("NOPE",),
            ),
        ]
        for description, call, code, fragments in cases:
            try:
                assert_status(rpc_error(call), code, *fragments)
            except AssertionError as failure:
                raise AssertionError(f"{description}: {failure}") from None
            assert_simple_works(client)

    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub_cases = [
            (
                "byte size mismatch",
                raw_request("simple", [("INPUT0", "FP32", [1, 4], b"\0" * 12)]),
                grpc.StatusCode.INVALID_ARGUMENT,
                ("INPUT0", "12", "16"),
            ),
            (
                "raw contents missing",
                service_pb2.ModelInferRequest(
                    model_name="simple",
                    inputs=[
                        service_pb2.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 4])
                    ],
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                ("INPUT0",),
            ),
            (
                "more raw contents than inputs",
                raw_request(
                    "simple", [("INPUT0", "FP32", [1, 4], good.tobytes())], raw_input_contents=[good.tobytes()]
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                ("raw_input_contents",),
            ),
            (
                "non-numeric version",
                raw_request("simple", [("INPUT0", "FP32", [1, 4], good.tobytes())], model_version="latest"),
                grpc.StatusCode.INVALID_ARGUMENT,
                ("latest",),
            ),
        ]
        for description, request, code, fragments in stub_cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request)
            assert info.value.code() == code, (description, info.value.code(), info.value.details())
            for fragment in fragments:
                assert fragment in info.value.details(), (description, fragment, info.value.details())
            response = stub.ModelInfer(raw_request("simple", [("INPUT0", "FP32", [1, 4], good.tobytes())]))
            np.testing.assert_array_equal(grpcclient.InferResult(response).as_numpy("OUTPUT0"), good + 1)


def test_message_over_the_limit_is_rejected_by_grpc(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository)
    over_limit_elements = 64 * 1024 * 1024 // 4 + 1024  # just over the default 64 MiB of FP32
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        huge = fp32_input(np.zeros((1, over_limit_elements), np.float32))
        error = rpc_error(lambda: client.infer("simple", [huge]))
        assert_status(error, "RESOURCE_EXHAUSTED", "larger than max")
        assert_simple_works(client)


def test_message_limit_is_raised_by_the_cli_option(tiny_repository: Path, running_server) -> None:
    server = running_server(tiny_repository, "--grpc-max-message-size", str(128 * 1024 * 1024))
    payload = b"t" * (64 * 1024 * 1024 + 1024)  # one BYTES element just over the default limit
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        words = make_input(grpcclient, "INPUT0", np.array([[payload]], dtype=np.object_), "BYTES")
        result = client.infer("string_identity", [words])
        assert result.as_numpy("OUTPUT0")[0, 0] == payload  # the response, as large, came back too
        assert_simple_works(client)
