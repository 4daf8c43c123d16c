"""Multi-scale temporal convolution with a residual connection (CTR-GCN / MS-G3D style).

Parallel branches on (B, C, T, V): one temporal convolution per dilation (kernel ``kernel`` along T
after a 1x1 bottleneck with BN and ReLU), a max-pool branch (bottleneck, ReLU, 3-frame max-pool) and
a plain strided 1x1 branch; their outputs are concatenated to ``out_channels`` and added to the
(strided) input.

The branches' 1x1 bottlenecks are computed as one convolution and their output batch norms as one
(both act per channel, so this is CTR-GCN's branch structure with fewer, larger operations, which
matters on a CPU).
"""

from __future__ import annotations

import torch
from torch import nn


class MultiScaleTCN(nn.Module):
    """(B, C_in, T, V) float32 -> (B, C_out, ceil(T / stride), V)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, kernel: int = 5,
        dilations: tuple[int, ...] = (1, 2), residual: bool = True,
    ) -> None:
        super().__init__()
        n_branches = len(dilations) + 2
        base = out_channels // n_branches
        widths = [base] * n_branches
        widths[0] += out_channels - base * n_branches
        self.widths = widths
        self.n_relu = len(dilations) + 1  # the last (1x1) branch has no ReLU
        self.stride = stride
        self.bottleneck = nn.Conv2d(in_channels, out_channels, 1)
        self.bn_in = nn.BatchNorm2d(out_channels)
        self.temporal = nn.ModuleList(
            nn.Conv2d(w, w, (kernel, 1), stride=(stride, 1), padding=((kernel - 1) * d // 2, 0),
                      dilation=(d, 1))
            for w, d in zip(widths, dilations)
        )
        self.pool = nn.MaxPool2d((3, 1), stride=(stride, 1), padding=(1, 0))
        self.bn_out = nn.BatchNorm2d(out_channels)
        if not residual:
            self.residual: nn.Module | None = None
        elif in_channels == out_channels and stride == 1:
            self.residual = nn.Identity()
        else:
            self.residual = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=(stride, 1)),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn_in(self.bottleneck(x))
        parts = list(h.split(self.widths, dim=1))
        outs = [conv(torch.relu(p)) for conv, p in zip(self.temporal, parts)]
        outs.append(self.pool(torch.relu(parts[len(self.temporal)])))
        outs.append(parts[-1][:, :, ::self.stride])
        out = self.bn_out(torch.cat(outs, dim=1))
        if self.residual is not None:
            out = out + self.residual(x)
        return out
