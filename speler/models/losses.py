"""Training losses: per-branch cross-entropy (optionally logit-adjusted for the long tail), the
cross-domain supervised contrastive loss, and the energy-weighted pseudo-label cross-entropy.

Logit adjustment (Menon et al., ICLR 2021): train on ``logits + tau · log prior`` so that the raw
logits used at inference are balanced across classes. The prior comes from the training labels'
class counts with add-one smoothing, so classes without labels stay finite.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def log_prior(counts: np.ndarray | torch.Tensor, *, smoothing: float = 1.0) -> torch.Tensor:
    """log((n_c + smoothing) / sum(n + smoothing)), float32 (num_classes,)."""
    c = torch.as_tensor(np.asarray(counts, dtype=np.float64) + smoothing, dtype=torch.float32)
    return torch.log(c / c.sum())


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, prior: torch.Tensor | None = None,
    tau: float = 1.0,
) -> torch.Tensor:
    """Per-sample cross-entropy, float32 (B,); logit-adjusted by ``tau · prior`` when given.

    logits: (B, K); target: int64 (B,) in 0..K-1; prior: log prior (K,) from ``log_prior``.
    """
    logits = logits.float()
    if prior is not None:
        logits = logits + tau * prior.to(logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def cross_domain_supcon(
    z_time: torch.Tensor, z_freq: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.2,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-domain supervised contrastive loss, a scalar.

    z_time, z_freq: (B, D) embeddings of the same B samples from the two branches; labels int64
    (B,). Each time embedding is an anchor whose candidates are all B frequency embeddings; the
    positives are the candidates with the same label (always including the sample itself), as in
    SupCon (Khosla et al. 2020) but across domains. Symmetrised (frequency anchors against time
    candidates).

    mask: bool (B,), the rows that take part (None = all): the loss of those rows alone, computed
    with the shapes of the whole batch, so that a caller need not know on the host how many there
    are (0 when there are none).
    """
    if z_time.shape[0] == 0:
        return z_time.sum() * 0.0
    zt = F.normalize(z_time.float(), dim=-1)
    zf = F.normalize(z_freq.float(), dim=-1)
    sim = zt @ zf.T / temperature
    pos = (labels[:, None] == labels[None, :]).float()
    if mask is not None:
        m = mask.float()
        pair = m[:, None] * m[None, :]
        pos = pos * pair
        # rows and columns outside the mask are never candidates: a kept similarity is at least
        # -1/temperature, so exp(far - kept) <= exp(-1/temperature - 200), exactly 0 in float32
        far = -(2.0 / temperature + 200.0)
        keep = pair > 0
        sim_tf, sim_ft = torch.where(keep, sim, far), torch.where(keep, sim.T, far)
    else:
        m, sim_tf, sim_ft = None, sim, sim.T
    npos = pos.sum(1).clamp(min=1.0)  # >= 1 wherever the row takes part: itself
    loss_tf = -(F.log_softmax(sim_tf, dim=1) * pos).sum(1) / npos
    loss_ft = -(F.log_softmax(sim_ft, dim=1) * pos).sum(1) / npos
    if m is None:
        return 0.5 * (loss_tf.mean() + loss_ft.mean())
    rows = m.sum().clamp(min=1.0)
    return 0.5 * ((loss_tf * m).sum() + (loss_ft * m).sum()) / rows


def pseudo_label_ce(
    logits: torch.Tensor, pseudo: torch.Tensor, weights: torch.Tensor, *,
    prior: torch.Tensor | None = None, tau: float = 1.0, rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Energy-weighted pseudo-label cross-entropy, a scalar: sum_i w_i CE_i / number of rows.

    logits (B, K); pseudo int64 (B,) pseudo-labels; weights float (B,) = ω from propagation energy
    (``omega``), 0 where a sample must not count. Empty input gives 0. rows: the number of rows
    to divide by (a tensor, when only some of the B rows are pseudo-labeled ones and the others
    have weight 0); default B.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = cross_entropy(logits, pseudo, prior=prior, tau=tau)
    return (weights.float() * ce).sum() / (logits.shape[0] if rows is None else rows)


def omega(energy: np.ndarray) -> np.ndarray:
    """Loss weights from propagation energy (method.md): max(0, -E) / max over the set of
    max(0, -E).

    energy float (n,) -> float32 (n,) in [0, 1]; all zeros when no energy is negative.
    """
    e = np.maximum(0.0, -np.asarray(energy, dtype=np.float64))
    top = e.max() if e.size else 0.0
    return (e / top if top > 0 else np.zeros_like(e)).astype(np.float32)
