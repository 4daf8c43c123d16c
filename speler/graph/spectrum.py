"""Eigenvalue spectrum of the propagation operator S = D^-1/2 W D^-1/2, before and after balance.

The paper's argument: class imbalance pushes the eigenvalue density of S towards low values, and
the spectral balance moves it back to the middle and high range. ``spectrum`` gives the extreme
eigenvalues by Lanczos (``scipy.sparse.linalg.eigsh``) and the density of the whole spectrum:

- ``"exact"``: all eigenvalues by dense ``eigvalsh`` when n ≤ ``exact_max_n`` (a few thousand; the
  only place in speler/graph where an n×n array is formed, and only that small);
- ``"slq"``: stochastic Lanczos quadrature beyond: ``n_probe`` random ±1 vectors, ``steps``
  Lanczos steps each (with full re-orthogonalisation), the Ritz values θ_k of each run weighted by
  the squared first components of their eigenvectors. The density estimate is
  ``Σ_probes Σ_k τ_k K_h(λ - θ_k) / n_probe`` with K_h a Gaussian of width ``bandwidth``; the exact
  density uses the same kernel, so the two are directly comparable.

All eigenvalues of S lie in [-1, 1]; the largest is 1 (once per connected component).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from speler.config import PropagationConfig
from speler.errors import ConfigError
from speler.graph.propagate import normalized_operator, spectral_balance, validated_graph

logger = logging.getLogger(__name__)


@dataclass
class Spectrum:
    """Eigenvalue density of S on a grid.

    grid: float64 (bins,), eigenvalue positions in [-1, 1].
    density: float64 (bins,), smoothed density (integrates to ~1 over the grid).
    extremes: {"lambda_min", "lambda_max", "lambda_2" (second largest), "gap" (λ_max - λ_2),
        "mass_below_0" (share of eigenvalues < 0), "mean" (trace / n)}.
    method: "exact" or "slq"; n: number of nodes; balanced: whether S was balanced.
    bandwidth: width of the Gaussian kernel; seconds: wall time.
    eigenvalues: float64 (n,), all eigenvalues for "exact", else None.
    """

    grid: np.ndarray
    density: np.ndarray
    extremes: dict[str, float]
    method: str
    n: int
    balanced: bool = False
    bandwidth: float = 0.02
    seconds: float = 0.0
    eigenvalues: np.ndarray | None = field(default=None, repr=False)


def spectrum(
    W: sp.spmatrix,
    *,
    node_weights: np.ndarray | None = None,
    exact_max_n: int = 3000,
    n_probe: int = 16,
    steps: int = 60,
    bins: int = 401,
    bandwidth: float = 0.02,
    seed: int = 0,
) -> Spectrum:
    """Spectrum of S built from W (symmetric sparse (n, n)), balanced by ``node_weights``
    (``p_c(i)^-1/2``, see ``propagate.spectral_balance``) when given."""
    if n_probe < 1 or steps < 2 or bins < 2 or not bandwidth > 0:
        raise ConfigError(
            f"spectrum: need n_probe >= 1, steps >= 2, bins >= 2, bandwidth > 0; got "
            f"{n_probe}, {steps}, {bins}, {bandwidth}"
        )
    start = time.perf_counter()
    W = validated_graph(W)
    n = W.shape[0]
    S = normalized_operator(W, node_weights).astype(np.float64)
    grid = np.linspace(-1.0, 1.0, bins)
    if n <= exact_max_n:
        lam = np.linalg.eigvalsh(S.toarray())
        density = _kde(grid, lam, np.full(n, 1.0 / n), bandwidth)
        ext = {"lambda_min": float(lam[0]), "lambda_max": float(lam[-1]),
               "lambda_2": float(lam[-2]) if n > 1 else float(lam[-1])}
        ext["mass_below_0"] = float((lam < 0).mean())
        method, eig = "exact", lam
    else:
        nodes, weights = _slq(S, n_probe, min(steps, n), seed)
        density = _kde(grid, nodes, weights, bandwidth)
        ext = _extremes(S, seed)
        ext["mass_below_0"] = float(weights[nodes < 0].sum())
        method, eig = "slq", None
    ext["gap"] = ext["lambda_max"] - ext["lambda_2"]
    ext["mean"] = float(S.diagonal().sum() / n)
    return Spectrum(grid=grid, density=density, extremes=ext, method=method, n=n,
                    balanced=node_weights is not None, bandwidth=bandwidth,
                    seconds=time.perf_counter() - start, eigenvalues=eig)


def spectrum_before_after(
    W: sp.spmatrix,
    labels: np.ndarray,
    *,
    num_classes: int,
    config: PropagationConfig = PropagationConfig(),
    predictions: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    **kwargs,
) -> tuple[Spectrum, Spectrum]:
    """Spectra of S without and with the spectral balance that ``propagate`` would apply for the
    same labels / predictions / prior (keyword arguments go to ``spectrum``)."""
    w, _ = spectral_balance(W, labels, num_classes=num_classes, config=config, prior=prior,
                            predictions=predictions)
    return spectrum(W, **kwargs), spectrum(W, node_weights=w, **kwargs)


# ----------------------------------------------------------------------------------------------
def _kde(grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, h: float) -> np.ndarray:
    out = np.zeros_like(grid)
    norm = 1.0 / (h * math.sqrt(2 * math.pi))
    for lo in range(0, len(nodes), 4096):
        d = (grid[:, None] - nodes[None, lo:lo + 4096]) / h
        out += (np.exp(-0.5 * d * d) * weights[None, lo:lo + 4096]).sum(axis=1) * norm
    return out


def _slq(S: sp.csr_matrix, n_probe: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and quadrature weights of ``n_probe`` Lanczos runs of ``m`` steps."""
    n = S.shape[0]
    rng = np.random.default_rng(seed)
    dtype = np.float64 if n * m <= 16_000_000 else np.float32  # basis memory n·m·(8|4) bytes
    all_nodes, all_weights = [], []
    for _ in range(n_probe):
        v = rng.choice(np.array([-1.0, 1.0]), size=n) / math.sqrt(n)
        V = np.empty((m, n), dtype=dtype)
        a = np.zeros(m)
        b = np.zeros(m)
        V[0] = v
        k = m
        for j in range(m):
            w = S @ V[j].astype(np.float64)
            a[j] = float(V[j] @ w)
            # full re-orthogonalisation (twice is enough), keeps ghost eigenvalues away
            for _ in range(2):
                basis = V[: j + 1]
                coef = basis @ w.astype(dtype, copy=False)
                w -= (coef @ basis).astype(np.float64, copy=False)
            if j + 1 == m:
                break
            b[j] = float(np.linalg.norm(w))
            if b[j] < 1e-10:
                k = j + 1
                break
            V[j + 1] = w / b[j]
        theta, U = eigh_tridiagonal(a[:k], b[: k - 1])
        all_nodes.append(theta)
        all_weights.append(U[0] ** 2 / n_probe)
    return np.concatenate(all_nodes), np.concatenate(all_weights)


def _extremes(S: sp.csr_matrix, seed: int) -> dict[str, float]:
    n = S.shape[0]
    v0 = np.random.default_rng(seed).standard_normal(n)
    out = {}
    try:
        top = eigsh(S, k=2, which="LA", v0=v0, tol=1e-6, return_eigenvectors=False)
        top = np.sort(top)
        out["lambda_max"], out["lambda_2"] = float(top[1]), float(top[0])
    except ArpackNoConvergence as exc:
        ev = np.sort(exc.eigenvalues) if len(exc.eigenvalues) else np.array([np.nan, np.nan])
        logger.warning("spectrum: Lanczos for the largest eigenvalues did not converge")
        out["lambda_max"], out["lambda_2"] = float(ev[-1]), float(ev[0])
    try:
        low = eigsh(S, k=1, which="SA", v0=v0, tol=1e-6, return_eigenvectors=False)
        out["lambda_min"] = float(low[0])
    except ArpackNoConvergence as exc:
        logger.warning("spectrum: Lanczos for the smallest eigenvalue did not converge")
        out["lambda_min"] = float(exc.eigenvalues[0]) if len(exc.eigenvalues) else float("nan")
    return out
