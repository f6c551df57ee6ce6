"""make train-probe's parts: multi-label metrics, the frequency prior, the kNN scores, the probe fit, scene folds and
the CLI on a tiny corpus."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import corpus, linear_probe, sample_data, simclr, train_probe, train_ssl
from models.specs import SENTINEL2_CARD
from services.core.model_card import ModelCard

TARGETS = np.array([[1, 0, 1], [1, 1, 0]])


def test_micro_and_macro_f1_on_a_hand_checked_case() -> None:
    predictions = np.array([[1, 0, 0], [1, 1, 1]])
    # TP 3 (two of class 0, one of class 1), FP 1, FN 1: 2*3 / (2*3 + 2) = 0.75.
    assert linear_probe.micro_f1(TARGETS, predictions) == pytest.approx(0.75)
    # Class 0: F1 1, class 1: F1 1, class 2: TP 0 -> F1 0; mean 2/3.
    assert linear_probe.macro_f1(TARGETS, predictions) == pytest.approx(2 / 3)
    assert linear_probe.micro_f1(TARGETS, TARGETS) == 1.0
    assert linear_probe.micro_f1(TARGETS, np.zeros_like(TARGETS)) == 0.0


def test_average_precision_on_a_hand_checked_ranking() -> None:
    # Ranked by score: pos, neg, pos -> precisions at the positives 1/1 and 2/3 -> AP 5/6.
    assert linear_probe.average_precision(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.1])) == pytest.approx(5 / 6)
    scores = np.array([[0.9, 0.1, 0.2], [0.8, 0.7, 0.6]])
    # Class 0: both positives on top (AP 1); class 1: the positive ranks first (1); class 2: second (1/2).
    assert linear_probe.mean_average_precision(TARGETS, scores) == pytest.approx((1 + 1 + 0.5) / 3)


def test_frequency_prior_predicts_the_k_most_frequent_labels_with_k_chosen_on_training_targets() -> None:
    targets = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]])
    prior = linear_probe.FrequencyPrior.fit(targets)
    # k = 1: TP 4, FP 0, FN 4 -> 8/12; k = 2: TP 6, FP 2, FN 2 -> 12/16 = 0.75 (best); k = 3: TP 7, FP 5 -> 14/20.
    assert prior.k == 2
    np.testing.assert_array_equal(prior.predict(2), [[1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(prior.scores(1), [[1.0, 0.5, 0.25, 0.25]])


def test_knn_label_scores_weight_the_nearest_bank_labels_by_similarity() -> None:
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = np.array([[1, 0], [0, 1], [1, 1]])
    query = np.array([[2.0, 0.0]])  # cosine 1 to bank 0, 0.707 to bank 2, 0 to bank 1
    scores = linear_probe.knn_label_scores(bank, labels, query, k=2)
    w = np.array([1.0, np.sqrt(0.5)])
    np.testing.assert_allclose(scores, [[1.0, w[1] / w.sum()]], rtol=1e-6)


def test_fit_probe_folds_the_feature_standardisation_into_the_served_layer() -> None:
    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(5.0, 3.0, size=(40, 8))).astype(np.float32)
    targets = np.stack([features[:, 0] > 5.0, features[:, 1] < 5.0], axis=1).astype(np.int64)
    probe = train_probe.fit_probe(features, targets, l2=1e-4, steps=300)
    predictions = (train_probe.probe_scores(probe, features) >= 0.5).astype(np.int64)
    assert linear_probe.micro_f1(targets, predictions) > 0.9  # learnt on raw features, no external scaler


def test_scene_folds_keep_every_scene_in_exactly_one_fold() -> None:
    scenes = np.array(["a", "a", "b", "c", "c", "c", "d", "e"])
    folds = train_probe.scene_folds(scenes, 3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(scenes)))
    assert all(len(set(scenes[f])) >= 1 for f in folds)
    for i, fold in enumerate(folds):
        others = np.concatenate([f for j, f in enumerate(folds) if j != i])
        assert not set(scenes[fold]) & set(scenes[others])


# The bundled sample's patches with 43-class (BENv1) labels, of its first five scenes in name order: the last of them
# plays the validation split.
SCENE_COUNT = 5


@pytest.fixture(scope="module")
def labelled_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    labels = corpus.bigearthnet_labels(root)  # no cached archives here: the bundled sample's index only
    labelled = sorted(m for m in sample_data.sample_patch_names() if labels[m].nomenclature == 43)
    chosen = sorted({corpus._scene_of_patch(n) for n in labelled})[:SCENE_COUNT]
    names = [n for n in labelled if corpus._scene_of_patch(n) in chosen]
    card = ModelCard(weights="seeded-init:seed=0", task="ssl-features", **SENTINEL2_CARD)
    normalised = sample_data.load_patches(names, card)
    mean = np.asarray(card.band_mean, np.float32)[:, None, None]
    std = np.asarray(card.band_std, np.float32)[:, None, None]
    scenes = [corpus._scene_of_patch(n) for n in names]
    np.savez(root / "sample.npz", patches=np.clip(np.rint(normalised * std + mean), 0, 65535).astype(np.uint16),
             patch_ids=np.array(names), scenes=np.array(scenes),
             split=np.array(["validation" if s == chosen[-1] else "train" for s in scenes]),
             cloud_fraction=np.full(len(names), -1.0, np.float32))
    (root / "corpus.json").write_text(json.dumps(
        {"format": corpus.CORPUS_FORMAT, "sources": {"sample": {"level": "L2A", "file": "sample.npz"}}}))
    torch.manual_seed(7)
    (root / "trunk.pt").write_bytes(train_ssl.fp16_state_bytes(simclr.SimCLRModel(layers=simclr.TINY_LAYERS)))
    return root, scenes


def run(root: Path, out: Path) -> dict:
    assert train_probe.main(["--trunk", "tiny", "--ssl-checkpoint", str(root / "trunk.pt"), "--data-root", str(root),
                             "--output-dir", str(out), "--threads", "1", "--probe-steps", "20"]) == 0
    return json.loads((out / train_probe.EVALUATION_NAME).read_text())


@pytest.mark.slow
def test_train_probe_cli_is_deterministic_and_writes_servable_probes(labelled_corpus: tuple[Path, list[str]],
                                                                     tmp_path: Path) -> None:
    root, scenes = labelled_corpus
    validation_scene = max(scenes)
    held_out = scenes.count(validation_scene)
    first, second = run(root, tmp_path / "a"), run(root, tmp_path / "b")
    assert first == second  # seeded subsets, zero-initialised full-batch fits: a rerun gives the same record
    for classes, name in train_probe.PROBE_NAMES.items():
        record = first["probes"][str(classes)]
        assert record["labelled_train_patches"] == len(scenes) - held_out and record["held_out_patches"] == held_out
        assert record["held_out_scenes"] == [validation_scene]
        assert record["cross_validation"]["patches"] == len(scenes)
        assert record["cross_validation"]["scenes"] == SCENE_COUNT
        assert [row["fraction"] for row in record["label_efficiency_held_out"]] == list(train_probe.FRACTIONS)
        for row in record["label_efficiency_held_out"]:
            for trunk in ("ssl", "random", "prior"):
                assert set(row[trunk]) == {"micro_f1", "macro_f1", "map"}
        payload = (tmp_path / "a" / name).read_bytes()
        assert hashlib.sha256(payload).hexdigest() == record["sha256"]
        probe = linear_probe.LinearProbe(classes)
        probe.load_state_dict(torch.load(tmp_path / "a" / name, weights_only=True))  # the served module's layout


def test_demo_states_the_probes_held_out_figures_for_the_checkpoint_it_serves(tmp_path: Path) -> None:
    from services.local_platform.demo import probe_quality_lines

    def scores(micro: float) -> dict[str, float]:
        return {"micro_f1": micro, "macro_f1": 0.1, "map": 0.2}

    record = {"classes": 43, "sha256": "ab" * 32, "labelled_train_patches": 29, "held_out_patches": 7,
              "label_efficiency_held_out": [{"ssl": scores(0.11), "random": scores(0.22), "prior": scores(0.33)},
                                            {"ssl": scores(0.61), "random": scores(0.42), "prior": scores(0.53)}],
              "cross_validation": {"patches": 36, "ssl": scores(0.64), "random": scores(0.5), "prior": scores(0.45)}}
    path = tmp_path / "probe-evaluation.json"
    path.write_text(json.dumps({"probes": {"43": record}}))
    text = " ".join(probe_quality_lines(f"checkpoint:probe-43.pt:sha256={'ab' * 32}", path))
    # The 100 % row (the served probe's training set), not a smaller label budget.
    assert "micro-F1 0.61 vs 0.53 for the label-frequency prior and 0.42 for the random-trunk probe" in text
    assert "0.64 vs prior 0.45" in text and "7 patches of unseen scenes" in text
    assert probe_quality_lines(f"checkpoint:probe-43.pt:sha256={'cd' * 32}", path) == []  # another checkpoint
    assert probe_quality_lines("seeded-init:seed=2", path) == []
