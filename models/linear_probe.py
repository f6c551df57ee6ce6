"""Linear probe over the SimCLR representation: multi-label BigEarthNet classifier (D3.4 2.2.3).

Multi-label, so one sigmoid per class rather than a softmax over classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .simclr import REPRESENTATION_DIM


class LinearProbe(nn.Module):
    """representation_2048 [N, 2048] -> classes_probability [N, classes] in [0, 1]."""

    def __init__(self, classes: int, in_features: int = REPRESENTATION_DIM) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, classes)

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(representation))


# ---------------------------------------------------------------------------------------------
# Multi-label metrics and the label-frequency baseline (numpy; targets and predictions are {0, 1} [N, classes]).


def micro_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
    """F1 over every (sample, class) decision pooled: 2 TP / (2 TP + FP + FN); 0 when there is nothing to find."""
    tp = float(np.sum((targets == 1) & (predictions == 1)))
    wrong = float(np.sum(targets != predictions))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + wrong)


def macro_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
    """Mean per-class F1 over the classes present in ``targets`` (an absent class has no defined recall)."""
    present = np.flatnonzero(targets.sum(axis=0) > 0)
    if len(present) == 0:
        return 0.0
    return float(np.mean([micro_f1(targets[:, c], predictions[:, c]) for c in present]))


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall steps of one class: mean precision at the rank of each positive (ties broken
    by sample order after a stable sort)."""
    order = np.argsort(-scores, kind="stable")
    hits = targets[order] == 1
    if not hits.any():
        return float("nan")
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP over the classes present in ``targets``."""
    values = [average_precision(targets[:, c], scores[:, c]) for c in range(targets.shape[1]) if targets[:, c].any()]
    return float(np.mean(values)) if values else 0.0


@dataclass(frozen=True)
class FrequencyPrior:
    """The label-frequency baseline: every patch gets the ``k`` most frequent training labels."""

    frequencies: np.ndarray  # [classes] fraction of training patches carrying each class
    k: int

    @classmethod
    def fit(cls, targets: np.ndarray) -> FrequencyPrior:
        """Frequencies from the training targets; ``k`` maximises micro-F1 on those same training targets (ties:
        the smaller k)."""
        frequencies = targets.mean(axis=0)
        best_k, best = 1, -1.0
        for k in range(1, targets.shape[1] + 1):
            score = micro_f1(targets, cls(frequencies, k).predict(len(targets)))
            if score > best:
                best_k, best = k, score
        return cls(frequencies, best_k)

    def scores(self, count: int) -> np.ndarray:
        return np.repeat(self.frequencies[None, :], count, axis=0)

    def predict(self, count: int) -> np.ndarray:
        top = np.argsort(-self.frequencies, kind="stable")[:self.k]
        out = np.zeros((count, len(self.frequencies)), np.int64)
        out[:, top] = 1
        return out


def knn_label_scores(bank: np.ndarray, bank_targets: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """D3.4 2.2's feature-bank metric: each query's label score is the cosine-similarity-weighted mean of the
    multi-hot labels of its ``k`` most similar bank features (similarities clipped at 0)."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    similarity = unit(queries) @ unit(bank).T
    k = min(k, len(bank))
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    weights = np.maximum(np.take_along_axis(similarity, nearest, axis=1), 0.0) + 1e-12
    return np.einsum("qk,qkc->qc", weights, bank_targets[nearest]) / weights.sum(axis=1, keepdims=True)
