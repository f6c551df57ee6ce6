"""UC6 locust breeding: one-class ConvLSTM classifier over precipitation/temperature sequences (D3.4 section 4).

Input: 4 time steps x [precipitation, temperature] x 12 x 12 grid cells, standardised per variable as
the model card says. Output: suitability probability in [0, 1] (positive-unlabelled training: high only
where breeding is likely).
"""

from __future__ import annotations

import torch
from torch import nn

TIME_STEPS = 4
VARIABLES = 2
WINDOW = 12
HIDDEN_CHANNELS = 16


class ConvLSTMCell(nn.Module):
    """ConvLSTM cell (Shi et al. 2015) without peepholes: the LSTM gates computed by convolutions.

    The gate convolution over concat(x, h) is split into an input part and a hidden part (the same
    linear map) so the first step, where h = c = 0, needs no zero-state tensors of dynamic batch size.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        padding = kernel_size // 2
        self.input_gates = nn.Conv2d(in_channels, 4 * hidden_channels, kernel_size, padding=padding)
        self.hidden_gates = nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel_size, padding=padding, bias=False)

    def _update(self, gates: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = torch.split(gates, self.hidden_channels, dim=1)
        new_c = torch.sigmoid(i) * torch.tanh(g)
        if c is not None:
            new_c = new_c + torch.sigmoid(f) * c
        return torch.sigmoid(o) * torch.tanh(new_c), new_c

    def first(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._update(self.input_gates(x), None)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._update(self.input_gates(x) + self.hidden_gates(h), c)


class LocustConvLSTM(nn.Module):
    """input [N, 4, 2, 12, 12] -> probability [N, 1]."""

    def __init__(self, hidden_channels: int = HIDDEN_CHANNELS) -> None:
        super().__init__()
        self.cell = ConvLSTMCell(VARIABLES, hidden_channels)
        self.head = nn.Linear(hidden_channels * WINDOW * WINDOW, 1)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        h, c = self.cell.first(sequence[:, 0])
        for step in range(1, TIME_STEPS):  # unrolled: the export graph has no loop
            h, c = self.cell(sequence[:, step], h, c)
        return torch.sigmoid(self.head(torch.flatten(h, 1)))
