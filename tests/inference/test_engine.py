"""``InferenceEngine`` called directly: control modes, versions, validation, classification, statistics."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine_harness import fp32_request, onnxruntime_outputs, run, started_engine
from services.inference.engine import SERVER_EXTENSIONS, SERVER_NAME, EngineStartupError, package_version
from services.inference.model_config import parse_config_text
from services.inference.protocol import ErrorKind, InferenceServerError, InferInput, InferRequest, RequestedOutput
from tiny_models import (
    CLASSIFIER_LABELS,
    SLOW_WIDTH,
    VERSIONED_POLICY_VERSIONS,
    build_tiny_repository,
    make_int64_identity,
    make_slow,
    write_config,
    write_onnx,
)


async def expect_error(kind: ErrorKind, awaitable, *fragments: str) -> InferenceServerError:
    with pytest.raises(InferenceServerError) as caught:
        await awaitable
    assert caught.value.kind is kind, caught.value.message
    for fragment in fragments:
        assert fragment in caught.value.message, caught.value.message
    return caught.value


def index_states(engine) -> dict[tuple[str, str], tuple[str, str]]:
    return {(e.name, e.version): (e.state, e.reason) for e in engine.repository_index()}


# -- control modes --------------------------------------------------------------------------------


def test_none_mode_loads_every_model_and_refuses_model_control(tiny_repository: Path) -> None:
    async def scenario() -> None:
        async with started_engine(tiny_repository) as engine:
            assert engine.is_live() and engine.is_ready()
            states = index_states(engine)
            ready = sorted(key for key, (state, _) in states.items() if state == "READY")
            expected = sorted(
                [(m, "1") for m in ("classifier", "fixed_shape", "int64_identity", "simple", "slow", "string_identity")]
                + [("versioned", str(v)) for v in VERSIONED_POLICY_VERSIONS]
            )
            assert ready == expected
            assert [e.name for e in engine.repository_index(ready_only=True)] == [name for name, _ in expected]
            await expect_error(ErrorKind.UNAVAILABLE, engine.load_model("simple"), "not allowed")
            await expect_error(ErrorKind.UNAVAILABLE, engine.unload_model("simple"), "not allowed")
            assert engine.model_ready("simple")

    run(scenario)


def test_server_metadata_names_the_server_and_its_extensions(tiny_repository: Path) -> None:
    async def scenario() -> None:
        async with started_engine(tiny_repository, model_control_mode="explicit") as engine:
            metadata = engine.server_metadata()
            assert metadata.name == SERVER_NAME
            assert metadata.version == package_version() != "0.0.0"
            assert metadata.extensions == list(SERVER_EXTENSIONS)
            assert engine.is_ready()  # explicit mode with nothing to load is ready

    run(scenario)


def test_explicit_mode_loads_unloads_and_applies_a_config_override(tiny_repository: Path) -> None:
    async def scenario() -> None:
        async with started_engine(tiny_repository, model_control_mode="explicit", startup_models=["simple"]) as engine:
            states = index_states(engine)
            assert states[("simple", "1")] == ("READY", "")
            assert states[("classifier", "")] == ("", "")  # in the repository, never loaded
            await expect_error(ErrorKind.NOT_FOUND, engine.infer(fp32_request("classifier", np.zeros((1, 5)))))

            await engine.load_model("classifier")
            assert engine.model_ready("classifier")
            response = await engine.infer(fp32_request("classifier", np.zeros((1, 5))))
            np.testing.assert_allclose(response.outputs[0].data, 0.5)

            await engine.unload_model("simple")
            assert index_states(engine)[("simple", "1")] == ("UNAVAILABLE", "unloaded")
            assert not engine.model_ready("simple")
            await expect_error(ErrorKind.NOT_FOUND, engine.infer(fp32_request("simple", np.zeros((1, 4)))), "simple")
            await engine.unload_model("simple")  # unloading twice is harmless

            # Override (Triton's JSON ModelConfig): every version, and a smaller max_batch_size.
            override = json.dumps({"max_batch_size": 2, "version_policy": {"all": {}},
                                   "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
                                   "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}]})
            await engine.load_model("versioned", override)
            assert engine.model_metadata("versioned").versions == ["1", "2", "3"]
            assert engine.model_config("versioned").max_batch_size == 2
            response = await engine.infer(fp32_request("versioned", np.zeros((2, 4)), version="2"))
            np.testing.assert_array_equal(response.outputs[0].data, np.full((2, 4), 2.0, np.float32))
            await expect_error(
                ErrorKind.INVALID_ARGUMENT, engine.infer(fp32_request("versioned", np.zeros((3, 4)))), "<= 2"
            )

            # Triton: INTERNAL ("failed to poll from model repository") for a name with no directory.
            await expect_error(ErrorKind.INTERNAL, engine.load_model("no_such_model"), "no_such_model")
            await expect_error(ErrorKind.INVALID_ARGUMENT, engine.load_model("simple", "{not json"), "JSON")
            await engine.unload_model("no_such_model")  # Triton answers success for a model it does not have
            bad_io = json.dumps({"input": [{"name": "WRONG", "data_type": "TYPE_FP32", "dims": [4]}],
                                 "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
                                 "max_batch_size": 8})
            await expect_error(ErrorKind.INVALID_ARGUMENT, engine.load_model("int64_identity", bad_io), "WRONG")
            # A failed API load leaves the server ready and the other models serving.
            assert engine.is_ready() and engine.model_ready("classifier") and engine.model_ready("versioned")

    run(scenario)


def test_explicit_mode_star_loads_every_model(tiny_repository: Path) -> None:
    async def scenario() -> None:
        async with started_engine(tiny_repository, model_control_mode="explicit", startup_models=["*"]) as engine:
            assert {e.name for e in engine.repository_index(ready_only=True)} == {
                "classifier", "fixed_shape", "int64_identity", "simple", "slow", "string_identity", "versioned"
            }

    run(scenario)


def test_poll_mode_loads_new_reloads_changed_and_unloads_removed_models(tmp_path: Path) -> None:
    repository = build_tiny_repository(tmp_path / "repo", ["simple", "classifier"])

    async def scenario() -> None:
        # A long interval: the test drives poll cycles itself, so nothing depends on timing.
        async with started_engine(repository, model_control_mode="poll", repository_poll_secs=3600) as engine:
            await expect_error(ErrorKind.UNAVAILABLE, engine.load_model("simple"))
            assert not engine.model_ready("int64_identity")

            make_int64_identity(repository)
            shutil.rmtree(repository / "classifier")
            config = parse_config_text((repository / "simple" / "config.pbtxt").read_text())
            config.max_batch_size = 4
            write_config(repository / "simple", config)
            await engine.poll_repository()

            assert engine.model_ready("int64_identity")
            codes = np.arange(8, dtype=np.int64).reshape(2, 4)
            request = InferRequest("int64_identity", inputs=[InferInput("INPUT0", "INT64", [2, 4], codes)])
            np.testing.assert_array_equal((await engine.infer(request)).outputs[0].data, codes)
            assert not engine.model_ready("classifier")
            assert index_states(engine)[("classifier", "1")] == ("UNAVAILABLE", "unloaded")
            assert engine.model_config("simple").max_batch_size == 4
            assert engine.is_ready()

            # Nothing changed: a second poll leaves the loaded model alone (same instances).
            instances_before = engine.model_instances("simple")
            await engine.poll_repository()
            assert [i.name for i in engine.model_instances("simple")] == [i.name for i in instances_before]

    run(scenario)


def test_poll_mode_fixes_and_removals_of_a_broken_model_restore_readiness(tmp_path: Path) -> None:
    repository = build_tiny_repository(tmp_path / "repo", ["simple", "classifier", "int64_identity"])
    for name in ("classifier", "int64_identity"):
        (repository / name / "config.pbtxt").write_text("max_batch_size: not-a-number")

    async def scenario() -> None:
        async with started_engine(
            repository, model_control_mode="poll", repository_poll_secs=3600, exit_on_error=False
        ) as engine:
            assert not engine.is_ready()
            assert "failed to parse" in index_states(engine)[("classifier", "")][1]
            shutil.rmtree(repository / "classifier")
            make_int64_identity(repository)  # rewrites a valid config.pbtxt
            await engine.poll_repository()
            assert engine.model_ready("int64_identity") and not engine.model_ready("classifier")
            assert engine.is_ready()

    run(scenario)


def test_poll_mode_background_poller_finds_a_new_model(tmp_path: Path) -> None:
    repository = build_tiny_repository(tmp_path / "repo", ["simple"])

    async def scenario() -> None:
        async with started_engine(repository, model_control_mode="poll", repository_poll_secs=0.1) as engine:
            make_int64_identity(repository)
            for _ in range(300):  # up to 30 s on a busy machine; usually the next poll
                if engine.model_ready("int64_identity"):
                    break
                await asyncio.sleep(0.1)
            assert engine.model_ready("int64_identity")

    run(scenario)


def test_a_model_that_fails_to_load_stops_the_start_or_is_reported(tmp_path: Path) -> None:
    repository = build_tiny_repository(tmp_path / "repo", ["simple", "classifier"])
    config = parse_config_text((repository / "classifier" / "config.pbtxt").read_text())
    config.input[0].name = "LOGITS"
    write_config(repository / "classifier", config)

    async def scenario() -> None:
        with pytest.raises(EngineStartupError, match="LOGITS"):
            async with started_engine(repository):
                pass
        async with started_engine(repository, exit_on_error=False) as engine:
            assert engine.model_ready("simple") and not engine.model_ready("classifier")
            # Found while loading version 1 (the graph is needed to check the config): reported on that version.
            state, reason = index_states(engine)[("classifier", "1")]
            assert state == "UNAVAILABLE" and "LOGITS" in reason
            assert not engine.is_ready()  # strict readiness: a model that should be loaded is not
        async with started_engine(repository, exit_on_error=False, strict_readiness=False) as engine:
            assert engine.is_ready()

    run(scenario)


# -- versions -------------------------------------------------------------------------------------


def test_version_policy_and_version_routing(tiny_repository: Path) -> None:
    async def scenario() -> None:
        async with started_engine(tiny_repository, model_control_mode="explicit", startup_models=["versioned"]) as engine:
            x = np.arange(4, dtype=np.float32).reshape(1, 4)
            assert engine.model_metadata("versioned").versions == [str(v) for v in VERSIONED_POLICY_VERSIONS]
            newest = max(VERSIONED_POLICY_VERSIONS)
            response = await engine.infer(fp32_request("versioned", x))
            assert response.model_version == str(newest)
            np.testing.assert_array_equal(response.outputs[0].data, x + newest)
            for version in VERSIONED_POLICY_VERSIONS:
                response = await engine.infer(fp32_request("versioned", x, version=str(version)))
                assert response.model_version == str(version)
                np.testing.assert_array_equal(response.outputs[0].data, x + version)
            assert not engine.model_ready("versioned", "2")  # on disk, but not in the policy
            await expect_error(ErrorKind.NOT_FOUND, engine.infer(fp32_request("versioned", x, version="2")), "2")
            await expect_error(ErrorKind.NOT_FOUND, engine.infer(fp32_request("versioned", x, version="abc")))
            await expect_error(ErrorKind.NOT_FOUND, _call(engine.model_metadata, "versioned", "2"))
            assert [s.version for s in engine.model_statistics("versioned")] == [
                str(v) for v in sorted(VERSIONED_POLICY_VERSIONS)
            ]

            await engine.load_model("versioned", json.dumps({"version_policy": {"latest": {"num_versions": 2}}}))
            assert engine.model_metadata("versioned").versions == ["2", "3"]
            assert index_states(engine)[("versioned", "1")] == ("UNAVAILABLE", "unloaded")
            # A plain load goes back to config.pbtxt.
            await engine.load_model("versioned")
            assert engine.model_metadata("versioned").versions == [str(v) for v in VERSIONED_POLICY_VERSIONS]

    run(scenario)


async def _call(function, *args):
    return function(*args)


# -- inference and validation ---------------------------------------------------------------------


def test_outputs_equal_onnxruntime_for_every_datatype(tiny_repository: Path) -> None:
    rng = np.random.default_rng(7)

    async def scenario() -> None:
        async with started_engine(tiny_repository) as engine:
            x = rng.standard_normal((3, 4)).astype(np.float32)
            response = await engine.infer(fp32_request("simple", x, request_id="req-1"))
            expected = onnxruntime_outputs(tiny_repository, "simple", 1, {"INPUT0": x})
            assert response.id == "req-1" and response.model_name == "simple" and response.model_version == "1"
            assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
            for output in response.outputs:
                assert output.datatype == "FP32" and output.shape == [3, 4]
                np.testing.assert_array_equal(output.data, expected[output.name])

            only_second = await engine.infer(fp32_request("simple", x, outputs=[RequestedOutput("OUTPUT1")]))
            assert [o.name for o in only_second.outputs] == ["OUTPUT1"]

            codes = rng.integers(-(2**40), 2**40, (2, 4), dtype=np.int64)
            request = InferRequest("int64_identity", inputs=[InferInput("INPUT0", "INT64", [2, 4], codes)])
            output = (await engine.infer(request)).outputs[0]
            assert output.datatype == "INT64"
            np.testing.assert_array_equal(output.data, codes)

            words = np.array([[b"sentinel", b"\xc3\xa9t\xc3\xa9", b""]], dtype=np.object_)
            request = InferRequest("string_identity", inputs=[InferInput("INPUT0", "BYTES", [1, 3], words)])
            output = (await engine.infer(request)).outputs[0]
            assert output.datatype == "BYTES" and output.shape == [1, 3]
            assert output.data.tolist() == words.tolist()

            matrix = rng.standard_normal((2, 3)).astype(np.float32)
            output = (await engine.infer(fp32_request("fixed_shape", matrix))).outputs[0]
            assert output.shape == [2, 3]
            np.testing.assert_array_equal(output.data, onnxruntime_outputs(tiny_repository, "fixed_shape", 1, {"INPUT0": matrix})["OUTPUT0"])

    run(scenario)


def test_invalid_requests_get_clear_errors_and_the_engine_keeps_serving(tiny_repository: Path) -> None:
    good = np.zeros((1, 4), np.float32)

    def simple(*inputs: InferInput, outputs: list[RequestedOutput] | None = None) -> InferRequest:
        return InferRequest("simple", inputs=list(inputs), outputs=outputs or [])

    cases = [
        (ErrorKind.NOT_FOUND, InferRequest("nope", inputs=[InferInput("INPUT0", "FP32", [1, 4], good)]), ["nope"]),
        (ErrorKind.INVALID_ARGUMENT, simple(InferInput("IMAGE", "FP32", [1, 4], good)), ["'IMAGE'", "INPUT0"]),
        (ErrorKind.INVALID_ARGUMENT, simple(), ["missing required input", "INPUT0"]),
        (ErrorKind.INVALID_ARGUMENT, simple(InferInput("INPUT0", "INT32", [1, 4], good.astype(np.int32))),
         ["'INT32'", "'FP32'"]),
        (ErrorKind.INVALID_ARGUMENT, simple(InferInput("INPUT0", "FP32", [4], good.reshape(4))), ["[-1, 4]", "[4]"]),
        (ErrorKind.INVALID_ARGUMENT, simple(InferInput("INPUT0", "FP32", [1, 5], np.zeros((1, 5), np.float32))),
         ["[-1, 4]", "[1, 5]"]),
        (ErrorKind.INVALID_ARGUMENT, simple(InferInput("INPUT0", "FP32", [9, 4], np.zeros((9, 4), np.float32))),
         ["<= 8"]),
        (ErrorKind.INVALID_ARGUMENT, simple(InferInput("INPUT0", "FP32", [2, 4], good)), ["byte size 16", "32"]),
        (ErrorKind.INVALID_ARGUMENT, simple(InferInput("INPUT0", "FP32", [1, 4], good),
                                            InferInput("INPUT0", "FP32", [1, 4], good)), ["more than once"]),
        (ErrorKind.INVALID_ARGUMENT, simple(InferInput("INPUT0", "FP32", [1, 4], good),
                                            outputs=[RequestedOutput("OUTPUT9")]), ["'OUTPUT9'", "OUTPUT0"]),
        (ErrorKind.INVALID_ARGUMENT, InferRequest("fixed_shape", inputs=[
            InferInput("INPUT0", "FP32", [1, 2, 3], np.zeros((1, 2, 3), np.float32))]), ["[2, 3]", "[1, 2, 3]"]),
        (ErrorKind.INVALID_ARGUMENT, InferRequest("string_identity", inputs=[
            InferInput("INPUT0", "BYTES", [1, 1], np.array([[b"\xff"]], dtype=np.object_))]), ["UTF-8"]),
    ]

    async def scenario() -> None:
        async with started_engine(tiny_repository) as engine:
            for kind, request, fragments in cases:
                await expect_error(kind, engine.infer(request), *fragments)
            response = await engine.infer(fp32_request("simple", good))
            np.testing.assert_array_equal(response.outputs[0].data, good + 1)
            statistics = engine.model_statistics("simple")[0]
            # Requests refused by validation never reach the model: like Triton, they are no inference failures.
            assert statistics.inference_stats.fail.count == 0
            assert statistics.inference_stats.success.count == 1
            assert engine.failure_counts("simple", "1").get("OTHER", 0) == 0

    run(scenario)


def test_classification_returns_sorted_score_index_label(tiny_repository: Path) -> None:
    logits = np.array([[0.5, 3.0, -1.0, 2.0, 0.0], [-2.0, -1.0, 4.0, 1.0, 0.25]], dtype=np.float32)
    probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    async def scenario() -> None:
        async with started_engine(tiny_repository) as engine:
            request = fp32_request("classifier", logits, outputs=[RequestedOutput("PROBABILITY", class_count=3)])
            output = (await engine.infer(request)).outputs[0]
            assert output.datatype == "BYTES" and output.shape == [2, 3]
            for row, entries in enumerate(output.data.tolist()):
                parsed = [entry.decode().split(":") for entry in entries]
                indices = [int(index) for _, index, _ in parsed]
                assert indices == list(np.argsort(-probabilities[row])[:3])
                for score, index, label in parsed:
                    assert label == CLASSIFIER_LABELS[int(index)]
                    assert float(score) == pytest.approx(probabilities[row, int(index)], abs=1e-6)
                    assert len(score.split(".")[1]) == 6  # Triton formats scores like printf %f

            # More classes asked for than exist: all of them; an output without labels: "score:index".
            request = fp32_request("classifier", logits[:1], outputs=[RequestedOutput("PROBABILITY", class_count=50)])
            assert (await engine.infer(request)).outputs[0].shape == [1, len(CLASSIFIER_LABELS)]
            request = fp32_request("simple", np.array([[1, 9, 3, 7]], np.float32), outputs=[
                RequestedOutput("OUTPUT1", class_count=2), RequestedOutput("OUTPUT0")])
            response = await engine.infer(request)
            assert response.outputs[0].data.tolist() == [[b"18.000000:1", b"14.000000:3"]]
            np.testing.assert_array_equal(response.outputs[1].data, [[2, 10, 4, 8]])

    run(scenario)


def test_statistics_follow_triton_semantics(tiny_repository: Path) -> None:
    async def scenario() -> None:
        async with started_engine(tiny_repository) as engine:
            stats = engine.model_statistics("int64_identity")[0]
            assert stats.inference_count == 0 and stats.execution_count == 0 and stats.last_inference == 0
            for rows in (1, 3, 2):
                codes = np.ones((rows, 4), np.int64)
                await engine.infer(InferRequest("int64_identity", inputs=[InferInput("INPUT0", "INT64", [rows, 4], codes)]))
            stats = engine.model_statistics("int64_identity")[0]
            assert (stats.name, stats.version) == ("int64_identity", "1")
            assert stats.inference_count == 6 and stats.execution_count == 3
            assert stats.last_inference > 0
            infer_stats = stats.inference_stats
            assert infer_stats.success.count == 3 and infer_stats.success.ns > 0
            for duration in (infer_stats.queue, infer_stats.compute_input, infer_stats.compute_infer,
                             infer_stats.compute_output):
                assert duration.count == 3
            assert infer_stats.compute_infer.ns > 0
            assert infer_stats.success.ns >= infer_stats.compute_infer.ns
            assert sorted((b.batch_size, b.compute_infer.count) for b in stats.batch_stats) == [(1, 1), (2, 1), (3, 1)]

            everything = engine.model_statistics()
            assert {(s.name, s.version) for s in everything} >= {("int64_identity", "1"), ("simple", "1")}
            await expect_error(ErrorKind.INVALID_ARGUMENT, _call(engine.model_statistics, "nope"), "not available")
            await expect_error(ErrorKind.NOT_FOUND, _call(engine.model_statistics, "simple", "7"))
            assert engine.pending_request_count("simple", "1") == 0
            assert engine.pending_request_count("nope", "") == 0

    run(scenario)


def test_metadata_and_config_describe_the_model(tiny_repository: Path) -> None:
    async def scenario() -> None:
        async with started_engine(tiny_repository) as engine:
            metadata = engine.model_metadata("simple")
            assert (metadata.name, metadata.versions, metadata.platform) == ("simple", ["1"], "onnxruntime_onnx")
            assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("INPUT0", "FP32", [-1, 4])]
            assert [(t.name, t.shape) for t in metadata.outputs] == [("OUTPUT0", [-1, 4]), ("OUTPUT1", [-1, 4])]
            fixed = engine.model_metadata("fixed_shape")
            assert fixed.inputs[0].shape == [2, 3]
            config = engine.model_config("classifier")
            assert config.output[0].label_filename == "labels.txt"
            config.max_batch_size = 99  # a copy: the engine's config is untouched
            assert engine.model_config("classifier").max_batch_size == 8
            await expect_error(ErrorKind.NOT_FOUND, _call(engine.model_config, "nope"))

    run(scenario)


def test_model_without_config_is_autocompleted_and_scalar_rows_are_reshaped(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Neg", ["VALUE"], ["NEGATED"])],
        "negate",
        [helper.make_tensor_value_info("VALUE", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("NEGATED", TensorProto.FLOAT, ["batch"])],
    )
    write_onnx(tmp_path / "negate", 1, graph)  # no config.pbtxt at all

    async def scenario() -> None:
        async with started_engine(tmp_path) as engine:
            config = engine.model_config("negate")
            # Triton's auto-completion: default max_batch_size 4, dynamic batching, [1] reshaped to [].
            assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
            assert list(config.input[0].dims) == [1] and config.input[0].HasField("reshape")
            assert list(config.input[0].reshape.shape) == []
            values = np.array([[1.5], [-2.0], [0.0]], np.float32)
            output = (await engine.infer(fp32_request("negate", values, input_name="VALUE"))).outputs[0]
            assert output.shape == [3, 1]
            np.testing.assert_array_equal(output.data, -values)

    run(scenario)


# -- warmup, instances, reload --------------------------------------------------------------------


def test_warmup_runs_on_every_instance_before_ready(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    make_slow(repository, instance_count=2)
    config = parse_config_text((repository / "slow" / "config.pbtxt").read_text())
    warmup = config.model_warmup.add(name="ones", batch_size=4, count=2)
    warmup.inputs["INPUT0"].data_type = config.input[0].data_type
    warmup.inputs["INPUT0"].dims.append(SLOW_WIDTH)
    warmup.inputs["INPUT0"].input_data_file = "ones.bin"
    write_config(repository / "slow", config)
    (repository / "slow" / "warmup").mkdir()
    (repository / "slow" / "warmup" / "ones.bin").write_bytes(np.ones(SLOW_WIDTH, np.float32).tobytes())

    async def scenario() -> None:
        async with started_engine(repository) as engine:
            instances = engine.model_instances("slow")
            assert [i.name for i in instances] == ["slow_0_0", "slow_0_1"]
            # One run of zeros plus the config's warmup (count 2) on each instance, before READY.
            assert [i.warmup_runs for i in instances] == [3, 3]
            stats = engine.model_statistics("slow")[0]
            assert stats.inference_count == 0 and stats.execution_count == 0  # warmup is not traffic

        (repository / "slow" / "warmup" / "ones.bin").write_bytes(b"short")
        with pytest.raises(EngineStartupError, match="model_warmup 'ones'"):
            async with started_engine(repository):
                pass

    run(scenario)


def test_reload_replaces_a_model_without_dropping_requests(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    make_slow(repository)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((1, SLOW_WIDTH)).astype(np.float32) for _ in range(24)]

    async def scenario() -> None:
        async with started_engine(repository, model_control_mode="explicit", startup_models=["slow"]) as engine:
            in_flight = [asyncio.create_task(engine.infer(fp32_request("slow", x))) for x in inputs]
            await asyncio.sleep(0)  # let them queue
            assert engine.pending_request_count("slow", "1") + engine.model_statistics("slow")[0].execution_count > 0
            override = json.dumps({"max_batch_size": 4, "dynamic_batching": {},
                                   "parameters": {"intra_op_thread_count": {"string_value": "1"}}})
            await engine.load_model("slow", override)
            assert engine.model_config("slow").max_batch_size == 4
            responses = await asyncio.gather(*in_flight)
            for x, response in zip(inputs, responses):
                np.testing.assert_array_equal(response.outputs[0].data, x)
            after = await engine.infer(fp32_request("slow", inputs[0]))
            np.testing.assert_array_equal(after.outputs[0].data, inputs[0])
            # Statistics are kept across the reload: every request is counted once.
            assert engine.model_statistics("slow")[0].inference_count == len(inputs) + 1

    run(scenario)


def test_cancelled_request_leaves_the_queue_and_others_complete(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    make_slow(repository, dynamic_batching=False)

    async def scenario() -> None:
        async with started_engine(repository) as engine:
            x = np.ones((1, SLOW_WIDTH), np.float32)
            tasks = [asyncio.create_task(engine.infer(fp32_request("slow", x * i))) for i in range(4)]
            await asyncio.sleep(0)
            assert engine.pending_request_count("slow", "1") == 3  # one runs, three wait
            tasks[2].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(results[2], asyncio.CancelledError)
            for i in (0, 1, 3):
                np.testing.assert_array_equal(results[i].outputs[0].data, x * i)
            assert engine.pending_request_count("slow", "1") == 0
            assert engine.model_statistics("slow")[0].execution_count == 3
            assert engine.failure_counts("slow", "1")["CANCELED"] == 1

    run(scenario)
