"""make train-compressor on a tiny corpus of real patches: seeded, resumable, and what it writes is usable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import compression, corpus, sample_data, train_compressor
from models.specs import SENTINEL2_CARD
from services.core import transform_codes as tc
from services.core.model_card import ModelCard

# Two L2A scenes of the bundled sample: the first in name order is a development scene (post-filter check), the
# second trains the post-filter.
SCENES = ("S2A_MSIL2A_20170613T101031", "S2A_MSIL2A_20170617T113321")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    names = [n for scene in SCENES for n in [m for m in sample_data.sample_patch_names() if m.startswith(scene)][:3]]
    assert {corpus._scene_of_patch(n) for n in names} == set(SCENES)
    card = ModelCard(weights="seeded-init:seed=0", task="compress", **SENTINEL2_CARD)
    normalised = sample_data.load_patches(names, card)
    mean = np.asarray(card.band_mean, np.float32)[:, None, None]
    std = np.asarray(card.band_std, np.float32)[:, None, None]
    patches = np.clip(np.rint(normalised * std + mean), 0, 65535).astype(np.uint16)
    scenes = [corpus._scene_of_patch(n) for n in names]
    np.savez(root / "sample.npz", patches=patches, patch_ids=np.array(names), scenes=np.array(scenes),
             split=np.array(["train"] * len(names)), cloud_fraction=np.full(len(names), -1.0, np.float32))
    (root / "corpus.json").write_text(json.dumps(
        {"format": corpus.CORPUS_FORMAT, "sources": {"sample": {"level": "L2A", "file": "sample.npz"}}}))
    return root


def train(corpus_root: Path, out: Path, work: Path, steps: int, *extra: str) -> dict:
    assert train_compressor.main(["--corpus", str(corpus_root), "--out", str(out), "--work-dir", str(work),
                                  "--steps", str(steps), "--batch", "2", "--crop", "32", *extra]) == 0
    return json.loads((out / "compression.json").read_text())


@pytest.mark.slow
def test_training_is_seeded_resumable_and_writes_a_usable_checkpoint(tiny_corpus: Path, tmp_path: Path) -> None:
    straight = train(tiny_corpus, tmp_path / "a", tmp_path / "wa", 4, "--restart")
    again = train(tiny_corpus, tmp_path / "b", tmp_path / "wb", 4, "--restart")
    assert straight["sha256"] == again["sha256"]  # seeded: equal runs give equal weights

    train(tiny_corpus, tmp_path / "c", tmp_path / "wc", 2, "--restart")
    resumed = train(tiny_corpus, tmp_path / "c", tmp_path / "wc", 4)  # continues from step 2
    assert resumed["post_filter"]["steps"] == 4
    assert resumed["sha256"] == straight["sha256"]

    assert straight["corpus"]["split"] == "train" and straight["corpus"]["patches"] == 5
    assert straight["post_filter"]["development_scenes"] == [SCENES[0]]
    state = torch.load(tmp_path / "a" / "compression.pt", map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float16}
    codec = compression.BlockTransformCodec()
    codec.load_state_dict(state)
    basis = codec.basis.to(torch.float64)
    torch.testing.assert_close(basis.T @ basis, torch.eye(128, dtype=torch.float64), atol=2e-2, rtol=0)
    prior = tc.LaplaceContextPrior.from_text(straight["entropy_prior"])
    assert prior.sha256 == straight["entropy_prior_sha256"]
    # Calibration: coarser quantiser scales and fewer levels never cost more bits on the training patches.
    assert (np.diff(prior.train_bpp, axis=0) <= 1e-9).all() and (np.diff(prior.train_bpp, axis=1) >= -1e-9).all()
