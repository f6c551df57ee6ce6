"""The device a training CLI runs on: ``--device auto`` is CUDA when present, else the CPU."""

from __future__ import annotations

import torch


def training_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else CPU; any other name (``cpu``, ``cuda``, ``cuda:1``) as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
