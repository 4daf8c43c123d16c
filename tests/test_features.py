"""Label-free views: random-kernel and plain features, PCA, and the graphs built from them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from speler.config import Config, ViewsConfig, apply_overrides
from speler.errors import ConfigError, DataFormatError
from speler.features import (
    RocketTransform, _as_series, _kernels, _ppv, label_free_views, pca, plain_view, rocket_view,
)
from speler.graph.knn import affinity, build_knn, combine_affinities, strongest_neighbours
from speler.graph.propagate import propagate
from factories import make_series_set, make_skeleton_set


def _frequencies(n_per: int = 20, frames: int = 64, seed: int = 0):
    """Two-channel series of three classes that differ only in frequency, with random phase,
    amplitude and offset: the plain view cannot line them up, a convolution can."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    t = np.arange(frames)[None, :]
    freq = np.array([0.04, 0.09, 0.16])[y][:, None]
    phase = rng.uniform(0, 2 * np.pi, size=(len(y), 1))
    amp = rng.uniform(0.5, 2.0, size=(len(y), 1))
    s = amp * np.sin(2 * np.pi * freq * t + phase) + rng.normal(0, 3.0, size=(len(y), 1))
    x = np.stack([s, np.roll(s, 3, axis=1)], axis=1) + 0.1 * rng.normal(size=(len(y), 2, frames))
    return x[..., None, None].astype(np.float32), y


def test_kernels_are_the_84_zero_sum_choices_of_three_taps():
    w = _kernels()
    assert w.shape == (84, 9)
    assert np.allclose(w.sum(1).numpy(), 0.0)
    assert ((w == 2).sum(1) == 3).all() and ((w == -1).sum(1) == 6).all()
    assert len({tuple(r) for r in w.tolist()}) == 84


def test_rocket_features_are_proportions_and_deterministic():
    x, _ = _frequencies()
    series = _as_series(x)
    a = RocketTransform(series, num_features=840, seed=3).transform(series)
    b = RocketTransform(series, num_features=840, seed=3).transform(series)
    c = RocketTransform(series, num_features=840, seed=4).transform(series)
    assert a.shape[0] == len(x) and a.shape[1] >= 840 * 0.9
    assert (a >= 0).all() and (a <= 1).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ppv_by_sorting_counts_exactly_what_comparing_every_pair_counts():
    import torch

    g = torch.Generator().manual_seed(0)
    for t, nf in [(1, 1), (9, 3), (48, 41), (64, 7)]:
        conv = torch.round(4 * torch.randn(5, 84, t, generator=g)) / 4  # many ties
        valid = torch.rand(84, t, generator=g) > 0.3
        valid[:, 0] = True
        biases = torch.round(4 * torch.randn(84, nf, generator=g)) / 4
        biases[:, 0] = conv[0, :, -1]  # a bias equal to a response value
        pairs = (conv[:, :, None, :] > biases[None, :, :, None]) & valid[None, :, None, :]
        want = pairs.sum(-1).float() / valid.sum(-1)[None, :, None]
        got = _ppv(conv, valid, biases)
        assert got.dtype == torch.float32 and torch.equal(got, want), (t, nf)
        assert 0.0 < float(want.mean()) < 1.0  # the case counts something and not everything


def test_rocket_view_separates_what_plain_features_cannot():
    x, y = _frequencies()
    labels = np.full(len(y), -1)
    labels[[0, 20, 40]] = [0, 1, 2]  # one label per class
    acc = {}
    for name, view in (("plain", plain_view(x)), ("rocket", rocket_view(x, num_features=2000))):
        r = propagate(affinity(build_knn(view, k=8)), labels, num_classes=3)
        acc[name] = float((r.labels == y).mean())
    assert acc["rocket"] >= 0.9, acc
    assert acc["rocket"] > acc["plain"] + 0.2, acc


