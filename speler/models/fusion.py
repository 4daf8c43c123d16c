"""Attention fusion of embedding vectors: shallow→middle→deep inside the frequency branch, and
the cross-domain fusion of the time and frequency embeddings.

``AttentionFusion`` lets a query vector attend over a few token vectors (single head, scaled dot
product) and adds the result back: ``LayerNorm(q + W_o softmax(q K^T / sqrt(d)) V)``.
``CrossDomainFusion`` applies it once per domain, each attending over both domains' tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AttentionFusion(nn.Module):
    """query (B, D), tokens (B, L, D) -> (B, D) float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.q(query).unsqueeze(1)  # (B, 1, D)
        att = torch.softmax((q * self.k(tokens)).sum(-1) * self.scale, dim=-1)  # (B, L)
        mixed = (att.unsqueeze(-1) * self.v(tokens)).sum(1)
        return self.norm(query + self.out(mixed))


class CrossDomainFusion(nn.Module):
    """(time (B, D), freq (B, D)) -> fused (time (B, D), freq (B, D)); each attends to both."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.time = AttentionFusion(dim)
        self.freq = AttentionFusion(dim)

    def forward(self, h_time: torch.Tensor,
                h_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.stack([h_time, h_freq], dim=1)
        return self.time(h_time, tokens), self.freq(h_freq, tokens)
