"""Label-free views of a dataset: embeddings every round computes before any training.

Three views, all from the preprocessed tensor x float32 (N, C, T, V, M) alone (no label is read):

- ``plain``: every sample flattened, each coordinate standardised over the samples, PCA.
- ``rocket``: random convolutional kernel features in the manner of MiniRocket (Dempster, Schmidt
  and Webb, KDD 2021). Each sample is a multivariate series of D = C·V·M channels over T frames.
  The 84 kernels of length 9 have weight -1 at six taps and +2 at three (every choice of three of
  nine taps; each kernel sums to 0, so a constant offset has no effect). Dilations are spaced
  exponentially from 1 to (T - 1) / 8. For each (dilation, kernel) a random subset of 1-9
  channels is summed first (convolution is linear, so this equals summing the channels'
  convolutions, at a fraction of the cost), then convolved. Biases come from quantiles of that
  convolution on one random sample, at the low-discrepancy quantiles ``frac(j · φ)``, and each
  feature is the proportion of positive values (PPV) of (convolution - bias). Half the
  (dilation, kernel) pairs are zero-padded, the other half read only the frames where the kernel
  fits. PPV features are then standardised and reduced by PCA.
- ``rocket_diff``: the ``rocket`` transform (its own random draw) of the first differences over
  time (velocities, for skeletons), as MultiRocket (Tan, Dempster, Bergmeir and Webb, 2022) adds
  the first-difference series to MiniRocket's. Left out when T < 2.

All views end L2-normalised (kNN uses cosine similarity). Everything is deterministic for a
seed. Written in torch, so the transform needs no numba and runs on a GPU as well.

Why these views: on the real sets in ../shared/data and on sets outside it, propagation on the
random-kernel view beat propagation on plain features by large margins at a few dozen labels,
and the sum of both views' normalised graphs (``speler.graph.knn.combine_affinities``) was the
steadier of the two across sets (benchmarks/round_quality.py). Adding the first-difference view
at half weight raised the floor's macro-F1 (five sets, 5 seeds, labels-prior balance) by +1.3 /
+0.1 / +1.2 / +2.9 points at π=10 γ=5 % / π=10 10 % / π=50 5 % / π=50 10 %, better in 66 of the
100 set × setting × seed cases and worse in 27; alone it was 6-10 points below the floor. A
log-amplitude Fourier view at half weight gave +1.2 / +1.9 / -1.0 / +1.7 (57 better, 38 worse)
and was not kept.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Callable

import numpy as np
import torch

from speler.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

VIEWS = ("plain", "rocket", "rocket_diff")
_KERNEL_LENGTH = 9
_MAX_DILATIONS = 32
_PHI = (math.sqrt(5.0) + 1.0) / 2.0
_EXACT_PCA_MAX_N = 4_000  # exact PCA (Gram eigendecomposition) up to this many samples
_BATCH = 256  # samples per transform batch (bounds the (B, 84, features, T) comparison tensor)


def _kernels() -> torch.Tensor:
    """float32 (84, 9): -1 everywhere, +2 at every choice of three taps."""
    combos = list(itertools.combinations(range(_KERNEL_LENGTH), 3))
    w = -torch.ones(len(combos), _KERNEL_LENGTH)
    for k, taps in enumerate(combos):
        w[k, list(taps)] = 2.0
    return w


def _check_x(x: np.ndarray, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 5:
        raise DataFormatError(f"{where}: expected x of shape (N, C, T, V, M), got {x.shape}")
    if x.shape[0] < 2:
        raise DataFormatError(f"{where}: need at least 2 samples, got {x.shape[0]}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))[0])
        raise DataFormatError(f"{where}: sample {bad} has non-finite values (NaN or inf)")
    return x


def _as_series(x: np.ndarray) -> torch.Tensor:
    """(N, C, T, V, M) → float32 (N, C·V·M, T), channels that are zero everywhere dropped."""
    n, c, t, v, m = x.shape
    s = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(0, 1, 3, 4, 2)
    s = s.reshape(n, c * v * m, t)
    used = s.abs().amax(dim=(0, 2)) > 0
    return s[:, used] if used.any() else s[:, :1]


class RocketTransform:
    """A fitted random-kernel transform: ``transform(series) → float32 (N, features)``.

    Fit on series float32 (N, D, T): draws dilations, channel subsets and biases with ``seed``.
    """

    def __init__(self, series: torch.Tensor, *, num_features: int = 10_000, seed: int = 0) -> None:
        n, d, t = series.shape
        self.channels, self.frames = d, t
        gen = torch.Generator().manual_seed(int(seed))
        self.weights = _kernels()
        k = self.weights.shape[0]
        per_kernel = max(1, num_features // k)
        max_exp = math.log2(max(1.0, (t - 1) / (_KERNEL_LENGTH - 1)))
        raw = np.floor(np.logspace(0, max_exp, min(per_kernel, _MAX_DILATIONS), base=2)).astype(int)
        dilations, counts = np.unique(raw, return_counts=True)
        # features per dilation in proportion to how often it was drawn, summing to per_kernel
        share = counts * per_kernel / counts.sum()
        per = np.maximum(1, np.round(share)).astype(int)
        self.plan: list[dict] = []
        combo = 0
        for dil, nf in zip(dilations.tolist(), per.tolist()):
            # channel subset per kernel: 2^U(0, log2(min(D, 9) + 1)) channels, at random
            top = math.log2(min(d, _KERNEL_LENGTH) + 1)
            sizes = torch.floor(2 ** (torch.rand(k, generator=gen) * top)).clamp(1, d).long()
            mask = torch.zeros(k, d)
            for i in range(k):
                mask[i, torch.randperm(d, generator=gen)[: int(sizes[i])]] = 1.0
            pad = (_KERNEL_LENGTH - 1) * dil // 2
            padded = torch.tensor([(combo + i) % 2 == 0 for i in range(k)])
            if t - 2 * pad < 1:  # the kernel never fits without padding
                padded[:] = True
            combo += k
            valid = torch.ones(k, t, dtype=torch.bool)
            valid[~padded, :pad] = False
            if pad:
                valid[~padded, t - pad:] = False
            # biases: quantiles of each kernel's response on one random sample
            pick = torch.randint(0, n, (k,), generator=gen)
            out = self._convolve(series[pick], mask, dil, diagonal=True)  # (k, t)
            q = torch.tensor([((j + 1) * _PHI) % 1.0 for j in range(nf)], dtype=torch.float32)
            biases = torch.stack([torch.quantile(out[i][valid[i]], q) for i in range(k)])  # (k, nf)
            self.plan.append({"dilation": dil, "mask": mask, "valid": valid, "biases": biases})
        self.num_features = k * int(per.sum())

    def _convolve(self, s: torch.Tensor, mask: torch.Tensor, dilation: int, *,
                  diagonal: bool = False) -> torch.Tensor:
        """Kernel k on the sum of its channels. s: (B, D, T) → (B, 84, T); with ``diagonal``,
        s: (84, D, T), kernel k applied to row k only → (84, T)."""
        pad = (_KERNEL_LENGTH - 1) * dilation // 2
        mixed = (torch.einsum("kd,kdt->kt", mask, s)[None] if diagonal
                 else torch.einsum("kd,bdt->bkt", mask, s))
        out = torch.nn.functional.conv1d(mixed, self.weights[:, None, :], padding=pad,
                                         dilation=dilation, groups=self.weights.shape[0])
        return out[0] if diagonal else out

    @torch.no_grad()
    def transform(self, series: torch.Tensor, *,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        n = series.shape[0]
        if series.shape[1:] != (self.channels, self.frames):
            raise DataFormatError(f"rocket transform was fitted on (D, T) = "
                                  f"{(self.channels, self.frames)}, got {tuple(series.shape[1:])}")
        out = np.empty((n, self.num_features), dtype=np.float32)
        for start in range(0, n, _BATCH):
            s = series[start:start + _BATCH]
            cols = []
            for p in self.plan:
                conv = self._convolve(s, p["mask"], p["dilation"])  # (B, k, T)
                ppv = _ppv(conv, p["valid"], p["biases"])
                cols.append(ppv.reshape(len(s), -1))
            out[start:start + len(s)] = torch.cat(cols, dim=1).numpy()
            if progress is not None:
                progress(min(start + _BATCH, n), n)
        return out


def _ppv(conv: torch.Tensor, valid: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """Proportion of positive values of (conv - bias) over the valid frames, for every bias.

    conv float32 (B, k, T), valid bool (k, T), biases float32 (k, nf) → float32 (B, k, nf).
    Counted by sorting each response once and locating each bias in it (T log T + nf log T per
    response instead of comparing all nf × T pairs: 4 of the 4.6 ms per NTU-shaped sample went
    to those comparisons); the frames outside ``valid`` become -inf, below every bias, so the
    counts, and the features, are exactly those of the pairwise comparison.
    """
    t = conv.shape[-1]
    ordered = torch.sort(conv.masked_fill(~valid[None], float("-inf")), dim=-1).values
    at_most = torch.searchsorted(ordered, biases[None].expand(len(conv), -1, -1).contiguous(),
                                 right=True)
    return (t - at_most).float() / valid.sum(-1)[None, :, None]


def pca(x: np.ndarray, dim: int, *, seed: int = 0) -> np.ndarray:
    """Standardise the columns of x (N, F) (constant columns dropped), project on the top ``dim``
    principal components (fewer when N or F is smaller), and L2-normalise the rows; float32."""
    x = np.asarray(x, dtype=np.float64)
    z = _standardise(x, x.mean(axis=0), x.std(axis=0))
    if z is None:  # every sample identical: no direction to keep
        return np.zeros((len(x), 1), dtype=np.float32)
    n, f = z.shape
    r = _components(dim, n, f)
    if n <= _EXACT_PCA_MAX_N:
        gram = z @ z.T
        vals, vecs = np.linalg.eigh(gram)
        top = np.argsort(vals)[::-1][:r]
        proj = vecs[:, top] * np.sqrt(np.clip(vals[top], 0.0, None))
    else:
        zt = torch.from_numpy(z.astype(np.float32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, _ = torch.svd_lowrank(zt, q=min(r + 10, n, f), niter=4)
        proj = (u[:, :r] * s[:r]).double().numpy()
    return _unit_rows(proj)


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray | None:
    """Rows x float64 (rows, F) with ``mean`` and ``std`` of each column over all the samples →
    the columns that are not constant (std above 1e-8 of max(1, largest |mean|)), standardised;
    None when every column is constant."""
    keep = std > 1e-8 * max(1.0, float(np.abs(mean).max(initial=0.0)))
    if not keep.any():
        return None
    return (x[:, keep] - mean[keep]) / std[keep]


def _components(dim: int, n: int, f: int) -> int:
    """How many principal components ``pca`` keeps of n samples × f standardised columns."""
    return max(1, min(dim, n - 1, f))


def _unit_rows(proj: np.ndarray) -> np.ndarray:
    """float32 rows of ``proj`` scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(proj, axis=1, keepdims=True)
    return (proj / np.maximum(norms, 1e-12)).astype(np.float32)