def test_views_of_skeletons_and_series_are_unit_rows():
    for ds in (make_skeleton_set(), make_series_set()):
        views = label_free_views(ds.x, dim=16, rocket_features=500)
        assert set(views) == {"plain", "rocket", "rocket_diff"}
        for v in views.values():
            assert v.dtype == np.float32 and v.shape[0] == ds.n and v.shape[1] <= 16
            np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_pca_matches_a_reference_projection():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 30)) @ rng.normal(size=(30, 40)) + 5.0
    p = pca(x, 10)
    z = (x - x.mean(0)) / x.std(0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    ref = u[:, :10] * s[:10]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    # components are defined up to sign; the cosine similarities between samples are not
    np.testing.assert_allclose(p @ p.T, ref @ ref.T, atol=1e-5)


def test_randomised_pca_of_many_samples_agrees_with_the_exact_one():
    rng = np.random.default_rng(1)
    n = 4_200  # above the exact-PCA size, so the randomised path runs
    x = rng.normal(size=(n, 8)) @ rng.normal(size=(8, 50)) + 0.01 * rng.normal(size=(n, 50))
    p = pca(x, 8)
    z = (x - x.mean(0)) / x.std(0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    ref = u[:, :8] * s[:8]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    sub = rng.choice(n, 300, replace=False)
    np.testing.assert_allclose(p[sub] @ p[sub].T, ref[sub] @ ref[sub].T, atol=1e-3)


def test_constant_data_gives_a_finite_view():
    x = np.ones((5, 3, 8, 1, 1), dtype=np.float32)
    v = plain_view(x)
    assert np.isfinite(v).all()


def test_bad_input_names_the_sample():
    x, _ = _frequencies(n_per=3)
    x[4, 0, 5] = np.nan
    with pytest.raises(DataFormatError, match="sample 4 has non-finite"):
        rocket_view(x)
    with pytest.raises(DataFormatError, match=r"\(N, C, T, V, M\)"):
        plain_view(x[:, :, :, 0, 0])
    with pytest.raises(ConfigError, match="unknown label-free view 'fancy'"):
        label_free_views(x, views=("fancy",))


def test_difference_view_differs_from_rocket_and_is_left_out_of_single_frames(caplog):
    ds = make_series_set()
    views = label_free_views(ds.x, dim=16, rocket_features=500, views=("rocket", "rocket_diff"))
    assert not np.allclose(views["rocket"], views["rocket_diff"])
    # a constant offset per sample moves the raw series, not its differences
    shifted = ds.x + np.arange(ds.n, dtype=np.float32)[:, None, None, None, None]
    again = label_free_views(shifted, dim=16, rocket_features=500, views=("rocket_diff",))
    np.testing.assert_allclose(again["rocket_diff"], views["rocket_diff"], atol=1e-4)
    single = ds.x[:, :, :1]
    with caplog.at_level("WARNING"):
        out = label_free_views(single, dim=8, rocket_features=200)
    assert set(out) == {"plain", "rocket"} and "rocket_diff left out" in caplog.text
    with pytest.raises(DataFormatError, match=r"rocket_diff view: expected x of shape"):
        label_free_views(ds.x[:, :, 0, 0, 0], views=("rocket_diff",))  # not (N, C, T, V, M)


def test_views_config_is_checked_when_built():
    with pytest.raises(ConfigError, match=r"views.network must be 'auto', 'always' or 'never', got 'maybe'"):
        ViewsConfig(network="maybe")
    with pytest.raises(ConfigError, match="views.plain_weight must be >= 0"):
        apply_overrides(Config(), ["views.plain_weight=-1"])
    with pytest.raises(ConfigError, match="views.rocket_weight"):
        ViewsConfig(plain_weight=0.0, rocket_weight=0.0, rocket_diff_weight=0.0)
    assert apply_overrides(Config(), ["views.network=never"]).views.network == "never"
    assert ViewsConfig().floor_weights == pytest.approx(
        {"plain": 0.25 / 1.75, "rocket": 1 / 1.75, "rocket_diff": 0.5 / 1.75})
    assert ViewsConfig(plain_weight=0.0, rocket_diff_weight=0.0).floor_weights == {"rocket": 1.0}
    with pytest.raises(ConfigError, match="views.rocket_diff_weight must be >= 0"):
        ViewsConfig(rocket_diff_weight=-0.5)


def _ring(n: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    a = sp.csr_matrix((rng.uniform(0.1, 2.0, n), (rows, (rows + 1) % n)), shape=(n, n))
    return (a + a.T).tocsr()


def test_combine_affinities_is_the_weighted_mean_of_normalised_graphs():
    W1, W2 = _ring(12, 0), _ring(12, 1) * 50.0 + sp.eye(12) * 0  # very different scales

    def norm(W):
        d = np.asarray(W.sum(1)).ravel()
        return np.diag(d ** -0.5) @ W.toarray() @ np.diag(d ** -0.5)

    got = combine_affinities([(W1, 1.0), (W2, 3.0)]).toarray()
    np.testing.assert_allclose(got, (norm(W1) + 3 * norm(W2)) / 4, rtol=1e-5)
    np.testing.assert_allclose(got, got.T)
    assert np.allclose(np.diag(got), 0)
    with pytest.raises(DataFormatError, match="same samples"):
        combine_affinities([(W1, 1.0), (_ring(5, 0), 1.0)])
    with pytest.raises(ConfigError, match="positive"):
        combine_affinities([(W1, 0.0)])


def test_strongest_neighbours_are_the_top_edges_of_each_row():
    rng = np.random.default_rng(2)
    dense = rng.uniform(0, 1, size=(30, 30)) * (rng.uniform(size=(30, 30)) < 0.3)
    dense = dense + dense.T
    np.fill_diagonal(dense, 0)
    dense[7] = 0
    dense[:, 7] = 0  # an isolated sample
    g = strongest_neighbours(sp.csr_matrix(dense), 3)
    for i in range(30):
        order = np.argsort(-dense[i], kind="stable")
        want = [j for j in order[:3] if dense[i, j] > 0]
        assert g.indices[i, :len(want)].tolist() == want
        assert (g.indices[i, len(want):] == -1).all()
    assert (g.indices[7] == -1).all() and (g.sims[7] == 0).all()
