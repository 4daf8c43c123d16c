"""Frequency branch: FFT along time as amplitude and phase channels, gated convolutions over the
frequency axis, and shallow→middle→deep attention fusion.

Input (B, C, T, V) (persons folded into B). The real FFT along T gives F = T // 2 + 1 bins per
channel and joint; the branch sees 3·C·V channels over F bins: log-amplitude ``a = log1p|X|`` and
the phase as the amplitude-weighted unit phasor ``(a·cos, a·sin)`` (see ``spectrum``). There is no
per-channel input normalisation: it would blow the noise of still joints up to the size of the
motion. Five gated convolution layers ``conv(x) · sigmoid(gate(x))`` follow
(1 shallow, 2 middle, 2 deep); the pooled shallow features are fused into the middle ones and
those into the deep ones by attention (``fusion.AttentionFusion``).
"""

from __future__ import annotations

import torch
from torch import nn

from speler.models.fusion import AttentionFusion


def spectrum(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, V) float -> (B, 3·C·V, T // 2 + 1) spectrum features, float32 (float64 for a
    float64 x).

    Rows: log-amplitude ``a = log1p|X|``, then the phase as ``a·cos(angle)`` and ``a·sin(angle)``.
    Weighting the phase by the amplitude keeps the (random) phase of near-silent bins and joints
    from looking as loud as the phase of the motion, and avoids the jump of the angle at ±pi.
    """
    b, c, t, v = x.shape
    seq = x.to(torch.promote_types(x.dtype, torch.float32)).permute(0, 1, 3, 2).reshape(b, c * v, t)
    spec = torch.fft.rfft(seq, dim=-1, norm="ortho")
    mag = spec.abs()
    amp = torch.log1p(mag)
    scale = amp / mag.clamp_min(1e-8)  # a / |X|, so a·cos = Re·a/|X|
    return torch.cat([amp, spec.real * scale, spec.imag * scale], dim=1)


class GatedConv(nn.Module):
    """(B, C_in, F) -> (B, C_out, F): BatchNorm(conv(x) · sigmoid(gate(x))) plus a residual."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, 2 * out_channels, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm1d(out_channels)
        self.skip = in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.conv(x).chunk(2, dim=1)
        out = self.bn(value * torch.sigmoid(gate))
        return out + x if self.skip else out


class FourierBranch(nn.Module):
    """(B, C, T, V) float32 -> (B, embed_dim) frequency-domain embedding (before the
    cross-domain fusion)."""

    def __init__(self, in_channels: int, joints: int, *, channels: int = 32,
                 embed_dim: int = 64) -> None:
        super().__init__()
        cin = 3 * in_channels * joints
        w = channels
        self.shallow = GatedConv(cin, w)
        self.middle = nn.Sequential(GatedConv(w, 2 * w), GatedConv(2 * w, 2 * w))
        self.deep = nn.Sequential(GatedConv(2 * w, 2 * w), GatedConv(2 * w, 2 * w))
        self.proj_s = nn.Linear(w, embed_dim)
        self.proj_m = nn.Linear(2 * w, embed_dim)
        self.proj_d = nn.Linear(2 * w, embed_dim)
        self.fuse_sm = AttentionFusion(embed_dim)
        self.fuse_md = AttentionFusion(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = spectrum(x)
        s = self.shallow(f)
        m = self.middle(s)
        d = self.deep(m)
        hs, hm, hd = self.proj_s(s.mean(-1)), self.proj_m(m.mean(-1)), self.proj_d(d.mean(-1))
        hm = self.fuse_sm(hm, torch.stack([hs, hm], dim=1))
        return self.fuse_md(hd, torch.stack([hm, hd], dim=1))
