"""SimCLR feature extractor for Sentinel-2: ResNet-101 on 10 bands plus the training projection head.

Plain torch (no torchvision): ResNet v1.5 (stride on the 3x3 convolution of the bottleneck),
bottleneck blocks [3, 4, 23, 3], first convolution over 10 bands, global average pooling to 2048.
D3.4 2.2.4: the projection MLP maps the 2048 features to 128 and then to the 64-d contrastive output;
serving uses the backbone representation only (the head is a training device, SimCLR section 4.2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from services.core import sentinel2

RESNET101_LAYERS = (3, 4, 23, 3)
# One bottleneck per stage: the same contract (10 bands -> 2048 features) at a fraction of the cost, for tests only.
TINY_LAYERS = (1, 1, 1, 1)
REPRESENTATION_DIM = 2048
PROJECTION_HIDDEN = 128
PROJECTION_DIM = 64


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """ResNet trunk without the classifier: [N, bands, H, W] -> [N, 2048]."""

    def __init__(self, in_bands: int = 10, layers: tuple[int, ...] = RESNET101_LAYERS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_bands, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        in_channels = 64
        for stage, blocks in enumerate(layers):
            width = 64 * 2**stage
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for block in range(blocks):
                stage_blocks.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_features = in_channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Zero-init residual (Goyal et al. 2017): every block starts as identity, so 33 blocks of
        # untrained weights do not blow activations up and an untrained model gives O(1) features.
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(torch.mean(x, dim=(2, 3)), 1)


class SimCLRModel(nn.Module):
    """What SimCLR trains: backbone + projection head. ``forward`` returns the 64-d projection."""

    def __init__(self, in_bands: int = 10, layers: tuple[int, ...] = RESNET101_LAYERS) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(in_bands, layers)
        self.projection_head = nn.Sequential(
            nn.Linear(REPRESENTATION_DIM, PROJECTION_HIDDEN, bias=False),
            nn.BatchNorm1d(PROJECTION_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Linear(PROJECTION_HIDDEN, PROJECTION_DIM),
        )

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))


class SimCLRRepresentation(nn.Module):
    """The served graph: input_sentinel2_10_bands_120 -> representation_2048 (projection head removed)."""

    def __init__(self, model: SimCLRModel) -> None:
        super().__init__()
        self.backbone = model.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def standardise(patches: np.ndarray) -> torch.Tensor:
    """uint16 DN [N, 10, H, W] -> the served input: (DN - band_mean) / band_std with the card's BigEarthNet
    statistics in SIMCLR band order (contracts doc section 6)."""
    mean = np.array([sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in sentinel2.SIMCLR_BAND_ORDER], np.float32)
    std = np.array([sentinel2.BIGEARTHNET_BAND_STD[b] for b in sentinel2.SIMCLR_BAND_ORDER], np.float32)
    return torch.from_numpy((patches.astype(np.float32) - mean[:, None, None]) / std[:, None, None])


@torch.no_grad()
def representations(backbone: nn.Module, inputs: torch.Tensor, chunk: int = 16,
                    device: torch.device | None = None) -> np.ndarray:
    """representation_2048 of standardised inputs [N, 10, H, W] in eval mode (batch-norm running statistics),
    as the served graph computes them; the module's train/eval state is restored afterwards."""
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    parts = [backbone(inputs[i:i + chunk].to(device)).float().cpu().numpy() for i in range(0, len(inputs), chunk)]
    backbone.train(was_training)
    return np.concatenate(parts) if parts else np.zeros((0, REPRESENTATION_DIM), np.float32)
