"""The two-branch network: a time branch (GCN + multi-scale TCN for skeletons, FCN for series), a
frequency branch (FFT amplitude/phase, gated convolutions), cross-domain attention fusion and one
classifier head per branch. ``build_model`` picks the time branch from the layout.

Input x: float32 (N, C, T, V, M). Persons (M) share all weights: they are folded into the batch,
and their embeddings are averaged over the persons that are present (non-zero). Inference averages
both heads' softmax (``SpelerOutput.probs``).

On an accelerator the forward pass has static shapes and never waits for the device: every person
slot is run, an empty slot's embedding gets weight 0 in the average, and in training the BatchNorm
layers that see the slots take their batch statistics over the present slots only
(``PersonBatchNorm``), so the result is that of running the present slots alone. On a CPU, where a
host sync is free and compute is not, only the present slots are run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from speler.config import MODEL_KINDS, TrainConfig
from speler.data.layouts import Layout
from speler.errors import ConfigError, DataFormatError
from speler.models.fcn import FCN
from speler.models.fourier import FourierBranch
from speler.models.fusion import CrossDomainFusion
from speler.models.gcn import GraphConv, layout_partitions
from speler.models.tcn import MultiScaleTCN


@dataclass
class SpelerOutput:
    """What ``SpelerNet.forward`` returns; all float32 with N rows.

    logits_time, logits_freq: (N, num_classes) per branch.
    emb_time, emb_freq: (N, embed_dim) fused embeddings (the classifier inputs; propagation uses
        them).
    pre_time, pre_freq: (N, embed_dim) branch embeddings before cross-domain fusion (used by the
        contrastive loss).
    """

    logits_time: torch.Tensor
    logits_freq: torch.Tensor
    emb_time: torch.Tensor
    emb_freq: torch.Tensor
    pre_time: torch.Tensor
    pre_freq: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """Mean of both branches' softmax, (N, num_classes)."""
        return 0.5 * (self.logits_time.float().softmax(-1) + self.logits_freq.float().softmax(-1))


def skeleton_plan(channels: int, blocks: int, model: str = "small") -> list[tuple[int, int]]:
    """(width, temporal stride) of each GCN+TCN block.

    paper: width doubles, with stride 2, at 40 % and 70 % of the depth (CTR-GCN's 64×4, 128×3,
    256×3 for 10 blocks of base 64). small (CPU): stride 2 in the first two blocks and one doubling,
    so most blocks run at T/4 (base 32: 32 /2, 64 /2, 64, ...).
    """
    if blocks < 1:
        raise ConfigError(f"train.blocks must be >= 1, got {blocks}")
    if model == "paper":
        steps = {round(0.4 * blocks), round(0.7 * blocks)} - {0}
        plan, width = [], channels
        for i in range(blocks):
            stride = 1
            if i in steps:
                width, stride = width * 2, 2
            plan.append((width, stride))
        return plan
    return [(channels if i == 0 else 2 * channels, 2 if i < 2 else 1) for i in range(blocks)]


class Block(nn.Module):
    """GCN then multi-scale TCN, residual around both: (B, C_in, T, V) -> (B, C_out, T/s, V)."""

    def __init__(self, in_c: int, out_c: int, partitions, *, stride: int, groups: int,
                 dilations: tuple[int, ...], residual: bool = True) -> None:
        super().__init__()
        self.gcn = GraphConv(in_c, out_c, partitions, groups=groups,
                             rel_channels=8 if in_c <= 16 else max(4, in_c // 8))
        self.tcn = MultiScaleTCN(out_c, out_c, stride=stride, dilations=dilations, residual=False)
        if not residual:
            self.residual: nn.Module | None = None
        elif in_c == out_c and stride == 1:
            self.residual = nn.Identity()
        else:
            self.residual = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride=(stride, 1)),
                                          nn.BatchNorm2d(out_c))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tcn(self.gcn(x))
        if self.residual is not None:
            y = y + self.residual(x)
        return self.act(y)


def _parents(layout: Layout) -> list[int]:
    """Parent joint of each joint (itself for a root), from the layout's (child, parent) bones."""
    parent = list(range(layout.num_joints))
    for child, par in layout.bones:
        if parent[child] == child:
            parent[child] = par
    return parent


def _pool(h: torch.Tensor, segments: int) -> torch.Tensor:
    """(B, C, T) -> (B, C·(1 + segments)): mean over all frames, then over each of ``segments``
    equal stretches of time (keeps the coarse order of events: raising then lowering an arm)."""
    pooled = [h.mean(-1)]
    if segments:
        pooled.append(nn.functional.adaptive_avg_pool1d(h, segments).flatten(1))
    return torch.cat(pooled, 1)


