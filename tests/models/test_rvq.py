"""The D3.4 residual-VQ compressor (models/rvq.py) and its training CLI (make train-compressor CODEC=rvq).

ONNX parity of the exported pair against torch runs with every other served model in test_model_contract.py
(``Bigearth-net-rvq-*`` are in ``SPECS``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import rvq, train_compressor, train_rvq
from tests.models.test_train_compressor import SCENES, tiny_corpus  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def codec() -> rvq.ResidualVQCodec:
    torch.manual_seed(0)
    return rvq.ResidualVQCodec().eval()


def test_served_shapes_and_code_range(codec: rvq.ResidualVQCodec) -> None:
    x = torch.randn(2, 10, 120, 120)
    with torch.no_grad():
        codes = rvq.RVQCompressor(codec)(x)
        restored = rvq.RVQDecompressor(codec)(codes)
    assert codes.shape == (2, 60, 60, 8) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < rvq.CODEBOOK_SIZE
    assert restored.shape == (2, 10, 120, 120) and torch.isfinite(restored).all()


def test_nearest_code_never_leaves_a_larger_residual_than_the_zero_code() -> None:
    """With a zero vector in every codebook, the nearest-code search can only shrink the residual, level by level;
    the chosen index is the brute-force nearest one and the cumulative sums are what dequantise gives back."""
    torch.manual_seed(1)
    quantiser = rvq.ResidualQuantiser(levels=4, size=50, dim=6)
    quantiser.codebooks.copy_(torch.randn(4, 50, 6) * torch.tensor([1.0, 0.5, 0.25, 0.1])[:, None, None])
    quantiser.codebooks[:, 0] = 0.0
    vectors = torch.randn(300, 6)
    indices, cumulative, residuals = quantiser.quantise(vectors)
    norms = [float(residuals[level].norm(dim=1).mean()) for level in range(4)]
    norms.append(float((vectors - cumulative[-1]).norm(dim=1).mean()))
    assert all(later <= earlier for earlier, later in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.8 * norms[0]
    for level in range(4):
        brute = torch.cdist(residuals[level], quantiser.codebooks[level]).argmin(dim=1)
        assert torch.equal(indices[:, level], brute)
        assert torch.allclose(quantiser.dequantise(rvq.keep_levels(indices, level + 1)), cumulative[level], atol=1e-5)


def test_unused_levels_read_as_absent_and_large_codes_clamp(codec: rvq.ResidualVQCodec) -> None:
    codes = torch.randint(0, rvq.CODEBOOK_SIZE, (1, 60, 60, 8))
    two = rvq.keep_levels(codes, 2)
    assert (two[..., 2:] == -1).all() and torch.equal(two[..., :2], codes[..., :2])
    books = codec.quantiser.codebooks
    expected = books[0][codes[..., 0]] + books[1][codes[..., 1]]
    assert torch.allclose(codec.quantiser.dequantise(two), expected, atol=1e-6)
    other_negative = torch.where(two < 0, torch.full_like(two, -7), two)  # any negative code = not used
    with torch.no_grad():
        assert torch.equal(codec.reconstruct(two), codec.reconstruct(other_negative))
        assert not torch.allclose(codec.reconstruct(two), codec.reconstruct(codes))
    too_large = codes.clone()
    too_large[..., 0] = 123_456
    clamped = codes.clone()
    clamped[..., 0] = rvq.CODEBOOK_SIZE - 1
    assert torch.equal(codec.quantiser.dequantise(too_large), codec.quantiser.dequantise(clamped))


def test_codebook_usage_counts_distinct_codes_and_perplexity() -> None:
    codes = np.full((1, 60, 60, 3), -1, np.int64)
    codes[..., 0] = np.arange(3600).reshape(60, 60) % 4  # 4 codes, equally often
    codes[..., 1] = 17  # one code
    usage = rvq.codebook_usage(codes)
    assert [u.level for u in usage] == [1, 2, 3]
    assert usage[0].used_fraction == pytest.approx(4 / rvq.CODEBOOK_SIZE)
    assert usage[0].perplexity == pytest.approx(4.0) and usage[0].entropy_bits == pytest.approx(2.0)
    assert usage[1].used_fraction == pytest.approx(1 / rvq.CODEBOOK_SIZE) and usage[1].perplexity == pytest.approx(1.0)
    assert usage[2].used_fraction == 0.0  # every code of level 3 is -1 (unused): nothing counted


def test_fp16_checkpoint_round_trip(codec: rvq.ResidualVQCodec, tmp_path: Path) -> None:
    path = tmp_path / "rvq.pt"
    sha256 = train_rvq.save_checkpoint(codec, path)
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float16}
    assert not any("ema_" in name or "last_used" in name for name in state)  # training statistics stay out
    loaded = train_rvq.load_fp16_checkpoint(path)
    for name, value in codec.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.to(torch.float16).to(value.dtype))


def train(corpus_root: Path, out: Path, work: Path, steps: int, *extra: str) -> dict:
    assert train_compressor.main(["--codec", "rvq", "--corpus", str(corpus_root), "--out", str(out), "--work-dir",
                                  str(work), "--steps", str(steps), "--batch", "2", "--crop", "16",
                                  "--warmup-steps", "2", "--init-patches", "1", "--usage-patches", "1",
                                  "--dev-patches", "1", "--save-every", "1", "--threads", "1", *extra]) == 0
    return json.loads((out / "rvq.json").read_text())


@pytest.mark.slow
def test_training_cli_is_seeded_resumable_and_reports_usage(tiny_corpus: Path, tmp_path: Path) -> None:  # noqa: F811
    straight = train(tiny_corpus, tmp_path / "a", tmp_path / "wa", 4, "--restart")
    train(tiny_corpus, tmp_path / "b", tmp_path / "wb", 2, "--restart")
    resumed = train(tiny_corpus, tmp_path / "b", tmp_path / "wb", 4)  # continues from step 2
    assert resumed["training"]["steps"] == 4 and resumed["training"]["warmup_steps"] == 2
    assert resumed["sha256"] == straight["sha256"]  # seeded, and resuming changes nothing
    assert straight["corpus"]["split"] == "train" and straight["corpus"]["development_scenes"] == [SCENES[0]]
    for part in ("fitted", "development"):
        rows = straight["codebook_usage"][part]
        assert [row["level"] for row in rows] == list(range(1, 9))
        assert all(0 < row["used_fraction"] <= 1 and row["perplexity"] >= 1 for row in rows)
    assert len(straight["development_rms_percent_per_levels"]) == 8
    assert straight["bytes"] == (tmp_path / "a" / "rvq.pt").stat().st_size
    train_rvq.load_fp16_checkpoint(tmp_path / "a" / "rvq.pt")  # the served architecture loads it strictly
