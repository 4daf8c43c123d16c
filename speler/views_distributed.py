"""The label-free views of a dataset, computed with its rows sharded over the ranks of a group.

``label_free_views_sharded(x, ...)`` returns this rank's rows [lo, hi) = ``shard_range(N)`` of what
``features.label_free_views(x, ...)`` returns for the whole x (same views, same arguments, same
errors). Every rank holds the whole x (each reads the file itself); it computes only its rows:

- ``rocket`` / ``rocket_diff``: the ``RocketTransform`` is fitted on the whole series on every rank
  (the same dilations, channel subsets and biases from the seed and the whole data), then applies
  to the local rows only. A sample's PPV features do not depend on the other samples of its batch
  (each sample's convolution is its own; bit-equal to the whole-batch transform, checked in the
  tests), so the local feature rows are those of the single-process transform.
- PCA, N <= ``exact_max_n`` (default: ``features``' own exact-PCA limit): the rocket feature rows
  are all-gathered (N × F float32) and every rank runs the very same ``features.pca`` on them; the
  ``plain`` view needs no exchange (every rank holds x). The views equal the single-process ones
  bit for bit.
- PCA, N > ``exact_max_n``: the features are never gathered. Column mean and standard deviation
  come from all-reduced float64 sums (two passes: sum, then squared deviations from the mean), the
  same constant-column rule keeps the same columns, and a randomized range finder runs on the
  row-sharded standardised Z (N × F'): Y = Z Ω with Ω (F' × q) Gaussian from the seed (the same on
  every rank), q = min(r + 10, N, F'), r = min(dim, N - 1, F'). Row-sharded Y is orthonormalised
  from its all-reduced q × q Gram (eigendecomposition, twice; see ``_orthonormal``), then 4 power
  iterations as ``torch.svd_lowrank`` does: P = qr(Zᵀ Q) (Zᵀ Q all-reduced from the local Z_rᵀ Q_r,
  P then the same on every rank), Q = orth(Z P). Finally B = Qᵀ Z (q × F', all-reduced), its SVD
  U_b S Vᵀ, and the local rows (Q_r U_b)[:, :r] · S[:r], L2-normalised. The products with Z run in
  float32 (as ``torch.svd_lowrank`` computes them; float64 took 2.7× as long, 0.78 s against 0.29 s
  for 10,000 × 10,000 × 138 on one core), everything else (the sums over ranks, Grams, QR, SVD) in
  float64. Each component's sign is fixed (its largest loading in V positive), so the values depend
  on the world size only through the order of the float sums (bit-equal on 1 and 2 ranks in the
  tests). Components may differ in sign and rotation from the single-process ``pca``, so the values
  differ; the inner products between rows (what cosine kNN reads) agree with the single-process
  view's as closely as a randomized PCA agrees with the exact one: to rounding when the spectrum has
  a gap after the r-th component, and loosely among near-equal singular values at the cut.

Memory per rank on the large path: the local rows × F features (float32, and a float64 copy while
they are standardised), plus F × q and q × q matrices; the transform, like the single process's,
holds the whole series.

Traffic per rank (counted in ``distributed.traffic``): exact path, (world - 1) × local rows × F × 4
bytes per rocket view (all-gather), none for ``plain``; large path, all-reduces of (2 F + 5 F' q +
10 q²) float64 per view (column sums, 4 Zᵀ Q, B, 2 Grams per orthonormalisation), that is about
2 (world - 1) / world × 8 × (2 F + 5 F' q + 10 q²) bytes on the wire per rank, whatever N: for
F ≈ 10 000 rocket features and dim 128 (q = 138) ~57 MB per view on 2 ranks, under 114 MB on any
number; plus an 8-byte all-reduce per failure-agreement stage.

Failing together: the arguments and x are checked on every rank before any exchange (the errors of
``label_free_views``, raised on every rank as ``distributed.RankFailedError``), and the ranks
check that they hold data of one shape and were given the same arguments. Every computing step
between two exchanges is a ``distributed.together`` stage. Without a process group (or with one
rank), and for no views, this is ``features.label_free_views`` itself (``exact_max_n`` then does
not apply: nothing needs gathering).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from speler import distributed as dist
from speler import features
from speler.errors import DataFormatError

logger = logging.getLogger(__name__)

_POWER_ITERATIONS = 4  # as features.pca's torch.svd_lowrank(niter=4)
_OVERSAMPLE = 10  # q = r + 10 as features.pca's torch.svd_lowrank(q=r + 10)


def label_free_views_sharded(
    x: np.ndarray,
    *,
    views: tuple[str, ...] = features.VIEWS,
    dim: int = 128,
    rocket_features: int = 10_000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    exact_max_n: int = features._EXACT_PCA_MAX_N,
) -> dict[str, np.ndarray]:
    """{view name: float32 (hi - lo, d)}: this rank's rows [lo, hi) = ``shard_range(N)`` of
    ``features.label_free_views(x, ...)`` (see the module docstring).

    Every rank of the group must call it with the same x float32 (N, C, T, V, M) and the same
    arguments. Errors (on every rank, as distributed.RankFailedError naming the failing rank and the
    original error; in a world of one the original error itself): ConfigError for an unknown view or
    rocket_features < 84, DataFormatError for x of the wrong shape, with fewer than 2 samples or
    with a non-finite value, or differing between the ranks. progress(view index, number of views)
    before each view and at the end.
    """
    if dist.world_size() == 1 or not views:  # no views: {} and nothing checked, as there
        return features.label_free_views(x, views=views, dim=dim,
                                         rocket_features=rocket_features, seed=seed,
                                         progress=progress)
    with dist.together("label-free views input"):
        x = _checked(x, views, rocket_features)
    settings = (x.shape, x.dtype.str, tuple(views), dim, rocket_features, seed, exact_max_n)
    every = dist.all_gather_object(settings)
    with dist.together("label-free views input"):
        if any(s != settings for s in every):
            raise DataFormatError("label-free views: the ranks differ in x or the arguments "
                                  "(shape, dtype, views, dim, rocket_features, seed, "
                                  f"exact_max_n): {dict(enumerate(every))}")
    n = len(x)
    lo, hi = dist.shard_range(n)
    out: dict[str, np.ndarray] = {}
    for i, v in enumerate(views):
        if progress is not None:
            progress(i, len(views))
        if v == "plain":
            if n <= exact_max_n:
                with dist.together("plain view"):
                    out[v] = features.plain_view(x, dim=dim, seed=seed)[lo:hi].copy()
            else:
                flat = x[lo:hi].reshape(hi - lo, int(np.prod(x.shape[1:])))
                out[v] = _pca_rows(flat, n, dim=dim, seed=seed, stage="plain view PCA")
        elif v == "rocket_diff" and x.shape[2] < 2:
            logger.warning("view %s left out: the samples have %d frame(s), no difference over "
                           "time", v, x.shape[2])
        else:
            out[v] = _rocket_rows(x, lo, hi, v, dim=dim, num_features=rocket_features, seed=seed,
                                  exact_max_n=exact_max_n)
    if progress is not None:
        progress(len(views), len(views))
    return out


def _checked(x: np.ndarray, views: tuple[str, ...], rocket_features: int) -> np.ndarray:
    """x as an array after the checks ``features.label_free_views`` makes (the same messages)."""
    features.check_settings(views, rocket_features)
    return features._check_x(x, f"{views[0]} view")


def _rocket_rows(x: np.ndarray, lo: int, hi: int, view: str, *, dim: int, num_features: int,
                 seed: int, exact_max_n: int) -> np.ndarray:
    """Rows [lo, hi) of the view ``rocket`` (``features.rocket_view(x, seed=seed)``) or
    ``rocket_diff`` (``rocket_view(np.diff(x, axis=2), seed=seed + 1)``, as label_free_views):
    the transform fitted on all of x, applied to the rows."""
    if view == "rocket_diff":
        seed += 1
    with dist.together(f"{view} view transform"):
        series = features._as_series(np.diff(x, axis=2) if view == "rocket_diff" else x)
        transform = features.RocketTransform(series, num_features=num_features, seed=seed)
        local = transform.transform(series[lo:hi])
    if len(x) > exact_max_n:
        return _pca_rows(local, len(x), dim=dim, seed=seed, stage=f"{view} view PCA")
    whole = dist.all_gather_array(local)
    with dist.together(f"{view} view PCA"):
        return features.pca(whole, dim, seed=seed)[lo:hi].copy()


def _pca_rows(local: np.ndarray, n: int, *, dim: int, seed: int, stage: str) -> np.ndarray:
    """This rank's rows of ``features.pca`` of the row-sharded (n, F) matrix whose rows here are
    ``local``, by the distributed randomized PCA of the module docstring; float32 (rows, r).
    Every local step is a ``together`` stage: a failure on one rank fails every rank."""
    z = _standardised(local, n, stage)
    if z is None:  # every sample identical: no direction to keep
        return np.zeros((len(local), 1), dtype=np.float32)
    z = z.astype(np.float32)  # the products with Z in float32, as torch.svd_lowrank's
    f = z.shape[1]
    r = features._components(dim, n, f)

    def times(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32, copy=False) @ b.astype(np.float32, copy=False)).astype(
            np.float64)

    with dist.together(stage):
        y = times(z, np.random.default_rng(seed).standard_normal((f, min(r + _OVERSAMPLE, n, f))))
    basis = _orthonormal(y, stage)
    for _ in range(_POWER_ITERATIONS):
        across = _summed(lambda: times(z.T, basis), stage)  # (F', k), the same on every rank
        with dist.together(stage):
            y = times(z, np.linalg.qr(across)[0])
        basis = _orthonormal(y, stage)
    b = _summed(lambda: times(basis.T, z), stage)
    with dist.together(stage):
        u, s, vt = np.linalg.svd(b, full_matrices=False)
        k = min(r, len(s))
        sign = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])  # largest loading > 0
        proj = np.zeros((len(z), r))  # components beyond the rank of Z (k < r) stay zero
        proj[:, :k] = (basis @ u[:, :k]) * (s[:k] * sign)
        return features._unit_rows(proj)


def _standardised(local: np.ndarray, n: int, stage: str) -> np.ndarray | None:
    """The local rows standardised as ``features.pca`` does, with the mean and standard deviation
    of each column over all n rows of every rank (float64 sums); None when every column is
    constant."""
    with dist.together(stage):
        rows = np.asarray(local, dtype=np.float64)
    mean = _summed(lambda: rows.sum(axis=0), stage) / n
    std = np.sqrt(_summed(lambda: ((rows - mean) ** 2).sum(axis=0), stage) / n)
    with dist.together(stage):
        return features._standardise(rows, mean, std)


def _orthonormal(y: np.ndarray, stage: str) -> np.ndarray:
    """Local rows of an orthonormal basis (over all ranks) of the columns of the row-sharded y.

    From the all-reduced Gram YᵀY = V Λ Vᵀ: Q_r = Y_r V Λ^(-1/2), twice (the second pass restores
    the orthogonality the first loses to rounding, as Cholesky-QR2 does). Unlike a Cholesky factor
    it copes with a rank-deficient Y (duplicated samples, q = N > rank): directions whose
    eigenvalue is below q · eps of the largest are dropped, so the basis may have fewer columns.
    Every rank factors the same all-reduced Gram, so every rank applies the same transformation.
    """
    for _ in range(2):
        gram = _summed(lambda: y.T @ y, stage)
        with dist.together(stage):
            vals, vecs = np.linalg.eigh(gram)
            keep = vals > vals[-1] * len(vals) * np.finfo(np.float64).eps
            y = y @ (vecs[:, keep] / np.sqrt(vals[keep]))
    return y


def _summed(part: Callable[[], np.ndarray], stage: str) -> np.ndarray:
    """part() on this rank (a failure fails every rank in ``stage``), summed over the ranks."""
    with dist.together(stage):
        mine = part()
    return dist.all_reduce_array(mine)
