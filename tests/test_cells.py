"""The inverted-cell index (speler.graph.cells): exact within its cells, recall as promised."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from speler.config import GraphConfig
from speler.errors import ConfigError
from speler.graph import cells
from speler.graph.cells import CellIndex, nprobe_for_recall
from speler.graph.knn import _torch_search, build_knn


def _unit_clusters(n: int, d: int, seed: int = 0, centers: int = 12, noise: float = 0.6):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, d)) * 2
    x = means[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(x: np.ndarray, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ x.astype(np.float64).T
    i = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(s, i, axis=1), i


def _own_probed(index: CellIndex, q: np.ndarray, p: int) -> np.ndarray:
    """For each query, a boolean (n,) of the points in its probed cells, in sample order."""
    import torch

    slots = index.probes(torch.from_numpy(q), p).numpy()
    cell_of = index.cell_of.numpy()
    return np.stack([np.isin(cell_of, row) for row in slots])


@pytest.mark.parametrize("dim", [0, 6])
def test_search_is_exact_within_the_probed_cells(dim):
    x = _unit_clusters(3000, 16)
    index = CellIndex(x, cells=40, dim=dim, seed=3, nprobe=5)
    q = _unit_clusters(300, 16, seed=9)  # queries that are not indexed points
    sims, ids = index.search(q, 7)
    probed = _own_probed(index, q, 5)
    s = q.astype(np.float64) @ x.astype(np.float64).T
    s[~probed] = -np.inf  # brute force over exactly the probed cells
    ref_i = np.argsort(-s, axis=1, kind="stable")[:, :7]
    ref_s = np.take_along_axis(s, ref_i, axis=1)
    assert sims.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(sims, ref_s, atol=2e-6)
    # the same neighbours, up to the order of equal similarities
    assert np.allclose(np.take_along_axis(s, ids, axis=1), ref_s, atol=2e-6)
    assert (np.diff(sims, axis=1) <= 1e-7).all()  # best first


def test_probing_every_cell_is_exact_search_and_indexed_search_matches_search():
    x = _unit_clusters(2000, 12, seed=1)
    index = CellIndex(x, cells=25, seed=0, nprobe=25)
    ref_s, ref_i = _brute(x, x, 11)
    sims, ids = index.search_indexed(11)
    np.testing.assert_allclose(sims, ref_s, atol=2e-6)
    assert (np.sort(ids, axis=1) == np.sort(ref_i, axis=1)).mean() > 0.999  # ties aside
    s2, i2 = index.search(x, 11)  # the same queries, not known to be indexed
    np.testing.assert_allclose(s2, sims, atol=1e-6)
    assert (np.sort(i2, axis=1) == np.sort(ids, axis=1)).mean() > 0.999


def test_cells_with_fewer_points_than_asked_fill_with_minus_one():
    x = _unit_clusters(60, 4, seed=2, centers=3)
    index = CellIndex(x, cells=30, seed=0, nprobe=1)
    sims, ids = index.search_indexed(10)
    small = index.counts.numpy()[index.cell_of.numpy()] < 10
    assert small.any()
    assert (ids[small] == -1).any() and np.isneginf(sims[ids == -1]).all()
    found = ids >= 0
    assert np.allclose(np.einsum("nd,nkd->nk", x, x[np.where(found, ids, 0)])[found], sims[found],
                       atol=1e-6)


def test_nprobe_for_recall_is_the_fewest_cells_and_its_recall_is_exact():
    x = _unit_clusters(5000, 24, seed=4, noise=1.0)
    index = CellIndex(x, cells=64, dim=8, seed=0)
    queries = np.sort(np.random.default_rng(7).choice(5000, 400, replace=False))
    p, reached = nprobe_for_recall(index, x, queries, 10, 0.9, 64)
    assert 1 < p < 64 and reached >= 0.9
    index.nprobe = p
    sims, ids = index.search(x[queries], 11, own=index.cell_of.numpy()[queries])
    _, ref_i = _torch_search(x, 11, "cpu", None, queries=x[queries])  # column 0: itself
    found = np.mean([len(set(ids[j]) & set(ref_i[j, 1:])) / 10 for j in range(len(queries))])
    assert found == pytest.approx(reached, abs=1e-9)  # the promised recall, exactly
    _, fewer = nprobe_for_recall(index, x, queries, 10, 1.0 + 1e-9, p - 1)
    assert fewer < 0.9  # one cell fewer misses the target
    p_cap, short = nprobe_for_recall(index, x, queries, 10, 1.0 + 1e-9, 3)
    assert p_cap == 3 and short < 1.0


def test_exact_search_of_other_queries_equals_brute_force():
    x = _unit_clusters(30_000, 8, seed=5)
    q = x[::10]  # 3,000 queries: two blocks of query rows against all 30,000 rows
    s, i = _torch_search(x, 6, "cpu", None, queries=q)
    assert s.shape == (3000, 6) and i.dtype == np.int64
    for lo in range(0, 3000, 500):
        ref_s, _ = _brute(x, q[lo:lo + 500], 6)
        np.testing.assert_allclose(s[lo:lo + 500], ref_s, atol=2e-6)
    assert (i[:, 0] == np.arange(0, 30_000, 10)).mean() > 0.999  # each query finds itself


def test_build_knn_chooses_nprobe_for_the_target_and_reports_a_recall_near_it(caplog):
    x = _unit_clusters(6000, 32, seed=6, centers=30, noise=1.2)
    cfg = GraphConfig(index="ivf", pca_dim=12, use_gpu=False, recall_queries=500,
                      target_recall=0.95)
    with caplog.at_level(logging.INFO, logger="speler.graph.knn"):
        g = build_knn(x, config=cfg, k=10)
    assert g.method == "ivf-pca"
    assert "cells probed, recall" in caplog.text
    ref_s, _ = _brute(x, x, 11)
    kth = ref_s[:, -1:] - 1e-5  # column 0 is the sample itself
    true_recall = float(((g.sims >= kth) & (g.indices >= 0)).mean())
    assert true_recall >= 0.93 and abs(true_recall - g.recall) < 0.02
    fixed = build_knn(x, config=GraphConfig(index="ivf", pca_dim=12, use_gpu=False, nprobe=1,
                                            recall_queries=500), k=10)
    assert fixed.recall < g.recall - 0.1  # one cell is far from enough here


def test_a_target_out_of_reach_warns_and_probes_max_nprobe(caplog):
    x = _unit_clusters(3000, 32, seed=8, noise=3.0)  # nearly uniform: cells help little
    cfg = GraphConfig(index="ivf", pca_dim=0, use_gpu=False, recall_queries=200,
                      target_recall=0.999, max_nprobe=2)
    with caplog.at_level(logging.WARNING, logger="speler.graph.knn"):
        g = build_knn(x, config=cfg, k=10)
    assert "graph.max_nprobe" in caplog.text and g.recall < 0.999


@pytest.mark.parametrize("key,value,message", [
    ("nprobe", -1, r"graph.nprobe must be >= 0"),
    ("target_recall", 0.0, r"graph.target_recall must be in \(0, 1\]"),
    ("target_recall", float("nan"), r"graph.target_recall must be in \(0, 1\]"),
    ("max_nprobe", 0, r"graph.max_nprobe must be >= 1"),
])
def test_bad_probe_settings_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        GraphConfig(**{key: value})


def test_the_bound_rounds_keep_every_candidate_that_can_reach_the_top():
    """Few points per cell and a small buffer force the bound's early merges: still exact."""
    x = _unit_clusters(1500, 10, seed=11, noise=2.0)
    index = CellIndex(x, cells=150, seed=0, nprobe=40)
    old = cells._BUFFER
    cells._BUFFER = 3
    try:
        sims, ids = index.search(x[:200], 15)
    finally:
        cells._BUFFER = old
    probed = _own_probed(index, x[:200], 40)
    s = x[:200].astype(np.float64) @ x.astype(np.float64).T
    s[~probed] = -np.inf
    ref = -np.sort(-s, axis=1)[:, :15]
    np.testing.assert_allclose(sims, ref, atol=2e-6)


