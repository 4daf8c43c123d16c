"""Fully convolutional network for sensor time series (Wang, Yan, Oates 2017): the time branch
when the layout is ``series`` (V = 1).

Blocks of Conv1d -> BatchNorm -> ReLU with kernels 7, 5, 3 (the original's 8 made odd so "same"
padding stays symmetric; the middle block repeats when there are more than three), widths
``c, 2c, ..., 2c, c``, then average pooling over time.
"""

from __future__ import annotations

import torch
from torch import nn


def fcn_plan(channels: int, blocks: int) -> list[tuple[int, int]]:
    """(width, kernel) of each block."""
    if blocks <= 1:
        return [(channels, 7)]
    if blocks == 2:
        return [(channels, 7), (channels, 3)]
    middle = [(2 * channels, 5)] * (blocks - 2)
    return [(channels, 7), *middle, (channels, 3)]


class FCN(nn.Module):
    """(B, C_in, T) float32 -> (B, out_channels, T) features; ``out_channels`` = last width.

    The caller pools over time (globally, and per segment in ``net.SeriesTimeBranch``)."""

    def __init__(self, in_channels: int, *, channels: int = 32, blocks: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for w, k in fcn_plan(channels, blocks):
            layers += [nn.Conv1d(width, w, k, padding="same"), nn.BatchNorm1d(w),
                       nn.ReLU(inplace=True)]
            width = w
        self.body = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
