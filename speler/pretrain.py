"""Self-supervised pre-training of the backbone on every sample, labels unused.

Each epoch every sample is augmented twice (``train._Augment``; series also get the temporal crop
skeletons always get) and the network learns to tell its own pair from the rest of the batch:

    loss = NT-Xent(g(z_a), g(z_b)) + ½ [NT-Xent(h_time_a, h_freq_b) + NT-Xent(h_time_b, h_freq_a)]

z = both branches' fused embeddings side by side, g a small projection head dropped afterwards,
h_time / h_freq the branch embeddings before fusion (the second term is the paper's cross-domain
idea without labels: a clip's time view must find its own frequency view). NT-Xent (Chen et al.
2020): cross-entropy of each row's similarity to its partner against every other row of both
views, temperature ``PRETRAIN_TEMPERATURE``.

A round uses it through ``train.pretrain_epochs`` (0 = off, the default): once per project, before
the first training; the weights start every later training (the cross-fitted folds' too) and are
kept in the round folder (``pretrained.pt``) for later rounds. Measured on the five real sets
(README, "Self-supervised pre-training"): round 0's macro-F1 unchanged on average (0.658 with and
without, 60 epochs, π = 10, γ = 10 %, 5 seeds), for 3x the round's time on a CPU; so it is off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from speler.config import TrainConfig
from speler.data.schema import SequenceSet
from speler.errors import CancelledError, DataFormatError
from speler.models.net import SpelerNet
from speler.train import (
    _Augment, _autocast, _check_finite, _recalibrate_batch_norm, _Rows, _threads, batch_size_for,
    model_for, select_device,
)

logger = logging.getLogger(__name__)

PRETRAIN_TEMPERATURE = 0.2
PROJECTION_DIM = 64
MAX_BATCH = 64  # pairs per step: more negatives help, but a batch must fit a 35-clip set too


@dataclass
class PretrainResult:
    """model: the backbone (eval mode, on ``device``); history: mean loss per epoch."""

    model: SpelerNet
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of the pairs (a_i, b_i), a and b (N, D): each of the 2N rows must pick its partner
    among the 2N - 1 others by cosine similarity / temperature; mean cross-entropy."""
    n = len(a)
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def pretrain(ds: SequenceSet, *, config: TrainConfig,
             progress: Callable[[int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> PretrainResult:
    """``config.pretrain_epochs`` epochs of self-supervised training on every sample of ``ds``
    (preprocessed, x float32 (N, C, T, V, M); labels are not read). The model is
    ``train.model_for(ds, config)``, the one ``fit`` builds, so its weights load into ``fit``'s
    model; it is returned in eval mode. progress(epoch, epochs) after each epoch; cancel() before
    each (CancelledError). Deterministic for a given ``config.seed`` on the CPU."""
    if not isinstance(ds, SequenceSet):
        raise DataFormatError(f"pretrain expects a SequenceSet, got {type(ds).__name__}")
    _check_finite(ds, "pretrain")
    if ds.n < 2:
        raise DataFormatError(f"pretrain: {ds.where} has {ds.n} sample(s); contrast needs two")
    t_start = time.perf_counter()
    epochs = config.pretrain_epochs
    device = select_device(config.device)
    cuda = device.startswith("cuda")
    amp = config.amp and cuda
    batch = min(MAX_BATCH if not cuda else batch_size_for(config, device), ds.n)
    history: list[float] = []
    devices = [torch.device(device).index or 0] if cuda else []
    with _threads(config.num_threads, device), torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        model = model_for(ds, config).to(device)
        d = config.embed_dim
        head = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(),
                             nn.Linear(2 * d, PROJECTION_DIM)).to(device)
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        augment = _Augment(ds)
        rows = _Rows(ds.x, device)
        lengths = torch.from_numpy(ds.lengths.astype(np.int64))
        gen = torch.Generator().manual_seed(config.seed + 2)
        steps = max(1, ds.n // batch)  # full batches only: a short one has few negatives
        for epoch in range(epochs):
            if cancel is not None and cancel():
                raise CancelledError(f"pre-training cancelled before epoch {epoch + 1}/{epochs}")
            model.train()
            order = torch.randperm(ds.n, generator=gen).numpy()
            total = torch.zeros((), dtype=torch.float64, device=device)
            for s in range(steps):
                part = np.sort(order[s * batch:(s + 1) * batch])
                x = rows.take(part)
                length = lengths[torch.from_numpy(part)]
                views = []
                for _ in range(2):
                    v = augment(x, length, gen)
                    if augment.series:  # skeletons are cropped inside the augmentation already
                        v = augment._crop(v, length, gen)
                    views.append(v)
                with _autocast(device, amp):
                    oa, ob = model(views[0]), model(views[1])
                    za = head(torch.cat([oa.emb_time, oa.emb_freq], 1).float())
                    zb = head(torch.cat([ob.emb_time, ob.emb_freq], 1).float())
                loss = nt_xent(za, zb, PRETRAIN_TEMPERATURE) + 0.5 * (
                    nt_xent(oa.pre_time, ob.pre_freq, PRETRAIN_TEMPERATURE)
                    + nt_xent(ob.pre_time, oa.pre_freq, PRETRAIN_TEMPERATURE))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().double()
            sched.step()
            _recalibrate_batch_norm(model, rows, np.sort(order[:96]), batch_size=64, amp=amp)
            history.append(float(total) / steps)
            logger.debug("pretrain epoch %d: loss %.4f", epoch + 1, history[-1])
            if progress is not None:
                progress(epoch + 1, epochs)
        model.eval()
    seconds = time.perf_counter() - t_start
    logger.info("pretrain: %d epochs, loss %.3f -> %.3f, %.1f s on %s", epochs,
                history[0] if history else float("nan"), history[-1] if history else float("nan"),
                seconds, device)
    return PretrainResult(model=model, history=history, seconds=seconds, device=device)
