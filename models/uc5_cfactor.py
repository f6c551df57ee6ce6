"""UC5 soil erosion: C-factor regressor on a Sentinel-2 crop (D3.4 section 4).

D3.4: "a 3-layer convolutional network followed by a 1-layer multi-layer perceptron" mapping a crop
centred on a LUCAS point to its C-factor in [0, 1]. Our crop: 24 x 24 pixels of the 10 m grid (240 m),
the same 10 bands and normalisation as the SimCLR model, so one preprocessing serves both.
"""

from __future__ import annotations

import torch
from torch import nn

CROP_SIZE = 24


class CFactorRegressor(nn.Module):
    """input_sentinel2_10_bands_24 [N, 10, 24, 24] -> c_factor [N, 1] in [0, 1]."""

    def __init__(self, in_bands: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_bands, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 24 -> 12
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 12 -> 6
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.mean(self.features(x), dim=(2, 3))
        return torch.sigmoid(self.head(pooled))
