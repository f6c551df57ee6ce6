"""An "externally exported" residual-VQ compressor/decompressor pair, as a model owner would hand one over: two ONNX
graphs built with the ``onnx`` package from seeded numpy weights (not ours, not trained), and a ``config.pbtxt``
per model whose card says ``codec: residual-vq/1``. Nothing in the platform names these models.

Compressor ``[N, 10, 120, 120]`` FP32 -> ``[N, 60, 60, 8]`` INT64: 2 x 2 average pool, a 1 x 1 convolution to a
``CODE_DIM``-dimensional latent, then eight levels of residual nearest-codeword search (``ArgMin`` of the squared
distance to each level's ``CODEBOOK`` codewords, the chosen codeword subtracted before the next level).
Decompressor ``[N, 60, 60, 8]`` INT64 (-1 = level not used) -> ``[N, 10, 120, 120]`` FP32: per level ``Gather`` of
the codeword (0 where the index is -1), summed, a 1 x 1 convolution back to 10 bands, nearest upsampling x 2.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.core import sentinel2

BANDS = list(sentinel2.SIMCLR_BAND_ORDER)
LEVELS = 8
CODE_DIM = 4
CODEBOOK = 64  # codewords per level actually used (the format allows up to 10,000)
INPUT, CODES, OUTPUT = "input_sentinel2_10_bands_120", "int64_latent32_15", "output_sentinel2_10_bands_120"
OPSET = 17


@dataclass(frozen=True)
class RvqWeights:
    encoder: np.ndarray  # [CODE_DIM, bands, 1, 1]
    codebooks: np.ndarray  # [LEVELS, CODEBOOK, CODE_DIM], shrinking per level as residuals do
    decoder: np.ndarray  # [bands, CODE_DIM, 1, 1]
    decoder_bias: np.ndarray  # [bands]

    @classmethod
    def seeded(cls, seed: int, bands: int = len(BANDS)) -> "RvqWeights":
        rng = np.random.default_rng(seed)
        scales = 0.5 ** np.arange(LEVELS, dtype=np.float32)
        return cls(
            encoder=rng.normal(0, 0.5, (CODE_DIM, bands, 1, 1)).astype(np.float32),
            codebooks=(rng.normal(0, 1.0, (LEVELS, CODEBOOK, CODE_DIM)) * scales[:, None, None]).astype(np.float32),
            decoder=rng.normal(0, 0.5, (bands, CODE_DIM, 1, 1)).astype(np.float32),
            decoder_bias=rng.normal(0, 0.1, bands).astype(np.float32),
        )


def _graph_model(nodes: list[onnx.NodeProto], name: str, inputs: list[onnx.ValueInfoProto],
                 outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="external-rvq-fixture")
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model, full_check=True)
    return model


def compressor(weights: RvqWeights) -> onnx.ModelProto:
    bands = weights.encoder.shape[1]
    init = [numpy_helper.from_array(weights.encoder, "encoder")]
    nodes = [
        helper.make_node("AveragePool", [INPUT], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pooled", "encoder"], ["latent_nchw"]),
        helper.make_node("Transpose", ["latent_nchw"], ["residual_0"], perm=[0, 2, 3, 1]),  # [N, 60, 60, D]
    ]
    indices = []
    for level in range(LEVELS):
        book = weights.codebooks[level]
        init += [numpy_helper.from_array(book, f"book_{level}"),
                 numpy_helper.from_array(np.ascontiguousarray(-2.0 * book.T), f"book_t_{level}"),
                 numpy_helper.from_array((book ** 2).sum(axis=1).astype(np.float32), f"book_norm_{level}")]
        residual = f"residual_{level}"
        # |r - c|^2 = |r|^2 - 2 r.c + |c|^2: the first term is the same for every codeword.
        nodes += [
            helper.make_node("MatMul", [residual, f"book_t_{level}"], [f"cross_{level}"]),
            helper.make_node("Add", [f"cross_{level}", f"book_norm_{level}"], [f"distance_{level}"]),
            helper.make_node("ArgMin", [f"distance_{level}"], [f"index_{level}"], axis=-1, keepdims=1),
            helper.make_node("Squeeze", [f"index_{level}", "last_axis"], [f"flat_index_{level}"]),
            helper.make_node("Gather", [f"book_{level}", f"flat_index_{level}"], [f"chosen_{level}"], axis=0),
            helper.make_node("Sub", [residual, f"chosen_{level}"], [f"residual_{level + 1}"]),
        ]
        indices.append(f"index_{level}")
    init.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"))
    nodes.append(helper.make_node("Concat", indices, [CODES], axis=-1))
    return _graph_model(
        nodes, "external_rvq_compress",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", bands, 120, 120])],
        [helper.make_tensor_value_info(CODES, TensorProto.INT64, ["N", 60, 60, LEVELS])], init)


def decompressor(weights: RvqWeights) -> onnx.ModelProto:
    bands = weights.decoder.shape[0]
    init = [numpy_helper.from_array(weights.decoder, "decoder"),
            numpy_helper.from_array(weights.decoder_bias, "decoder_bias"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "upsample")]
    nodes = [helper.make_node("Max", [CODES, "zero"], ["safe_codes"]),
             helper.make_node("GreaterOrEqual", [CODES, "zero"], ["used"]),
             helper.make_node("Cast", ["used"], ["used_float"], to=TensorProto.FLOAT)]
    parts = []
    for level in range(LEVELS):
        init += [numpy_helper.from_array(weights.codebooks[level], f"book_{level}"),
                 numpy_helper.from_array(np.array([level], dtype=np.int64), f"at_{level}"),
                 numpy_helper.from_array(np.array([level + 1], dtype=np.int64), f"to_{level}")]
        nodes += [
            helper.make_node("Slice", ["safe_codes", f"at_{level}", f"to_{level}", "last_axis"], [f"index_{level}"]),
            helper.make_node("Squeeze", [f"index_{level}", "last_axis"], [f"flat_index_{level}"]),
            helper.make_node("Gather", [f"book_{level}", f"flat_index_{level}"], [f"codeword_{level}"], axis=0),
            helper.make_node("Slice", ["used_float", f"at_{level}", f"to_{level}", "last_axis"], [f"mask_{level}"]),
            helper.make_node("Mul", [f"codeword_{level}", f"mask_{level}"], [f"part_{level}"]),
        ]
        parts.append(f"part_{level}")
    nodes += [
        helper.make_node("Sum", parts, ["latent"]),
        helper.make_node("Transpose", ["latent"], ["latent_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["latent_nchw", "decoder", "decoder_bias"], ["bands_60"]),
        helper.make_node("Resize", ["bands_60", "", "upsample"], [OUTPUT], mode="nearest"),
    ]
    return _graph_model(
        nodes, "external_rvq_decompress",
        [helper.make_tensor_value_info(CODES, TensorProto.INT64, ["N", 60, 60, LEVELS])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", bands, 120, 120])], init)


def _parameters(card: dict[str, str]) -> str:
    return "".join(f'parameters {{\n  key: "card.{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
                   for key, value in card.items())


def _config(name: str, input_: tuple[str, str, Sequence[int]], output: tuple[str, str, Sequence[int]],
            card: dict[str, str]) -> str:
    def tensor(entry: tuple[str, str, Sequence[int]]) -> str:
        return f'  {{\n    name: "{entry[0]}"\n    data_type: {entry[1]}\n    dims: [ {", ".join(map(str, entry[2]))} ]\n  }}\n'

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
            f"input [\n{tensor(input_)}]\noutput [\n{tensor(output)}]\n" + _parameters(card))


def card_fields(task: str, weights_sha256: str, codec: str = "residual-vq/1", entropy_prior: str = "") -> dict[str, str]:
    """The card a model owner writes: the bands and the standardisation the encoder was trained with, the codec."""
    card = {
        "schema_version": "2",
        "task": task,
        "input_kind": "sentinel2-l2a" if task == "compress" else "codes",
        "bands": ",".join(BANDS),
        "band_mean": ",".join(repr(sentinel2.BIGEARTHNET_BAND_MEAN[b]) for b in BANDS),
        "band_std": ",".join(repr(sentinel2.BIGEARTHNET_BAND_STD[b]) for b in BANDS),
        "normalisation": "standardise",
        "resampling_20m": "bilinear",
        "patch_size": "120",
        "weights": f"package:external-rvq-fixture==1/model.onnx:sha256={weights_sha256}",
        "intended_use": "test fixture: an externally exported residual-VQ codec (seeded numpy weights, untrained)",
    }
    if codec:
        card["codec"] = codec
    if entropy_prior:
        card["entropy_prior"] = entropy_prior
    return card


def write_model(root: Path, name: str, model: onnx.ModelProto, task: str, codec: str = "residual-vq/1",
                entropy_prior: str = "") -> Path:
    """``root/name/{config.pbtxt, 1/model.onnx}`` with the card of ``task``; returns the model directory."""
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    (folder / "1" / "model.onnx").write_bytes(data)
    card = card_fields(task, hashlib.sha256(data).hexdigest(), codec, entropy_prior)
    bands = len(BANDS)
    if task == "compress":
        config = _config(name, (INPUT, "TYPE_FP32", [bands, 120, 120]), (CODES, "TYPE_INT64", [60, 60, LEVELS]), card)
    else:
        config = _config(name, (CODES, "TYPE_INT64", [60, 60, LEVELS]), (OUTPUT, "TYPE_FP32", [bands, 120, 120]), card)
    (folder / "config.pbtxt").write_text(config)
    return folder


def write_pair(root: Path, compress_name: str, decompress_name: str, seed: int = 2026,
               entropy_prior: str = "") -> RvqWeights:
    """The pair with seeded weights; ``entropy_prior``: an RVQ prior (``services.core.rvq_prior``) on both cards."""
    weights = RvqWeights.seeded(seed)
    write_model(root, compress_name, compressor(weights), "compress", entropy_prior=entropy_prior)
    write_model(root, decompress_name, decompressor(weights), "decompress", entropy_prior=entropy_prior)
    return weights


def numpy_codes(weights: RvqWeights, inputs: np.ndarray) -> np.ndarray:
    """The compressor's codes computed in numpy (an independent reference of the graph)."""
    n, bands = inputs.shape[:2]
    pooled = inputs.reshape(n, bands, 60, 2, 60, 2).mean(axis=(3, 5))
    residual = np.einsum("dc,nchw->nhwd", weights.encoder[:, :, 0, 0], pooled)
    codes = np.empty((n, 60, 60, LEVELS), dtype=np.int64)
    for level, book in enumerate(weights.codebooks):
        distance = ((residual[..., None, :] - book) ** 2).sum(axis=-1)
        codes[..., level] = distance.argmin(axis=-1)
        residual = residual - book[codes[..., level]]
    return codes