def plain_view(x: np.ndarray, *, dim: int = 128, seed: int = 0) -> np.ndarray:
    """float32 (N, ≤ dim): the flattened preprocessed samples, standardised, PCA, L2-normalised."""
    x = _check_x(x, "plain view")
    return pca(x.reshape(len(x), -1), dim, seed=seed)


def rocket_view(x: np.ndarray, *, dim: int = 128, num_features: int = 10_000, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """float32 (N, ≤ dim): random-kernel PPV features (see the module docstring), standardised,
    PCA, L2-normalised."""
    x = _check_x(x, "rocket view")
    check_settings(("rocket",), num_features)
    series = _as_series(x)
    transform = RocketTransform(series, num_features=num_features, seed=seed)
    feats = transform.transform(series, progress=progress)
    return pca(feats, dim, seed=seed)


def check_settings(views: tuple[str, ...], rocket_features: int) -> None:
    """ConfigError for an unknown view name, or for fewer than 84 random-kernel features (one per
    kernel) when a ``rocket`` view is asked for."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ConfigError(f"unknown label-free view {unknown[0]!r}; known: {', '.join(VIEWS)}")
    if rocket_features < 84 and any(v.startswith("rocket") for v in views):
        raise ConfigError(f"views.rocket_features must be >= 84 (one per kernel), got "
                          f"{rocket_features}")


def label_free_views(x: np.ndarray, *, views: tuple[str, ...] = VIEWS, dim: int = 128,
                     rocket_features: int = 10_000, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """{view name: float32 (N, d)} for the named ``views`` of x float32 (N, C, T, V, M);
    ``rocket_diff`` is left out (with a warning) when x has fewer than 2 frames."""
    check_settings(views, rocket_features)
    out: dict[str, np.ndarray] = {}
    for i, v in enumerate(views):
        if progress is not None:
            progress(i, len(views))
        if v == "plain":
            out[v] = plain_view(x, dim=dim, seed=seed)
        elif v == "rocket":
            out[v] = rocket_view(x, dim=dim, num_features=rocket_features, seed=seed)
        else:  # rocket_diff
            x = _check_x(x, "rocket_diff view")
            if x.shape[2] < 2:
                logger.warning("view %s left out: the samples have %d frame(s), no difference "
                               "over time", v, x.shape[2])
            else:
                out[v] = rocket_view(np.diff(x, axis=2), dim=dim, num_features=rocket_features,
                                     seed=seed + 1)
    if progress is not None:
        progress(len(views), len(views))
    return out
