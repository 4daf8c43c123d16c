"""Fit the two-branch backbone on human labels (+ energy-weighted pseudo-labels), embed samples, and
save/load checkpoints tied to a dataset.

``fit`` is one straight loop: validate, seed, split a stratified hold-out slice of the human labels
for early stopping, build the model (or warm-start it), then epochs of augmented mini-batches with
Adam, evaluating the hold-out slice after each epoch and keeping the best weights. Pseudo-labeled
samples join after ``config.supervised_epochs``; each epoch draws at most ``pseudo_ratio`` of them
per human label so a round's cost follows the number of human labels, not the dataset size.

Loss per batch = CE_time + CE_freq on human labels (logit-adjusted when ``balanced_loss``)
+ μ · cross-domain SupCon on human labels + λ · ω-weighted pseudo-label CE on both branches.

On CUDA the host never waits for the GPU within an epoch: the samples are copied to the GPU once
when they fit, small tensors go through pinned memory, which rows are human-labeled is known on
the host, and the loss and accuracy figures are summed on the device and read once per epoch;
Adam is fused, AMP (bf16, else fp16 with loss scaling) is on, and ``train.batch_size`` 0 means
128 (32 on a CPU). On the CPU the same code runs with every tensor in place, deterministically.

Under ``torchrun`` (a ``speler.distributed`` world of more than one rank) every rank calls ``fit``
with the same arguments and the ranks train one model with DistributedDataParallel: every rank draws
the epoch's members and order with the same seed (the class-balanced pseudo-label draw of a single
process), runs every world-th of the epoch's batches (``_rank_steps``, padded so that every rank
takes the same number of steps) with augmentations from a generator of its own, and DDP averages
the gradients, so a step sees world × batch_size samples and an epoch takes 1/world of the steps.
The epoch's figures are all-reduced and the held-out figures are rank 0's, so every rank keeps the
same history, best epoch and early stop; the returned model is the plain module (its checkpoint
loads without torchrun). Bad input on any rank fails every rank before the first exchange, and
ranks given different inputs are refused (they would take different numbers of steps). With one
process none of this runs: results are bit for bit as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from speler import distributed as dist
from speler.atomic_file import write_atomically
from speler.config import TrainConfig
from speler.cuda_graph import GraphStep
from speler.data.layouts import Layout
from speler.data.schema import SequenceSet
from speler.errors import CancelledError, CheckpointError, ConfigError, DataFormatError, LabelError
from speler.models import losses
from speler.models.net import ARCH_FIELDS, SpelerNet, build_model, paper_config
from speler.system import torch_threads

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "speler-checkpoint"
CHECKPOINT_VERSION = 1
MIN_HOLDOUT = 20  # fewer held-out labels than this: no early stopping, train every label
BN_SAMPLES = 96  # clean samples used to recompute BatchNorm statistics after each epoch

__all__ = [
    "Checkpoint", "Embeddings", "FitResult", "batch_size_for", "embed", "fit", "load_checkpoint",
    "paper_config", "save_checkpoint", "select_device",
]


@dataclass
class FitResult:
    """model: trained network in eval mode (on ``device``); history: one dict per epoch (loss terms,
    train accuracy, hold-out balanced accuracy and loss, seconds); best_epoch (1-based) and
    best_metric (hold-out balanced accuracy; NaN when there was no hold-out slice); holdout: int64
    indices of the human labels held out; seconds: wall time of the fit; warm_started: whether the
    ``init`` weights were used."""

    model: SpelerNet
    history: list[dict]
    best_epoch: int
    best_metric: float
    device: str
    seconds: float
    holdout: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    config: TrainConfig = field(default_factory=TrainConfig)
    warm_started: bool = False


@dataclass
class Embeddings:
    """time: float32 (N, d_t); freq: float32 (N, d_f); probs: float32 (N, C), mean of both branches'
    softmax; probs_time, probs_freq: float32 (N, C) per branch."""

    time: np.ndarray
    freq: np.ndarray
    probs: np.ndarray
    probs_time: np.ndarray
    probs_freq: np.ndarray


@dataclass
class Checkpoint:
    """A loaded checkpoint: model (eval mode, CPU), its TrainConfig, the class list, layout name,
    dataset fingerprint and the ``extra`` dict saved with it."""

    model: SpelerNet
    config: TrainConfig
    classes: tuple[str, ...]
    layout_name: str
    fingerprint: str
    extra: dict


# --- device and validation ----------------------------------------------------------------------
def select_device(preference: str = "auto") -> str:
    """``"cuda"`` when available and asked for (or ``"auto"``), else ``"cpu"``; ConfigError for a
    device that is unknown or not available."""
    pref = str(preference).strip().lower()
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cpu":
        return "cpu"
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is {preference!r} but torch sees no CUDA device;"
                              f" use 'auto' or 'cpu'")
        if ":" in pref:
            idx = pref.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise ConfigError(f"train.device {preference!r}: there are"
                                  f" {torch.cuda.device_count()} CUDA devices")
        return pref
    raise ConfigError(f"train.device must be 'auto', 'cpu' or 'cuda', got {preference!r}")


def _check_finite(ds: SequenceSet, what: str, finite: np.ndarray | None = None) -> None:
    """DataFormatError naming the first sample of ``ds`` with a NaN or inf. ``finite``: bool (N,)
    per sample when the caller has it already (embed checks on the GPU), else computed here."""
    if finite is None:
        finite = np.isfinite(ds.x).reshape(ds.n, -1).all(axis=1)
    if not finite.all():
        bad = ~finite
        i = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"{what}: sample {i} (id {str(ds.ids[i])!r}) of {ds.where} has non-finite values"
            f" (NaN or inf); {int(bad.sum())} samples affected, expected finite float32 input")


def _as_labels(arr, n: int, k: int, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != (n,) or a.dtype.kind not in "iu":
        raise LabelError(f"{name} must be integers of shape ({n},), got {a.dtype} {a.shape}")
    bad = (a < -1) | (a >= k)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LabelError(f"{name}[{i}] = {int(a[i])} is out of range, expected -1..{k - 1}")
    return a.astype(np.int64)


def model_for(ds: SequenceSet, config: TrainConfig) -> SpelerNet:
    """The network ``fit`` trains for ``ds`` (its channels, classes, frames and persons) and
    ``config``; ``pretrain`` builds the same, so the weights of one load into the other."""
    return build_model(ds.layout, in_channels=ds.x.shape[1], num_classes=ds.num_classes,
                       frames=ds.x.shape[2], persons=ds.x.shape[4], config=config)


@contextlib.contextmanager
def _threads(n: int, device: str = "cpu"):
    """torch's CPU thread count for a while: ``n``, or for 0 on a CPU the cores no other task
    is busy on when it starts (``speler.system.torch_threads``); 0 on CUDA leaves it as it is."""
    if n == 0 and str(device).startswith("cuda"):
        yield
        return
    with torch_threads(n):
        yield


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    """cuDNN autotuning on for a while (CUDA training: fixed batch shapes,
    ``train.cudnn_benchmark``), restored after, so a fit leaves no process-wide setting behind."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = old or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


