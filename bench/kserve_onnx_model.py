"""KServe ModelServer hosting ONNX models of a Triton model repository: the peer in the benchmark.

Runs inside ``.venv-kserve`` (KServe pins its own dependencies, so it never shares the project's
venv); it cannot import the project. ``bench/inference_bench.py`` starts it, one process hosting
every model under test, with the ONNX Runtime session options our server uses, passed as flags.

This is the custom ``kserve.Model`` a user would write: ``predict`` takes the v2 ``InferRequest``
KServe decoded (REST JSON, REST binary-tensor extension, or gRPC), runs ``session.run`` and answers
an ``InferResponse`` in the same encoding the client asked for. ``session.run`` is offloaded to
KServe's asyncio executor (``--max_asyncio_workers``) so concurrent requests overlap the way they
do in the in-process ceiling; a blocking ``predict`` would serialise every request on the event loop
and make the peer look worse than a careful user would make it.

    .venv-kserve/bin/python bench/kserve_onnx_model.py --models-file models.json \
        --http_port 8080 --grpc_port 8081 --enable_latency_logging false

``models.json`` (written by the benchmark) lists each model's name, ONNX file and session setup
(threads, execution mode, graph optimisation level, arena flags, ``session.*`` config entries,
execution providers) as our server derives them from ``config.pbtxt``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import kserve
import kserve.protocol.grpc.server
import numpy as np
import onnxruntime as ort
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from kserve.utils.numpy_codec import from_np_dtype

log = logging.getLogger("kserve-onnx-bench")

GRAPH_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
EXECUTION_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
ORT_TYPE_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def session_from_setup(onnx_path: Path, setup: dict[str, Any]) -> ort.InferenceSession:
    """The session our server builds for this model, from the setup the benchmark read off it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(setup["intra_op_threads"])
    options.inter_op_num_threads = int(setup["inter_op_threads"])
    options.execution_mode = EXECUTION_MODES[setup["execution_mode"]]
    options.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[setup["graph_optimization_level"]]
    options.enable_cpu_mem_arena = bool(setup["enable_cpu_mem_arena"])
    options.enable_mem_pattern = bool(setup["enable_mem_pattern"])
    for key, value in setup.get("config_entries", {}).items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    providers = setup.get("providers") or [["CPUExecutionProvider", {}]]
    return ort.InferenceSession(
        str(onnx_path),
        sess_options=options,
        providers=[name for name, _ in providers],
        provider_options=[provider_options for _, provider_options in providers],
    )


def tensor_metadata(node: Any) -> dict[str, Any]:
    shape = [dim if isinstance(dim, int) else -1 for dim in node.shape]
    return {"name": node.name, "datatype": ORT_TYPE_TO_V2.get(node.type, node.type), "shape": shape}


class OnnxRuntimeModel(kserve.Model):
    """One ONNX file behind the v2 protocol; inputs are fed by name, every output is returned."""

    def __init__(self, name: str, onnx_path: Path, session_setup: dict[str, Any]) -> None:
        super().__init__(name)
        self.onnx_path = onnx_path
        self.session_setup = session_setup
        self.session: ort.InferenceSession | None = None
        self.input_names: set[str] = set()

    def load(self) -> bool:
        self.session = session_from_setup(self.onnx_path, self.session_setup)
        self.input_names = {node.name for node in self.session.get_inputs()}
        self.ready = True
        log.info("loaded %s from %s", self.name, self.onnx_path)
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        assert self.session is not None
        return [tensor_metadata(node) for node in self.session.get_inputs()]

    def get_output_types(self) -> list[dict[str, Any]]:
        assert self.session is not None
        return [tensor_metadata(node) for node in self.session.get_outputs()]

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this model speaks the v2 protocol only")
        assert self.session is not None
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        if set(feeds) != self.input_names:
            raise InvalidInput(f"expected inputs {sorted(self.input_names)}, got {sorted(feeds)}")
        # session.run releases the GIL: on the executor, concurrent requests run side by side.
        results = await asyncio.get_running_loop().run_in_executor(None, self.session.run, None, feeds)
        outputs: list[InferOutput] = []
        for node, array in zip(self.session.get_outputs(), results):
            array = np.asarray(array)
            output = InferOutput(name=node.name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
            output.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


def bind_to_loopback_only() -> None:
    """Make KServe listen on 127.0.0.1 instead of every interface.

    KServe 0.21 hard-codes ``0.0.0.0`` (REST) and ``[::]`` (gRPC); the benchmark's servers must stay on
    loopback. Only the bind address changes, nothing on the request path.
    """
    original_config_init = uvicorn.Config.__init__

    def loopback_config_init(self: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = "127.0.0.1"
        original_config_init(self, *args, **kwargs)

    uvicorn.Config.__init__ = loopback_config_init  # type: ignore[method-assign]

    grpc_aio = kserve.protocol.grpc.server.aio
    original_grpc_server = grpc_aio.server

    def loopback_grpc_server(*args: Any, **kwargs: Any) -> Any:
        server = original_grpc_server(*args, **kwargs)
        original_add_port = server.add_insecure_port
        server.add_insecure_port = lambda address: original_add_port(address.replace("[::]", "127.0.0.1", 1))
        return server

    grpc_aio.server = loopback_grpc_server


class _DropPerRequestLines(logging.Filter):
    """KServe's gRPC interceptor logs one INFO line per call on the ``kserve`` logger itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "intercept_service"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[kserve.model_server.parser])
    parser.add_argument(
        "--models-file",
        type=Path,
        required=True,
        help='JSON list of {"name", "onnx_path", "session": {...}} written by inference_bench.py',
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    bind_to_loopback_only()
    models = []
    for entry in json.loads(args.models_file.read_text()):
        model = OnnxRuntimeModel(entry["name"], Path(entry["onnx_path"]), entry["session"])
        model.load()
        models.append(model)
    server = kserve.ModelServer()
    # KServe logs two trace lines and an access line per request by default; at thousands of small
    # requests per second that is CPU the peer would spend on logging instead of serving. Our
    # server logs no line per request either, so both are measured without it.
    for per_request_logger in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(per_request_logger).setLevel(logging.WARNING)
    logging.getLogger("kserve").addFilter(_DropPerRequestLines())
    server.start(models)


if __name__ == "__main__":
    main()
