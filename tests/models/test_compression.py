"""Learned compression: the block transform, the code layout, the -1 level convention and the bundled weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime
import pytest
import torch

from models import compression, sample_data
from models.specs import COMPRESSION_CHECKPOINT, COMPRESSION_FAMILY, COMPRESSION_METADATA, SENTINEL2_CARD, \
    compression_split, get_spec
from services.core import transform_codes as tc
from services.core.model_card import ModelCard

COMPRESS = "Bigearth-net-compression-compress-pytorch"
DECOMPRESS = "Bigearth-net-compression-decompress-pytorch"


def test_torch_and_numpy_code_layouts_agree() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(-300, 300, size=(2, 15, 15, 128)).astype(np.int32)
    torch_codes = compression.coefficients_to_codes(torch.from_numpy(q.astype(np.int64) + tc.CODE_OFFSET)).numpy()
    np.testing.assert_array_equal(torch_codes, tc.coefficients_to_codes(q, 8))
    # Coefficient k of block (by, bx) sits at (4 by + dy, 4 bx + dx), level k // 16, (dy, dx) = divmod(k % 16, 4).
    k, by, bx = 37, 3, 11
    dy, dx = divmod(k % 16, 4)
    assert torch_codes[1, 4 * by + dy, 4 * bx + dx, k // 16] == q[1, by, bx, k] + tc.CODE_OFFSET
    back = compression.codes_to_grouped(torch.from_numpy(torch_codes)).numpy() - tc.CODE_OFFSET
    np.testing.assert_array_equal(back, q)
    decoded, levels = tc.codes_to_coefficients(tc.coefficients_to_codes(q, 3))
    assert levels == 3
    np.testing.assert_array_equal(decoded[..., :48], q[..., :48])
    assert not decoded[..., 48:].any()


def test_codes_that_skip_a_level_are_refused() -> None:
    codes = tc.coefficients_to_codes(np.zeros((1, 15, 15, 128), np.int32), 8)
    codes[..., 2] = tc.UNUSED_CODE
    with pytest.raises(tc.TransformCodesError, match="prefix"):
        tc.codes_to_coefficients(codes)


def test_fitted_transform_is_orthonormal_ordered_and_deterministic() -> None:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(640, 640, generator=generator, dtype=torch.float64) * torch.linspace(3, 0.01, 640)
    blocks = torch.randn(4000, 640, generator=generator, dtype=torch.float64) @ mixing.T + 1000.0
    first, second = compression.BlockTransformCodec(), compression.BlockTransformCodec()
    values = compression.fit_block_transform(first, blocks)
    compression.fit_block_transform(second, blocks.flip(0))  # same data, another order
    basis = first.basis.to(torch.float64)
    torch.testing.assert_close(basis.T @ basis, torch.eye(128, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (values[:-1] >= values[1:]).all()
    torch.testing.assert_close(first.basis, second.basis, atol=1e-4, rtol=0)
    torch.testing.assert_close(first.block_mean, blocks.mean(0).to(torch.float32), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------
# The bundled trained weights


def test_bundled_checkpoint_matches_its_record_and_is_compact() -> None:
    record = json.loads(COMPRESSION_METADATA.read_text())
    data = COMPRESSION_CHECKPOINT.read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert len(data) <= 30 * 1024 * 1024
    state = torch.load(COMPRESSION_CHECKPOINT, map_location="cpu", weights_only=True)
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    codec = compression.BlockTransformCodec()
    codec.load_state_dict(state)  # strict: the checkpoint fits the architecture
    assert record["corpus"]["split"] == "train" and record["corpus"]["patches"] > 0
    prior = tc.LaplaceContextPrior.from_text(record["entropy_prior"])
    assert prior.sha256 == record["entropy_prior_sha256"]
    # The post-filter was trained (its last convolution is no longer the zero it starts from) and checked on
    # development scenes; it is applied from the scale where it helped there.
    assert codec.post_filter.conv3.weight.abs().max() > 0
    assert int(codec.post_filter_min_scale) == record["post_filter"]["applied_from_quantiser_scale"]


def test_exported_cards_carry_the_checkpoint_and_its_prior(artefacts) -> None:
    record = json.loads(COMPRESSION_METADATA.read_text())
    for name in (COMPRESS, DECOMPRESS):
        card = get_spec(name).card(f"checkpoint:compression.pt:sha256={record['sha256']}")
        assert card.entropy_prior == record["entropy_prior"]
    # A seeded (untrained) build carries no prior: the prior belongs to the trained weights.
    assert get_spec(COMPRESS).card("seeded-init:seed=4").entropy_prior == ""


def test_seeded_codec_is_fitted_on_the_seeded_sample_split() -> None:
    codec = COMPRESSION_FAMILY.create_seeded(COMPRESSION_FAMILY.seed)
    basis = codec.basis.to(torch.float64)
    torch.testing.assert_close(basis.T @ basis, torch.eye(128, dtype=torch.float64), atol=1e-4, rtol=0)
    assert codec.post_filter.conv3.weight.abs().max() == 0  # identity filter until trained


# ------------------------------------------------------------------------------------------------
# The exported models on real sample patches


@pytest.fixture(scope="module")
def sample_patches() -> np.ndarray:
    init_names, held_out = compression_split(COMPRESSION_FAMILY.seed)
    card = ModelCard(weights="seeded-init:seed=0", task="compress", **SENTINEL2_CARD)
    return sample_data.load_patches(held_out, card)


def run_batched(session: onnxruntime.InferenceSession, name: str, data: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([session.run(None, {name: data[i : i + batch]})[0] for i in range(0, len(data), batch)])


@pytest.fixture(scope="module")
def sample_codes(artefacts, sample_patches: np.ndarray) -> np.ndarray:
    spec = get_spec(COMPRESS)
    return run_batched(artefacts.session(COMPRESS), spec.inputs[0].name, sample_patches, spec.max_batch_size)


@pytest.mark.slow
def test_compressor_codes_on_real_patches(sample_patches: np.ndarray, sample_codes: np.ndarray) -> None:
    assert sample_codes.shape == (len(sample_patches), 60, 60, 8) and sample_codes.dtype == np.int64
    assert sample_codes.min() >= 0 and sample_codes.max() < 10000
    q, levels = tc.codes_to_coefficients(sample_codes)
    assert levels == 8
    # Ordered by variance: the first level carries far more than the last.
    assert np.abs(q[..., :16]).mean() > 10 * np.abs(q[..., 112:]).mean()


@pytest.mark.slow
def test_onnx_and_torch_compressors_agree_on_real_patches(artefacts, sample_patches: np.ndarray,
                                                          sample_codes: np.ndarray) -> None:
    with torch.no_grad():
        torch_codes = artefacts.torch_module(COMPRESS)(torch.from_numpy(sample_patches[:2])).numpy()
    assert np.mean(torch_codes == sample_codes[:2]) >= 0.999


@pytest.mark.slow
def test_reconstruction_error_falls_with_every_level(artefacts, sample_patches: np.ndarray,
                                                     sample_codes: np.ndarray) -> None:
    spec = get_spec(DECOMPRESS)
    session = artefacts.session(DECOMPRESS)
    card = get_spec(DECOMPRESS).card("seeded-init:seed=0")
    std = np.asarray(card.band_std, np.float32)[None, :, None, None]
    rms_dn = []
    for levels in range(1, 9):
        codes = sample_codes.copy()
        codes[..., levels:] = compression.UNUSED_LEVEL
        decoded = run_batched(session, spec.inputs[0].name, codes, spec.max_batch_size)
        assert decoded.shape == sample_patches.shape
        rms_dn.append(float(np.sqrt(np.mean(((decoded - sample_patches) * std) ** 2))))
    assert all(after < before for before, after in zip(rms_dn, rms_dn[1:])), rms_dn
    assert rms_dn[-1] < 150.0  # all levels at the base step: well under 1.5 % of 10,000 DN


@pytest.mark.slow
def test_unused_levels_decode_as_zero_coefficients(artefacts, sample_codes: np.ndarray) -> None:
    decompressor = artefacts.torch_module(DECOMPRESS)
    codec = decompressor.codec
    session = artefacts.session(DECOMPRESS)
    codes = sample_codes[:2]
    with torch.no_grad():
        for kept in (1, 3, 8):
            q, _ = tc.codes_to_coefficients(tc.coefficients_to_codes(tc.codes_to_coefficients(codes)[0], kept))
            used = torch.arange(128)[None, None, None, :].expand(q.shape) < kept * 16
            expected = codec.decode(torch.from_numpy(q.astype(np.int64)), used)
            masked = codes.copy()
            masked[..., kept:] = compression.UNUSED_LEVEL
            torch.testing.assert_close(decompressor(torch.from_numpy(masked)), expected, atol=1e-4, rtol=1e-4)
            onnx_out = session.run(None, {"int64_latent32_15": masked})[0]
            np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_post_filter_applies_only_from_its_quantiser_scale(artefacts, sample_codes: np.ndarray) -> None:
    codec = artefacts.torch_module(DECOMPRESS).codec
    gate = int(codec.post_filter_min_scale)
    assert 1 < gate <= 64  # trained: applied to coarse codes only (the development check in compression.json)
    q, _ = tc.codes_to_coefficients(sample_codes[:2])
    used = torch.ones(q.shape, dtype=torch.bool)
    with torch.no_grad():
        for scale in tc.QUANTISER_SCALES:
            coarse = torch.from_numpy((tc.requantise(q, scale) * scale).astype(np.int64))
            plain = codec.synthesise(coarse.to(torch.float32) * tc.BASE_STEP_DN)
            decoded = codec.decode(coarse, used)
            assert torch.equal(decoded, plain) == (scale < gate), scale


@pytest.mark.slow
def test_onnx_decompressor_clamps_codes_beyond_the_range(artefacts) -> None:
    codes = np.full((1, 60, 60, 8), tc.CODE_OFFSET, dtype=np.int64)
    beyond = codes.copy()
    codes[0, 5, 5, 3], beyond[0, 5, 5, 3] = 9999, 12345
    session = artefacts.session(DECOMPRESS)
    np.testing.assert_array_equal(session.run(None, {"int64_latent32_15": beyond})[0],
                                  session.run(None, {"int64_latent32_15": codes})[0])