# --- device placement ---------------------------------------------------------------------------
CPU_BATCH, CUDA_BATCH = 32, 256  # train.batch_size 0: the device's batch
EMBED_BATCH_CPU, EMBED_BATCH_CUDA = 128, 1024  # embed's default batch
DEVICE_SHARE = 0.25  # a dataset is copied to the GPU at once when it takes <= this share of the
# free GPU memory (training also needs room for activations), else batch by batch


def batch_size_for(config: TrainConfig, device: str) -> int:
    """Training batch size on ``device``: ``config.batch_size``, or for 0 the device's default
    (``CPU_BATCH`` on a CPU, ``CUDA_BATCH`` on CUDA, where larger batches keep the GPU busy)."""
    if config.batch_size > 0:
        return int(config.batch_size)
    return CUDA_BATCH if str(device).startswith("cuda") else CPU_BATCH


def _upload(t: torch.Tensor, device) -> torch.Tensor:
    """CPU tensor ``t`` on ``device``: itself on the CPU; on CUDA copied through pinned memory
    without waiting for the GPU (a plain ``.to`` from pageable memory synchronises)."""
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class _Rows:
    """Samples of a float32 array (N, ...) handed out as batches on ``device``: the array is
    copied there once when it fits (``DEVICE_SHARE`` of the free GPU memory) and ``resident``,
    else each batch is copied as it is asked for (through pinned memory, without waiting for the
    GPU). On the CPU the array is used in place.

    Training reads random rows many times over: resident. A single pass in order (``embed``)
    streams: a whole upload first is one blocking copy from pageable memory before the GPU has
    any work, where batch copies queue behind the batches before them."""

    def __init__(self, x: np.ndarray, device: str, *, resident: bool = True) -> None:
        self.device = device
        self.host = torch.from_numpy(np.ascontiguousarray(x))
        self.data = self.host
        if resident and torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            if self.host.nbytes <= DEVICE_SHARE * free:
                self.data = self.host.to(device)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` (int64 host array) on the device."""
        ti = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        if self.data is self.host:
            return _upload(self.host[ti], self.device)
        return self.data[_upload(ti, self.device)]

    def slice(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 on the device."""
        if self.data is self.host:
            return _upload(self.host[lo:hi], self.device)
        return self.data[lo:hi]


def _holdout_split(labels: np.ndarray, fraction: float, seed: int, *,
                   min_size: int = MIN_HOLDOUT) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) indices of the labeled samples. Each class with >= 2 labels gives
    round(fraction · n_c) of them (half rounded up, always leaving one for training). No hold-out
    (train all labels for the full epochs) when that totals fewer than ``min_size`` samples or
    covers fewer than 2 classes: on a handful of samples early stopping follows noise, and the
    held-out labels are worth more as training data (measured on BasicMotions: a 7-sample
    hold-out stopped at epoch 2-4 and lost 10 points of accuracy)."""
    labeled = np.flatnonzero(labels >= 0)
    if fraction <= 0:
        return labeled, np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels[labeled]):
        idx = labeled[labels[labeled] == c]
        take = min(len(idx) - 1, int(math.floor(fraction * len(idx) + 0.5)))
        if take > 0:
            held.append(rng.permutation(idx)[:take])
    if len(held) < 2 or sum(len(h) for h in held) < min_size:
        return labeled, np.zeros(0, dtype=np.int64)
    hold = np.sort(np.concatenate(held))
    return np.setdiff1d(labeled, hold), hold


# --- augmentation -------------------------------------------------------------------------------
class _Augment:
    """Random augmentation of a batch (B, C, T, V, M) on its device, parameters drawn from ``gen``.

    Skeletons: rotation about the up axis (±0.3 rad; in-plane ±0.1 rad for 2D), scaling per axis
    (0.9–1.1), temporal crop of 80–100 % of the valid frames resampled back to them. Series: scaling
    per channel (N(1, 0.1)) and jitter (0.05 × the channel's std).
    """

    def __init__(self, ds: SequenceSet) -> None:
        self.series = ds.layout.is_series or ds.layout.num_joints == 1
        names = [c.lower() for c in ds.channels]
        self.coords = [names.index(a) for a in ("x", "y", "z") if a in names]
        if not self.series and not self.coords:
            self.coords = list(range(min(3, ds.x.shape[1])))
        self.up = self._up_axis(ds) if len(self.coords) == 3 else 1

    def _up_axis(self, ds: SequenceSet) -> int:
        if ds.layout.spine is None:
            return 1
        lo, hi = ds.layout.spine
        ends = ds.x[:, :, :, [hi, lo]][:, self.coords]  # the two joints first: a small copy
        v = (ends[:, :, :, 0] - ends[:, :, :, 1]).mean(axis=(0, 2, 3))
        return int(np.argmax(np.abs(v))) if np.abs(v).max() > 0 else 1

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
        b, c = x.shape[:2]
        dev = x.device
        if self.series:
            scale = _upload(1 + 0.1 * torch.randn(b, c, 1, 1, 1, generator=gen), dev)
            noise = _upload(torch.randn(x.shape, generator=gen), dev)
            std = x.std(dim=2, keepdim=True)
            return x * scale + 0.05 * std * noise
        x = self._crop(x, lengths, gen)
        x = x.clone()
        coords = self.coords
        if len(coords) >= 2:
            if len(coords) == 3:
                a, bb = [coords[i] for i in range(3) if i != self.up]
                theta = (torch.rand(b, generator=gen) * 2 - 1) * 0.3
            else:
                a, bb = coords[0], coords[1]
                theta = (torch.rand(b, generator=gen) * 2 - 1) * 0.1
            cos = _upload(torch.cos(theta), dev).view(b, 1, 1, 1)
            sin = _upload(torch.sin(theta), dev).view(b, 1, 1, 1)
            xa, xb = x[:, a].clone(), x[:, bb].clone()
            x[:, a] = cos * xa - sin * xb
            x[:, bb] = sin * xa + cos * xb
        scale = _upload(0.9 + 0.2 * torch.rand(b, len(coords), generator=gen), dev)
        x[:, coords] = x[:, coords] * scale.view(b, len(coords), 1, 1, 1)
        return x

    @staticmethod
    def _crop(x: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, t, v, m = x.shape
        length = lengths.float()
        ratio = 0.8 + 0.2 * torch.rand(b, generator=gen)
        win = torch.clamp(ratio * length, min=2.0)
        win = torch.minimum(win, length)
        start = torch.rand(b, generator=gen) * (length - win)
        j = torch.arange(t, dtype=torch.float32)
        denom = torch.clamp(length - 1, min=1.0)
        pos = start[:, None] + j[None, :] * ((win - 1) / denom)[:, None]
        pos = torch.minimum(pos, (length - 1)[:, None])
        lo = pos.floor().long().clamp(0, t - 1)
        hi = torch.minimum(lo + 1, (lengths - 1).clamp(min=0)[:, None].long())
        w = _upload(pos - lo.float(), x.device).view(b, 1, t, 1, 1)
        valid = _upload(j[None, :] < length[:, None], x.device).view(b, 1, t, 1, 1)
        lo = _upload(lo, x.device).view(b, 1, t, 1, 1).expand(b, c, t, v, m)
        hi = _upload(hi, x.device).view(b, 1, t, 1, 1).expand(b, c, t, v, m)
        out = x.gather(2, lo) * (1 - w) + x.gather(2, hi) * w
        return out * valid


# --- training -----------------------------------------------------------------------------------
@torch.no_grad()
def _recalibrate_batch_norm(model: nn.Module, rows: _Rows, idx: np.ndarray, *, batch_size: int,
                            amp: bool) -> None:
    """Recompute every BatchNorm's statistics as the exact average over samples ``idx``
    (unaugmented, current weights), then leave the model in eval mode.

    With a few dozen labels an epoch is one or two batches, far too few updates for the usual
    exponential average (momentum 0.1) to forget its initial values, and augmented batches have
    wider statistics than the clean samples the model is evaluated on; both made the eval-mode
    network much worse than its training accuracy.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    model.train()
    for part in _batches(idx, batch_size):
        with _autocast(rows.device, amp):
            model(rows.take(part))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def _autocast(device: str, enabled: bool, *, cache: bool = True):
    """Mixed precision on CUDA (bfloat16 where the GPU has it, else float16) when ``enabled``.
    cache=False for a pass recorded into a CUDA graph (autocast's cache of cast weights must not
    outlive the capture)."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=cache)


def _batches(order: np.ndarray, size: int, *, fixed: bool = False) -> list[np.ndarray]:
    """Consecutive batches; a last batch smaller than half a batch joins the one before.

    ``fixed`` (CUDA): every batch has exactly ``size`` rows, the last one filled up with the
    epoch's first samples, so cuDNN tunes its kernels for one shape instead of one per epoch's
    remainder (a set smaller than a batch is one batch of its own size)."""
    if fixed and len(order) > size:
        fill = -len(order) % size
        order = np.concatenate([order, order[:fill]])
        return [order[i:i + size] for i in range(0, len(order), size)]
    out = [order[i:i + size] for i in range(0, len(order), size)]
    if len(out) > 1 and len(out[-1]) < max(2, size // 2):
        last = out.pop()
        out[-1] = np.concatenate([out[-1], last])
    return out


def _rank_steps(batches: list[np.ndarray], rank: int, world: int) -> list[tuple[np.ndarray, bool]]:
    """This rank's steps through an epoch's ``batches``: (batch, whether it counts in the epoch's
    figures). One process: every batch, counted. Under DDP: batches rank, rank + world, ... of the
    list padded to a multiple of ``world`` by repeating its first batches, so that every rank takes
    the same number of steps (DDP averages the ranks' gradients at each); the repeats train but are
    not counted."""
    if world == 1:
        return [(b, True) for b in batches]
    steps = -(-len(batches) // world)
    return [(batches[i % len(batches)], i < len(batches))
            for i in range(rank, steps * world, world)]


def _batch_loss(out, target: torch.Tensor, human: torch.Tensor, weight: torch.Tensor, *,
                prior: torch.Tensor | None, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Loss terms of one batch: CE of both heads and the cross-domain SupCon on the human-labeled
    rows, ω-weighted pseudo-label CE of both heads on the others, and their weighted sum.

    human: bool (B,) on the batch's device, the human-labeled rows. Every term is computed over
    the whole batch and masked, so the shapes never depend on how many rows are human-labeled:
    nothing waits for the device and the step can be captured as a CUDA graph. A term whose rows
    are absent is 0."""
    lt, lf = out.logits_time.float(), out.logits_freq.float()
    h = human.float()
    o = 1.0 - h
    tau = config.logit_tau
    n_h, n_o = h.sum().clamp(min=1.0), o.sum().clamp(min=1.0)
    ce = ((losses.cross_entropy(lt, target, prior=prior, tau=tau) * h).sum()
          + (losses.cross_entropy(lf, target, prior=prior, tau=tau) * h).sum()) / n_h
    con = pl = lt.new_zeros(())
    if config.contrastive_weight > 0:
        con = losses.cross_domain_supcon(out.pre_time, out.pre_freq, target,
                                         temperature=config.temperature, mask=human)
    if config.pseudo_weight > 0:
        wo = weight * o
        pl = (losses.pseudo_label_ce(lt, target, wo, prior=prior, tau=tau, rows=n_o)
              + losses.pseudo_label_ce(lf, target, wo, prior=prior, tau=tau, rows=n_o))
    loss = ce + config.contrastive_weight * con + config.pseudo_weight * pl
    return {"loss": loss, "ce": ce, "contrastive": con, "pseudo": pl}


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate to ``lr``; a tensor learning rate (a step replayed
    from a CUDA graph reads it where it is) is filled in place."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


@torch.no_grad()
def _evaluate(model: SpelerNet, rows: _Rows, idx: np.ndarray, target: np.ndarray, *,
              batch_size: int, amp: bool) -> tuple[float, float]:
    """(balanced accuracy, mean NLL of the averaged softmax) on samples ``idx``."""
    model.eval()
    probs = []
    for part in np.array_split(idx, max(1, math.ceil(len(idx) / batch_size))):
        with _autocast(rows.device, amp):
            out = model(rows.take(part))
        probs.append(out.probs.float())
    p = torch.cat(probs).cpu().numpy()
    pred = p.argmax(1)
    recalls = [float((pred[target == c] == c).mean()) for c in np.unique(target)]
    nll = float(-np.log(np.clip(p[np.arange(len(target)), target], 1e-12, None)).mean())
    return float(np.mean(recalls)), nll


def fit(
    ds: SequenceSet, labels: np.ndarray, *, config: TrainConfig = TrainConfig(),
    pseudo_labels: np.ndarray | None = None, pseudo_weights: np.ndarray | None = None,
    init: Checkpoint | None = None, progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None, holdout: np.ndarray | None = None,
    start: nn.Module | None = None,
) -> FitResult:
    """Train the backbone on the preprocessed ``ds`` (x float32 (N, C, T, V, M)).

    labels: int (N,), human labels, -1 = unknown. pseudo_labels: int (N,), -1 = none;
    pseudo_weights: float (N,) >= 0, ω from propagation energy (0 = ignore); samples with a human
    label ignore their pseudo-label. init: a checkpoint of the same dataset to start from (then
    ``config.warm_epochs`` epochs and no supervised warm-up; ignored with a warning when its
    architecture differs from ``config``).
    progress(epoch, epochs) after each epoch (called with (epochs, epochs) on an early stop);
    cancel() is checked before each epoch and raises CancelledError when true.
    start: a model of the same architecture whose weights training starts from (self-supervised
    pre-training, ``speler.pretrain``); unlike ``init`` the training is otherwise a first one
    (``config.epochs``, supervised warm-up). Ignored when ``init`` is used.
    holdout: int indices of human-labeled samples to keep out of training and score after every
    epoch (``history[e]["holdout_acc"]``), instead of the automatic ``config.holdout`` slice; the
    model then trains every epoch and is returned as it ends (no best-epoch restore, no early
    stop), so a caller can read an unbiased learning curve (cross-fitting, ``speler.loop``).
    Raises DataFormatError for non-finite input (naming the sample), LabelError for bad labels or
    when there is nothing to train on, ConfigError for bad settings, CheckpointError for a bad init.
    """
    t_start = time.perf_counter()
    # under torchrun a rank with bad input fails every rank here, before any exchange
    with dist.together("training input"):
        if not isinstance(ds, SequenceSet):
            raise DataFormatError(f"fit expects a SequenceSet, got {type(ds).__name__}")
        _check_finite(ds, "fit")
        n, k = ds.n, ds.num_classes
        if k < 1:
            raise LabelError(f"fit: dataset {ds.where} has no classes to learn")
        y = _as_labels(labels, n, k, "labels")
        pseudo = (np.full(n, -1, dtype=np.int64) if pseudo_labels is None
                  else _as_labels(pseudo_labels, n, k, "pseudo_labels"))
        if pseudo_weights is None:
            weights = np.where(pseudo >= 0, 1.0, 0.0).astype(np.float32)
        else:
            weights = np.asarray(pseudo_weights, dtype=np.float64)
            if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any():
                raise LabelError(f"pseudo_weights must be finite floats >= 0 of shape ({n},),"
                                 f" got shape {weights.shape}")
            weights = weights.astype(np.float32)
        pseudo_idx = np.flatnonzero((pseudo >= 0) & (weights > 0) & (y < 0))
        if not (y >= 0).any() and len(pseudo_idx) == 0:
            raise LabelError("fit: no human labels and no weighted pseudo-labels to train on")
        warm = init is not None and _check_init(init, ds, config)
        device = select_device(config.device)
        cuda = device.startswith("cuda")
        amp = config.amp and cuda
        batch_size = batch_size_for(config, device)
    world, rank = dist.world_size(), dist.rank()  # under torchrun: DDP (see the module docstring)
    if world > 1:  # DDP needs the same steps on every rank: refuse ranks given different inputs
        digest = hashlib.sha256(repr((ds.fingerprint(), dataclasses.asdict(config), warm)).encode())
        for a in (y, pseudo, weights, np.asarray([] if holdout is None else holdout, np.int64)):
            digest.update(a.tobytes())
        if len(set(dist.all_gather_object(digest.hexdigest()))) > 1:
            raise LabelError("fit under torchrun: the ranks were given different data, labels,"
                             " pseudo-labels, weights, hold-out or config; give all the same")

    devices = [torch.device(device).index or 0] if cuda else []
    with _threads(config.num_threads, device), torch.random.fork_rng(devices=devices), \
            _cudnn_benchmark(cuda and config.cudnn_benchmark):
        torch.manual_seed(config.seed)
        if holdout is None:
            train_idx, hold_idx = _holdout_split(y, config.holdout, config.seed)
        else:
            hold_idx = np.unique(np.asarray(holdout, dtype=np.int64))
            if len(hold_idx) and (hold_idx.min() < 0 or hold_idx.max() >= n
                                  or (y[hold_idx] < 0).any()):
                raise LabelError("fit: holdout must index human-labeled samples")
            train_idx = np.setdiff1d(np.flatnonzero(y >= 0), hold_idx)
        model = model_for(ds, config)
        if warm:
            model.load_state_dict(init.model.state_dict())
        elif start is not None:
            try:
                model.load_state_dict(start.state_dict())
            except RuntimeError as exc:
                raise CheckpointError(f"fit: the start weights do not fit this model ({exc})"
                                      ) from None
        model.to(device)
        net: nn.Module = model  # what the steps run: the model, or its DDP wrapper under torchrun
        if world > 1:
            where = torch.device(device)
            local = torch.cuda.current_device() if cuda and where.index is None else where.index
            net = nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
        scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported())
        # the step replayed from a CUDA graph (speler.cuda_graph): one process (DDP's hooks are not
        # captured here) and no float16 loss scaling (its overflow check reads on the host)
        graph = cuda and config.cuda_graph and world == 1 and not scaler.is_enabled()
        # fused: one kernel for every parameter's update on CUDA (not offered on the CPU path);
        # for a graph the learning rate is a tensor on the device, filled in place each epoch
        opt = torch.optim.Adam(
            model.parameters(), weight_decay=config.weight_decay,
            lr=torch.tensor(config.lr, device=device) if graph else config.lr,
            **({"fused": True, "capturable": graph} if cuda else {}))
        if graph:  # torch warns when a capturable optimizer steps uncaptured; warm-ups must
            opt._warned_capturable_if_run_uncaptured = True
        epochs = config.warm_epochs if warm and config.warm_epochs > 0 else config.epochs
        counts = np.bincount(y[train_idx], minlength=k).astype(np.float64)
        counts += np.bincount(pseudo[pseudo_idx], weights=weights[pseudo_idx], minlength=k)
        prior = losses.log_prior(counts).to(device) if config.balanced_loss else None
        gen = torch.Generator().manual_seed(config.seed + 1)
        # the epoch's members and order come from ``gen`` alike on every rank; each rank augments
        # its own batches from a generator of its own (one process: ``gen`` for both, as ever)
        aug_gen = gen if world == 1 else torch.Generator().manual_seed(
            int(np.random.SeedSequence([config.seed, rank]).generate_state(1)[0]))
        augment = _Augment(ds) if config.augment else None
        rows = _Rows(ds.x, device)  # on the GPU once when it fits
        len_all = torch.from_numpy(ds.lengths.astype(np.int64))  # the augmentation draws on the CPU
        target = torch.from_numpy(np.where(y >= 0, y, pseudo)).to(device)
        w_all = torch.from_numpy(weights).to(device)
        human_all = y >= 0
        human_dev = torch.from_numpy(human_all).to(device)
        keys = ("loss", "ce", "contrastive", "pseudo")

        def body(xb: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
            """One step on the (augmented) rows ``ti``: the loss terms and the number of human
            labels the time-and-frequency average gets right, float64 (5,) on the device."""
            tb, wb, hb = target[ti], w_all[ti], human_dev[ti]
            with _autocast(device, amp, cache=not graph):
                out = net(xb)
            terms = _batch_loss(out, tb, hb, wb, prior=prior, config=config)
            opt.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                right = ((out.probs.argmax(-1) == tb) & hb).sum()
                return torch.cat([torch.stack([terms[key].detach() for key in keys]).double(),
                                  right.double().view(1)])

        step = GraphStep(body, graph=graph, what="fit's training step")
        # Pseudo-labels join after a supervised warm-up, unless the model is already trained
        # (warm start) or there are no human labels to warm up on.
        warmup = 0 if warm or len(train_idx) == 0 else config.supervised_epochs

        history: list[dict] = []
        best_key, best_epoch, best_state, stale = None, 0, None, 0
        for epoch in range(epochs):
            stop_now = cancel is not None and cancel()
            if world > 1:  # a rank that stops alone would leave the others waiting in a step
                stop_now = bool(dist.all_reduce_array(np.array([int(stop_now)]), "max")[0])
            if stop_now:
                raise CancelledError(f"training cancelled before epoch {epoch + 1}/{epochs}")
            t0 = time.perf_counter()
            members = train_idx
            if epoch >= warmup and len(pseudo_idx):
                draw = len(pseudo_idx)
                if config.pseudo_ratio > 0:
                    draw = min(draw, math.ceil(config.pseudo_ratio * max(len(train_idx),
                                                                         batch_size)))
                pick = torch.randperm(len(pseudo_idx), generator=gen)[:draw].numpy()
                members = np.concatenate([train_idx, pseudo_idx[np.sort(pick)]])
            order = members[torch.randperm(len(members), generator=gen).numpy()]
            model.train()
            # Batch figures stay on the device and are read once per epoch: reading them per
            # batch would make the host wait for the GPU every step. Loss sums in float64 add up
            # exactly as Python floats did.
            sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.float64, device=device)
            seen = rows_done = 0  # human-labeled rows scored, rows trained on (padding too)
            for part, counted in _rank_steps(_batches(order, batch_size, fixed=cuda), rank,
                                              world):
                xb = rows.take(part)
                if augment is not None:
                    xb = augment(xb, len_all[torch.from_numpy(part)], aug_gen)
                figures = step(xb, _upload(torch.from_numpy(part), device))
                if not counted:
                    continue
                with torch.no_grad():
                    sums += figures[:len(keys)] * len(part)
                    correct += figures[len(keys)]
                seen += int(np.count_nonzero(human_all[part]))  # known here, on the host
                rows_done += len(part)
            if world > 1:  # the epoch's figures over every rank's batches
                total = dist.all_reduce_array(np.append(sums.cpu().numpy(),
                                                        [int(correct), seen, rows_done]))
                sums, correct = torch.from_numpy(total[:-3]), int(total[-3])
                seen, rows_done = int(total[-2]), int(total[-1])
            if config.lr_schedule == "cosine":  # cosine annealing to 0 over the epochs
                _set_lr(opt, 0.5 * config.lr * (1 + math.cos(math.pi * (epoch + 1) / epochs)))
            if len(order):
                _recalibrate_batch_norm(model, rows, np.sort(order[:BN_SAMPLES]),
                                        batch_size=max(batch_size, 64), amp=amp)
            row = {key: val / max(1, rows_done) for key, val in zip(keys, sums.tolist())}
            row.update(epoch=epoch + 1, train_acc=int(correct) / seen if seen else float("nan"),
                       samples=len(order), pseudo_samples=len(order) - len(train_idx))
            stop = False
            if len(hold_idx):
                acc, nll = _evaluate(model, rows, hold_idx, y[hold_idx],
                                     batch_size=max(batch_size, 64), amp=amp)
                if world > 1:  # rank 0's figures: every rank keeps the same best epoch and stop
                    acc, nll = dist.broadcast_object((acc, nll))
                row.update(holdout_acc=acc, holdout_loss=nll)
                key = (acc, -nll)
                # with the caller's holdout the curve is theirs: train on, keep the last epoch
                if holdout is None and (best_key is None or key > best_key):
                    best_key, best_epoch, stale = key, epoch + 1, 0
                    best_state = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
                elif holdout is None:
                    stale += 1
                    # Early stopping only once pseudo-labels have had a chance to join.
                    stop = stale >= config.patience and epoch + 1 > warmup
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            logger.debug("epoch %d: %s", epoch + 1, row)
            if stop:
                if progress is not None:
                    progress(epochs, epochs)
                break
            if progress is not None:
                progress(epoch + 1, epochs)

        if best_state is not None:
            model.load_state_dict(best_state)
            best_metric = float(best_key[0])
        elif holdout is not None and history and "holdout_acc" in history[-1]:
            best_epoch, best_metric = len(history), float(history[-1]["holdout_acc"])
        else:
            best_epoch, best_metric = len(history), float("nan")
        model.eval()
        net = step = None  # the DDP wrapper and the CUDA graph (its memory) go; the model stays
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t_start
    logger.info("fit: %d epochs, best %d (holdout %.3f), %.1f s on %s", len(history), best_epoch,
                best_metric, seconds, device)
    return FitResult(model=model, history=history, best_epoch=best_epoch, best_metric=best_metric,
                     device=device, seconds=seconds, holdout=hold_idx, config=config,
                     warm_started=warm)


def _check_init(init: Checkpoint, ds: SequenceSet, config: TrainConfig) -> bool:
    """CheckpointError if ``init`` belongs to another dataset, class list or layout; False (with a
    warning: train from scratch) if its architecture differs from ``config``; True if usable."""
    if tuple(init.classes) != tuple(ds.classes):
        raise CheckpointError(f"init checkpoint has classes {list(init.classes)}, the dataset has"
                              f" {list(ds.classes)}")
    if init.layout_name != ds.layout.name:
        raise CheckpointError(f"init checkpoint is for layout {init.layout_name!r}, the dataset"
                              f" uses {ds.layout.name!r}")
    if init.fingerprint != ds.fingerprint():
        raise CheckpointError(f"init checkpoint belongs to dataset {init.fingerprint}, expected"
                              f" this dataset's fingerprint {ds.fingerprint()}")
    changed = [f"train.{name}: {getattr(init.config, name)!r} -> {getattr(config, name)!r}"
               for name in ARCH_FIELDS if getattr(init.config, name) != getattr(config, name)]
    if changed:
        logger.warning("not warm-starting: the architecture changed (%s); training from scratch",
                       ", ".join(changed))
        return False
    return True


# --- embedding ----------------------------------------------------------------------------------
def embed(model: nn.Module, ds: SequenceSet, *, batch_size: int | None = None,
          device: str | None = None, progress: Callable[[int, int], None] | None = None,
          cuda_graph: bool = False) -> Embeddings:
    """Both branches' embeddings and the class probabilities of every sample (no grad, batched).

    ds.x float32 (N, C, T, V, M) must match the model's channels and joints. batch_size: samples
    per forward pass (default ``EMBED_BATCH_CUDA`` on CUDA, ``EMBED_BATCH_CPU`` on the CPU).
    progress(done, N) after each batch is queued (on CUDA the GPU may still be working on it).
    The model is moved to ``device`` (default: where it is) and left in eval mode.

    On CUDA nothing waits for the GPU until the end (but once, to record the forward pass as a
    CUDA graph after the first batches with ``cuda_graph``, ``speler.cuda_graph``): each batch is
    copied through pinned memory without blocking, every batch has the same shape (the last one
    is padded with empty samples, whose rows are dropped), the outputs stay on the GPU and come
    back in one copy, and the samples are checked for NaN and inf there, batch by batch, instead
    of by a pass over the whole array on the host first (which took longer than the copies): a
    sample with one is named after the pass over all of them. ``cuda_graph`` is off by default:
    a batch of 1,024 clips keeps the GPU busy for longer than its kernels take to launch, so a
    graph only adds its warm-up and capture (on an H200, 40,000 NTU-shaped clips, four calls
    each way: 0.85-0.87 of the bare forward rate without, 0.78-0.83 with). fit's batches of
    256 are launch-bound: its step is replayed.
    """
    if not isinstance(ds, SequenceSet):
        raise DataFormatError(f"embed expects a SequenceSet, got {type(ds).__name__}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"embed batch_size must be >= 1, got {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = str(param.device) if param is not None else "cpu"
    else:
        device = select_device(device)
    cuda = device.startswith("cuda")
    if batch_size is None:
        batch_size = EMBED_BATCH_CUDA if cuda else EMBED_BATCH_CPU
    if not cuda:
        _check_finite(ds, "embed")
    model.to(device).eval()
    rows = _Rows(ds.x, device, resident=False)
    outputs = []  # per batch: (B, d_t + d_f + 2 C) float32 on the device
    finite = []  # CUDA: per batch, bool (B,) on the device
    widths: list[int] = []  # d_t, d_f, C, read from the first batch's output

    def forward(xb: torch.Tensor) -> torch.Tensor:
        with _autocast(device, cuda, cache=not graphed):
            out = model(xb)
        widths[:] = [out.emb_time.shape[1], out.emb_freq.shape[1], out.logits_time.shape[1]]
        return torch.cat([out.emb_time.float(), out.emb_freq.float(),
                          out.logits_time.float().softmax(-1),
                          out.logits_freq.float().softmax(-1)], 1)

    graphed = cuda and cuda_graph
    step = GraphStep(forward, graph=graphed, what="embed's forward pass")
    with torch.inference_mode(), _threads(0, device):
        for start in range(0, ds.n, batch_size):
            stop = min(start + batch_size, ds.n)
            xb = rows.slice(start, stop)
            if cuda:
                finite.append(torch.isfinite(xb).flatten(1).all(1))
            if cuda and stop - start < batch_size:  # one shape for every batch (cuDNN plans)
                xb = torch.cat([xb, xb.new_zeros((batch_size - (stop - start),) + xb.shape[1:])])
            got = step(xb)[:stop - start]
            # a replayed graph writes its next batch over its output: keep a copy
            outputs.append(got.clone() if graphed else got)
            if progress is not None:
                progress(stop, ds.n)
    every = torch.cat(outputs).cpu().numpy()  # the one copy back
    if cuda:
        _check_finite(ds, "embed", torch.cat(finite).cpu().numpy())
    d_t, d_f, k = widths
    cut = np.cumsum([d_t, d_f, k])
    emb_t, emb_f, pt, pf = (np.ascontiguousarray(a, dtype=np.float32)
                            for a in np.split(every, cut, axis=1))
    return Embeddings(time=emb_t, freq=emb_f, probs=(0.5 * (pt + pf)).astype(np.float32),
                      probs_time=pt, probs_freq=pf)


# --- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, fit_or_model: FitResult | nn.Module, *, config: TrainConfig,
                    ds: SequenceSet, extra: dict | None = None) -> None:
    """Write weights + config + class list + layout + dataset fingerprint to ``path`` atomically.

    ``extra`` must hold plain values (str, numbers, bools, lists, dicts) so it loads with
    ``weights_only=True``.
    """
    model = fit_or_model.model if isinstance(fit_or_model, FitResult) else fit_or_model
    if not isinstance(model, SpelerNet):
        raise CheckpointError(f"save_checkpoint expects a FitResult or SpelerNet, got"
                              f" {type(model).__name__}")
    _, c, t, v, m = ds.shape
    if model.num_classes != ds.num_classes or model.in_channels != c or model.joints != v:
        raise CheckpointError(
            f"model (C={model.in_channels}, V={model.joints}, {model.num_classes} classes) does not"
            f" fit dataset {ds.where} (C={c}, V={v}, {ds.num_classes} classes)")
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "state_dict": {k: v_.detach().cpu() for k, v_ in model.state_dict().items()},
        "config": dataclasses.asdict(config),
        "classes": list(ds.classes),
        "layout": ds.layout.to_json(),
        "layout_name": ds.layout.name,
        "fingerprint": ds.fingerprint(),
        "model_args": {"in_channels": model.in_channels, "num_classes": model.num_classes,
                       "frames": model.frames, "persons": model.persons},
        "extra": dict(extra or {}),
    }
    if isinstance(fit_or_model, FitResult):
        payload["fit"] = {"best_epoch": int(fit_or_model.best_epoch),
                          "best_metric": float(fit_or_model.best_metric),
                          "device": fit_or_model.device, "seconds": float(fit_or_model.seconds),
                          "epochs_run": len(fit_or_model.history)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path, ds: SequenceSet) -> Checkpoint:
    """Load a checkpoint for ``ds`` (weights_only=True, onto the CPU).

    CheckpointError when the file is unreadable, lacks a field or has one of the wrong type, or was
    saved for another layout, class list or dataset (fingerprint), saying which and what was
    expected. For a round's checkpoint (``.../rounds/NNN/checkpoint.pt``) the message also says how
    to get past it: delete that round folder, and the next round starts from an earlier one.
    """
    path = Path(path)
    if path.parent.parent.name == "rounds":
        fix = (f"; delete the round folder {path.parent} and run the round again (it then starts"
               " from an earlier round's model, or trains from scratch)")
    else:
        fix = "; train a new checkpoint"

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}{fix}")

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise bad(f"not a readable SpeLER checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise bad(f"not a SpeLER checkpoint (no {CHECKPOINT_FORMAT!r} marker)")
    fields = {"version": (int, "an integer"), "layout_name": (str, "a layout name"),
              "layout": (str, "a layout JSON string"), "classes": ((list, tuple), "a list of names"),
              "fingerprint": (str, "a dataset fingerprint"), "config": (dict, "a dict"),
              "model_args": (dict, "a dict"), "state_dict": (dict, "a dict of tensors"),
              "extra": (dict, "a dict")}
    for key, (types, what) in fields.items():
        if key not in payload:
            if key == "extra":
                continue
            raise bad(f"checkpoint has no {key!r} field, expected {what}")
        value = payload[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise bad(f"checkpoint field {key!r} is {str(value)[:40]!r}, expected {what}")
    if not all(isinstance(c, str) for c in payload["classes"]):
        raise bad(f"checkpoint field 'classes' is {str(payload['classes'])[:60]}, expected names")
    if payload["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload['version']} is newer than this"
                              f" SpeLER reads ({CHECKPOINT_VERSION})")
    saved_layout = payload["layout_name"]
    if saved_layout != ds.layout.name:
        raise bad(f"checkpoint was trained on layout {saved_layout!r}, this dataset uses layout"
                  f" {ds.layout.name!r}")
    saved_classes = tuple(payload["classes"])
    if saved_classes != tuple(ds.classes):
        missing = [c for c in saved_classes if c not in ds.classes]
        added = [c for c in ds.classes if c not in saved_classes]
        detail = (f"missing here: {missing}, new here: {added}" if missing or added
                  else "same names in another order")
        raise bad(f"checkpoint classes {list(saved_classes)} differ from the dataset's"
                  f" {list(ds.classes)} ({detail})")
    fp = ds.fingerprint()
    if payload["fingerprint"] != fp:
        raise bad(f"checkpoint belongs to dataset fingerprint {payload['fingerprint']}, this"
                  f" dataset's fingerprint is {fp} (other sample ids, shape, classes or layout)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg_dict = {k: v for k, v in payload["config"].items() if k in known}
    dropped = sorted(set(payload["config"]) - known, key=str)
    if dropped:
        logger.warning("%s: ignoring unknown train config keys %s", path, dropped)
    try:
        config = TrainConfig(**cfg_dict)
        args = payload["model_args"]
        model = build_model(Layout.from_json(payload["layout"]), config=config, **args)
        model.load_state_dict(payload["state_dict"])
    except (ConfigError, DataFormatError, RuntimeError, TypeError, KeyError, ValueError,
            AttributeError) as exc:
        raise bad(f"cannot rebuild the model from the checkpoint ({exc})") from exc
    model.eval()
    return Checkpoint(model=model, config=config, classes=saved_classes, layout_name=saved_layout,
                      fingerprint=payload["fingerprint"], extra=dict(payload.get("extra", {})))
