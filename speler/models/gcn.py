"""Graph convolution over a skeleton layout, with a learned per-channel-group topology refinement.

The static graph comes from the layout's bones (``Layout.bones``) as three partitions, as in
ST-GCN's spatial strategy and CTR-GCN: the joint itself (self loop), its parents (inward edges) and
its children (outward edges), each row-normalised. On top of that each partition k gets

* a learned, sample-independent offset ``B_k`` (V, V), initialised at zero, and
* a sample-dependent refinement per channel group g (CTR-GCN's channel-wise topology
  refinement, with the channels of a group sharing one topology to keep it cheap on a CPU):
  ``Q_kg(x) = conv(tanh(phi(x̄)_u - psi(x̄)_v))`` on the time-averaged input x̄, scaled by a learned
  ``alpha`` that starts at zero.

Joints gather from their neighbours first (per partition and input-channel group), then a 1x1
convolution mixes the K·C_in aggregated channels into C_out. By linearity this equals CTR-GCN's
"transform, then aggregate" for the static graph, and it is cheaper whenever C_in <= C_out. At
initialisation the layer therefore aggregates exactly along the layout's bones and it learns which
other joint pairs matter (both hands for clapping, hand and foot for kicking) per channel group.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from speler.data.layouts import Layout


def layout_partitions(layout: Layout) -> np.ndarray:
    """The layout's graph as 3 partitions, float32 (3, V, V): self, inward (to parent), outward.

    Row u of partition k holds the weights with which joint u gathers from joints v; each non-empty
    row of the inward and outward partitions sums to 1. The union of the non-zero entries is the
    layout's bones (both directions) plus self loops.
    """
    v = layout.num_joints
    inward = np.zeros((v, v), dtype=np.float32)
    for child, parent in layout.bones:
        if child != parent:
            inward[child, parent] = 1.0
    outward = inward.T.copy()

    def row_normalise(a: np.ndarray) -> np.ndarray:
        d = a.sum(1, keepdims=True)
        return np.where(d > 0, a / np.maximum(d, 1e-12), 0.0).astype(np.float32)

    return np.stack([np.eye(v, dtype=np.float32), row_normalise(inward), row_normalise(outward)])


class GraphConv(nn.Module):
    """CTR-style graph convolution: (B, C_in, T, V) float32 -> (B, C_out, T, V).

    partitions: float32 (K, V, V) from ``layout_partitions``.
    groups: input-channel groups that each get their own refined topology (1 if it does not divide
        C_in; C_in for one topology per channel as in CTR-GCN).
    rel_channels: width of the pairwise-relation features that produce the refinement.
    """

    def __init__(
        self, in_channels: int, out_channels: int, partitions: np.ndarray, *, groups: int = 4,
        rel_channels: int = 8,
    ) -> None:
        super().__init__()
        k, v, _ = partitions.shape
        groups = max(1, min(groups, in_channels))
        if in_channels % groups:
            groups = 1
        self.k, self.v, self.groups = k, v, groups
        self.in_channels, self.out_channels, self.rel = in_channels, out_channels, rel_channels
        self.register_buffer("A", torch.as_tensor(partitions, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(k, v, v))
        self.alpha = nn.Parameter(torch.zeros(1))
        self.phi = nn.Conv1d(in_channels, k * rel_channels, 1)
        self.psi = nn.Conv1d(in_channels, k * rel_channels, 1)
        self.expand = nn.Conv2d(k * rel_channels, k * groups, 1, groups=k)
        self.mix = nn.Conv2d(k * in_channels, out_channels, 1)
        self.bn = nn.BatchNorm2d(out_channels)
        if in_channels == out_channels:
            self.down: nn.Module = nn.Identity()
        else:
            self.down = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1),
                                      nn.BatchNorm2d(out_channels))
        self.act = nn.ReLU(inplace=True)

    @property
    def adjacency(self) -> torch.Tensor:
        """Static graph: sum of the partitions, float32 (V, V); non-zero on bones and self loops."""
        return self.A.sum(0)

    def topology(self, x: torch.Tensor) -> torch.Tensor:
        """Refined adjacency per sample, partition and channel group, (B, K, G, V, V)."""
        b = x.shape[0]
        xm = x.mean(2)  # (B, C_in, V)
        p = self.phi(xm)  # (B, K*R, V)
        q = self.psi(xm)
        rel = torch.tanh(p.unsqueeze(-1) - q.unsqueeze(-2))  # (B, K*R, V, V)
        refine = self.expand(rel).view(b, self.k, self.groups, self.v, self.v)
        static = (self.A + self.B)[None, :, None]  # (1, K, 1, V, V)
        return static + self.alpha * refine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, v = x.shape
        g = self.groups
        adj = self.topology(x)
        xg = x.reshape(b, g, (c // g) * t, v)
        # agg[b, k, g, (c, t), u] = sum_v adj[b, k, g, u, v] * x[b, g, (c, t), v]
        agg = torch.matmul(xg.unsqueeze(1), adj.transpose(-1, -2))  # (B, K, G, C/G*T, V)
        y = self.mix(agg.reshape(b, self.k * c, t, v))
        return self.act(self.bn(y) + self.down(x))
