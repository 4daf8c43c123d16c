"""Spectrum of the propagation operator: SLQ against eigvalsh, extremes, before / after balance."""

from __future__ import annotations

import numpy as np
import pytest

from speler.config import GraphConfig
from speler.errors import ConfigError
from speler.graph.knn import affinity, build_knn
from speler.graph.propagate import normalized_operator, spectral_balance
from speler.graph.spectrum import spectrum, spectrum_before_after


def _graph(n=500, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [250, 120, 70, 40, 20]
    y = np.repeat(np.arange(5), sizes)[:n]
    x = rng.standard_normal((5, 12))[y] * 1.2 + rng.standard_normal((n, 12))
    W = affinity(build_knn(x, config=GraphConfig(use_gpu=False), k=8))
    labels = np.full(n, -1)
    for c in range(5):  # labels in proportion to the classes (as the balance by labels expects)
        members = np.flatnonzero(y == c)
        labels[members[:max(1, len(members) // 16)]] = c
    return W, labels


def test_slq_density_matches_eigvalsh():
    W, _ = _graph()
    exact = spectrum(W, bandwidth=0.04)
    slq = spectrum(W, exact_max_n=0, n_probe=60, steps=60, bandwidth=0.04, seed=1)
    assert exact.method == "exact" and slq.method == "slq" and slq.eigenvalues is None
    lam = np.linalg.eigvalsh(normalized_operator(W).toarray().astype(np.float64))
    np.testing.assert_allclose(exact.eigenvalues, lam, atol=1e-6)
    dx = exact.grid[1] - exact.grid[0]
    assert exact.density.sum() * dx == pytest.approx(1.0, abs=0.02)
    assert slq.density.sum() * dx == pytest.approx(1.0, abs=0.02)
    assert np.abs(exact.density - slq.density).sum() * dx < 0.08  # L1 distance of two densities
    # share of the spectrum below 0 and the extremes by Lanczos agree with the exact ones
    assert slq.extremes["mass_below_0"] == pytest.approx(exact.extremes["mass_below_0"], abs=0.03)
    assert slq.extremes["lambda_min"] == pytest.approx(lam[0], abs=1e-4)
    assert slq.extremes["lambda_max"] == pytest.approx(lam[-1], abs=1e-4)
    assert -1 - 1e-9 <= lam[0] and lam[-1] <= 1 + 1e-9


def test_before_after_uses_the_balance_of_propagate():
    W, labels = _graph(seed=2)
    before, after = spectrum_before_after(W, labels, num_classes=5, bandwidth=0.05)
    assert not before.balanced and after.balanced and before.n == after.n == 500
    w, _ = spectral_balance(W, labels, num_classes=5)
    lam = np.linalg.eigvalsh(normalized_operator(W, w).toarray().astype(np.float64))
    np.testing.assert_allclose(after.eigenvalues, lam, atol=1e-6)
    assert not np.allclose(before.eigenvalues, after.eigenvalues, atol=1e-4)
    # a uniform prior makes the balance a no-op
    flat_before, flat_after = spectrum_before_after(W, labels, num_classes=5, prior=np.ones(5))
    np.testing.assert_allclose(flat_before.eigenvalues, flat_after.eigenvalues, atol=1e-6)


def test_bad_settings():
    W, _ = _graph(n=60)
    with pytest.raises(ConfigError, match="n_probe >= 1"):
        spectrum(W, n_probe=0)
