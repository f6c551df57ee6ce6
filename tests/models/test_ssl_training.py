"""make train-ssl's parts: LARS, NT-Xent, the augmentation stack, and the CLI's resumable run on a tiny corpus."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import corpus, sample_data, simclr, train_ssl
from models.specs import SENTINEL2_CARD
from services.core.model_card import ModelCard


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def test_lars_excludes_biases_and_norm_parameters_from_decay_and_adaptation() -> None:
    model = Tiny()
    groups = train_ssl.parameter_groups(model, weight_decay=0.5)
    decayed, excluded = groups
    assert [p is model.linear.weight for p in decayed["params"]] == [True]
    assert {id(p) for p in excluded["params"]} == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}
    assert excluded["weight_decay"] == 0 and not excluded["adapt"] and decayed["adapt"]

    # Zero gradients: only weight decay moves anything, and only the multiplicative weight.
    optimiser = train_ssl.LARS(groups, lr=0.1, momentum=0.0, weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimiser.step()
    after = dict(model.named_parameters())
    assert not torch.equal(after["linear.weight"], before["linear.weight"])
    for name in ("linear.bias", "norm.weight", "norm.bias"):
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


@pytest.mark.parametrize("gradient_scale", [1e-3, 1.0, 1e3])
def test_lars_trust_ratio_makes_a_layers_step_proportional_to_its_weight_norm(gradient_scale: float) -> None:
    model = Tiny()
    optimiser = train_ssl.LARS(train_ssl.parameter_groups(model, 0.0), lr=0.01, momentum=0.0, weight_decay=0.0,
                               eta=1.0)
    weight, bias = model.linear.weight, model.linear.bias
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    weight.grad = torch.full_like(weight, gradient_scale)
    bias.grad = torch.full_like(bias, gradient_scale)
    model.norm.weight.grad = torch.zeros_like(model.norm.weight)
    model.norm.bias.grad = torch.zeros_like(model.norm.bias)
    optimiser.step()
    # Adapted layer: ||step|| = lr * eta * ||w||, whatever the gradient's scale.
    assert math.isclose(float(torch.norm(weight.detach() - w0)), 0.01 * float(torch.norm(w0)), rel_tol=1e-4)
    # Excluded bias: a plain SGD step, lr * g.
    torch.testing.assert_close(b0 - bias.detach(), torch.full_like(b0, 0.01 * gradient_scale))


def test_nt_xent_prefers_matching_views_and_equals_log_2n_minus_1_when_all_views_agree() -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=generator)
    matched = train_ssl.nt_xent(z, z.clone())
    shuffled = train_ssl.nt_xent(z, z[torch.randperm(8, generator=generator)])
    assert float(matched) < float(shuffled)
    same = torch.ones(4, 16)  # every similarity equal: the positive is one of 2N - 1 equally likely candidates
    assert math.isclose(float(train_ssl.nt_xent(same, same)), math.log(7), rel_tol=1e-5)


def dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    rotations = [torch.rot90(image, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [r.flip(-1) for r in rotations]


def test_augment_keeps_shape_and_dtype_and_never_crops() -> None:
    batch = torch.randn(3, 10, 120, 120)
    view = train_ssl.augment(batch, torch.Generator().manual_seed(1))
    assert view.shape == batch.shape and view.dtype == batch.dtype
    assert not torch.equal(view, batch)
    # With colour jitter and blur off, every view is one of the 8 flips/rotations of the whole patch: nothing is
    # cropped, resized or shifted.
    geometric = train_ssl.augment(batch, torch.Generator().manual_seed(2), jitter_probability=0.0,
                                  blur_probability=0.0)
    for original, augmented in zip(batch, geometric):
        assert any(torch.equal(augmented, candidate) for candidate in dihedral(original))


def test_cosine_schedule_anneals_to_zero_without_restart() -> None:
    rates = [train_ssl.cosine_learning_rate(3e-4, step, 10) for step in range(15)]
    assert rates[0] == 3e-4 and rates[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(rates))  # never goes back up, even past the planned length


# Two scenes of the bundled sample (labelled by data/bigearthnet-sample/index.json): the kNN metric has a bank with
# leave-one-scene-out queries.
SCENES = ("S2A_MSIL2A_20170613T101031", "S2A_MSIL2A_20170617T113321")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    names = [n for scene in SCENES for n in [m for m in sample_data.sample_patch_names() if m.startswith(scene)][:3]]
    card = ModelCard(weights="seeded-init:seed=0", task="ssl-features", **SENTINEL2_CARD)
    normalised = sample_data.load_patches(names, card)
    mean = np.asarray(card.band_mean, np.float32)[:, None, None]
    std = np.asarray(card.band_std, np.float32)[:, None, None]
    patches = np.clip(np.rint(normalised * std + mean), 0, 65535).astype(np.uint16)
    np.savez(root / "sample.npz", patches=patches, patch_ids=np.array(names),
             scenes=np.array([corpus._scene_of_patch(n) for n in names]), split=np.array(["train"] * len(names)),
             cloud_fraction=np.full(len(names), -1.0, np.float32))
    (root / "corpus.json").write_text(json.dumps(
        {"format": corpus.CORPUS_FORMAT, "sources": {"sample": {"level": "L2A", "file": "sample.npz"}}}))
    return root


def run(root: Path, out: Path, work: Path, *extra: str) -> dict:
    assert train_ssl.main(["--trunk", "tiny", "--data-root", str(root), "--output-dir", str(out), "--work-dir",
                           str(work), "--batch", "3", "--accumulation", "2", "--threads", "1", "--eval-every", "1",
                           *extra]) == 0
    return json.loads((out / train_ssl.CHECKPOINT_NAME).with_suffix(".json").read_text())


@pytest.mark.slow
def test_train_ssl_is_seeded_resumable_and_writes_an_fp16_checkpoint(tiny_corpus: Path, tmp_path: Path) -> None:
    straight = run(tiny_corpus, tmp_path / "a", tmp_path / "wa", "--steps", "2", "--restart")
    assert straight["steps"] == 2 and straight["cosine_steps"] == 2 and straight["images_seen"] == 2 * 2 * 2 * 3
    assert [e["step"] for e in straight["knn"]] == [0, 1, 2]
    assert all(0.0 <= e["train_loso_micro_f1"] <= 1.0 for e in straight["knn"])
    assert straight["corpus"]["patches"] == 5 and straight["corpus"]["levels"] == ["L2A", "L1C"]

    # A run cut by its budget after the first update, then resumed: same cosine, same weights as straight through.
    cut = run(tiny_corpus, tmp_path / "c", tmp_path / "wc", "--steps", "2", "--restart", "--budget-minutes", "1e-6")
    assert cut["steps"] == 1 and cut["cosine_steps"] == 2
    resumed = run(tiny_corpus, tmp_path / "c", tmp_path / "wc", "--steps", "2")
    assert resumed["steps"] == 2 and resumed["sha256"] == straight["sha256"]

    state = torch.load(tmp_path / "a" / train_ssl.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    model = simclr.SimCLRModel(layers=simclr.TINY_LAYERS)
    model.load_state_dict(state)  # the served module's layout
    features = simclr.representations(model.backbone, torch.zeros(2, 10, 120, 120))
    assert features.shape == (2, simclr.REPRESENTATION_DIM)
