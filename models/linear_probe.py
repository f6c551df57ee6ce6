"""Linear probe over the SimCLR representation: multi-label BigEarthNet classifier (D3.4 2.2.3).

Multi-label, so one sigmoid per class rather than a softmax over classes.
"""

from __future__ import annotations

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
