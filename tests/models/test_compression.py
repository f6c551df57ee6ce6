"""Learned compression: residual VQ mechanics, the -1 level convention, and a working codec on real patches."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from models import compression, sample_data
from models.specs import COMPRESSION_FAMILY, SENTINEL2_CARD, compression_split, get_spec
from services.core.model_card import ModelCard

COMPRESS = "Bigearth-net-compression-compress-pytorch"
DECOMPRESS = "Bigearth-net-compression-decompress-pytorch"


def small_quantizer(levels: int = 4, size: int = 50, dim: int = 8, seed: int = 0) -> compression.ResidualVectorQuantizer:
    quantizer = compression.ResidualVectorQuantizer(levels, size, dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for level, codebook in enumerate(quantizer.codebooks):
            codebook.copy_(torch.randn(size, dim, generator=generator) / (level + 1))
    return quantizer


def test_nearest_code_is_the_brute_force_nearest_neighbour() -> None:
    generator = torch.Generator().manual_seed(1)
    vectors, codebook = torch.randn(300, 16, generator=generator), torch.randn(200, 16, generator=generator)
    expected = torch.cdist(vectors.double(), codebook.double()).argmin(dim=1)
    assert torch.equal(compression.nearest_code(vectors, codebook), expected)


def test_rvq_encode_is_greedy_on_the_residual_and_decode_sums_the_codes() -> None:
    quantizer = small_quantizer()
    latent = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(2))
    codes = quantizer.encode(latent)
    assert codes.shape == (2, 3, 5, 4) and codes.dtype == torch.int64
    residual = latent.permute(0, 2, 3, 1).reshape(-1, 8).double()
    for level, codebook in enumerate(quantizer.codebooks):
        expected = torch.cdist(residual, codebook.double()).argmin(dim=1)
        assert torch.equal(codes[..., level].reshape(-1), expected)
        residual = residual - codebook.double()[expected]
    summed = sum(quantizer.codebooks[level][codes[..., level]] for level in range(4)).permute(0, 3, 1, 2)
    torch.testing.assert_close(quantizer.decode(codes), summed)


def test_unused_levels_decode_as_the_truncated_sum() -> None:
    quantizer = small_quantizer()
    codes = quantizer.encode(torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(3)))
    for kept in range(1, 5):
        truncated = sum(quantizer.codebooks[level][codes[..., level]] for level in range(kept)).permute(0, 3, 1, 2)
        masked = compression.mask_levels(codes, kept)
        assert (masked[..., kept:] == compression.UNUSED_LEVEL).all()
        torch.testing.assert_close(quantizer.decode(masked), truncated)


def test_codes_beyond_the_codebook_are_an_error_not_clamped() -> None:
    quantizer = small_quantizer()
    codes = torch.zeros(1, 2, 2, 4, dtype=torch.int64)
    codes[0, 1, 1, 2] = 50  # size is 50
    with pytest.raises(IndexError):
        quantizer.decode(codes)


def test_identity_initialisation_reconstructs_exactly() -> None:
    model = compression.CompressionAutoencoder()
    compression.identity_init_(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 10, 120, 120, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latent = model.encoder(x)
        assert latent.shape == (2, 128, 60, 60)
        torch.testing.assert_close(model.decoder(latent), x, atol=1e-4, rtol=1e-4)


def test_codebook_initialisation_samples_distinct_residuals_and_never_adds_error() -> None:
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(2000, 8, generator=generator)
    quantizer = compression.ResidualVectorQuantizer(levels=4, size=64, dim=8)
    compression.init_codebooks_from_latents(quantizer, latents, generator)
    codebooks = [c.detach() for c in quantizer.codebooks]
    assert all(len(torch.unique(c, dim=0)) == 64 for c in codebooks)
    assert all(torch.equal(c[0], torch.zeros(8)) for c in codebooks[1:])  # the zero code
    # Level 0 codes are latent vectors themselves.
    assert all(((latents - code).abs().amax(dim=1) == 0).any() for code in codebooks[0][:10])
    codes = quantizer.encode(latents.T.reshape(1, 8, 40, 50))
    errors = [
        (quantizer.decode(compression.mask_levels(codes, k)) - latents.T.reshape(1, 8, 40, 50)).pow(2).sum(dim=1)
        for k in range(1, 5)
    ]
    for before, after in zip(errors, errors[1:]):
        assert (after <= before + 1e-5).all()  # per vector, not just on average


def test_codebook_initialisation_needs_enough_distinct_vectors() -> None:
    quantizer = compression.ResidualVectorQuantizer(levels=2, size=64, dim=8)
    with pytest.raises(ValueError, match="distinct residual vectors"):
        compression.init_codebooks_from_latents(quantizer, torch.ones(500, 8), torch.Generator())


# ------------------------------------------------------------------------------------------------
# The exported models on real, held-out sample patches


@pytest.fixture(scope="module")
def held_out_patches() -> np.ndarray:
    init_names, held_out = compression_split(COMPRESSION_FAMILY.seed)
    assert not set(init_names) & set(held_out) and len(held_out) >= 10
    card = ModelCard(weights="seeded-init:seed=0", task="compress", **SENTINEL2_CARD)
    return sample_data.load_patches(held_out, card)


def run_batched(session: onnxruntime.InferenceSession, name: str, data: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([session.run(None, {name: data[i : i + batch]})[0] for i in range(0, len(data), batch)])


@pytest.fixture(scope="module")
def held_out_codes(artefacts, held_out_patches: np.ndarray) -> np.ndarray:
    spec = get_spec(COMPRESS)
    return run_batched(artefacts.session(COMPRESS), spec.inputs[0].name, held_out_patches, spec.max_batch_size)


@pytest.mark.slow
def test_compressor_codes_on_real_patches(held_out_patches: np.ndarray, held_out_codes: np.ndarray) -> None:
    assert held_out_codes.shape == (len(held_out_patches), 60, 60, 8)
    assert held_out_codes.dtype == np.int64
    assert held_out_codes.min() >= 0 and held_out_codes.max() < 10000
    assert len(np.unique(held_out_codes[..., 0])) > 100  # the codebook is used, not one code


@pytest.mark.slow
def test_onnx_and_torch_compressors_agree_on_real_patches(artefacts, held_out_patches: np.ndarray, held_out_codes: np.ndarray) -> None:
    with torch.no_grad():
        torch_codes = artefacts.torch_module(COMPRESS)(torch.from_numpy(held_out_patches[:2])).numpy()
    assert np.mean(torch_codes == held_out_codes[:2]) >= 0.999


@pytest.mark.slow
def test_reconstruction_error_falls_with_every_level(artefacts, held_out_patches: np.ndarray, held_out_codes: np.ndarray) -> None:
    spec = get_spec(DECOMPRESS)
    session = artefacts.session(DECOMPRESS)
    rms_errors = []
    for levels in range(1, 9):
        codes = held_out_codes.copy()
        codes[..., levels:] = compression.UNUSED_LEVEL
        decoded = run_batched(session, spec.inputs[0].name, codes, spec.max_batch_size)
        assert decoded.shape == held_out_patches.shape
        rms_errors.append(float(np.sqrt(np.mean((decoded - held_out_patches) ** 2))))
    signal = float(np.sqrt(np.mean(held_out_patches**2)))
    assert rms_errors[0] < signal  # one level already beats sending nothing (the band means)
    assert all(after < before for before, after in zip(rms_errors, rms_errors[1:])), rms_errors


@pytest.mark.slow
def test_decompressor_with_unused_levels_equals_decoding_the_truncated_sum(artefacts, held_out_codes: np.ndarray) -> None:
    decompressor = artefacts.torch_module(DECOMPRESS)
    quantizer, decoder = decompressor.quantizer, decompressor.decoder
    codes = torch.from_numpy(held_out_codes[:2])
    session = artefacts.session(DECOMPRESS)
    with torch.no_grad():
        for kept in (1, 3, 8):
            summed = sum(quantizer.codebooks[level][codes[..., level]] for level in range(kept))
            expected = decoder(summed.permute(0, 3, 1, 2))
            masked = compression.mask_levels(codes, kept)
            torch.testing.assert_close(decompressor(masked), expected, atol=1e-5, rtol=1e-5)
            onnx_out = session.run(None, {"int64_latent32_15": masked.numpy()})[0]
            np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_onnx_decompressor_rejects_codes_beyond_the_codebook(artefacts) -> None:
    codes = np.zeros((1, 60, 60, 8), dtype=np.int64)
    codes[0, 5, 5, 3] = 10000
    with pytest.raises(Exception, match="(?i)indices|out of|bounds"):
        artefacts.session(DECOMPRESS).run(None, {"int64_latent32_15": codes})