class GraphTimeBranch(nn.Module):
    """Skeleton time branch: (B, C, T, V) -> (B, embed_dim).

    Input per joint: its coordinates and, with ``config.bones``, its bone vector (joint minus its
    parent joint, zero at the root), as in two-stream skeleton models.
    """

    def __init__(self, layout: Layout, in_channels: int, config: TrainConfig) -> None:
        super().__init__()
        parts = layout_partitions(layout)
        paper = config.model == "paper"
        dilations = (1, 2, 3, 4) if paper else (1, 2)
        self.bones = config.bones
        self.segments = config.segments
        self.register_buffer("parent", torch.tensor(_parents(layout)), persistent=False)
        blocks = []
        width = in_channels * (2 if self.bones else 1)
        plan = skeleton_plan(config.channels, config.blocks, config.model)
        for i, (out, stride) in enumerate(plan):
            groups = max(1, out // 8) if paper else 4
            blocks.append(Block(width, out, parts, stride=stride, groups=groups,
                                dilations=dilations, residual=i > 0))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(width * (1 + self.segments), config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bones:
            x = torch.cat([x, x - x[:, :, :, self.parent]], dim=1)
        h = self.blocks(x).mean(3)  # (B, C, T')
        return self.proj(_pool(h, self.segments))


class SeriesTimeBranch(nn.Module):
    """Series time branch: (B, C, T, 1) -> (B, embed_dim) via an FCN."""

    def __init__(self, in_channels: int, joints: int, config: TrainConfig) -> None:
        super().__init__()
        self.fcn = FCN(in_channels * joints, channels=config.channels, blocks=config.blocks)
        self.segments = config.segments
        self.proj = nn.Linear(self.fcn.out_channels * (1 + self.segments), config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, v = x.shape
        h = self.fcn(x.permute(0, 1, 3, 2).reshape(b, c * v, t))  # (B, C', T)
        return self.proj(_pool(h, self.segments))


class PersonBatchNorm:
    """BatchNorm (mixed into ``nn.BatchNorm1d``/``2d``) whose training statistics cover only the
    rows flagged in ``rows`` (bool (B,), set by ``SpelerNet.forward`` while it runs; None = all
    rows, the plain BatchNorm). Evaluation uses the running statistics as usual. Same parameters
    and buffers as the plain layer, so checkpoints do not change."""

    rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None or not self.training:
            return super().forward(x)
        return _masked_batch_norm(self, x, self.rows)


class PersonBatchNorm1d(PersonBatchNorm, nn.BatchNorm1d):
    pass


class PersonBatchNorm2d(PersonBatchNorm, nn.BatchNorm2d):
    pass


def _masked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of x (B, C, ...) with statistics over the rows where ``rows`` is
    true (float32, float64 for float64 x; no host sync); running statistics updated as
    ``nn.BatchNorm`` does (unbiased variance, ``momentum`` or a cumulative average when it is
    None)."""
    y, mean, var, count = _MaskedBatchNorm.apply(x, rows.to(torch.float32), bn.weight, bn.bias,
                                                 bn.eps)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = (bn.momentum if bn.momentum is not None
                      else (1.0 / bn.num_batches_tracked).to(mean.dtype))
            bn.running_mean.lerp_(mean, factor)
            bn.running_var.lerp_(var * count / (count - 1).clamp(min=1), factor)
    return y


class _MaskedBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with mean and (biased) var per channel
    over the rows b where w[b] = 1, every row normalised; forward and backward in float32
    (float64 for float64 x) with the result in x's dtype. First derivatives only.

    The same function as the plain composition of torch operations, with an estimated third of
    its memory traffic: that composition materialised a float32 copy of x for each of some ten
    element-wise steps forward and twice as many backward. Here a pass computes per-(row,
    channel) sums, one materialises x - mean, one its norm, one writes y; backward recomputes
    x - mean from the saved x. On one H100 the default network's bare training step at NTU shape,
    batch 512, went from 7,678 to 8,639 samples/s; at batch 256 the host launching kernels
    bounded the step either way (speler.cuda_graph). Gradient: with s = 1/sqrt(var + eps),
    n = the count of masked-in elements, a = sum over all rows of dy and b = sum of dy (x - mean),
    dx = weight s (dy - w (a + s² (x - mean) b) / n); rows outside the mask take the direct term
    only, their outputs still depend on the mean and variance through a and b.
    """

    @staticmethod
    def forward(ctx, x, w, weight, bias, eps):
        spatial = tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 x
        w = w.to(acc)
        count = w.sum() * (x[0, 0].numel())
        with torch.autocast(device_type=x.device.type, enabled=False):
            rowsum = x.sum(spatial, dtype=acc) if spatial else x.to(acc)  # (B, C)
            mean = (rowsum * w[:, None]).sum(0) / count
            xc = torch.sub(x, mean.view(shape))  # in mean's dtype (type promotion)
            sq = (torch.linalg.vector_norm(xc, dim=spatial).square() if spatial
                  else xc.square())
            var = (sq * w[:, None]).sum(0) / count
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else invstd * weight.to(acc)
            if bias is None:
                y = xc.mul_(scale.view(shape))
            else:
                y = torch.addcmul(bias.to(acc).view(shape), xc, scale.view(shape))
        ctx.save_for_backward(x, w, mean, invstd, weight, count)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, count)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises, never wrong
    def backward(ctx, gy, _g_mean, _g_var, _g_count):
        x, w, mean, invstd, weight, count = ctx.saved_tensors
        dims = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = torch.sub(x, mean.view(shape))
            a = gy.sum(dims, dtype=mean.dtype)
            b = (gy * xc).sum(dims)
            gx = gw = gb = None
            if ctx.needs_input_grad[0]:
                scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
                t = torch.addcmul((a / count).view(shape), xc,
                                  (invstd.square() * b / count).view(shape))
                t.mul_(w.view((-1,) + (1,) * (x.ndim - 1)))
                gx = torch.sub(gy, t).mul_(scale.view(shape)).to(x.dtype)
            if weight is not None and ctx.needs_input_grad[2]:
                gw = (invstd * b).to(weight.dtype)
            if ctx.needs_input_grad[3]:
                gb = a.to(ctx.bias_dtype)
        return gx, None, gw, gb, None


def _use_person_batch_norm(module: nn.Module) -> None:
    """Replace the plain BatchNorm1d/2d layers below ``module`` by their ``PersonBatchNorm``
    versions (freshly initialised: call before loading any weights)."""
    kinds = {nn.BatchNorm1d: PersonBatchNorm1d, nn.BatchNorm2d: PersonBatchNorm2d}
    for name, child in module.named_children():
        kind = kinds.get(type(child))
        if kind is None:
            _use_person_batch_norm(child)
            continue
        setattr(module, name, kind(child.num_features, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine,
                                   track_running_stats=child.track_running_stats))


@contextlib.contextmanager
def _person_rows(model: nn.Module, rows: torch.Tensor | None):
    """Tell every ``PersonBatchNorm`` of ``model`` which rows hold a person, for one pass."""
    if rows is None:
        yield
        return
    bns = [m for m in model.modules() if isinstance(m, PersonBatchNorm)]
    for bn in bns:
        bn.rows = rows
    try:
        yield
    finally:
        for bn in bns:
            bn.rows = None


class SpelerNet(nn.Module):
    """Two-branch classifier; ``forward(x)`` with x float32 (N, C, T, V, M) -> ``SpelerOutput``."""

    def __init__(self, layout: Layout, *, in_channels: int, num_classes: int, frames: int,
                 persons: int, config: TrainConfig) -> None:
        super().__init__()
        self.layout_name = layout.name
        self.in_channels, self.num_classes = in_channels, num_classes
        self.frames, self.persons, self.joints = frames, persons, layout.num_joints
        self.is_series = layout.is_series or layout.num_joints == 1
        v = layout.num_joints
        # One scale per input channel, shared by all joints: per-joint statistics would blow the
        # jitter of nearly still joints up to the size of the moving ones.
        self.data_bn = nn.BatchNorm2d(in_channels)
        if self.is_series:
            self.time_branch: nn.Module = SeriesTimeBranch(in_channels, v, config)
        else:
            self.time_branch = GraphTimeBranch(layout, in_channels, config)
        self.freq_branch = FourierBranch(in_channels, v, channels=config.freq_channels,
                                         embed_dim=config.embed_dim)
        _use_person_batch_norm(self)  # data_bn and both branches: the parts that see person slots
        self.static_persons: bool | None = None  # every slot run, masked (None: off on a CPU only)
        self.fusion = CrossDomainFusion(config.embed_dim)
        self.drop = nn.Dropout(config.dropout)
        self.head_time = nn.Linear(config.embed_dim, num_classes)
        self.head_freq = nn.Linear(config.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> SpelerOutput:
        if x.ndim != 5:
            raise DataFormatError(
                f"model input must have shape (N, C, T, V, M), got {tuple(x.shape)}")
        N, C, T, V, M = x.shape
        if C != self.in_channels or V != self.joints:
            raise DataFormatError(
                f"model input has C={C} channels and V={V} joints, this model ({self.layout_name})"
                f" expects C={self.in_channels}, V={self.joints}")
        if N == 0 or T < 2:
            raise DataFormatError(
                f"model input needs N >= 1 samples and T >= 2 frames, got N={N}, T={T}")
        # Persons share the weights: fold them into the batch and average the embeddings of the
        # slots that hold a person (an all-zero sample keeps all its slots). Every slot is run
        # (static shapes, no host sync); empty ones get weight 0 and stay out of the BatchNorm
        # statistics in training.
        present = x.detach().abs().amax(dim=(1, 2, 3)) > 0  # (N, M)
        present = present | ~present.any(1, keepdim=True)
        weight = present.float() / present.float().sum(1, keepdim=True)
        xp = x.permute(0, 4, 1, 2, 3).reshape(N * M, C, T, V)
        keep = present.reshape(-1)
        static = self.static_persons if self.static_persons is not None else x.device.type != "cpu"
        if not static and M > 1 and not bool(keep.all()):
            # on a CPU a host sync costs nothing and empty slots would cost compute (half the
            # slots of a one-person NTU clip): run the present slots only, put them back in place
            h_t, h_f = self._branches(xp[keep], None)
            h_t = h_t.new_zeros(N * M, h_t.shape[1]).index_copy(0, keep.nonzero()[:, 0], h_t)
            h_f = h_f.new_zeros(N * M, h_f.shape[1]).index_copy(0, keep.nonzero()[:, 0], h_f)
        else:
            h_t, h_f = self._branches(xp, keep if M > 1 and self.training else None)
        h_time = self._pool_persons(h_t, weight)
        h_freq = self._pool_persons(h_f, weight)
        e_time, e_freq = self.fusion(h_time, h_freq)
        return SpelerOutput(
            logits_time=self.head_time(self.drop(e_time)),
            logits_freq=self.head_freq(self.drop(e_freq)),
            emb_time=e_time, emb_freq=e_freq, pre_time=h_time, pre_freq=h_freq,
        )

    def _branches(self, xp: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches on the person slots xp (slots, C, T, V); ``rows``: the slots that hold a
        person, for the BatchNorm statistics in training (None = all of them)."""
        full = torch.promote_types(xp.dtype, torch.float32)  # float32 under autocast
        with _person_rows(self, rows):
            h_t = self.time_branch(self.data_bn(xp)).to(full)
            with torch.autocast(device_type=xp.device.type, enabled=False):
                h_f = self.freq_branch(xp.to(full))
        return h_t, h_f

    @staticmethod
    def _pool_persons(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(N·M slots, D) -> (N, D): weighted mean over each sample's person slots (weight 0 for
        an empty slot; ``where`` keeps whatever an empty slot computed out of the sum)."""
        n, m = weight.shape
        h = h.view(n, m, -1)
        return torch.where(weight.unsqueeze(-1) > 0, h * weight.unsqueeze(-1), 0.0).sum(1)


ARCH_FIELDS = ("model", "channels", "blocks", "freq_channels", "embed_dim", "segments", "bones")


def build_model(layout: Layout, *, in_channels: int, num_classes: int, frames: int, persons: int,
                config: TrainConfig) -> SpelerNet:
    """The network for this layout and input size; ConfigError on impossible sizes.

    The time branch is a GCN + TCN stack for skeleton layouts and an FCN for ``series`` (V = 1).
    """
    if config.model not in MODEL_KINDS:
        raise ConfigError(
            f"train.model must be one of {', '.join(MODEL_KINDS)}, got {config.model!r}")
    for name in ("channels", "blocks", "freq_channels", "embed_dim"):
        if getattr(config, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(config, name)}")
    if config.segments < 0:
        raise ConfigError(f"train.segments must be >= 0, got {config.segments}")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"train.dropout must be in [0, 1), got {config.dropout}")
    if in_channels < 1 or num_classes < 1 or frames < 2 or persons < 1:
        raise ConfigError(
            f"cannot build a model for in_channels={in_channels}, num_classes={num_classes},"
            f" frames={frames}, persons={persons}; expected >= 1 channel, class and person and"
            f" >= 2 frames")
    return SpelerNet(layout, in_channels=in_channels, num_classes=num_classes, frames=frames,
                     persons=persons, config=config)


def paper_config(kind: str = "skeleton", **overrides) -> TrainConfig:
    """The paper's GPU-size settings (method.md): CTR-GCN widths 64-128-256 over 10 blocks, batch
    128; skeletons Adam lr 5e-4, 300 epochs (10 supervised), patience 20; series lr 1e-3, 120 epochs
    (5 supervised). Pair it with ``PreprocessConfig(frames=64)`` or more; ``overrides`` replace
    fields.
    """
    if kind not in ("skeleton", "series"):
        raise ConfigError(f"paper_config kind must be 'skeleton' or 'series', got {kind!r}")
    base = dict(model="paper", channels=64, blocks=10, freq_channels=64, embed_dim=256,
                batch_size=128, holdout=0.1, pseudo_ratio=0.0)
    if kind == "skeleton":
        base.update(epochs=300, supervised_epochs=10, lr=5e-4, patience=20)
    else:
        base.update(channels=128, blocks=3, epochs=120, supervised_epochs=5, lr=1e-3, patience=20)
    base.update(overrides)
    return dataclasses.replace(TrainConfig(), **base)