def test_cells_no_point_falls_in_are_dropped_and_zero_rows_are_searched():
    """Zero rows make a zero centroid that no point chooses; such cells must not be probed."""
    rng = np.random.default_rng(12)
    x = np.vstack([np.zeros((20, 8)), rng.standard_normal((280, 8))]).astype(np.float32)
    g = build_knn(x, config=GraphConfig(index="ivf", use_gpu=False, recall_queries=300), k=5)
    assert g.method == "ivf" and (g.indices >= 0).all() and g.recall > 0.9
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = CellIndex(xn, cells=60, seed=0)
    assert index.cells < 60 and (index.counts > 0).all()
    assert int(index.counts.sum()) == 300 and index.cell_of.max() < index.cells


def test_queries_searched_in_blocks_give_the_same_lists_and_report_progress(monkeypatch):
    x = _unit_clusters(1200, 10, seed=13)
    index = CellIndex(x, cells=30, seed=0, nprobe=6)
    whole_s, whole_i = index.search_indexed(9)
    monkeypatch.setattr(cells, "_QUERY_ROWS", 250)  # 5 blocks, the last one short
    calls = []
    s, i = index.search_indexed(9, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(250, 1200), (500, 1200), (750, 1200), (1000, 1200), (1200, 1200)]
    np.testing.assert_allclose(s, whole_s, atol=1e-6)
    assert (np.sort(i, axis=1) == np.sort(whole_i, axis=1)).mean() > 0.999
